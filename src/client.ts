/**
 * The NATadm client: keeps one connection to the server and serves the tunnels the server
 * opens on it as streams, each bridged to a local service.
 * @module
 */
import type { ClientConfig } from "./config.ts";
import { log } from "./log.ts";
import {
  AUTH_STEP_TIMEOUT_MS,
  authPayload,
  encodeMessage,
  FramedStream,
  fromBase64,
  type Hello,
  type Message,
  PROTOCOL_VERSION,
  ProtocolError,
  type ServiceInfo,
  type Welcome,
} from "./protocol.ts";
import { sign } from "./keys.ts";
import { Mux } from "./mux.ts";
import { LocalTunnels } from "./client_tunnels.ts";
import { connectTls, type Stream } from "./transport.ts";

export { allows } from "./client_tunnels.ts";

const logger = log("client");

/** First reconnect delay; each failure doubles it, up to `interval`. */
const RETRY_FIRST_MS = 1000;

/** Share of each reconnect delay taken off at random, so a fleet does not return in step. */
const RETRY_JITTER = 0.5;

/** A connection that lasted this long resets the reconnect delay to the first one. */
const HEALTHY_MS = 30_000;

/** The server refused us, or dropped us for a newer client of the same name. */
export class RefusedError extends Error {
  override name = "RefusedError";

  /** @param retry false when another live client took this name over: do not fight it. */
  constructor(message: string, readonly retry = true) {
    super(message);
  }
}

/** The server said it is going away; its live tunnels finish, then we connect again. */
class GoodbyeError extends Error {
  override name = "GoodbyeError";
}

/** Exit code of a client that stepped back because another took over its name. */
export const EXIT_REPLACED = 3;

/**
 * One {@link Client} per server of `remote`, all serving the same local tunnels: with a list
 * of servers (a cluster), the client keeps a session with each, so any of them can reach it.
 */
export function clientsFor(config: ClientConfig): Client[] {
  const tunnels = new LocalTunnels(config);
  return config.remotes.map(([remoteHost, remotePort]) =>
    new Client({ ...config, remoteHost, remotePort, remotes: [[remoteHost, remotePort]] }, tunnels)
  );
}

/** A running NATadm client. */
export class Client {
  #config: ClientConfig;
  #stopping = false;
  #wakeRetry: (() => void) | undefined;
  #tunnels: LocalTunnels;
  /** The connection of the current session, if one is up. */
  #mux: Mux | undefined;
  /** Ends the current session early (stop() or the server's goodbye). */
  #endSession: ((reason: Error) => void) | undefined;
  /** Connections whose session ended while tunnels still ran on them. */
  #leftovers = new Set<Mux>();
  /** Unix time in ms when the current connection authenticated. */
  #connectedAt: number | undefined;

  /**
   * @param tunnels the local tunnels to serve, shared by the clients of one process that keep
   * a session with each server of `remote`; a new set if absent
   */
  constructor(config: ClientConfig, tunnels?: LocalTunnels) {
    this.#config = config;
    this.#tunnels = tunnels ?? new LocalTunnels(config);
  }

  /** Live tunnels right now. */
  get liveTunnels(): number {
    return this.#tunnels.size;
  }

