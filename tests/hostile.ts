/**
 * Tools for the security tests: a NATadm client driven by hand, speaking the real protocol
 * (`src/protocol.ts`) over real TLS, so that a test can do what the real client never does —
 * hold an id back, replay it, present it with another session's token, open standby
 * connections past the limit, sign with the wrong key. Also raw connections, an echo service
 * that counts its connections, and server configs with every service option.
 * @module
 */
import { importPrivateKey, sign } from "../src/keys.ts";
import {
  authPayload,
  ChunkStream,
  type Connect,
  FramedStream,
  fromBase64,
  type Message,
  PROTOCOL_VERSION,
  TUNNEL_ID_BYTES,
  type Welcome,
} from "../src/protocol.ts";
import { ConnStream, type Stream } from "../src/transport.ts";
import {
  DEADLINE_MS,
  type Identity,
  readExactly,
  serverToml,
  type ServiceSpec,
} from "./helpers.ts";

/** A TLS connection to the communication port, with the local port for matching log lines. */
export interface Dialed {
  stream: Stream;
  framed: FramedStream;
  /** Our side's port, as the server logs it in `127.0.0.1:PORT`. */
  localPort: number;
}

/** Opens a verified TLS connection to `hostname:port`, as the real client does. */
export async function dial(
  port: number,
  caPem: string,
  hostname = "localhost",
): Promise<Dialed> {
  const tcp = await Deno.connect({ hostname, port, signal: AbortSignal.timeout(DEADLINE_MS) });
  tcp.setNoDelay(true);
  const localPort = (tcp.localAddr as Deno.NetAddr).port;
  const tls = await Deno.startTls(tcp, { hostname, caCerts: [caPem] });
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

/** Reads exactly `n` bytes from a NATadm stream, or throws at its end or the deadline. */
export function readStream(
  stream: Stream,
  n: number,
  timeoutMs = DEADLINE_MS,
): Promise<Uint8Array> {
  return readExactly(stream, n, timeoutMs);
}

/**
 * Plays the service on a data connection in tunnel mode: echoes every chunk back as a chunk
 * until the end-of-stream chunk, then ends our direction the same way and closes.
 */
export async function echoStream(stream: Stream): Promise<void> {
  const tunnel = new ChunkStream(stream);
  const buf = new Uint8Array(16 * 1024);
  try {
    for (;;) {
      const n = await tunnel.read(buf);
      if (n === null) break;
      await tunnel.write(buf.slice(0, n));
    }
    await tunnel.closeWrite();
  } catch {
    // The other side cut the tunnel: nothing left to echo.
  } finally {
    stream.close();
  }
}

/** A random 128-bit id in the wire's base64 form, as nobody was ever issued. */
export function randomId(): string {
  return crypto.getRandomValues(new Uint8Array(TUNNEL_ID_BYTES)).toBase64();
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
 * returns the server's final answer and how long it took.
 */
export async function attemptLogin(options: {
  port: number;
  caPem: string;
  name: string;
  keyPath: string;
  interval?: number;
}): Promise<Attempt> {
  const key = await importPrivateKey(await Deno.readTextFile(options.keyPath));
  const dialed = await dial(options.port, options.caPem);
  const { framed } = dialed;
  const started = performance.now();
  await framed.send({
    type: "hello",
    version: PROTOCOL_VERSION,
    name: options.name,
    // Long enough that the server never calls a silent test peer dead.
    interval: options.interval ?? 600,
    check: false,
  });
  const challenge = await framed.read(DEADLINE_MS);
  if (challenge?.type !== "challenge") {
    return { reply: challenge, ms: performance.now() - started, dialed };
  }
  const signature = await sign(key, authPayload(fromBase64(challenge.nonce)!, options.name));
  await framed.send({ type: "auth", signature: signature.toBase64() });
  const reply = await framed.read(DEADLINE_MS);
  return { reply, ms: performance.now() - started, dialed };
}

/** An authenticated control connection driven by the test. */
export class Peer {
  private constructor(
    readonly dialed: Dialed,
    readonly welcome: Welcome,
    readonly port: number,
    readonly caPem: string,
  ) {}

  /** Logs in as `identity`; throws unless the server says welcome. */
  static async login(port: number, caPem: string, identity: Identity): Promise<Peer> {
    const attempt = await attemptLogin({
      port,
      caPem,
      name: identity.name,
      keyPath: identity.keyPath,
    });
    if (attempt.reply?.type !== "welcome") {
      attempt.dialed.stream.close();
      throw new Error(`login as ${identity.name} failed: ${JSON.stringify(attempt.reply)}`);
    }
    return new Peer(attempt.dialed, attempt.reply, port, caPem);
  }

  /** The session token from `welcome`. */
  get session(): string {
    return this.welcome.session;
  }

  /** Waits for the next `connect` on the control connection, skipping heartbeats. */
  async nextConnect(timeoutMs = DEADLINE_MS): Promise<Connect> {
    const end = Date.now() + timeoutMs;
    for (let i = 0; i < 1000; i++) {
      const message = await this.dialed.framed.read(Math.max(1, end - Date.now()));
      if (message?.type === "connect") return message;
      if (message?.type !== "ping") {
        throw new Error(`expected "connect", got ${JSON.stringify(message)}`);
      }
    }
    throw new Error("no connect among 1000 messages");
  }

  /** Opens a data connection presenting `id` with `session` (ours unless given). */
  async openData(id: string, session = this.session): Promise<Dialed> {
    const dialed = await dial(this.port, this.caPem);
    await dialed.framed.send({ type: "data", version: PROTOCOL_VERSION, id, session });
    return dialed;
  }

  /** Opens a standby connection presenting `session` (ours unless given). */
  async openStandby(session = this.session): Promise<Dialed> {
    const dialed = await dial(this.port, this.caPem);
    await dialed.framed.send({ type: "standby", version: PROTOCOL_VERSION, session });
    return dialed;
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
