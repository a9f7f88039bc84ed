/**
 * Socket helpers for the load generator: connect with a deadline, exact reads, an echo probe
 * for readiness, and the byte-counting relay used to measure the control connection.
 * @module
 */

/** Connects to `hostname`:`port` (127.0.0.1) with no-delay, giving up after `timeoutMs`. */
export async function connect(
  port: number,
  timeoutMs = 10_000,
  hostname = "127.0.0.1",
): Promise<Deno.TcpConn> {
  const conn = await Deno.connect({
    hostname,
    port,
    signal: AbortSignal.timeout(timeoutMs),
  });
  conn.setNoDelay(true);
  return conn;
}

/** Closes `conn`, ignoring one that is already closed. */
export function safeClose(conn: Deno.Conn | undefined): void {
  try {
    conn?.close();
  } catch {
    // already closed
  }
}

/** Writes all of `data`. */
export async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  let done = 0;
  while (done < data.length) done += await conn.write(data.subarray(done));
}

/** Fills `buf` from `conn`; throws if the stream ends first. */
export async function readFull(conn: Deno.Conn, buf: Uint8Array): Promise<void> {
  let got = 0;
  while (got < buf.length) {
    const n = await conn.read(buf.subarray(got));
    if (n === null) throw new Error(`stream ended after ${got} of ${buf.length} bytes`);
    got += n;
  }
}

/** Runs `fn` with `conn` closed if it has not finished within `timeoutMs`. */
export async function withDeadline<T>(
  conn: Deno.Conn,
  timeoutMs: number,
  fn: () => Promise<T>,
): Promise<T> {
  let expired = false;
  const timer = setTimeout(() => {
    expired = true;
    safeClose(conn);
  }, timeoutMs);
  try {
    return await fn();
  } catch (err) {
    throw expired ? new Error(`timed out after ${timeoutMs} ms`) : err;
  } finally {
    clearTimeout(timer);
  }
}

/** True if `a` and `b` hold the same bytes. */
export function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** One echo round trip through `host`:`port`; false on any failure. */
export async function echoOnce(
  port: number,
  timeoutMs = 5000,
  host = "127.0.0.1",
): Promise<boolean> {
  let conn: Deno.TcpConn | undefined;
  try {
    conn = await connect(port, timeoutMs, host);
    const c = conn;
    const probe = new TextEncoder().encode("ping");
    const back = new Uint8Array(probe.length);
    await withDeadline(c, timeoutMs, async () => {
      await writeAll(c, probe);
      await readFull(c, back);
    });
    return sameBytes(probe, back);
  } catch {
    return false;
  } finally {
    safeClose(conn);
  }
}

/** Waits until an echo round trip through `host`:`port` works; throws after `timeoutMs`. */
export async function waitEcho(
  port: number,
  what: string,
  timeoutMs = 20_000,
  host = "127.0.0.1",
): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await echoOnce(port, Math.max(100, Math.min(5000, end - Date.now())), host)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${what}: no echo through ${host}:${port} within ${timeoutMs} ms`);
}

/** Bytes carried by one relayed connection. */
export interface RelayedConn {
  /** Client → server. */
  up: number;
  /** Server → client. */
  down: number;
  closed: boolean;
}

/** A TCP relay on 127.0.0.1 that counts the payload bytes of every connection through it. */
export class CountingRelay {
  readonly port: number;
  readonly conns: RelayedConn[] = [];
  #listener: Deno.Listener;
  #open = new Set<Deno.Conn>();

  constructor(readonly upstreamPort: number) {
    this.#listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    this.port = (this.#listener.addr as Deno.NetAddr).port;
    this.#accept().catch(() => {});
  }

  async #accept(): Promise<void> {
    for await (const conn of this.#listener) {
      (conn as Deno.TcpConn).setNoDelay(true);
      this.#relay(conn).catch(() => {});
    }
  }

  async #relay(down: Deno.Conn): Promise<void> {
    const record: RelayedConn = { up: 0, down: 0, closed: false };
    this.conns.push(record);
    this.#open.add(down);
    let up: Deno.TcpConn | undefined;
    try {
      up = await connect(this.upstreamPort);
      this.#open.add(up);
      const u = up;
      await Promise.all([
        this.#pump(down, u, (n) => record.up += n),
        this.#pump(u, down, (n) => record.down += n),
      ]);
    } finally {
      record.closed = true;
      for (const c of [down, up]) {
        if (c) this.#open.delete(c);
        safeClose(c);
      }
    }
  }

  async #pump(from: Deno.Conn, to: Deno.Conn, count: (n: number) => void): Promise<void> {
    const buf = new Uint8Array(64 * 1024);
    try {
      for (;;) {
        const n = await from.read(buf);
        if (n === null) break;
        count(n);
        await writeAll(to, buf.subarray(0, n));
      }
      await to.closeWrite();
    } catch {
      safeClose(from);
      safeClose(to);
    }
  }

  /** Bytes both ways over every connection so far. */
  total(): number {
    return this.conns.reduce((sum, c) => sum + c.up + c.down, 0);
  }

  close(): void {
    try {
      this.#listener.close();
    } catch {
      // already closed
    }
    for (const c of this.#open) safeClose(c);
    this.#open.clear();
  }
}