  /** Runs until stopped (`infinite = true`) or after one check; returns the exit code. */
  async run(): Promise<number> {
    const { remoteHost, remotePort, interval } = this.#config;
    if (!this.#config.infinite) {
      try {
        await this.#session();
        await this.#tunnels.all();
        return 0;
      } catch (err) {
        logger.error("{error}", { error: describeError(err, remoteHost, remotePort) });
        return 1;
      }
    }
    let failures = 0;
    while (!this.#stopping) {
      this.#connectedAt = undefined;
      let problem: unknown;
      try {
        await this.#session();
      } catch (err) {
        problem = err;
      }
      if (this.#stopping) break;
      if (problem instanceof RefusedError && !problem.retry) {
        // Two live machines share this name. Taking it back would push the other one out,
        // and both would swap places for ever: step back and let the admin sort it out.
        logger.error(
          "{error}; another client with this name is running, so this one stops " +
            "(give each machine its own name and key)",
          { error: describeError(problem, remoteHost, remotePort) },
        );
        await this.#drain();
        return EXIT_REPLACED;
      }
      const healthy = this.#connectedAt !== undefined &&
        Date.now() - this.#connectedAt >= HEALTHY_MS;
      failures = healthy || problem instanceof GoodbyeError ? 1 : failures + 1;
      // Exponential backoff with jitter, capped at `interval`: a server that is down is not
      // hammered, and a fleet that lost it at once returns spread over half of each delay.
      const base = Math.min(interval * 1000, RETRY_FIRST_MS * 2 ** (failures - 1));
      const delay = Math.round(base * (1 - RETRY_JITTER * Math.random()));
      const retry = {
        error: problem === undefined
          ? "connection closed"
          : describeError(problem, remoteHost, remotePort),
        delay: Math.round(delay / 100) / 10,
      };
      // A refusal needs the admin; a network problem usually passes by itself; a server
      // that said goodbye is a routine restart.
      if (problem instanceof RefusedError) logger.error("{error}; retrying in {delay} s", retry);
      else if (problem instanceof GoodbyeError) {
        logger.info("{error}; retrying in {delay} s", retry);
      } else logger.warn("{error}; retrying in {delay} s", retry);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, delay);
        this.#wakeRetry = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    await this.#drain();
    return 0;
  }

  /** Waits for live tunnels, up to `shutdown_grace` once stopping, then closes the rest. */
  async #drain(): Promise<void> {
    if (this.#tunnels.size > 0) {
      logger.info("shutting down: waiting up to {grace} s for {live} live tunnels", {
        grace: this.#config.shutdownGrace,
        live: this.#tunnels.size,
      });
    }
    await this.#tunnels.drain(this.#config.shutdownGrace * 1000);
    for (const mux of this.#leftovers) mux.close();
    this.#mux?.close();
  }

  /** Stops reconnecting and takes no new tunnels; live tunnels get a grace period. */
  stop(): void {
    this.#stopping = true;
    this.#wakeRetry?.();
    this.#endSession?.(new GoodbyeError("the client is stopping"));
  }

  async #connect(): Promise<Stream> {
    const { remoteHost, remotePort, caPem } = this.#config;
    return await connectTls({ hostname: remoteHost, port: remotePort, caCert: caPem });
  }

