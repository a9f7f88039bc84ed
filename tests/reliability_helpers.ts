/**
 * Shared pieces of the reliability, reload, resource and fault tests (and the soak): local
 * targets the tests can watch, a process's memory and descriptors from /proc, log timestamps,
 * and one-call setups of a server with its clients.
 * @module
 */
import assert from "node:assert/strict";
import {
  clientToml,
  connectUser,
  Fixture,
  freePort,
  type Identity,
  type Program,
  Scope,
  serverToml,
  startClient,
  startServer,
  waitUntil,
} from "./helpers.ts";
import { FaultProxy } from "./faultproxy.ts";

/** Resident memory and open descriptors of a live process (Linux /proc). */
export interface ProcStats {
  /** VmRSS in bytes. */
  rss: number;
  /** Entries in /proc/PID/fd. */
  fds: number;
}

/** Reads `pid`'s resident memory and open descriptor count. */
export function procStats(pid: number): ProcStats {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const kb = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
  let fds = 0;
  for (const _ of Deno.readDirSync(`/proc/${pid}/fd`)) fds++;
  return { rss: Number(kb?.[1] ?? 0) * 1024, fds };
}

/** Bytes as mebibytes with one decimal, for messages. */
export function mib(bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

/** The time (Unix ms) at the start of a text log line: `2026-01-02 03:04:05.678 +00:00 …`. */
export function logTime(line: string): number {
  const m = /^(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d\.\d+) ([+-]\d\d:\d\d)/.exec(line);
  if (!m) throw new Error(`no timestamp at the start of log line: ${line}`);
  return Date.parse(`${m[1]}T${m[2]}${m[3]}`);
}

/** How a {@link Target} treats each connection. */
export type TargetMode =
  /** Sends `banner` (if any), then echoes every byte back. */
  | "echo"
  /** Accepts and does not read until {@link Target.drain} is called. */
  | "sink"
  /** Writes zero bytes as fast as it can, never reads. */
  | "source";

/** A local TCP service behind the client, whose connections the test can watch. */
export interface Target {
  port: number;
  /** Connections accepted so far. */
  readonly accepted: number;
  /** Connections open right now. */
  readonly live: number;
  /** Bytes a "source" target has written so far, over all its connections. */
  readonly written: number;
  /** Bytes a "sink" target has read so far, over all its connections. */
  readonly received: number;
  /** Makes a "sink" target start reading (and discarding) what it is sent. */
  drain(): void;
  close(): void;
}

/** Starts a {@link Target} on 127.0.0.1. */
export function startTarget(mode: TargetMode = "echo", banner = ""): Target {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns = new Set<Deno.Conn>();
  let accepted = 0;
  let written = 0;
  let received = 0;
  let startDraining: () => void = () => {};
  const draining = new Promise<void>((resolve) => startDraining = resolve);
  const serve = async (conn: Deno.Conn) => {
    try {
      if (mode === "sink") {
        await draining;
        const buf = new Uint8Array(256 * 1024);
        for (;;) {
          const n = await conn.read(buf);
          if (n === null) break;
          received += n;
        }
      } else if (mode === "source") {
        const chunk = new Uint8Array(64 * 1024);
        for (;;) written += await conn.write(chunk);
      } else {
        if (banner) await writeAll(conn, new TextEncoder().encode(banner));
        const buf = new Uint8Array(64 * 1024);
        for (;;) {
          const n = await conn.read(buf);
          if (n === null) break;
          await writeAll(conn, buf.subarray(0, n));
        }
        await conn.closeWrite();
      }
    } catch {
      // Reset by the peer, or closed by the test.
    } finally {
      conns.delete(conn);
      try {
        conn.close();
      } catch {
        // Already closed.
      }
    }
  };
  (async () => {
    for await (const conn of listener) {
      accepted++;
      conns.add(conn);
      (conn as Deno.TcpConn).setNoDelay(true);
      serve(conn);
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    get accepted() {
      return accepted;
    },
    get live() {
      return conns.size;
    },
    get written() {
      return written;
    },
    get received() {
      return received;
    },
    drain: () => startDraining(),
    close() {
      try {
        listener.close();
      } catch {
        // Already closed.
      }
      for (const conn of conns) {
        try {
          conn.close();
        } catch {
          // Already closed.
        }
      }
      conns.clear();
    },
  };
}

/** Writes all of `bytes` to `conn`. */
export async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  let done = 0;
  while (done < bytes.length) done += await conn.write(bytes.subarray(done));
}

/** `n` random bytes. */
export function randomBytes(n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let at = 0; at < n; at += 65_536) crypto.getRandomValues(out.subarray(at, at + 65_536));
  return out;
}

/**
 * Writes `payload` to `conn` while reading what comes back, until `expect` bytes arrived, the
 * stream ends or fails, or `timeoutMs` passes (then the connection is closed, so no wait
 * outlives it). Returns what was read and how the reading ended.
 */
export async function exchange(
  conn: Deno.Conn,
  payload: Uint8Array,
  options: { expect?: number; timeoutMs?: number; chunk?: number } = {},
): Promise<{ received: Uint8Array; ended: "complete" | "eof" | "error" | "timeout" }> {
  const expect = options.expect ?? payload.length;
  const chunk = options.chunk ?? 16 * 1024;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      conn.close();
    } catch {
      // Already closed.
    }
  }, options.timeoutMs ?? 20_000);
  const writer = (async () => {
    for (let at = 0; at < payload.length; at += chunk) {
      await writeAll(conn, payload.subarray(at, at + chunk));
    }
  })().catch(() => {});
  const received = new Uint8Array(expect);
  let got = 0;
  let ended: "complete" | "eof" | "error" | "timeout" = "complete";
  try {
    while (got < expect) {
      const n = await conn.read(received.subarray(got));
      if (n === null) {
        ended = "eof";
        break;
      }
      got += n;
    }
  } catch {
    ended = "error";
  } finally {
    clearTimeout(timer);
  }
  if (timedOut) ended = "timeout";
  if (ended !== "complete") {
    try {
      conn.close();
    } catch {
      // Already closed.
    }
  }
  await writer;
  return { received: received.subarray(0, got), ended };
}

