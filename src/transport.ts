/**
 * Byte streams behind one small interface, whatever carries them: plain TCP to users and local
 * services, TLS between client and server.
 *
 * Every TCP socket gets no-delay. `Deno.listenTls` connections cannot set it, and their first
 * small reply after the handshake stalls 40–90 ms (Nagle on our side, delayed ACK on the peer),
 * so the server accepts TLS through `node:tls`, whose sockets can. The client dials through
 * `node:tls` too, whose `ca` is the only CA it then trusts (see {@link connectTls}).
 * @module
 */
import * as tls from "node:tls";
import { isIP, type Socket } from "node:net";
import { Buffer } from "node:buffer";
import {
  acceptQueueLength,
  DEFAULT_MAX_HANDSHAKING,
  DEFAULT_MAX_HANDSHAKING_PER_ADDRESS,
  HandshakeCap,
  onDescriptorsFreed,
  openFileLimit,
  ShedLog,
} from "./accept.ts";
import { log } from "./log.ts";

/** A connected, bidirectional byte stream with half-close. */
export interface Stream {
  /** The peer's address as `host:port`, for logs. */
  readonly remote: string;
  /** The peer's IP address alone, for per-address limits and allow lists. */
  readonly remoteIp: string;
  /** Reads into `p`; resolves to the byte count, or null at end of stream. */
  read(p: Uint8Array): Promise<number | null>;
  /**
   * Where the stream can hand over what it received without a copy: the next chunk as it
   * came, which the caller may keep; null at end of stream.
   */
  readChunk?(): Promise<Uint8Array | null>;
  /** Writes all of `chunk`; resolves once the stream no longer needs it. */
  write(chunk: Uint8Array): Promise<void>;
  /**
   * From now on the peer must stay silent: anything it sends (or has sent and we have not
   * read) closes the stream instead of being buffered. For a peer made to wait for an answer.
   */
  holdSilent?(): void;
  /**
   * Bounds what may wait unread: beyond `bytes` the stream closes instead of buffering more
   * (undefined: no such bound). A handshake in lockstep never has more than one frame waiting.
   */
  limitUnread?(bytes: number | undefined): void;
  /** Ends our direction (FIN, or TLS close_notify) while the other keeps flowing. */
  closeWrite(): Promise<void>;
  /** Closes both directions at once. Safe to call more than once. */
  close(): void;
  /** Whether the stream is known to be over (closed here, or ended or failed at the peer). */
  isClosed(): boolean;
}

/** Longest wait for a TCP connect plus TLS handshake, either side. */
export const HANDSHAKE_TIMEOUT_MS = 10_000;

/**
 * A node socket is paused once this much of its input waits unread. Flow control itself is
 * the mux's credit, which bounds what a peer may send; this only spares memory when the
 * reader falls behind for a moment.
 */
const NODE_READ_HIGH_WATER = 256 * 1024;

/** Formats a Deno address for logs; IPv6 in brackets. */
export function formatAddr(addr: Deno.Addr): string {
  if (addr.transport === "tcp" || addr.transport === "udp") {
    return addr.hostname.includes(":")
      ? `[${addr.hostname}]:${addr.port}`
      : `${addr.hostname}:${addr.port}`;
  }
  return addr.transport;
}

/** A Deno TCP or TLS connection as a {@link Stream}. */
export class ConnStream implements Stream {
  readonly remote: string;
  readonly remoteIp: string;
  #conn: Deno.Conn;
  #closed = false;

  constructor(conn: Deno.Conn, remote?: string) {
    this.#conn = conn;
    this.remote = remote ?? formatAddr(conn.remoteAddr);
    this.remoteIp = conn.remoteAddr.transport === "tcp" ? conn.remoteAddr.hostname : "";
  }

  read(p: Uint8Array): Promise<number | null> {
    return this.#conn.read(p);
  }

  async write(chunk: Uint8Array): Promise<void> {
    let done = 0;
    while (done < chunk.length) done += await this.#conn.write(chunk.subarray(done));
  }

  async closeWrite(): Promise<void> {
    await this.#conn.closeWrite();
  }

  isClosed(): boolean {
    return this.#closed;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#conn.close();
    } catch {
      // Already closed by the runtime after an error: nothing left to release.
    }
  }
}

