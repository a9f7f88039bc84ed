/**
 * Version 2 peers driven by hand for the protocol, mux, fuzz and slowloris tests: pairs of real
 * TCP sockets on 127.0.0.1, a TLS dial as the real client makes it, and a login that speaks the
 * real handshake (`src/protocol.ts`) with a real key, after which the test writes whatever mux
 * frames it likes.
 * @module
 */
import { importPrivateKey, sign } from "../src/keys.ts";
import {
  AUTH_STEP_TIMEOUT_MS,
  authPayload,
  encodeMessage,
  FramedStream,
  FrameType,
  fromBase64,
  type Hello,
  type Message,
  muxFrame,
  PROTOCOL_VERSION,
} from "../src/protocol.ts";
import { ConnStream } from "../src/transport.ts";
import { DEADLINE_MS, type Identity } from "./helpers.ts";

/** Two ends of one real TCP connection on 127.0.0.1, with no-delay, as {@link ConnStream}s. */
export async function tcpPair(): Promise<{ a: ConnStream; b: ConnStream; close(): void }> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const [dialed, accepted] = await Promise.all([
      Deno.connect({ hostname: "127.0.0.1", port: (listener.addr as Deno.NetAddr).port }),
      listener.accept(),
    ]);
    dialed.setNoDelay(true);
    (accepted as Deno.TcpConn).setNoDelay(true);
    const a = new ConnStream(dialed);
    const b = new ConnStream(accepted);
    return {
      a,
      b,
      close: () => {
        a.close();
        b.close();
      },
    };
  } finally {
    listener.close();
  }
}

/** A TLS connection to the communication port, with our local port for matching log lines. */
export interface Dialed {
  stream: ConnStream;
  framed: FramedStream;
  /** Our side's port, as the server logs it in `127.0.0.1:PORT`. */
  localPort: number;
}

/** Opens a verified TLS connection to `hostname:port`, as the real client does. */
export async function dial(port: number, caPem: string, hostname = "localhost"): Promise<Dialed> {
  const tcp = await Deno.connect({ hostname, port, signal: AbortSignal.timeout(DEADLINE_MS) });
  tcp.setNoDelay(true);
  const localPort = (tcp.localAddr as Deno.NetAddr).port;
  const tls = Deno.startTls(tcp, { hostname, caCerts: [caPem] });
  const conn = await tls;
  try {
    await conn.handshake();
  } catch (err) {
    conn.close();
    throw err;
  }
  // No read-ahead: the handshake reader must leave the mux frames after `welcome` unread.
  const stream = new ConnStream(conn);
  return { stream, framed: new FramedStream(stream), localPort };
}

/** The hello a test peer sends: version 2, the server name it dialled, a long interval. */
export function helloFor(
  name: string,
  options: { interval?: number; server?: string } = {},
): Hello {
  return {
    type: "hello",
    version: PROTOCOL_VERSION,
    name,
    interval: options.interval ?? 600,
    check: false,
    server: options.server ?? "localhost",
  };
}

/**
 * Dials and logs in as `identity` with its real key; resolves with the connection once the
 * server said `welcome` (mux frames follow), or throws with what it said instead.
 */
export async function login(
  port: number,
  caPem: string,
  identity: Identity,
  options: { interval?: number } = {},
): Promise<Dialed & { welcome: Message }> {
  const key = await importPrivateKey(await Deno.readTextFile(identity.keyPath));
  const dialed = await dial(port, caPem);
  try {
    const hello = helloFor(identity.name, options);
    await dialed.framed.send(hello);
    const challenge = await dialed.framed.read(AUTH_STEP_TIMEOUT_MS);
    if (challenge?.type !== "challenge") throw new Error(`got ${JSON.stringify(challenge)}`);
    const nonce = fromBase64(challenge.nonce)!;
    const signature = await sign(key, authPayload(nonce, encodeMessage(hello)));
    await dialed.framed.send({ type: "auth", signature: signature.toBase64() });
    const welcome = await dialed.framed.read(AUTH_STEP_TIMEOUT_MS);
    if (welcome?.type !== "welcome") throw new Error(`got ${JSON.stringify(welcome)}`);
    // As the real client does: a first ping says we heard welcome, and users may be paired.
    await dialed.stream.write(muxFrame(FrameType.CONTROL, 0, encodeMessage({ type: "ping" })));
    return { ...dialed, welcome };
  } catch (err) {
    dialed.stream.close();
    throw new Error(`login as ${identity.name} failed: ${(err as Error).message}`);
  }
}

/** Resolves true once `stream` ends or fails (the peer closed it), false at the deadline. */
export async function closedWithin(
  stream: { read(p: Uint8Array): Promise<number | null> },
  timeoutMs = DEADLINE_MS,
  maxBytes = 16 * 1024 * 1024,
): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<false>((resolve) =>
    timer = setTimeout(() => resolve(false), timeoutMs)
  );
  const ended = (async () => {
    const buf = new Uint8Array(64 * 1024);
    let got = 0;
    try {
      // Bounded: a peer that keeps sending past `maxBytes` is not closing.
      while (got < maxBytes) {
        const n = await stream.read(buf);
        if (n === null) return true;
        got += n;
      }
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