/** Asserts `received` is an exact prefix of `sent` (nothing corrupted, nothing reordered). */
export function assertPrefix(received: Uint8Array, sent: Uint8Array, what: string): void {
  assert.ok(
    received.length <= sent.length,
    `${what}: received ${received.length} bytes, more than the ${sent.length} sent`,
  );
  for (let i = 0; i < received.length; i++) {
    if (received[i] !== sent[i]) {
      assert.fail(`${what}: byte ${i} of ${received.length} received differs from what was sent`);
    }
  }
}

/** Connects a user to `port`, sends `size` random bytes through an echo and checks them. */
export async function echoCheck(port: number, size = 1000, timeoutMs = 20_000): Promise<void> {
  const user = await connectUser(port);
  try {
    const payload = randomBytes(size);
    const { received, ended } = await exchange(user, payload, { timeoutMs });
    assert.equal(ended, "complete", `echo through port ${port}: ${ended} after ${received.length}`);
    assertPrefix(received, payload, `echo through port ${port}`);
  } finally {
    user.close();
  }
}

/** One client of a {@link Setup}: its identity, target, public port and config file. */
export interface SetupClient {
  identity: Identity;
  target: Target;
  servicePort: number;
  config: string;
}

/** A fixture with a server config and one client config (with an echo service) per name. */
export interface Setup {
  scope: Scope;
  fixture: Fixture;
  communicationPort: number;
  serverConfig: string;
  clients: SetupClient[];
  /** The proxy clients dial instead of the server, when asked for. */
  proxy?: FaultProxy;
  /**
   * Writes the server config again (to `file`, default {@link serverConfig}) with clients,
   * services or extra keys changed.
   */
  writeServer(options?: ServerChange): Promise<void>;
  startServer(args?: string[]): Promise<Program>;
  startClient(index?: number, args?: string[]): Promise<Program>;
}

