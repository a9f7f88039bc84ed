/**
 * Resources: no descriptor or memory growth in either program across 1,000 tunnels, bounded
 * memory when one end of a tunnel stops reading while the other writes 1 GiB, and a standby
 * pool that shrinks back after a burst without dropping users.
 */
import assert from "node:assert/strict";
import { connectUser, type Program, waitUntil } from "./helpers.ts";
import { MAX_STANDBY_PER_CLIENT, STANDBY_CONNECTIONS, STANDBY_PING_MS } from "../src/protocol.ts";
import {
  establishedWith,
  exchange,
  mib,
  procStats,
  randomBytes,
  setup,
  startTarget,
} from "./reliability_helpers.ts";

/** Memory both programs may reach while a tunnel's reader stalls (1 GiB is on offer). */
const STALL_RSS_LIMIT = 150 * 1024 * 1024;

/** Memory growth allowed across 1,000 tunnels. */
const CYCLE_RSS_GROWTH = 30 * 1024 * 1024;

/** Descriptors (besides pooled connections) allowed above the start after 1,000 tunnels. */
const FD_SLACK = 3;

/** Waits until every tunnel `program` opened has closed again (by its log lines). */
async function tunnelsClosed(program: Program, timeoutMs = 15_000): Promise<void> {
  await waitUntil(
    () => program.count(/tunnel closed/) === program.count(/tunnel open/),
    () =>
      `every tunnel to close: ${program.count(/tunnel open/)} opened, ` +
      `${program.count(/tunnel closed/)} closed`,
    timeoutMs,
  );
}

/** Runs `total` user tunnels through `port`, `parallel` at a time, each a checked round trip. */
async function cycles(port: number, total: number, parallel: number): Promise<void> {
  let next = 0;
  const payload = randomBytes(1024);
  await Promise.all(Array.from({ length: parallel }, async () => {
    while (next < total) {
      next++;
      const user = await connectUser(port);
      try {
        const { received, ended } = await exchange(user, payload, { timeoutMs: 10_000 });
        assert.equal(ended, "complete", `tunnel ${next}: ${ended} after ${received.length} bytes`);
        assert.deepEqual(received, payload);
      } finally {
        try {
          user.close();
        } catch {
          // Closed by exchange after a failure.
        }
      }
    }
  }));
}

Deno.test("resources: no growth in descriptors or memory across 1,000 tunnels", async () => {
  const env = await setup({ interval: 5 });
  try {
    const port = env.clients[0].servicePort;
    const server = await env.startServer();
    const client = await env.startClient();
    const programs = { server, client };
    // Descriptors apart from the pool of idle connections to the communication port, which
    // grows with demand and shrinks slowly; the pool itself must stay within its bound.
    const measure = (program: Program) => {
      const { fds, rss } = procStats(program.pid);
      const pool = establishedWith(program.pid, env.communicationPort);
      return { fds, rss, pool, other: fds - pool };
    };
    // Warm up at the same concurrency: code compiled, heap sized, the pool grown.
    await cycles(port, 300, 8);
    await tunnelsClosed(server);
    await tunnelsClosed(client);
    const before = { server: measure(server), client: measure(client) };
    await cycles(port, 1000, 8);
    await tunnelsClosed(server);
    await tunnelsClosed(client);
    assert.equal(server.count(/tunnel closed/), 1300);
    for (const [name, program] of Object.entries(programs)) {
      const start = before[name as keyof typeof before];
      const now = () => measure(program);
      await waitUntil(
        () => now().other <= start.other + FD_SLACK,
        () =>
          `${name}'s descriptors (apart from pooled connections) to return to ` +
          `${start.other} (+${FD_SLACK}): before ${JSON.stringify(start)}, now ` +
          JSON.stringify(now()),
        10_000,
      );
      const end = now();
      assert.ok(
        end.pool <= MAX_STANDBY_PER_CLIENT + 1,
        `${name} holds ${end.pool} connections to the communication port`,
      );
      assert.ok(
        end.rss - start.rss < CYCLE_RSS_GROWTH,
        `${name}'s memory grew from ${mib(start.rss)} to ${mib(end.rss)} over 1,000 tunnels`,
      );
    }
  } finally {
    await env.scope.close();
  }
});

/**
 * Samples both programs' memory every 100 ms while `progress()` grows; stops once it has not
 * grown for 2 s (the writer is blocked) or after `maxMs`. Returns the peaks.
 */
