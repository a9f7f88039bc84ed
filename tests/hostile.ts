/**
 * Tools for the security tests: a NATadm client driven by hand, speaking the real protocol
 * (`src/protocol.ts`) over real TLS — a hello naming the server, the signed challenge, then mux
 * frames — so that a test can do what the real client never does: sign another hello than the
 * one it sent, dial one server name and claim another, send DATA past its credit, open a stream
 * itself, name a stream that was never opened, send a second FIN or a bad WINDOW. Also raw
 * connections, an echo service that counts its connections, and server configs with every
 * service option.
 * @module
 */
import { importPrivateKey, sign } from "../src/keys.ts";
import {
  authPayload,
  decodeMessage,
  decodeOpen,
  encodeMessage,
  FramedStream,
  type FrameKind,
  FrameParser,
  FrameType,
  fromBase64,
  type Hello,
  INITIAL_WINDOW,
  MAX_DATA_BYTES,
  type Message,
  MUX_HEADER_BYTES,
  muxFrame,
  type OpenRequest,
  PROTOCOL_VERSION,
  type Welcome,
} from "../src/protocol.ts";
import { ConnStream, type Stream } from "../src/transport.ts";
import { DEADLINE_MS, type Identity, serverToml, type ServiceSpec, waitUntil } from "./helpers.ts";

const encoder = new TextEncoder();

/** A TLS connection to the communication port, with the local port for matching log lines. */
export interface Dialed {
  stream: Stream;
  framed: FramedStream;
  /** Our side's port, as the server logs it in `127.0.0.1:PORT`. */
  localPort: number;
}

/**
 * Opens a verified TLS connection to `hostname:port`, as the real client does; `tlsName` is
 * the name the certificate must carry (default `hostname`).
 */
export async function dial(
  port: number,
  caPem: string,
  hostname = "localhost",
  tlsName = hostname,
): Promise<Dialed> {
  const tcp = await Deno.connect({ hostname, port, signal: AbortSignal.timeout(DEADLINE_MS) });
  tcp.setNoDelay(true);
  const localPort = (tcp.localAddr as Deno.NetAddr).port;
  const tls = await Deno.startTls(tcp, { hostname: tlsName, caCerts: [caPem] });
  try {
    await tls.handshake();
  } catch (err) {
    tls.close();
    throw err;
  }
  const stream = new ConnStream(tls);
  return { stream, framed: new FramedStream(stream), localPort };
}

/** Resolves true once `stream` ends or fails (the peer closed it), false at the deadline. */
export async function closedWithin(
  stream: { read(p: Uint8Array): Promise<number | null> },
  timeoutMs = DEADLINE_MS,
): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<false>((resolve) =>
    timer = setTimeout(() => resolve(false), timeoutMs)
  );
  const ended = (async () => {
    const buf = new Uint8Array(4096);
    try {
      // Bounded: a peer that keeps sending past 64 KiB is not closing.
      for (let i = 0; i < 16; i++) if (await stream.read(buf) === null) return true;
      return false;
    } catch {
      return true;
    }
  })();
  try {
    return await Promise.race([ended, deadline]);
  } finally {
    clearTimeout(timer);
  }
}

/** A handshake frame (4-byte length, JSON) of any object, valid or not, as a peer may send. */
export function rawFrame(object: unknown): Uint8Array {
  const body = encoder.encode(JSON.stringify(object));
  const frame = new Uint8Array(4 + body.length);
  new DataView(frame.buffer).setUint32(0, body.length);
  frame.set(body, 4);
  return frame;
}

/** A 4-byte handshake frame header announcing `length` bytes. */
export function lengthHeader(length: number): Uint8Array {
  const h = new Uint8Array(4);
  new DataView(h.buffer).setUint32(0, length);
  return h;
}