/** What {@link Setup.writeServer} changes. */
export interface ServerChange {
  extra?: string;
  clients?: Identity[];
  services?: ServiceLine[];
  /** Where to write (default: the server config). */
  file?: string;
}

/** A service line for {@link Setup.writeServer}. */
export interface ServiceLine {
  port: number;
  name: string;
  targetPort: number;
}

/**
 * Builds a fixture: one client (identity, echo target, service) per name, a server config, and
 * client configs (`interval`, extra client keys such as `shutdown_grace = 2`) that dial the
 * server directly or, with `proxy`, through a {@link FaultProxy}. Everything is undone by
 * `scope.close()`.
 */
export async function setup(options: {
  names?: string[];
  interval?: number;
  serverExtra?: string;
  clientExtra?: string;
  proxy?: boolean;
} = {}): Promise<Setup> {
  const scope = new Scope();
  const fixture = await Fixture.create();
  scope.defer(() => fixture.cleanup());
  const communicationPort = freePort();
  const proxy = options.proxy ? FaultProxy.start({ targetPort: communicationPort }) : undefined;
  if (proxy) scope.defer(() => proxy.close());
  const clients: SetupClient[] = [];
  for (const name of options.names ?? ["a"]) {
    const identity = await fixture.identity(name);
    const target = startTarget("echo");
    scope.defer(() => target.close());
    const config = await fixture.write(
      `client-${clients.length}.toml`,
      clientToml({
        identity,
        communicationPort: proxy?.port ?? communicationPort,
        interval: options.interval ?? 1,
      }) + (options.clientExtra ?? ""),
    );
    clients.push({ identity, target, servicePort: freePort(), config });
  }
  const serverConfig = fixture.path("server.toml");
  const result: Setup = {
    scope,
    fixture,
    communicationPort,
    serverConfig,
    clients,
    proxy,
    async writeServer(change: ServerChange = {}) {
      await Deno.writeTextFile(
        change.file ?? serverConfig,
        serverToml({
          communicationPort,
          clients: change.clients ?? clients.map((c) => c.identity),
          services: change.services ?? clients.map((c) => ({
            port: c.servicePort,
            name: c.identity.name,
            targetPort: c.target.port,
          })),
          extra: change.extra ?? options.serverExtra,
        }),
      );
    },
    async startServer(args = []) {
      return scope.track(await startServer(serverConfig, args));
    },
    async startClient(index = 0, args = []) {
      return scope.track(await startClient(clients[index].config, args));
    },
  };
  await result.writeServer();
  return result;
}

/** Waits until `check` holds, sampling every 10 ms; returns how long that took in ms. */
export async function timeUntil(
  check: () => unknown | Promise<unknown>,
  what: string | (() => string),
  timeoutMs: number,
): Promise<number> {
  const start = performance.now();
  await waitUntil(async () => Boolean(await check()), what, timeoutMs);
  return performance.now() - start;
}

/** Random bytes whose period (a prime) matches no buffer size, for {@link patternAt}. */
const PATTERN = randomBytes(65_521);

/** The byte an {@link EchoStream} sends at `offset`: depends on the position, so a lost,
 * repeated or reordered chunk shows. */
export function patternAt(offset: number): number {
  return PATTERN[offset % PATTERN.length] ^ ((offset / PATTERN.length) & 0xff);
}

/**
 * A user that streams position-dependent bytes into an echo tunnel and checks every byte that
 * comes back, until stopped, cut, or a byte differs.
 */
