/**
 * A TCP proxy for fault injection, placed between a client and the server's communication
 * port (TLS passes through untouched) or between a user and a service port. On command it
 * drops connections, cuts one after a number of bytes (or inside a given TLS record), stalls a
 * direction (stops reading, so TCP backpressure builds up), adds latency per chunk, refuses new
 * connections, and reports bytes forwarded and live connections.
 *
 * "up" is the direction from the side that connected to the proxy (client or user) towards the
 * target; "down" is the way back.
 * @module
 */

/** One way through a proxied connection. */
export type Direction = "up" | "down";

/** A direction, or both at once. */
export type Which = Direction | "both";

/** TLS record content types, for {@link CutRule.tlsRecord}. */
export const TLS_HANDSHAKE = 22;
/** TLS application data; in TLS 1.3 also every encrypted handshake message. */
export const TLS_APPLICATION_DATA = 23;

/** Where to cut a connection in one direction; both sides are closed at that point. */
export interface CutRule {
  direction: Direction;
  /** Cut once this many bytes in total have been forwarded in `direction`. */
  afterBytes?: number;
  /**
   * Cut inside a TLS record: the `index`-th (1-based) record of content type `type` seen in
   * `direction` on this connection, after forwarding `within` bytes of it (header included;
   * 0 drops the whole record).
   */
  tlsRecord?: { type: number; index: number; within: number };
}

/** Faults for one connection, applied as soon as it is accepted. */
export interface ConnectionFault {
  cut?: CutRule;
  stall?: Which;
  delayMs?: number;
}

const both = (which: Which): Direction[] => which === "both" ? ["up", "down"] : [which];

/** Follows TLS record boundaries in one direction, counting records per content type. */
class RecordTracker {
  /** Absolute offset of the next record header. */
  #next = 0;
  #header: number[] = [];
  #headerStart = 0;
  readonly counts = new Map<number, number>();