/** A mux frame header alone: type, stream id and a claimed payload length (any, even wrong). */
export function muxHeader(type: number, stream: number, length: number): Uint8Array {
  const out = new Uint8Array(MUX_HEADER_BYTES);
  const view = new DataView(out.buffer);
  out[0] = type;
  view.setUint32(1, stream);
  view.setUint32(5, length);
  return out;
}

/** A WINDOW frame granting `increment` (any 32-bit value, 0 included). */
export function windowFrame(stream: number, increment: number): Uint8Array {
  const payload = new Uint8Array(4);
  new DataView(payload.buffer).setUint32(0, increment);
  return muxFrame(FrameType.WINDOW, stream, payload);
}

/** The hello a client of `name` sends, with `server` the name it dialled. */
export function helloFor(name: string, fields: Partial<Hello> = {}): Hello {
  return {
    type: "hello",
    version: PROTOCOL_VERSION,
    name,
    // Long enough that the server never calls a silent test peer dead.
    interval: 600,
    check: false,
    server: "localhost",
    ...fields,
  };
}

/** How one hand-driven login went. */
export interface Attempt {
  /** `welcome` or `refused`, or null if the server closed without a word. */
  reply: Message | null;
  /** From sending `hello` to the final reply. */
  ms: number;
  dialed: Dialed;
}

/**
 * Says hello as `name` and signs the challenge with the key in `keyPath` (right or wrong);
 * returns the server's final answer and how long it took. `hello` changes fields of the hello
 * sent; `signed` makes the signature cover other bytes than the hello as sent (a hello changed
 * after signing, say).
 */
export async function attemptLogin(options: {
  port: number;
  caPem: string;
  name: string;
  keyPath: string;
  hello?: Partial<Hello>;
  signed?: (sent: Uint8Array) => Uint8Array;
  /** Address dialled (default "localhost"). */
  hostname?: string;
}): Promise<Attempt> {
  const key = await importPrivateKey(await Deno.readTextFile(options.keyPath));
  const dialed = await dial(options.port, options.caPem, options.hostname);
  const { framed } = dialed;
  const started = performance.now();
  const hello = rawFrame(helloFor(options.name, options.hello));
  await dialed.stream.write(hello);
  const challenge = await framed.read(DEADLINE_MS);
  if (challenge?.type !== "challenge") {
    return { reply: challenge, ms: performance.now() - started, dialed };
  }
  const sent = hello.subarray(4);
  const covered = options.signed ? options.signed(sent) : sent;
  const signature = await sign(
    key,
    authPayload(fromBase64(challenge.nonce)!, new Uint8Array(covered)),
  );
  await framed.send({ type: "auth", signature: signature.toBase64() });
  const reply = await framed.read(DEADLINE_MS);
  return { reply, ms: performance.now() - started, dialed };
}

/** A stream the server opened on a {@link MuxPeer}'s connection. */
export interface PeerStream {
  id: number;
  request: OpenRequest;
  /** Payloads of the DATA frames received, in order. */
  received: Uint8Array[];
  /** Credit the server granted us and we have not used (negative once we overran it). */
  credit: number;
  /** Whether the server sent FIN. */
  fin: boolean;
  /** Whether our echo sent FIN back. */
  finSent: boolean;
  /** The server's RESET reason, if it reset the stream. */
  reset?: string;
  /** Echo whatever arrives back (within our credit), granting the server credit back. */
  echo: boolean;
  /** Bytes to echo that wait for credit. */
  backlog: Uint8Array[];
}

/**
 * An authenticated client connection driven by the test, in the mux phase: it records what
 * the server sends (opens, data, windows, control messages) and sends whatever the test asks,
 * well-formed or not.
 */
export class MuxPeer {
  /** Streams the server opened, in order. */
  readonly streams: PeerStream[] = [];
  /** Control messages from the server (pings included). */
  readonly controls: Message[] = [];
  /** Resolves once the server closed the connection (or it failed). */
  readonly ended: Promise<void>;
  /** Set if the server sent something our strict parser rejects. */
  parseError: Error | undefined;
  #byId = new Map<number, PeerStream>();