export class EchoStream {
  sent = 0;
  received = 0;
  /**
   * How reading ended: "complete" (every byte of a limited stream came back), "eof" or "error"
   * (the tunnel closed), "stopped", or "mismatch".
   */
  ended: "complete" | "eof" | "error" | "stopped" | "mismatch" | undefined;
  /** performance.now() when reading ended. */
  endedAt = 0;
  /** Offset of the first byte that came back wrong. */
  mismatchAt = -1;
  /** Resolves when reading has ended. */
  readonly done: Promise<void>;
  #stopped = false;
  #writing = true;

  /**
   * Starts streaming on `conn`: `limit` bytes in all (default: until stopped), pausing
   * `pauseMs` after each 16 KiB chunk (default: as fast as the tunnel takes them).
   */
  constructor(readonly conn: Deno.Conn, options: { limit?: number; pauseMs?: number } = {}) {
    const limit = options.limit ?? Infinity;
    (async () => {
      const chunk = new Uint8Array(16 * 1024);
      while (this.#writing && this.sent < limit) {
        const n = Math.min(chunk.length, limit - this.sent);
        for (let i = 0; i < n; i++) chunk[i] = patternAt(this.sent + i);
        await writeAll(conn, chunk.subarray(0, n));
        this.sent += n;
        if (options.pauseMs) await new Promise((r) => setTimeout(r, options.pauseMs));
      }
    })().catch(() => {}).finally(() => this.#writing = false);
    this.done = (async () => {
      const buf = new Uint8Array(64 * 1024);
      try {
        while (this.received < limit) {
          const n = await conn.read(
            buf.subarray(0, Math.min(buf.length, limit - this.received)),
          );
          if (n === null) return this.#end("eof");
          for (let i = 0; i < n; i++) {
            if (buf[i] !== patternAt(this.received + i)) {
              this.mismatchAt = this.received + i;
              return this.#end("mismatch");
            }
          }
          this.received += n;
        }
        this.#end("complete");
      } catch {
        this.#end(this.#stopped ? "stopped" : "error");
      }
    })();
  }

  #end(how: NonNullable<EchoStream["ended"]>): void {
    this.ended ??= how;
    this.endedAt = performance.now();
  }

  /** Waits until at least `n` bytes have come back intact. */
  async receivedAtLeast(n: number, timeoutMs = 20_000): Promise<void> {
    await waitUntil(
      () => {
        if (this.received >= n) return true;
        if (this.ended) {
          throw new Error(`stream ended (${this.ended}) after ${this.received} bytes`);
        }
        return false;
      },
      () => `${n} bytes back through the tunnel (got ${this.received})`,
      timeoutMs,
    );
  }

  /** Stops writing and waits until every byte sent has come back intact. */
  async finish(timeoutMs = 20_000): Promise<void> {
    this.#writing = false;
    await waitUntil(() => !this.#writing, "the writer to stop", timeoutMs);
    await this.receivedAtLeast(this.sent, timeoutMs);
  }

  /** Stops writing and closes the connection. */
  stop(): void {
    this.#stopped = true;
    this.#writing = false;
    try {
      this.conn.close();
    } catch {
      // Already closed.
    }
  }
}

/**
 * Established TCP connections of process `pid` with `port` at either end, from /proc/net/tcp
 * (Linux): the pooled connections between a client and the server's communication port.
 */
export function establishedWith(pid: number, port: number): number {
  const inodes = new Set<string>();
  for (const entry of Deno.readDirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(Deno.readLinkSync(`/proc/${pid}/fd/${entry.name}`));
      if (m) inodes.add(m[1]);
    } catch {
      // Closed while we looked.
    }
  }
  let count = 0;
  for (const table of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text: string;
    try {
      text = Deno.readTextFileSync(table);
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10 || f[3] !== "01" || !inodes.has(f[9])) continue; // 01: ESTABLISHED
      const local = parseInt(f[1].split(":")[1], 16);
      const remote = parseInt(f[2].split(":")[1], 16);
      if (local === port || remote === port) count++;
    }
  }
  return count;
}