/** The TCP socket under a Deno `node:tls` server socket, if the runtime exposes it. */
function parentOf(socket: Socket): Socket | undefined {
  // deno-lint-ignore no-explicit-any
  return (socket as any)._parent;
}

/**
 * Destroys a TLS socket and the TCP socket under it: in Deno's node:tls, destroying the first
 * alone can leave the connection open.
 */
function destroyTls(socket: Socket): void {
  socket.destroy();
  parentOf(socket)?.destroy();
}

/** A `node:net`/`node:tls` socket as a {@link Stream}. */
export class SocketStream implements Stream {
  readonly remote: string;
  readonly remoteIp: string;
  #socket: Socket;
  #chunks: Uint8Array[] = [];
  #buffered = 0;
  #ended = false;
  #error: Error | undefined;
  #wake: (() => void) | undefined;
  #paused = false;
  #silent = false;
  #limit: number | undefined;

  /** @param limit see {@link Stream.limitUnread}; applies from the first byte */
  constructor(socket: Socket, limit?: number) {
    this.#limit = limit;
    this.#socket = socket;
    const host = socket.remoteAddress ?? "?";
    this.remoteIp = host;
    this.remote = host.includes(":")
      ? `[${host}]:${socket.remotePort}`
      : `${host}:${socket.remotePort}`;
    socket.on("data", (data: Buffer) => {
      if (this.#silent) return this.close();
      this.#chunks.push(data);
      this.#buffered += data.length;
      if (this.#limit !== undefined && this.#buffered > this.#limit) {
        this.#error ??= new Error(`${this.remote} sent ${this.#buffered} bytes out of turn`);
        this.#notify();
        return this.close();
      }
      if (this.#buffered >= NODE_READ_HIGH_WATER && !this.#paused) {
        this.#paused = true;
        socket.pause();
      }
      this.#notify();
    });
    socket.on("end", () => {
      this.#ended = true;
      this.#notify();
    });
    socket.on("error", (err: Error) => {
      this.#error ??= err;
      this.#notify();
    });
    socket.on("close", () => {
      this.#ended = true;
      this.#notify();
    });
    // A peer that ends right after its handshake can have its end of stream consumed before
    // we get the socket: see it here, and on the TCP socket underneath, whose close is final.
    if (socket.readableEnded || socket.destroyed) this.#ended = true;
    const parent = parentOf(socket);
    for (const event of ["end", "close"]) {
      parent?.once(event, () => {
        this.#ended = true;
        this.#notify();
      });
    }
  }

  limitUnread(bytes: number | undefined): void {
    this.#limit = bytes;
  }

  holdSilent(): void {
    this.#silent = true;
    if (this.#chunks.length > 0) this.close();
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  async read(p: Uint8Array): Promise<number | null> {
    while (this.#chunks.length === 0) {
      if (this.#error) throw this.#error;
      if (this.#ended) return null;
      await new Promise<void>((resolve) => this.#wake = resolve);
    }
    // Gather every queued chunk that fits: the socket delivers TLS-record-sized pieces, and
    // one large read means one large write downstream instead of many small ones.
    let n = 0;
    while (n < p.length && this.#chunks.length > 0) {
      const head = this.#chunks[0];
      const take = Math.min(head.length, p.length - n);
      p.set(head.subarray(0, take), n);
      n += take;
      if (take === head.length) this.#chunks.shift();
      else this.#chunks[0] = head.subarray(take);
    }
    this.#taken(n);
    return n;
  }

  async readChunk(): Promise<Uint8Array | null> {
    while (this.#chunks.length === 0) {
      if (this.#error) throw this.#error;
      if (this.#ended) return null;
      await new Promise<void>((resolve) => this.#wake = resolve);
    }
    const chunk = this.#chunks.shift()!;
    this.#taken(chunk.length);
    return chunk;
  }

  /** `n` buffered bytes were read: resume a paused socket once half its buffer is free. */
  #taken(n: number): void {
    this.#buffered -= n;
    if (this.#paused && this.#buffered < NODE_READ_HIGH_WATER / 2) {
      this.#paused = false;
      this.#socket.resume();
    }
  }

  write(chunk: Uint8Array): Promise<void> {
    if (this.#socket.destroyed || this.#socket.writableEnded) {
      return Promise.reject(this.#error ?? new Error(`connection to ${this.remote} is closed`));
    }
    // The caller reuses `chunk` as soon as we resolve, so wait for the socket's own callback:
    // it fires once the bytes have left our buffers.
    return new Promise((resolve, reject) => {
      this.#socket.write(chunk, (err?: Error | null) => err ? reject(err) : resolve());
    });
  }

  closeWrite(): Promise<void> {
    if (this.#socket.destroyed || this.#socket.writableEnded) return Promise.resolve();
    return new Promise((resolve) => this.#socket.end(() => resolve()));
  }

  isClosed(): boolean {
    return this.#ended || this.#error !== undefined || this.#socket.destroyed;
  }

  close(): void {
    destroyTls(this.#socket);
  }
}

/** Options for {@link connectTls}. */
export interface ConnectTlsOptions {
  /** Host name or address of the server; also the name its certificate must carry. */
  hostname: string;
  /** Port of the server's communication port. */
  port: number;
  /** PEM of the CA that must have signed the server's certificate. */
  caCert: string;
  /** Gives up after this many milliseconds (default {@link HANDSHAKE_TIMEOUT_MS}). */
  timeoutMs?: number;
}

/**
 * Dials the server with no-delay set and returns the TLS stream once the server's certificate
 * proved to be signed by `caCert` and to carry `hostname`.
 *
 * Only that CA is trusted. `Deno.startTls`'s `caCerts` are trusted in addition to the runtime's
 * default roots (Mozilla's, the system's, `DENO_CERT`, `NODE_EXTRA_CA_CERTS`), so with it anyone
 * holding a publicly trusted certificate for the server's name could pose as the server.
 * `node:tls`'s `ca` replaces the default roots.
 */
export async function connectTls(options: ConnectTlsOptions): Promise<Stream> {
  const timeoutMs = options.timeoutMs ?? HANDSHAKE_TIMEOUT_MS;
  try {
    return new SocketStream(await dialTls(options, true, timeoutMs));
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    if (code !== "UNABLE_TO_VERIFY_LEAF_SIGNATURE") throw err;
    // Deno's node:tls gives this one code for every failed verification. An expired
    // certificate is common and needs another fix (renew it, not change cafile): look again
    // without verifying, only to read its dates, and send nothing.
    const cert = await dialTls(options, false, Math.min(timeoutMs, DIAGNOSE_TIMEOUT_MS))
      .then((socket) => {
        const cert = socket.getPeerCertificate();
        destroyTls(socket);
        return cert;
      }, () => undefined);
    const now = Date.now();
    if (cert?.valid_from && cert.valid_to) {
      const [from, to] = [Date.parse(cert.valid_from), Date.parse(cert.valid_to)];
      if (now > to || now < from) {
        throw Object.assign(
          new Error(`certificate valid from ${cert.valid_from} to ${cert.valid_to}`),
          { code: now > to ? "CERT_HAS_EXPIRED" : "CERT_NOT_YET_VALID" },
        );
      }
    }
    throw err;
  }
}

/** Longest wait for the second look at a certificate that failed verification. */
const DIAGNOSE_TIMEOUT_MS = 3_000;

/** Dials `node:tls` with `ca` as the only trusted root; `verify: false` only to read a cert. */
function dialTls(
  options: ConnectTlsOptions,
  verify: boolean,
  timeoutMs: number,
): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({
      host: options.hostname,
      port: options.port,
      servername: isIP(options.hostname) ? undefined : options.hostname,
      ca: options.caCert,
      rejectUnauthorized: verify,
      minVersion: "TLSv1.2",
    });
    socket.setNoDelay(true);
    const end = (err: Error) => {
      clearTimeout(timer);
      destroyTls(socket);
      reject(err);
    };
    const timer = setTimeout(() => {
      const host = options.hostname.includes(":") ? `[${options.hostname}]` : options.hostname;
      end(new Error(`TLS handshake with ${host}:${options.port} timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once("error", end);
    socket.once("secureConnect", () => {
      clearTimeout(timer);
      socket.off("error", end);
      if (verify && !socket.authorized) {
        return end(new Error(`certificate not verified: ${socket.authorizationError}`));
      }
      resolve(socket);
    });
  });
}

/** Dials a plain TCP service (a local target, or a test's user) with no-delay set. */
export async function connectTcp(
  hostname: string,
  port: number,
  timeoutMs = HANDSHAKE_TIMEOUT_MS,
): Promise<Stream> {
  const conn = await Deno.connect({ hostname, port, signal: AbortSignal.timeout(timeoutMs) });
  conn.setNoDelay(true);
  return new ConnStream(conn);
}

/** A TLS listener that hands over each connection once its handshake is done. */
export interface TlsListener {
  /** The bound port (useful when asked for port 0). */
  readonly port: number;
  /** Stops accepting; live connections stay open. */
  close(): Promise<void>;
  /** Presents a new certificate and key to connections from now on. */
  setCertificate(cert: string, key: string): void;
}

/** Options for {@link listenTls}. */
export interface ListenTlsOptions {
  hostname: string;
  port: number;
  /** PEM certificate chain presented to clients. */
  cert: string;
  /** PEM private key of that certificate. */
  key: string;
  /** Called with every connection whose TLS handshake finished in time. */
  onConnection: (stream: Stream) => void;
  /**
   * PEM of a CA: every connection must then present a client certificate it signed (mutual
   * TLS, as between the servers of a cluster); one without is refused in the handshake.
   */
  clientCa?: string;
  /** Unread bytes a new connection may have waiting before it is closed (see limitUnread). */
  firstUnreadLimit?: number;
  /** Called when a connection fails before its handshake completes. */
  onHandshakeError?: (remote: string, err: Error) => void;
  /** Names the listener in logs, e.g. "communication port"; the port number follows. */
  name?: string;
  /**
   * Connections between TCP accept and the end of their TLS handshake, at once; one past it is
   * closed at once (default {@link DEFAULT_MAX_HANDSHAKING}).
   */
  maxHandshaking?: number;
  /** The same, per source address (default {@link DEFAULT_MAX_HANDSHAKING_PER_ADDRESS}). */
  maxHandshakingPerAddress?: number;
  /**
   * TCP connections open at once on this listener, whatever their stage; one past it is closed
   * at once. Default: half the open-file limit, so that this port alone cannot use up the
   * descriptors that service ports and tunnels need.
   */
  maxOpen?: number;
}

/** How often a TLS listener checks that it still accepts (see {@link listenTls}). */
const STALL_CHECK_MS = 1_000;

/**
 * Listens for TLS on `hostname:port`, sets no-delay on each socket, bounds each handshake, and
 * closes at once connections past `maxHandshaking`, `maxHandshakingPerAddress` or `maxOpen`.
 *
 * A `node:tls` server in Deno stops accepting for good, without an event, once an accept fails
 * for want of descriptors. So every {@link STALL_CHECK_MS} in which no connection came, the
 * listener looks at its kernel accept queue: connections waiting there at two checks in a row
 * mean it has stalled, and it listens again on the same port (retrying until it can). Where the
 * queue cannot be read (no access to /proc), a sign of trouble stands in for it: an "error"
 * from the server, or another accept loop recovering from running out of descriptors.
 */
export function listenTls(options: ListenTlsOptions): Promise<TlsListener> {
  let cert = options.cert;
  let key = options.key;
  const handshaking = new HandshakeCap(
    options.maxHandshaking ?? DEFAULT_MAX_HANDSHAKING,
    options.maxHandshakingPerAddress ?? DEFAULT_MAX_HANDSHAKING_PER_ADDRESS,
  );
  const maxOpen = options.maxOpen ?? Math.max(64, Math.floor((openFileLimit() ?? 65_536) / 2));
  let open = 0;
  let seen = 0; // connections accepted, for the stall check
  /** Uncounts a raw socket from `handshaking` once its handshake is over, either way. */
  const handshakeDone = new WeakMap<Socket, () => void>();
  /** Raw sockets closed for being past a cap: their handshake errors are not news. */
  const shedSockets = new WeakSet<Socket>();
  let what = `${options.name ?? "TLS listener"} ${options.port}`;
  let shed = new ShedLog(what);
  const logger = log("transport");

  const create = () => {
    const server = tls.createServer({
      cert,
      key,
      minVersion: "TLSv1.2",
      allowHalfOpen: true,
      ...(options.clientCa
        ? { ca: options.clientCa, requestCert: true, rejectUnauthorized: true }
        : {}),
      // Ends with "tlsClientError", where the socket is destroyed.
      handshakeTimeout: HANDSHAKE_TIMEOUT_MS,
    });
    server.on("connection", (socket: Socket) => {
      seen++;
      const address = socket.remoteAddress ?? "?";
      const release = open < maxOpen ? handshaking.admit(address) : undefined;
      if (!release) {
        shedSockets.add(socket);
        socket.destroy();
        shed.note(
          open >= maxOpen
            ? `${open} open (the limit is half the open-file limit)`
            : handshaking.count >= handshaking.max
            ? `${handshaking.count} in their TLS handshake (max_handshaking)`
            : `too many in their TLS handshake from ${address} (max_handshaking_per_address)`,
        );
        return;
      }
      open++;
      handshakeDone.set(socket, release);
      socket.once("close", () => {
        open--;
        release();
      });
      // No-delay before the handshake, so its last flight is not held back either.
      socket.setNoDelay(true);
    });
    server.on("secureConnection", (socket: tls.TLSSocket) => {
      const raw = parentOf(socket);
      if (raw) handshakeDone.get(raw)?.();
      socket.setNoDelay(true);
      options.onConnection(new SocketStream(socket, options.firstUnreadLimit));
    });
    server.on("tlsClientError", (err: Error, socket: tls.TLSSocket) => {
      // Before the handshake completes, Deno's TLS socket knows the address only via its parent.
      const raw = parentOf(socket);
      if (raw) handshakeDone.get(raw)?.();
      destroyTls(socket);
      if (raw && shedSockets.has(raw)) return;
      const host = socket.remoteAddress ?? raw?.remoteAddress ?? "?";
      const remote = `${host.includes(":") ? `[${host}]` : host}:${
        socket.remotePort ?? raw?.remotePort
      }`;
      options.onHandshakeError?.(remote, err);
    });
    return server;
  };

  /** Listens with a new server on `port`; resolves to it, or rejects with the listen error. */
  const bind = (port: number) =>
    new Promise<tls.Server>((resolve, reject) => {
      const server = create();
      server.once("error", reject);
      server.listen(port, options.hostname, () => {
        server.off("error", reject);
        server.on("error", (err: Error) => {
          logger.warn("{what}: {error}", { what, error: err.message });
          suspect = true; // an accept error may have stopped it
        });
        resolve(server);
      });
    });

  let current: tls.Server | undefined;
  let closed = false;
  let checking = false;
  let stalled = 0;
  let suspect = false;
  let seenAtCheck = 0;
  const check = async (port: number) => {
    if (closed || checking) return;
    checking = true;
    try {
      if (current && seen !== seenAtCheck) {
        seenAtCheck = seen;
        stalled = 0;
        suspect = false;
        return;
      }
      if (current) {
        const queued = await acceptQueueLength(port);
        if (closed) return;
        if (queued === undefined) {
          if (!suspect) return;
        } else if (queued === 0) {
          stalled = 0;
          return;
        } else if (++stalled < 2) return;
        suspect = false;
        logger.warn(
          "{what} may have stopped accepting ({queued} connections waiting), likely after " +
            "running out of file descriptors: listening again",
          { what, queued: queued ?? "unknown" },
        );
        current.close();
        current = undefined;
      }
      stalled = 0;
      try {
        const server = await bind(port);
        if (closed) server.close();
        else {
          current = server;
          logger.info("{what} is listening again", { what });
        }
      } catch (err) {
        logger.warn("{what} cannot listen again yet: {error}", {
          what,
          error: (err as Error).message,
        });
      }
    } finally {
      checking = false;
    }
  };

  return bind(options.port).then((server) => {
    current = server;
    const address = server.address();
    const port = typeof address === "object" && address ? address.port : options.port;
    what = `${options.name ?? "TLS listener"} ${port}`;
    shed = new ShedLog(what);
    const timer = setInterval(() => check(port), STALL_CHECK_MS);
    Deno.unrefTimer(timer);
    const unsubscribe = onDescriptorsFreed(() => suspect = true);
    return {
      port,
      setCertificate: (nextCert: string, nextKey: string) => {
        cert = nextCert;
        key = nextKey;
        current?.setSecureContext({ cert, key });
      },
      close: () => {
        closed = true;
        clearInterval(timer);
        unsubscribe();
        current?.close(); // stops accepting; live connections are closed by their owners
        current = undefined;
        return Promise.resolve();
      },
    };
  });
}
