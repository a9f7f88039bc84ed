/**
 * The data path at scale, through real server and client processes: a burst of users at a
 * connected client is served in full, and a bulk tunnel does not starve another tunnel of the
 * same client. Speed targets live in `deno task bench`; these are behaviour with generous
 * guards.
 */
import assert from "node:assert/strict";
import {
  connectUser,
  DEADLINE_MS,
  echoSetup,
  firstDifference,
  randomBytes,
  readExactly,
  Scope,
  writeAll,
} from "./helpers.ts";

/** Users in the burst: all connected before any of them sends. */
const BURST = 1000;

/** Bytes each user of the burst echoes. */
const BURST_BYTES = 64 * 1024;

Deno.test("a burst of 1,000 users at a connected client is served, every byte exact", async () => {
  const env = await echoSetup({ extra: "max_pending_users = 16" });
  const scope = new Scope();
  try {
    const server = await scope.server(env.serverConfig);
    await scope.client(env.clientConfig);
    const users = await Promise.all(
      Array.from({ length: BURST }, async () => scope.closing(await connectUser(env.servicePort))),
    );
    // Every user is connected before any sends: the server must pair them all at once,
    // whatever max_pending_users says (it is for clients that are away).
    const results = await Promise.all(users.map(async (user) => {
      const payload = randomBytes(BURST_BYTES);
      try {
        const [, back] = await Promise.all([
          writeAll(user, payload),
          readExactly(user, payload.length, DEADLINE_MS * 3),
        ]);
        return firstDifference(back, payload) === -1;
      } catch {
        return false;
      }
    }));
    const served = results.filter(Boolean).length;
    assert.equal(served, BURST, `${served} of ${BURST} users were served byte-exact`);
    assert.equal(server.count(/max_pending_users/), 0, "users were turned away by the queue");
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("a bulk tunnel does not starve another tunnel of the same client (p99 round trip < 50 ms)", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  try {
    await scope.server(env.serverConfig);
    await scope.client(env.clientConfig);
    const bulk = scope.closing(await connectUser(env.servicePort));
    const interactive = scope.closing(await connectUser(env.servicePort));
    const one = new Uint8Array([42]);
    // Warm the interactive tunnel up before the load starts.
    await writeAll(interactive, one);
    await readExactly(interactive, 1);

    let running = true;
    const chunk = randomBytes(256 * 1024);
    let moved = 0;
    const writer = (async () => {
      while (running) await writeAll(bulk, chunk);
    })().catch(() => {});
    const reader = (async () => {
      const buf = new Uint8Array(256 * 1024);
      while (running) {
        const n = await bulk.read(buf);
        if (n === null) break;
        moved += n;
      }
    })().catch(() => {});
    // Measure only once the bulk transfer is in full flow.
    const flowing = Date.now() + DEADLINE_MS;
    while (moved < 64 * 1024 * 1024 && Date.now() < flowing) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    assert.ok(moved >= 64 * 1024 * 1024, `the bulk transfer moved only ${moved} bytes`);

    const samples: number[] = [];
    for (let i = 0; i < 300; i++) {
      const started = performance.now();
      await writeAll(interactive, one);
      await readExactly(interactive, 1);
      samples.push(performance.now() - started);
    }
    const during = moved;
    running = false;
    bulk.close();
    await Promise.all([writer, reader]);
    samples.sort((a, b) => a - b);
    const p99 = samples[Math.floor(samples.length * 0.99)];
    assert.ok(during > 64 * 1024 * 1024, "the bulk transfer stalled while we measured");
    assert.ok(p99 < 50, `interactive p99 ${p99.toFixed(1)} ms during a bulk transfer`);
  } finally {
    await scope.close();
    await env.cleanup();
  }
});