async function sampleWhileWriting(
  programs: Program[],
  progress: () => number,
  maxMs = 10_000,
): Promise<{ peaks: number[]; blocked: boolean }> {
  const peaks = programs.map(() => 0);
  const start = performance.now();
  let last = -1;
  let lastChange = start;
  let blocked = false;
  while (performance.now() - start < maxMs) {
    programs.forEach((p, i) => peaks[i] = Math.max(peaks[i], procStats(p.pid).rss));
    const now = progress();
    if (now !== last) {
      last = now;
      lastChange = performance.now();
    } else if (performance.now() - lastChange > 2000) {
      blocked = true;
      break;
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return { peaks, blocked };
}

Deno.test("backpressure: a user writing 1 GiB to a target that never reads stays bounded", async () => {
  const env = await setup();
  const sink = startTarget("sink");
  env.scope.defer(() => sink.close());
  try {
    const service = env.clients[0].servicePort;
    await env.writeServer({
      services: [{ port: service, name: "a", targetPort: sink.port }],
    });
    const server = await env.startServer();
    const client = await env.startClient();
    const user = env.scope.closing(await connectUser(service));
    let written = 0;
    let writing = true;
    const chunk = new Uint8Array(256 * 1024).fill(0x5a);
    const writer = (async () => {
      while (writing && written < 1024 ** 3) written += await user.write(chunk);
    })();
    const { peaks, blocked } = await sampleWhileWriting([server, client], () => written);
    const report = `wrote ${mib(written)}; peak server ${mib(peaks[0])}, client ${mib(peaks[1])}`;
    assert.ok(peaks[0] < STALL_RSS_LIMIT, `server grew past the bound: ${report}`);
    assert.ok(peaks[1] < STALL_RSS_LIMIT, `client grew past the bound: ${report}`);
    assert.ok(blocked, `the writer was never held back: ${report}`);
    // Once the target reads again, everything written arrives and the tunnel ends cleanly.
    writing = false;
    sink.drain();
    await writer;
    await user.closeWrite();
    await waitUntil(
      () => sink.received === written && sink.live === 0,
      () => `the target to receive all ${written} bytes and close (got ${sink.received})`,
    );
    await tunnelsClosed(server);
  } finally {
    await env.scope.close();
  }
});

Deno.test("backpressure: a target writing 1 GiB to a user that never reads stays bounded", async () => {
  const env = await setup();
  const source = startTarget("source");
  env.scope.defer(() => source.close());
  try {
    const service = env.clients[0].servicePort;
    await env.writeServer({
      services: [{ port: service, name: "a", targetPort: source.port }],
    });
    const server = await env.startServer();
    const client = await env.startClient();
    const user = env.scope.closing(await connectUser(service));
    await waitUntil(() => source.written > 0, "the target to start writing");
    const { peaks, blocked } = await sampleWhileWriting(
      [server, client],
      () => source.written,
    );
    const report = `target wrote ${mib(source.written)}; peak server ${mib(peaks[0])}, ` +
      `client ${mib(peaks[1])}`;
    assert.ok(peaks[0] < STALL_RSS_LIMIT, `server grew past the bound: ${report}`);
    assert.ok(peaks[1] < STALL_RSS_LIMIT, `client grew past the bound: ${report}`);
    assert.ok(blocked, `the target was never held back: ${report}`);
    // The user leaves without reading: the tunnel is torn down as far as the target.
    user.close();
    await waitUntil(() => source.live === 0, "the target's connection to close", 10_000);
    await tunnelsClosed(server);
  } finally {
    await env.scope.close();
  }
});

Deno.test("standby pool: shrinking back after a burst drops no user", async () => {
  const env = await setup({ interval: 5 });
  try {
    const port = env.clients[0].servicePort;
    const server = await env.startServer();
    const client = await env.startClient();
    await cycles(port, 200, 12); // a burst: the client's pool of idle connections grows
    await tunnelsClosed(server);
    const grown = establishedWith(client.pid, env.communicationPort) - 1; // minus control
    assert.ok(grown > STANDBY_CONNECTIONS, `the pool did not grow (${grown})`);
    // Idle for a while, the server's pings let the client retire the connections it no
    // longer needs.
    await waitUntil(
      () => establishedWith(client.pid, env.communicationPort) <= STANDBY_CONNECTIONS + 1,
      "the client's pool to shrink back",
      STANDBY_PING_MS + 20_000,
    );
    // Every user after that is served: none is handed a connection the client retired.
    for (let i = 0; i < grown + STANDBY_CONNECTIONS; i++) {
      const user = await connectUser(port);
      try {
        const payload = randomBytes(1000);
        const { received, ended } = await exchange(user, payload, { timeoutMs: 10_000 });
        assert.equal(ended, "complete", `user ${i + 1} after the pool shrank: ${ended}`);
        assert.deepEqual(received, payload);
      } finally {
        try {
          user.close();
        } catch {
          // Closed by exchange after a failure.
        }
      }
    }
  } finally {
    await env.scope.close();
  }
});