  private constructor(readonly dialed: Dialed, readonly welcome: Welcome) {
    this.ended = this.#read();
  }

  /** Logs in as `identity`; throws unless the server says welcome. */
  static async login(
    port: number,
    caPem: string,
    identity: Identity,
    hello: Partial<Hello> = {},
  ): Promise<MuxPeer> {
    const attempt = await attemptLogin({
      port,
      caPem,
      name: identity.name,
      keyPath: identity.keyPath,
      hello,
    });
    if (attempt.reply?.type !== "welcome") {
      attempt.dialed.stream.close();
      throw new Error(`login as ${identity.name} failed: ${JSON.stringify(attempt.reply)}`);
    }
    const peer = new MuxPeer(attempt.dialed, attempt.reply);
    // As the real client does: a first ping says we heard welcome, and users may be paired.
    await peer.send(muxFrame(FrameType.CONTROL, 0, encodeMessage({ type: "ping" })));
    return peer;
  }

  /** Our side's port, as the server logs it. */
  get localPort(): number {
    return this.dialed.localPort;
  }

  async #read(): Promise<void> {
    const parser = new FrameParser((type, id, payload) => this.#frame(type, id, payload));
    const buf = new Uint8Array(256 * 1024);
    try {
      for (;;) {
        const n = await this.dialed.stream.read(buf);
        if (n === null) return;
        parser.push(buf.subarray(0, n), false);
      }
    } catch (err) {
      if (err instanceof Error && err.name === "ProtocolError") this.parseError = err;
    } finally {
      this.dialed.stream.close();
    }
  }

  #frame(type: FrameKind, id: number, payload: Uint8Array): void {
    if (type === FrameType.CONTROL) {
      this.controls.push(decodeMessage(payload));
      return;
    }
    if (type === FrameType.OPEN) {
      const stream: PeerStream = {
        id,
        request: decodeOpen(payload),
        received: [],
        credit: INITIAL_WINDOW,
        fin: false,
        finSent: false,
        echo: false,
        backlog: [],
      };
      this.streams.push(stream);
      this.#byId.set(id, stream);
      return;
    }
    const stream = this.#byId.get(id);
    if (!stream) return;
    switch (type) {
      case FrameType.DATA:
        stream.received.push(payload);
        if (stream.echo) {
          stream.backlog.push(payload);
          this.send(windowFrame(id, payload.length)).catch(() => {});
          this.#pump(stream);
        }
        return;
      case FrameType.WINDOW:
        stream.credit += new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0);
        if (stream.echo) this.#pump(stream);
        return;
      case FrameType.FIN:
        stream.fin = true;
        if (stream.echo) this.#pump(stream);
        return;
      case FrameType.RESET:
        stream.reset = new TextDecoder().decode(payload);
        return;
    }
  }

  /** Sends what waits to be echoed on `stream`, as far as the credit goes. */
  #pump(stream: PeerStream): void {
    while (stream.backlog.length > 0 && stream.credit > 0) {
      const head = stream.backlog[0];
      const n = Math.min(head.length, stream.credit, MAX_DATA_BYTES);
      this.send(muxFrame(FrameType.DATA, stream.id, head.subarray(0, n))).catch(() => {});
      stream.credit -= n;
      if (n === head.length) stream.backlog.shift();
      else stream.backlog[0] = head.subarray(n);
    }
    if (stream.backlog.length === 0 && stream.fin && !stream.finSent) {
      stream.finSent = true;
      this.send(muxFrame(FrameType.FIN, stream.id)).catch(() => {});
    }
  }

  /** Waits for the `index`-th stream the server opens (0 = the first). */
  nextOpen(index = this.streams.length, timeoutMs = DEADLINE_MS): Promise<PeerStream> {
    return waitUntil(() => this.streams[index], `stream #${index} opened by the server`, timeoutMs);
  }

  /** Echoes everything `stream` receives from now on (and what it received already). */
  echo(stream: PeerStream): void {
    stream.echo = true;
    for (const payload of stream.received) {
      stream.backlog.push(payload);
      this.send(windowFrame(stream.id, payload.length)).catch(() => {});
    }
    this.#pump(stream);
  }

  /** Writes raw bytes on the connection (a frame, a broken frame, anything). */
  send(bytes: Uint8Array): Promise<void> {
    return this.dialed.stream.write(bytes);
  }

  /** Sends one mux frame (type and stream as given, however wrong). */
  frame(type: number, stream: number, payload?: Uint8Array): Promise<void> {
    return this.send(muxFrame(type as FrameKind, stream, payload));
  }

  /** Sends `bytes` on `stream` as DATA frames of at most 64 KiB, whatever our credit. */
  async data(stream: PeerStream, bytes: Uint8Array): Promise<void> {
    const frames: Uint8Array[] = [];
    for (let at = 0; at < bytes.length; at += MAX_DATA_BYTES) {
      const part = bytes.subarray(at, at + MAX_DATA_BYTES);
      frames.push(muxFrame(FrameType.DATA, stream.id, part));
      stream.credit -= part.length;
    }
    // One write: the frames arrive together, as a sender that ignores credit would send them.
    const all = new Uint8Array(frames.reduce((n, f) => n + f.length, 0));
    frames.reduce((at, f) => (all.set(f, at), at + f.length), 0);
    await this.send(all);
  }

  /** Resolves true once the server has closed the connection, false at the deadline. */
  async closedWithin(timeoutMs = DEADLINE_MS): Promise<boolean> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      return await Promise.race([
        this.ended.then(() => true),
        new Promise<false>((resolve) => timer = setTimeout(() => resolve(false), timeoutMs)),
      ]);
    } finally {
      clearTimeout(timer);
    }
  }

  close(): void {
    this.dialed.stream.close();
  }
}