  /**
   * Feeds `chunk` (which starts at absolute offset `at`) and calls `onRecord` with the
   * absolute start, content type and per-type index of each record whose header completes.
   */
  feed(
    chunk: Uint8Array,
    at: number,
    onRecord: (start: number, type: number, index: number) => void,
  ): void {
    let i = Math.max(0, this.#next - at);
    while (i < chunk.length) {
      if (this.#header.length === 0) this.#headerStart = at + i;
      this.#header.push(chunk[i++]);
      if (this.#header.length < 5) continue;
      const [type, , , hi, lo] = this.#header;
      this.#header = [];
      const index = (this.counts.get(type) ?? 0) + 1;
      this.counts.set(type, index);
      onRecord(this.#headerStart, type, index);
      this.#next = this.#headerStart + 5 + (hi << 8 | lo);
      i = Math.max(i, this.#next - at);
    }
  }
}

/** One connection through the proxy: its two sockets, counters and controls. */
export class ProxyConnection {
  /** Bytes forwarded from the connecting side to the target. */
  bytesUp = 0;
  /** Bytes forwarded from the target back to the connecting side. */
  bytesDown = 0;
  /** False once both sockets are closed. */
  live = true;
  /** performance.now() when the proxy accepted it. */
  readonly acceptedAt = performance.now();
  /** performance.now() when it closed (0 while live). */
  closedAt = 0;
  /** Resolves when the connection has closed. */
  readonly closed: Promise<void>;
  /** Per-chunk latency in ms, both directions. */
  delayMs = 0;

  #from: Deno.Conn;
  #to: Deno.Conn | undefined;
  #stalled = new Set<Direction>();
  #wake: (() => void)[] = [];
  #cuts: CutRule[] = [];
  /** Absolute offset at which a direction is cut, once known. */
  #cutAt: Record<Direction, number | undefined> = { up: undefined, down: undefined };
  #tracker: Record<Direction, RecordTracker> = {
    up: new RecordTracker(),
    down: new RecordTracker(),
  };
  #markClosed!: () => void;

  constructor(readonly index: number, from: Deno.Conn) {
    this.#from = from;
    this.closed = new Promise((resolve) => this.#markClosed = resolve);
  }

  /** Bytes forwarded in `direction`. */
  bytes(direction: Direction): number {
    return direction === "up" ? this.bytesUp : this.bytesDown;
  }

  /** TLS records of content `type` seen so far in `direction`. */
  records(direction: Direction, type = TLS_APPLICATION_DATA): number {
    return this.#tracker[direction].counts.get(type) ?? 0;
  }

  /** Arms a cut; a point already passed cuts at once. */
  cut(rule: CutRule): void {
    if (rule.afterBytes !== undefined) {
      this.#setCut(rule.direction, rule.afterBytes);
    } else {
      this.#cuts.push(rule);
    }
  }

  /** Cuts `direction` after `n` more bytes than it has forwarded so far. */
  cutAfter(direction: Direction, n: number): void {
    this.cut({ direction, afterBytes: this.bytes(direction) + n });
  }

  #setCut(direction: Direction, at: number): void {
    const current = this.#cutAt[direction];
    this.#cutAt[direction] = current === undefined ? at : Math.min(current, at);
    if (this.bytes(direction) >= at) this.close();
  }

  /** Stops forwarding (and reading) in `which` direction(s). */
  stall(which: Which = "both"): void {
    for (const d of both(which)) this.#stalled.add(d);
  }

  /** Forwards again in `which` direction(s). */
  resume(which: Which = "both"): void {
    for (const d of both(which)) this.#stalled.delete(d);
    this.#wakeAll();
  }

  #wakeAll(): void {
    for (const wake of this.#wake.splice(0)) wake();
  }

  /** Waits while `direction` is stalled; false once the connection is closed. */
  async #gate(direction: Direction): Promise<boolean> {
    while (this.live && this.#stalled.has(direction)) {
      await new Promise<void>((resolve) => this.#wake.push(resolve));
    }
    return this.live;
  }

  /** Closes both sockets at once. */
  close(): void {
    if (!this.live) return;
    this.live = false;
    this.closedAt = performance.now();
    for (const conn of [this.#from, this.#to]) {
      try {
        conn?.close();
      } catch {
        // Already closed.
      }
    }
    this.#wakeAll();
    this.#markClosed();
  }

  /** Connects to the target and forwards both ways until both directions end. */
  async run(target: { hostname: string; port: number }): Promise<void> {
    let to: Deno.TcpConn;
    try {
      to = await Deno.connect(target);
    } catch {
      this.close();
      return;
    }
    if (!this.live) return to.close(); // dropped while connecting
    this.#to = to;
    to.setNoDelay(true);
    (this.#from as Deno.TcpConn).setNoDelay(true);
    await Promise.all([
      this.#pump(this.#from, to, "up"),
      this.#pump(to, this.#from, "down"),
    ]);
    this.close();
  }

  async #pump(from: Deno.Conn, to: Deno.Conn, direction: Direction): Promise<void> {
    const buf = new Uint8Array(64 * 1024);
    try {
      for (;;) {
        if (!await this.#gate(direction)) return;
        const n = await from.read(buf);
        if (n === null) {
          await to.closeWrite();
          return;
        }
        let chunk = buf.subarray(0, n);
        const start = this.bytes(direction);
        this.#tracker[direction].feed(chunk, start, (at, type, index) => {
          for (const rule of this.#cuts) {
            const r = rule.tlsRecord;
            if (rule.direction === direction && r && r.type === type && r.index === index) {
              this.#setCut(direction, at + r.within);
            }
          }
        });
        if (this.delayMs > 0) await new Promise((r) => setTimeout(r, this.delayMs));
        if (!await this.#gate(direction)) return;
        const cutAt = this.#cutAt[direction];
        const cut = cutAt !== undefined && start + chunk.length >= cutAt;
        if (cut) chunk = chunk.subarray(0, Math.max(0, cutAt - start));
        let done = 0;
        while (done < chunk.length) done += await to.write(chunk.subarray(done));
        if (direction === "up") this.bytesUp += chunk.length;
        else this.bytesDown += chunk.length;
        if (cut) return this.close();
      }
    } catch {
      this.close();
    }
  }
}

/** The proxy: a listener on 127.0.0.1 forwarding every connection to one target. */
export class FaultProxy {
  /** Every connection accepted, in order (index 0 first). */
  readonly connections: ProxyConnection[] = [];
  #listener: Deno.Listener | undefined;
  #target: { hostname: string; port: number };
  #port: number;
  #plan: (ConnectionFault | undefined)[] = [];
  #stallNew: Which | undefined;
  #delayMs = 0;
  #closed = false;
  #accepting: Promise<void> = Promise.resolve();

  private constructor(target: { hostname: string; port: number }, port: number) {
    this.#target = target;
    this.#port = port;
  }

  /** Starts a proxy to `targetHost:targetPort` on 127.0.0.1:`port` (0: any free port). */
  static start(options: { targetPort: number; targetHost?: string; port?: number }): FaultProxy {
    const proxy = new FaultProxy(
      { hostname: options.targetHost ?? "127.0.0.1", port: options.targetPort },
      options.port ?? 0,
    );
    proxy.#listen();
    return proxy;
  }

  /** The port the proxy listens on. */
  get port(): number {
    return this.#port;
  }

  /** Connections open right now. */
  get live(): number {
    return this.connections.filter((c) => c.live).length;
  }

  /** The connections open right now, oldest first. */
  get liveConnections(): ProxyConnection[] {
    return this.connections.filter((c) => c.live);
  }

  /** Bytes forwarded towards the target, over every connection. */
  get bytesUp(): number {
    return this.connections.reduce((n, c) => n + c.bytesUp, 0);
  }

  /** Bytes forwarded back from the target, over every connection. */
  get bytesDown(): number {
    return this.connections.reduce((n, c) => n + c.bytesDown, 0);
  }

  #listen(): void {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: this.#port });
    this.#listener = listener;
    this.#port = (listener.addr as Deno.NetAddr).port;
    this.#accepting = (async () => {
      try {
        for await (const conn of listener) this.#accept(conn);
      } catch {
        // Listener closed.
      }
    })();
  }

  #accept(conn: Deno.Conn): void {
    const connection = new ProxyConnection(this.connections.length, conn);
    this.connections.push(connection);
    const fault = this.#plan.shift();
    connection.delayMs = fault?.delayMs ?? this.#delayMs;
    if (this.#stallNew) connection.stall(this.#stallNew);
    if (fault?.stall) connection.stall(fault.stall);
    if (fault?.cut) connection.cut(fault.cut);
    connection.run(this.#target);
  }

  /** Faults for the next connections to arrive, one entry each, in order. */
  plan(...faults: (ConnectionFault | undefined)[]): void {
    this.#plan.push(...faults);
  }

  /** Closes every current connection. */
  drop(): void {
    for (const c of this.connections) c.close();
  }

  /** Stalls `which` direction(s) of every current connection, and of new ones. */
  stall(which: Which = "both"): void {
    this.#stallNew = which;
    for (const c of this.connections) c.stall(which);
  }

  /** Undoes {@link stall} for current and new connections. */
  resume(): void {
    this.#stallNew = undefined;
    for (const c of this.connections) c.resume();
  }

  /** Adds `ms` of latency to every chunk, on current and new connections. */
  delay(ms: number): void {
    this.#delayMs = ms;
    for (const c of this.connections) c.delayMs = ms;
  }

  /**
   * Refuses new connections (`true`: the port is closed, so connecting fails with "connection
   * refused"; live connections stay) or accepts them again on the same port (`false`).
   */
  async refuse(on: boolean): Promise<void> {
    if (on && this.#listener) {
      this.#listener.close();
      this.#listener = undefined;
      await this.#accepting;
    } else if (!on && !this.#listener && !this.#closed) {
      this.#listen();
    }
  }

  /** Waits until at least `n` connections have been accepted; returns the `n`-th. */
  async waitForConnection(n: number, timeoutMs = 20_000): Promise<ProxyConnection> {
    const end = Date.now() + timeoutMs;
    while (this.connections.length < n) {
      if (Date.now() > end) {
        throw new Error(
          `proxy: ${this.connections.length} of ${n} connections after ${timeoutMs} ms`,
        );
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    return this.connections[n - 1];
  }

  /** Stops listening and closes every connection. */
  async close(): Promise<void> {
    this.#closed = true;
    await this.refuse(true);
    this.drop();
  }
}
