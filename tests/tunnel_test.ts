import assert from "node:assert/strict";
import {
  connectUser,
  echoSetup,
  firstDifference,
  randomBytes,
  readExactly,
  readToEnd,
  Scope,
  waitUntil,
  writeAll,
} from "./helpers.ts";

Deno.test("a user's bytes come back through the tunnel from an echo service", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  try {
    const server = await scope.server(env.serverConfig);
    await scope.client(env.clientConfig);
    const user = scope.closing(await connectUser(env.servicePort));
    const message = new TextEncoder().encode("hello through NAT\n");
    await user.write(message);
    assert.deepEqual(await readExactly(user, message.length), message);
    user.close();
    await server.waitFor(/tunnel closed: user .* service \d+ .*18 bytes up, 18 bytes down/);
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("a user that half-closes still receives every byte of the reply", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  try {
    await scope.server(env.serverConfig);
    await scope.client(env.clientConfig);
    const user = scope.closing(await connectUser(env.servicePort));
    const payload = randomBytes(60_000);
    await writeAll(user, payload);
    await user.closeWrite();
    const back = await readToEnd(user);
    assert.equal(back.length, payload.length);
    assert.equal(firstDifference(back, payload), -1);
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("100 simultaneous users each get exactly their own bytes back", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  const USERS = 100, SIZE = 32 * 1024;
  try {
    const server = await scope.server(env.serverConfig);
    await scope.client(env.clientConfig);
    const payloads = Array.from({ length: USERS }, () => randomBytes(SIZE));
    const users = await Promise.all(
      payloads.map(async () => scope.closing(await connectUser(env.servicePort))),
    );
    const backs = await Promise.all(users.map(async (user, i) => {
      const [, back] = await Promise.all([writeAll(user, payloads[i]), readExactly(user, SIZE)]);
      return back;
    }));
    for (let i = 0; i < USERS; i++) {
      assert.equal(firstDifference(backs[i], payloads[i]), -1, `user ${i} got other bytes`);
    }
    for (const user of users) user.close();
    const closed = new RegExp(`tunnel closed: .*; ${SIZE} bytes up, ${SIZE} bytes down`);
    await waitUntil(
      () => server.count(closed) === USERS,
      () => `${USERS} tunnels closed, saw ${server.count(closed)}`,
    );
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("64 MiB each way arrive intact (SHA-256 equal) while both directions flow", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  const SIZE = 64 * 1024 * 1024, CHUNK = 1024 * 1024;
  try {
    const server = await scope.server(env.serverConfig);
    await scope.client(env.clientConfig);
    const user = scope.closing(await connectUser(env.servicePort));
    const sent = randomBytes(SIZE);
    // The echo sends everything back, so reading must run alongside writing or both stall.
    const reading = readExactly(user, SIZE, 120_000);
    for (let at = 0; at < SIZE; at += CHUNK) await writeAll(user, sent.subarray(at, at + CHUNK));
    await user.closeWrite();
    const received = await reading;
    assert.equal(await user.read(new Uint8Array(1)), null, "bytes after the echo's end");
    const [a, b] = await Promise.all([
      crypto.subtle.digest("SHA-256", sent),
      crypto.subtle.digest("SHA-256", received),
    ]);
    assert.equal(new Uint8Array(b).toHex(), new Uint8Array(a).toHex());
    await server.waitFor(new RegExp(`tunnel closed: .*; ${SIZE} bytes up, ${SIZE} bytes down`));
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("the first byte through a fresh tunnel comes back in under 20 ms", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  /** Connects a fresh user, sends one byte, and times until its echo arrives. */
  const firstByteMs = async (value: number): Promise<number> => {
    const started = performance.now();
    const user = scope.closing(await connectUser(env.servicePort));
    await user.write(new Uint8Array([value]));
    const [back] = await readExactly(user, 1);
    const ms = performance.now() - started;
    user.close();
    assert.equal(back, value);
    return ms;
  };
  try {
    await scope.server(env.serverConfig);
    await scope.client(env.clientConfig);
    for (let i = 0; i < 3; i++) await firstByteMs(i); // warm up: JIT, caches
    const times: number[] = [];
    for (let i = 0; i < 20; i++) times.push(await firstByteMs(100 + i));
    times.sort((x, y) => x - y);
    const median = (times[9] + times[10]) / 2;
    assert.ok(
      median < 20,
      `median first byte ${median.toFixed(1)} ms; all: ${times.map((t) => t.toFixed(1))}`,
    );
  } finally {
    await scope.close();
    await env.cleanup();
  }
});
