/**
 * Slowloris: a thousand connections to the communication port that hold a slot and say
 * nothing. Legitimate clients must still get in at once, and the server must drop every idle
 * connection when its timer runs out: the TLS handshake timer (HANDSHAKE_TIMEOUT_MS) for those
 * that never finish it, the first-frame timer (AUTH_STEP_TIMEOUT_MS) for those that do or send
 * only part of a frame. Logged-in clients that go silent, whole or in the middle of a mux frame,
 * are dropped after three heartbeat intervals; one that keeps talking stays.
 */
import assert from "node:assert/strict";
import {
  AUTH_STEP_TIMEOUT_MS,
  encodeMessage,
  FrameType,
  HEARTBEAT_MISSES,
  muxFrame,
} from "../src/protocol.ts";
import { HANDSHAKE_TIMEOUT_MS } from "../src/transport.ts";
import {
  clientToml,
  Fixture,
  freePort,
  roundTrip,
  Scope,
  serverToml,
  sh,
  startClient,
  startEcho,
  waitUntil,
} from "./helpers.ts";
import { closedWithin, dial, helloFor, login } from "./wire.ts";

/** Connections of each kind; fewer if the fd limit is low (each side holds one fd each). */
async function perKind(): Promise<number> {
  const limit = Number((await sh("sh", ["-c", "ulimit -n"])).trim());
  return Number.isFinite(limit) ? Math.min(500, Math.floor((limit - 300) / 2)) : 500;
}

/** An idle connection: when it was opened, and when the server closed it. */
interface Idle {
  kind: string;
  opened: number;
  closed?: number;
  close(): void;
}

/** Watches `conn` until the server ends or resets it. */
function watch(kind: string, conn: Deno.Conn, opened: number): Idle {
  const idle: Idle = {
    kind,
    opened,
    close: () => {
      try {
        conn.close();
      } catch {
        // Already closed.
      }
    },
  };
  (async () => {
    const buf = new Uint8Array(1024);
    try {
      for (let i = 0; i < 64; i++) if (await conn.read(buf) === null) break;
    } catch {
      // A reset is a close too.
    }
    idle.closed ??= performance.now();
  })();
  return idle;
}

/** Runs `count` tasks, `width` at a time. */
async function inBatches(count: number, width: number, task: (i: number) => Promise<void>) {
  let next = 0;
  await Promise.all(
    Array.from({ length: width }, async () => {
      while (next < count) await task(next++);
    }),
  );
}

Deno.test("1,000 idle connections do not keep clients out, and each is dropped when its timer runs out", async () => {
  const scope = new Scope();
  const idle: Idle[] = [];
  scope.defer(() => idle.forEach((i) => i.close()));
  try {
    const n = await perKind();
    assert.ok(n >= 100, `the fd limit (ulimit -n) is too low for this test`);
    const fixture = await Fixture.create();
    scope.defer(() => fixture.cleanup());
    const first = await fixture.identity("foo bar");
    const late = await fixture.identity("late");
    const echo = startEcho();
    scope.defer(echo.close);
    const communicationPort = freePort();
    const [firstPort, latePort] = [freePort(), freePort()];
    const server = await scope.server(
      await fixture.write(
        "server.toml",
        // max_unauthenticated stays at its default (1024): room for the silent ones and more.
        // The handshake caps are raised so that every silent one is held until its timer (with
        // the defaults, those from one address past max_handshaking_per_address are closed at
        // once: exhaustion_test.ts proves that).
        serverToml({
          extra: "max_handshaking = 5000\nmax_handshaking_per_address = 5000",
          communicationPort,
          clients: [first, late],
          services: [
            { port: firstPort, name: first.name, targetPort: echo.port },
            { port: latePort, name: late.name, targetPort: echo.port },
          ],
        }),
      ),
    );
    await scope.client(
      await fixture.write("first.toml", clientToml({ identity: first, communicationPort })),
    );
    const timedEcho = async (port: number, text: string) => {
      const started = performance.now();
      assert.equal(await roundTrip(port, text), text, `no echo: ${text}`);
      return performance.now() - started;
    };
    await timedEcho(firstPort, "before");

    const caPem = await Deno.readTextFile(fixture.caPath);
    // TCP connections that never finish the TLS handshake: silent, or a ClientHello cut short.
    await inBatches(n, 50, async (i) => {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: communicationPort });
      if (i % 2) await conn.write(new Uint8Array([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]));
      idle.push(watch("no handshake", conn, performance.now()));
    });
    // TLS connections that finish the handshake and never send a whole frame: nothing, part of
    // a length, or a length and part of what it announces.
    const partial = [
      new Uint8Array(0),
      new Uint8Array([0, 0]),
      new Uint8Array([0, 0, 0, 100, 0x7b, 0x22]),
    ];
    await inBatches(n, 50, async (i) => {
      const conn = await Deno.connectTls({
        hostname: "localhost",
        port: communicationPort,
        caCerts: [caPem],
      });
      await conn.handshake();
      const part = partial[i % partial.length];
      if (part.length) await conn.write(part);
      idle.push(watch(part.length ? "part of a frame" : "no frame", conn, performance.now()));
    });
    // One that says hello for a real name and never answers the challenge.
    const stalled = await dial(communicationPort, caPem);
    await stalled.framed.send(helloFor(first.name, { interval: 5 }));
    assert.equal((await stalled.framed.read(AUTH_STEP_TIMEOUT_MS))?.type, "challenge");
    const stalledIdle = {
      kind: "no signature",
      opened: performance.now(),
      closed: undefined as number | undefined,
      close: () => stalled.stream.close(),
    };
    idle.push(stalledIdle);
    stalled.framed.read(AUTH_STEP_TIMEOUT_MS * 3)
      .catch(() => null)
      .finally(() => stalledIdle.closed ??= performance.now());

    // With all of them held, the running client still tunnels at once...
    assert.equal(idle.filter((i) => i.closed !== undefined).length, 0, "dropped too early");
    const runningMs = await timedEcho(firstPort, "during");
    assert.ok(runningMs < 1000, `an echo through the running client took ${runningMs} ms`);
    // ...and a client that starts now authenticates and tunnels too.
    const newcomer = await startClient(
      await fixture.write("late.toml", clientToml({ identity: late, communicationPort })),
    );
    scope.track(newcomer);
    const newcomerMs = await timedEcho(latePort, "newcomer");
    assert.ok(newcomerMs < 1000, `the new client's first echo took ${newcomerMs} ms`);
    const heldDuringChecks = idle.filter((i) => i.closed === undefined).length;

    // Every idle connection is dropped by its timer: not before, and not much after.
    const timer = Math.max(HANDSHAKE_TIMEOUT_MS, AUTH_STEP_TIMEOUT_MS);
    await waitUntil(
      () => idle.every((i) => i.closed !== undefined),
      `all ${idle.length} idle connections to be closed by the server`,
      timer + 20_000,
    );
    const lifetimes = idle.map((i) => i.closed! - i.opened);
    const early = idle.filter((_, k) => lifetimes[k] < timer - 2_000);
    assert.deepEqual(early.map((i) => i.kind), [], "dropped before their timer ran out");
    const overdue = idle.filter((_, k) => lifetimes[k] > timer + 5_000);
    assert.deepEqual(
      overdue.map((i) => `${i.kind} after ${(i.closed! - i.opened).toFixed(0)} ms`),
      [],
      "kept well past their timer",
    );
    assert.ok(
      heldDuringChecks > idle.length * 0.9,
      `only ${heldDuringChecks} were still held when the new client was checked`,
    );
    assert.ok(server.count(/TLS handshake with .* failed: .*timeout/i) >= n);
    assert.ok(server.count(/dropped: .*within \d+ ms/) >= n + 1);
    assert.equal(server.exited, false);
    await timedEcho(firstPort, "after");
  } finally {
    await scope.close();
  }
});

