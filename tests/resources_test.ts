/**
 * Resources: no descriptor or memory growth in either program across 1,000 tunnels (each
 * program holding its one client connection and nothing more), bounded memory when one end of a
 * tunnel stops reading while the other writes 1 GiB, bounded memory when 800 users of a
 * streaming service stop reading at once, and a client that a hostile server cannot make open
 * connections without limit.
 */
import assert from "node:assert/strict";
import {
  clientToml,
  connectUser,
  DEADLINE_MS,
  Fixture,
  Program,
  Scope,
  waitUntil,
} from "./helpers.ts";
import { CERT_FILES } from "../src/certs.ts";
import {
  encodeOpen,
  FramedStream,
  type FrameKind,
  FrameParser,
  FrameType,
  muxFrame,
  NONCE_BYTES,
} from "../src/protocol.ts";
import { ConnStream } from "../src/transport.ts";
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

/** Descriptors allowed above the start after 1,000 tunnels. */
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
    // Every tunnel is a stream on the client's one connection: no pool of connections to
    // the communication port in either program, whatever the demand.
    const measure = (program: Program) => {
      const { fds, rss } = procStats(program.pid);
      return { fds, rss, links: establishedWith(program.pid, env.communicationPort) };
    };
    // Warm up at the same concurrency: code compiled, heap sized.
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
        () => now().fds <= start.fds + FD_SLACK,
        () =>
          `${name}'s descriptors to return to ${start.fds} (+${FD_SLACK}): before ` +
          `${JSON.stringify(start)}, now ${JSON.stringify(now())}`,
        10_000,
      );
      const end = now();
      assert.equal(
        end.links,
        1,
        `${name} holds ${end.links} connections to the communication port`,
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

/**
 * A local service that streams without end to each connection (16 KiB of zeros at a time) and
 * echoes what it reads into that stream as soon as it can, so a user who reads can time a round
 * trip through the flood.
 */
function startStreamer(): {
  port: number;
  readonly live: number;
  readonly written: number;
  close(): void;
} {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns = new Set<Deno.Conn>();
  let written = 0;
  const filler = new Uint8Array(16 * 1024);
  const serve = async (conn: Deno.Conn) => {
    const echoes: Uint8Array[] = [];
    const reading = (async () => {
      const buf = new Uint8Array(1024);
      for (;;) {
        const n = await conn.read(buf);
        if (n === null) break;
        echoes.push(buf.slice(0, n));
      }
    })().catch(() => {});
    try {
      for (;;) written += await conn.write(echoes.shift() ?? filler);
    } catch {
      // The tunnel was closed.
    } finally {
      conns.delete(conn);
      try {
        conn.close();
      } catch {
        // Already closed.
      }
      await reading;
    }
  };
  (async () => {
    for await (const conn of listener) {
      conns.add(conn);
      (conn as Deno.TcpConn).setNoDelay(true);
      serve(conn);
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    get live() {
      return conns.size;
    },
    get written() {
      return written;
    },
    close() {
      listener.close();
      for (const conn of conns) {
        try {
          conn.close();
        } catch {
          // Already closed.
        }
      }
    },
  };
}

/**
 * Connects a new user to a streaming service, sends a marker byte and reads the stream until
 * the marker comes back; returns the time it took, or throws after `timeoutMs`.
 */
async function markerRoundTrip(port: number, marker: number, timeoutMs: number): Promise<number> {
  const started = performance.now();
  const user = await connectUser(port);
  const buf = new Uint8Array(256 * 1024);
  const timer = setTimeout(() => user.close(), timeoutMs);
  try {
    await user.write(new Uint8Array([marker]));
    for (;;) {
      const n = await user.read(buf);
      if (n === null) throw new Error("the stream ended");
      if (buf.subarray(0, n).includes(marker)) return performance.now() - started;
    }
  } catch (err) {
    throw new Error(`no round trip within ${timeoutMs} ms: ${(err as Error).message}`);
  } finally {
    clearTimeout(timer);
    try {
      user.close();
    } catch {
      // Closed by the deadline.
    }
  }
}

/** CPU time (user + system) that process `pid` has used so far, in clock ticks. */
function cpuTicks(pid: number): number {
  const fields = Deno.readTextFileSync(`/proc/${pid}/stat`).split(") ")[1].split(" ");
  return Number(fields[11]) + Number(fields[12]);
}

// Issue 11.4, "Slow readers pin memory". The bound on what the server holds for a user who does
// not read comes from the streams' credit (each holds at most its window), not from reaching
// into the runtime's node:tls internals to pause sockets (issue 11.15): the server no longer
// does that, and this test proves the bound on every run.
Deno.test("slow readers: 800 users of a streaming service who never read do not pin the server's memory", async () => {
  const env = await setup({ interval: 5 });
  const streamer = startStreamer();
  env.scope.defer(() => streamer.close());
  const users: Deno.Conn[] = [];
  env.scope.defer(() => users.forEach((u) => u.close()));
  try {
    const service = env.clients[0].servicePort;
    await env.writeServer({ services: [{ port: service, name: "a", targetPort: streamer.port }] });
    const server = await env.startServer();
    const client = await env.startClient();
    // Normal users, who read: warm up, and a baseline with the code paths in use.
    for (let i = 1; i <= 3; i++) await markerRoundTrip(service, i, 10_000);
    const baseline = procStats(server.pid).rss;
    let peak = baseline;
    const sample = () => peak = Math.max(peak, procStats(server.pid).rss);

    // 800 users arrive and never read a byte.
    for (let i = 0; i < 800; i += 50) {
      const batch = await Promise.all(Array.from({ length: 50 }, () => connectUser(service)));
      users.push(...batch);
      sample();
    }
    await waitUntil(() => streamer.live === 800, () => `800 streams, got ${streamer.live}`);
    const report = () =>
      `server RSS ${mib(baseline)} before, peak ${mib(peak)} with 800 stalled readers ` +
      `(the service wrote ${mib(streamer.written)})`;
    // While their streams fill up, a new user of the same service is served.
    const filling = await markerRoundTrip(service, 0x41, 30_000);
    // Wait until every stalled stream is held back: the service can write no more, and both
    // programs are idle (what was in flight has settled). Sampling all along.
    let last = -1;
    let still = performance.now();
    let ticks = [cpuTicks(server.pid) + cpuTicks(client.pid), performance.now()];
    await waitUntil(
      () => {
        sample();
        if (streamer.written !== last) {
          last = streamer.written;
          still = performance.now();
        }
        const now = [cpuTicks(server.pid) + cpuTicks(client.pid), performance.now()];
        if (now[1] - ticks[1] < 1000) return false;
        const busy = (now[0] - ticks[0]) / ((now[1] - ticks[1]) / 10); // ticks are 10 ms
        ticks = now;
        return performance.now() - still > 2000 && busy < 0.05;
      },
      () => `the service to be held back and the programs idle; ${report()}`,
      180_000,
    );
    // Then a normal user of the same service is served at once.
    let ms = 0;
    for (let i = 0; i < 3; i++) ms = Math.max(ms, await markerRoundTrip(service, 0x42 + i, 10_000));
    sample();
    assert.ok(peak - baseline <= 256 * 1024 * 1024, report());
    assert.ok(ms < 2000, `a round trip took ${ms.toFixed(0)} ms; ${report()}`);
    assert.ok(filling < 30_000, `${filling.toFixed(0)} ms while the streams filled`);

    // They leave: the server lets go, and its memory does not keep growing.
    for (const user of users.splice(0)) user.close();
    await waitUntil(() => streamer.live === 0, () => `the 800 streams to close (${streamer.live})`);
    const after = procStats(server.pid).rss;
    let most = after;
    for (let i = 0; i < 10; i++) {
      await markerRoundTrip(service, 0x50 + i, 10_000);
      most = Math.max(most, procStats(server.pid).rss);
    }
    assert.ok(
      most - after < 32 * 1024 * 1024,
      `server RSS grew from ${mib(after)} to ${mib(most)} after the stalled users left`,
    );
    console.log(
      `slow readers: ${report()}; a new user waited ${filling.toFixed(0)} ms while ` +
        `their streams filled, ${ms.toFixed(0)} ms once they had; after they left ${mib(after)}`,
    );
  } finally {
    await env.scope.close();
  }
});

/**
 * A fake NATadm server on 127.0.0.1 with the fixture's certificate: it accepts the real
 * client's hello and any signature, says welcome, and hands the connection to `flood`.
 */
async function fakeServer(
  fixture: Fixture,
  flood: (stream: ConnStream) => Promise<void>,
): Promise<{ port: number; done: Promise<void>; close(): void }> {
  const listener = Deno.listenTls({
    hostname: "127.0.0.1",
    port: 0,
    cert: await Deno.readTextFile(fixture.path(CERT_FILES.cert)),
    key: await Deno.readTextFile(fixture.path(CERT_FILES.key)),
  });
  const streams = new Set<ConnStream>();
  const done = (async () => {
    const conn = await listener.accept();
    const stream = new ConnStream(conn);
    streams.add(stream);
    const framed = new FramedStream(stream);
    const hello = await framed.read(DEADLINE_MS);
    assert.equal(hello?.type, "hello");
    await framed.send({ type: "challenge", nonce: randomBytes(NONCE_BYTES).toBase64() });
    assert.equal((await framed.read(DEADLINE_MS))?.type, "auth");
    await framed.send({ type: "welcome", services: [], pending: 0 });
    await flood(stream);
  })();
  return {
    port: (listener.addr as Deno.NetAddr).port,
    done,
    close() {
      listener.close();
      for (const stream of streams) stream.close();
    },
  };
}

/** Reads mux frames from `stream` in the background, counting RESETs and their reasons. */
function countResets(stream: ConnStream): { resets: Map<number, string>; fins: Set<number> } {
  const resets = new Map<number, string>();
  const fins = new Set<number>();
  const decoder = new TextDecoder();
  const parser = new FrameParser((type, id, payload) => {
    if (type === FrameType.RESET) resets.set(id, decoder.decode(payload));
    if (type === FrameType.FIN) fins.add(id);
  });
  (async () => {
    const buf = new Uint8Array(64 * 1024);
    for (;;) {
      const n = await stream.read(buf);
      if (n === null) break;
      parser.push(buf.subarray(0, n), false);
    }
  })().catch(() => {});
  return { resets, fins };
}

/** `count` OPEN frames for streams `first`…, each followed by `then` (if any), as one buffer. */
function opens(first: number, count: number, port: number, then?: FrameKind): Uint8Array {
  const request = encodeOpen({ host: "127.0.0.1", port, user: "203.0.113.66:6666" });
  const one = muxFrame(FrameType.OPEN, 1, request).length + (then === undefined ? 0 : 9);
  const out = new Uint8Array(count * one);
  for (let i = 0; i < count; i++) {
    const open = muxFrame(FrameType.OPEN, first + i, request);
    out.set(open, i * one);
    if (then !== undefined) out.set(muxFrame(then, first + i), i * one + open.length);
  }
  return out;
}

// Issue 11.7, "A hostile server can make the client open connections without limit".
Deno.test("hostile server: thousands of OPENs leave the client within max_tunnels; the rest are reset", async () => {
  const scope = new Scope();
  try {
    const fixture = await Fixture.create();
    scope.defer(() => fixture.cleanup());
    const target = startTarget("echo"); // holds every connection open until it is closed
    scope.defer(() => target.close());
    const maxTunnels = 50;
    const total = 5000;
    let resets!: Map<number, string>;
    let fdsBefore = 0;
    let peakFds = 0;
    const victim: { client?: Program } = {};
    const fake = await fakeServer(fixture, async (stream) => {
      ({ resets } = countResets(stream));
      const client = await waitUntil(() => victim.client, "the client process");
      fdsBefore = procStats(client.pid).fds;
      for (let at = 1; at <= total; at += 500) {
        await stream.write(opens(at, 500, target.port));
        peakFds = Math.max(peakFds, procStats(client.pid).fds);
      }
    });
    scope.defer(() => fake.close());
    const identity = await fixture.identity("victim");
    const config = await fixture.write(
      "client.toml",
      clientToml({ identity, communicationPort: fake.port, interval: 60 }) +
        `max_tunnels = ${maxTunnels}\n`,
    );
    const client = victim.client = scope.track(new Program("client.ts", ["--config", config]));
    await client.waitFor(/connected to .* as/);
    await fake.done;
    await waitUntil(
      () => {
        peakFds = Math.max(peakFds, procStats(client.pid).fds);
        return resets.size >= total - maxTunnels;
      },
      () =>
        `${total - maxTunnels} resets, got ${resets?.size}; client:\n${client.lines.join("\n")}`,
    );
    await waitUntil(() => target.accepted >= maxTunnels, "the allowed tunnels to connect");
    peakFds = Math.max(peakFds, procStats(client.pid).fds);
    assert.equal(target.accepted, maxTunnels, "connections the client opened to its target");
    assert.equal(resets.size, total - maxTunnels);
    const reasons = new Set([...resets.values()].map((r) => r.replace(/\d+/g, "N")));
    for (const reason of reasons) assert.match(reason, /max_tunnels|too many tunnels/, reason);
    assert.ok(
      peakFds <= fdsBefore + maxTunnels + 5,
      `the client's descriptors went from ${fdsBefore} to ${peakFds} (max_tunnels ${maxTunnels})`,
    );
    assert.equal(client.exited, false);
  } finally {
    await scope.close();
  }
});

Deno.test("hostile server: OPENs that end at once are still held to the client's open rate", async () => {
  const scope = new Scope();
  try {
    const fixture = await Fixture.create();
    scope.defer(() => fixture.cleanup());
    const target = startTarget("echo"); // ends its side when the tunnel does
    scope.defer(() => target.close());
    const total = 8000;
    let resets!: Map<number, string>;
    let fins!: Set<number>;
    let started = 0;
    const fake = await fakeServer(fixture, async (stream) => {
      ({ resets, fins } = countResets(stream));
      started = performance.now();
      // Each stream is opened and ended at once, so none stays open: only the rate holds.
      for (let at = 1; at <= total; at += 500) {
        await stream.write(opens(at, 500, target.port, FrameType.FIN));
      }
    });
    scope.defer(() => fake.close());
    const identity = await fixture.identity("victim");
    // A rate well below what the client could open, so that the rate is what holds.
    const rate = 500;
    const config = await fixture.write(
      "client.toml",
      clientToml({ identity, communicationPort: fake.port, interval: 60 }) +
        `max_tunnel_rate = ${rate}\n`,
    );
    const client = scope.track(new Program("client.ts", ["--config", config]));
    await client.waitFor(/connected to .* as/);
    await fake.done;
    await waitUntil(
      () => resets.size + fins.size >= total,
      () => `an answer to all ${total} OPENs: ${resets.size} resets, ${fins.size} ends`,
      60_000,
    );
    const seconds = (performance.now() - started) / 1000;
    const allowed = rate + rate * seconds; // a burst of one second's worth, then the rate
    assert.ok(
      target.accepted <= allowed,
      `${target.accepted} connections in ${seconds.toFixed(1)} s; the rate allows ${allowed}`,
    );
    assert.ok(target.accepted >= rate * 0.9, `${target.accepted}`);
    const byRate = [...resets.values()].filter((r) => /max_tunnel_rate/.test(r)).length;
    assert.ok(byRate > 0, `no OPEN was reset for the rate: ${[...new Set(resets.values())]}`);
    assert.equal(client.exited, false);
  } finally {
    await scope.close();
  }
});