/** A TCP echo service on `hostname` that counts the connections it accepted. */
export function countingEcho(hostname = "127.0.0.1"): {
  port: number;
  readonly accepted: number;
  close: () => void;
} {
  const listener = Deno.listen({ hostname, port: 0 });
  const conns = new Set<Deno.Conn>();
  let accepted = 0;
  (async () => {
    for await (const conn of listener) {
      accepted++;
      conns.add(conn);
      conn.readable.pipeTo(conn.writable).catch(() => {}).finally(() => conns.delete(conn));
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    get accepted() {
      return accepted;
    },
    close: () => {
      listener.close();
      for (const c of conns) {
        try {
          c.close();
        } catch {
          // closed by pipeTo
        }
      }
    },
  };
}

/** A service with `host` and `allow_from`: {@link ServiceSpec} has them all. */
export type FullService = ServiceSpec;

/** Server config text with hosts and allow_from on services, and any listen_host. */
export function fullServerToml(options: {
  communicationPort: number;
  clients: Identity[];
  services: FullService[];
  listenHost?: string;
  certificate?: [string, string];
  extra?: string[];
}): string {
  return serverToml({ ...options, extra: options.extra?.join("\n") });
}

/** Sends `payload` through `conn` and checks the same bytes come back, within the deadline. */
export async function echoesThrough(
  conn: Deno.Conn,
  payload: Uint8Array,
  timeoutMs = DEADLINE_MS,
): Promise<boolean> {
  const back = new Uint8Array(payload.length);
  let got = 0;
  const timer = setTimeout(() => conn.close(), timeoutMs);
  try {
    const reading = (async () => {
      while (got < back.length) {
        const n = await conn.read(back.subarray(got));
        if (n === null) return;
        got += n;
      }
    })();
    let sent = 0;
    while (sent < payload.length) sent += await conn.write(payload.subarray(sent));
    await reading;
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
  }
  return got === payload.length && back.every((b, i) => b === payload[i]);
}