Deno.test("logged-in clients that go silent, whole or inside a mux frame, are dropped after three heartbeats; a talking one stays", async () => {
  const scope = new Scope();
  try {
    const fixture = await Fixture.create();
    scope.defer(() => fixture.cleanup());
    const echo = startEcho();
    scope.defer(echo.close);
    const good = await fixture.identity("good");
    const kinds = ["silent", "half a header", "half a control frame", "talking"] as const;
    const peers = await Promise.all(kinds.map((k) => fixture.identity(k)));
    const communicationPort = freePort();
    const goodPort = freePort();
    const server = await scope.server(
      await fixture.write(
        "server.toml",
        serverToml({
          communicationPort,
          clients: [good, ...peers],
          services: [{ port: goodPort, name: good.name, targetPort: echo.port }],
        }),
      ),
    );
    const client = await scope.client(
      await fixture.write("good.toml", clientToml({ identity: good, communicationPort })),
    );
    const caPem = await Deno.readTextFile(fixture.caPath);
    const intervalMs = 1000;
    const ping = muxFrame(FrameType.CONTROL, 0, encodeMessage({ type: "ping" }));
    let talking = true;
    const results = await Promise.all(
      peers.map(async (identity, k) => {
        const kind = kinds[k];
        const peer = await login(communicationPort, caPem, identity, {
          interval: intervalMs / 1000,
        });
        scope.closing(peer.stream);
        if (kind === "half a header") await peer.stream.write(ping.subarray(0, 4));
        if (kind === "half a control frame") await peer.stream.write(ping.subarray(0, 12));
        let lastWrite = performance.now();
        const pinging = (async () => {
          while (kind === "talking" && talking) {
            await peer.stream.write(ping);
            lastWrite = performance.now();
            await new Promise((resolve) => setTimeout(resolve, intervalMs / 2));
          }
        })();
        // Reads (and drops) the server's pings until it hangs up.
        const closed = await closedWithin(peer.stream, 20_000);
        await pinging;
        return { kind, closed, afterMs: performance.now() - lastWrite };
      }).map(async (result, k) => {
        // The talking one stops after the others have all been dropped.
        if (kinds[k] !== "talking") return await result;
        await waitUntil(
          () => server.count(/client "(silent|half a [\w ]+)" disconnected/) >= 3,
          () => "the silent ones to be dropped:\n" + server.lines.slice(-30).join("\n"),
        );
        talking = false;
        return await result;
      }),
    );
    for (const { kind, closed, afterMs } of results) {
      assert.ok(closed, `${kind}: never dropped`);
      // Dropped once nothing was heard for 3 intervals: the check runs every interval.
      assert.ok(
        afterMs > HEARTBEAT_MISSES * intervalMs - 200 &&
          afterMs < (HEARTBEAT_MISSES + 2) * intervalMs + 2000,
        `${kind}: dropped ${afterMs.toFixed(0)} ms after it last spoke`,
      );
    }
    assert.match(
      server.lines.find((l) => /silent"? disconnected/.test(l)) ?? "",
      /nothing heard for 3 s/,
    );
    // The real client, which beats every second, was served throughout.
    assert.equal(await roundTrip(goodPort, "still here"), "still here");
    assert.equal(client.count(/connected to .* as/), 1);
  } finally {
    await scope.close();
  }
});