  /** One connection: authenticate, then serve the streams the server opens until it ends. */
  async #session(): Promise<void> {
    const { name, interval, infinite } = this.#config;
    const stream = await this.#connect();
    const framed = new FramedStream(stream);
    let welcome: Welcome, rttMs: number;
    try {
      ({ welcome, rttMs } = await this.#authenticate(framed, false));
    } catch (err) {
      stream.close();
      throw err;
    }
    this.#connectedAt = Date.now();
    logger.info("connected to {server} as {name}; serving {services}", {
      server: stream.remote,
      name,
      services: describeServices(welcome.services),
    });
    let remaining = welcome.pending;
    if (!infinite && remaining === 0) return stream.close();
    const leave = (reason: string) => {
      mux.sendControl({ type: "goodbye", reason }).catch(() => {});
      mux.closeWhenIdle(new Error(reason));
    };
    const mux: Mux = new Mux(stream, {
      onOpen: (tunnel, request) => {
        this.#tunnels.serve(tunnel, request);
        // A one-shot client serves what was pending when it connected, then leaves.
        if (!infinite && --remaining === 0) leave("served what was pending");
      },
      onControl: (message: Message) => {
        if (message.type === "ping") return;
        if (message.type === "refused") throw new RefusedError(message.reason, message.retry);
        if (message.type === "goodbye") {
          mux.closeWhenIdle(new Error(`the server said: ${message.reason}`));
          return this.#endSession?.(new GoodbyeError(`the server said: ${message.reason}`));
        }
        throw new ProtocolError(`unexpected "${message.type}" from the server`);
      },
    }, { maxStreams: this.#config.maxTunnels, rttMs });
    this.#mux = mux;
    // A first ping at once tells the server we heard welcome: it pairs users with us now.
    mux.sendControl({ type: "ping" }).catch(() => {});
    mux.startHeartbeat(interval * 1000);
    const ended = mux.run();
    const early = new Promise<Error>((resolve) => this.#endSession = resolve);
    try {
      const reason = await Promise.race([ended, early]);
      if (reason instanceof GoodbyeError) {
        // Live tunnels finish on this connection; a new one takes the next users.
        if (this.#stopping) leave("the client is stopping");
        this.#leftovers.add(mux);
        ended.then(() => this.#leftovers.delete(mux));
      }
      if (!infinite && !(reason instanceof RefusedError)) return;
      throw reason;
    } finally {
      this.#endSession = undefined;
      this.#mux = undefined;
    }
  }

  /** Says hello, answers the challenge with our key, and returns the server's welcome. */
  async #authenticate(
    framed: FramedStream,
    check: boolean,
  ): Promise<{ welcome: Welcome; rttMs: number }> {
    const { name, interval, key, remoteHost } = this.#config;
    const hello: Hello = {
      type: "hello",
      version: PROTOCOL_VERSION,
      name,
      interval,
      check,
      server: remoteHost.toLowerCase(),
    };
    const sent = performance.now();
    await framed.send(hello);
    const challenge = expect(await framed.read(AUTH_STEP_TIMEOUT_MS), "challenge");
    const rttMs = performance.now() - sent;
    const nonce = fromBase64(challenge.nonce)!;
    const signature = await sign(key, authPayload(nonce, encodeMessage(hello)));
    await framed.send({ type: "auth", signature: signature.toBase64() });
    return { welcome: expect(await framed.read(AUTH_STEP_TIMEOUT_MS), "welcome"), rttMs };
  }

  /**
   * Connects once, authenticates, and returns the services the server routes to this client,
   * without serving anything or disturbing a running client of the same name.
   */
  async check(): Promise<ServiceInfo[]> {
    const stream = await this.#connect();
    try {
      return (await this.#authenticate(new FramedStream(stream), true)).welcome.services;
    } finally {
      stream.close();
    }
  }
}

function expect<T extends Message["type"]>(
  message: Message | null,
  type: T,
): Extract<Message, { type: T }> {
  if (message?.type === "refused") throw new RefusedError(message.reason, message.retry);
  if (message === null) throw new Error(`server closed the connection before "${type}"`);
  if (message.type !== type) throw new Error(`expected "${type}", got "${message.type}"`);
  return message as Extract<Message, { type: T }>;
}

function describeServices(services: ServiceInfo[]): string {
  if (services.length === 0) return "no services";
  return services.map((s) => `server port ${s.port} → ${s.host}:${s.target_port}`).join(", ");
}

/** OpenSSL's verification codes, as `node:tls` reports them, for a chain our CA did not sign. */
const NOT_SIGNED_BY_CA = new Set([
  "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  "UNABLE_TO_GET_ISSUER_CERT",
  "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
  "SELF_SIGNED_CERT_IN_CHAIN",
  "DEPTH_ZERO_SELF_SIGNED_CERT",
  "CERT_SIGNATURE_FAILURE",
  "CERT_UNTRUSTED",
]);

/** Turns a connection or handshake failure into one line that says what to check. */
export function describeError(err: unknown, host: string, port: number): string {
  const where = `${host}:${port}`;
  const message = err instanceof Error ? err.message : String(err);
  const code = (err as { code?: unknown } | null)?.code;
  if (err instanceof RefusedError) return `server ${where} refused this client: ${message}`;
  if (typeof code === "string" && NOT_SIGNED_BY_CA.has(code)) {
    return `server ${where} presented a certificate not signed by cafile (${message})`;
  }
  if (code === "ERR_TLS_CERT_ALTNAME_INVALID") {
    return `server ${where}'s certificate is not valid for the name "${host}" (${message})`;
  }
  if (code === "CERT_HAS_EXPIRED" || code === "CERT_NOT_YET_VALID") {
    return `server ${where}'s certificate is expired or not yet valid (${message})`;
  }
  if (code === "ECONNRESET" && /before secure TLS connection/.test(message)) {
    // What a server's handshake caps do to one connection past them.
    return `server ${where} closed the connection during the TLS handshake (a busy server ` +
      `turns away handshakes past max_handshaking and max_handshaking_per_address)`;
  }
  if (code === "ECONNREFUSED") {
    return `cannot connect to ${where}: connection refused (is the server running?)`;
  }
  if (code === "ENOTFOUND" || code === "EAI_AGAIN" || code === "EAI_NONAME") {
    return `cannot resolve ${host}: ${message}`;
  }
  if (
    code === "ERR_SSL_WRONG_VERSION_NUMBER" ||
    /InvalidContentType|corrupt message|InvalidMessage|unexpected handshake message/i.test(message)
  ) {
    return `${where} does not speak TLS on that port (${message})`;
  }
  return `connection to ${where} failed: ${message}`;
}
