/**
 * The NATadm client: keeps a control connection to the server and, when told a user is
 * waiting, bridges a local service to the server over a fresh data connection.
 * @module
 */
import type { ClientConfig } from "./config.ts";
import { log } from "./log.ts";
import { bridge } from "./bridge.ts";
import {
  AUTH_STEP_TIMEOUT_MS,
  authPayload,
  ChunkStream,
  type Connect,
  FramedStream,
  fromBase64,
  HEARTBEAT_MISSES,
  MAX_STANDBY_PER_CLIENT,
  type Message,
  PROTOCOL_VERSION,
  type ServiceInfo,
  STANDBY_CONNECTIONS,
  STANDBY_PING_MS,
  type Welcome,
} from "./protocol.ts";
import { sign } from "./keys.ts";
import { connectTcp, connectTls, type Stream } from "./transport.ts";

const logger = log("client");

/** First reconnect delay; each failure doubles it, up to `interval`. */
const RETRY_FIRST_MS = 1000;

/** A control connection that lasted this long resets the reconnect delay to the first one. */
const HEALTHY_MS = 30_000;

/**
 * Idle standby connections kept at most, when tunnels that ended return theirs: as many as the
 * server will hold. A lower cap here closed connections that a burst needed again a moment
 * later, and every one of those cost a TLS handshake (6 of 7 handshakes at 32 parallel users).
 */
const MAX_IDLE_STANDBY = MAX_STANDBY_PER_CLIENT;

/** The server refused us, or dropped us for a newer client of the same name. */
export class RefusedError extends Error {
  override name = "RefusedError";

  /** @param retry false when another live client took this name over: do not fight it. */
  constructor(message: string, readonly retry = true) {
    super(message);
  }
}

/** Exit code of a client that stepped back because another took over its name. */
export const EXIT_REPLACED = 3;

/** A running NATadm client. */
export class Client {
  #config: ClientConfig;
  #stopping = false;
  #control: Stream | undefined;
  #wakeRetry: (() => void) | undefined;
  #tunnels = new Set<Promise<void>>();
  #streams = new Set<Stream>();
  /** Standby data connections waiting for a user. */
  #idle = new Set<Stream>();
  /** Token of the current session, which standby connections present; none between sessions. */
  #token: string | undefined;

  constructor(config: ClientConfig) {
    this.#config = config;
  }

  /** Unix time in ms when the current control connection authenticated. */
  #connectedAt: number | undefined;

  /** Runs until stopped (`infinite = true`) or after one check; returns the exit code. */
  async run(): Promise<number> {
    const { remoteHost, remotePort, interval } = this.#config;
    if (!this.#config.infinite) {
      try {
        await this.#session();
        await Promise.all(this.#tunnels);
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
      failures = healthy ? 0 : failures + 1;
      // Exponential backoff with jitter, capped at `interval`: a server that is down is not
      // hammered, and many clients that lost it at once do not return in lockstep.
      const base = Math.min(interval * 1000, RETRY_FIRST_MS * 2 ** (failures - 1));
      const delay = Math.round(base * (0.8 + 0.2 * Math.random()));
      const error = problem === undefined
        ? "control connection closed"
        : describeError(problem, remoteHost, remotePort);
      // A refusal needs the admin; a network problem usually passes by itself.
      const retry = { error, delay: (delay / 1000).toFixed(1) };
      if (problem instanceof RefusedError) logger.error("{error}; retrying in {delay} s", retry);
      else logger.warn("{error}; retrying in {delay} s", retry);
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
    if (this.#tunnels.size === 0) return;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const grace = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, this.#config.shutdownGrace * 1000);
    });
    if (this.#stopping) {
      logger.info("shutting down: waiting up to {grace} s for {live} live tunnels", {
        grace: this.#config.shutdownGrace,
        live: this.#tunnels.size,
      });
    }
    await Promise.race([Promise.all(this.#tunnels), grace]);
    clearTimeout(timer);
    for (const stream of this.#streams) stream.close();
    await Promise.all(this.#tunnels);
  }

  /** Stops reconnecting, closes the control connection; live tunnels get a grace period. */
  stop(): void {
    this.#stopping = true;
    this.#wakeRetry?.();
    this.#control?.close();
  }

  async #connect(): Promise<Stream> {
    const { remoteHost, remotePort, caPem } = this.#config;
    return await connectTls({ hostname: remoteHost, port: remotePort, caCert: caPem });
  }

  /** One control connection: authenticate, then serve connect requests until it ends. */
  async #session(): Promise<void> {
    const { name, interval, infinite } = this.#config;
    const stream = await this.#connect();
    this.#control = stream;
    const framed = new FramedStream(stream);
    let heartbeat: ReturnType<typeof setInterval> | undefined;
    try {
      const welcome = await this.#authenticate(framed, false);
      this.#connectedAt = Date.now();
      logger.info("connected to {server} as {name}; serving {services}", {
        server: stream.remote,
        name,
        services: describeServices(welcome.services),
      });
      let remaining = welcome.pending;
      if (!infinite && remaining === 0) return;
      if (infinite) {
        this.#token = welcome.session;
        for (let i = 0; i < STANDBY_CONNECTIONS; i++) this.#standby(welcome.session, framed);
      }
      heartbeat = setInterval(() => {
        framed.send({ type: "ping" }).catch(() => stream.close());
      }, interval * 1000);
      for (;;) {
        const message = await framed.read(HEARTBEAT_MISSES * interval * 1000);
        if (message === null) throw new Error("server closed the control connection");
        if (message.type === "ping") continue;
        if (message.type === "refused") throw new RefusedError(message.reason, message.retry);
        if (message.type !== "connect") {
          throw new Error(`unexpected "${message.type}" on the control connection`);
        }
        this.#track(message, this.#tunnel(message, framed, welcome.session));
        // A one-shot check serves what was pending when it connected, then hangs up.
        if (!infinite && --remaining === 0) return;
      }
    } finally {
      clearInterval(heartbeat);
      stream.close();
      this.#control = undefined;
      this.#token = undefined;
      for (const idle of this.#idle) idle.close();
    }
  }

  /** Says hello, answers the challenge with our key, and returns the server's welcome. */
  async #authenticate(framed: FramedStream, check: boolean): Promise<Welcome> {
    const { name, interval, key } = this.#config;
    await framed.send({ type: "hello", version: PROTOCOL_VERSION, name, interval, check });
    const challenge = expect(await framed.read(AUTH_STEP_TIMEOUT_MS), "challenge");
    const nonce = fromBase64(challenge.nonce)!;
    const signature = await sign(key, authPayload(nonce, name));
    await framed.send({ type: "auth", signature: signature.toBase64() });
    return expect(await framed.read(AUTH_STEP_TIMEOUT_MS), "welcome");
  }

  /**
   * Connects once, authenticates, and returns the services the server routes to this client,
   * without serving anything or disturbing a running client of the same name.
   */
  async check(): Promise<ServiceInfo[]> {
    const stream = await this.#connect();
    try {
      return (await this.#authenticate(new FramedStream(stream), true)).services;
    } finally {
      stream.close();
    }
  }

  /** Keeps a tunnel in the set that shutdown and one-shot checks wait for; logs a failure. */
  #track(request: Connect, work: Promise<void>): void {
    const tunnel = work.catch((err) => {
      logger.warn("tunnel for user {user} failed: {error}", {
        user: request.user,
        error: (err as Error).message,
      });
    }).finally(() => this.#tunnels.delete(tunnel));
    this.#tunnels.add(tunnel);
  }

  /**
   * Connects to the local target if this client allows it, or tells the server why not (the
   * server then closes the user).
   */
  async #connectLocal(request: Connect, control: FramedStream): Promise<Stream> {
    const target = `${request.host}:${request.port}`;
    let reason: string;
    if (!allows(this.#config.allow, request.host, request.port)) {
      reason = `${target} is not in this client's allow list`;
      logger.warn("refused to connect user {user} to {target}: not in the allow list", {
        user: request.user,
        target,
      });
    } else {
      try {
        return await connectTcp(request.host, request.port);
      } catch (err) {
        reason = `cannot connect to ${target}: ${(err as Error).message}`;
      }
    }
    await control.send({ type: "reject", id: request.id, reason }).catch(() => {});
    throw new Error(reason);
  }

  /** Serves a `connect` from the control connection: a new data connection for its id. */
  async #tunnel(request: Connect, control: FramedStream, session: string): Promise<void> {
    const [local, data] = await Promise.allSettled([
      this.#connectLocal(request, control),
      this.#connect(),
    ]);
    if (local.status === "rejected") {
      if (data.status === "fulfilled") data.value.close();
      throw local.reason;
    }
    if (data.status === "rejected") {
      local.value.close();
      throw new Error(`cannot open a data connection: ${(data.reason as Error).message}`);
    }
    const server = data.value;
    await new FramedStream(server).send({
      type: "data",
      version: PROTOCOL_VERSION,
      id: request.id,
      session,
    });
    // Once the tunnel has ended cleanly, the connection joins the standby pool.
    if (await this.#bridge(request, server, local.value)) this.#standby(session, control, server);
  }

  /**
   * Keeps a standby data connection for session `token`, opening one if `stream` is not
   * given. The server hands it the next user at once, so that user's first byte waits for no
   * round trip and no TLS handshake. After each tunnel that ends cleanly it goes back to the
   * pool, which grows with demand up to {@link MAX_IDLE_STANDBY}; the server, which hands them
   * out, closes the surplus when it finds the pool idle.
   */
  async #standby(token: string, control: FramedStream, stream?: Stream): Promise<void> {
    if (!stream) {
      try {
        stream = await this.#connect();
      } catch (err) {
        logger.debug("standby connection failed: {error}", { error: (err as Error).message });
        return;
      }
    }
    const framed = new FramedStream(stream);
    for (;;) {
      if (this.#token !== token || this.#idle.size >= MAX_IDLE_STANDBY) return stream.close();
      let request: Connect | undefined;
      this.#idle.add(stream);
      try {
        await framed.send({ type: "standby", version: PROTOCOL_VERSION, session: token });
        while (!request) {
          const message = await framed.read(HEARTBEAT_MISSES * STANDBY_PING_MS);
          if (message === null) break;
          if (message.type === "connect") request = message;
          else if (message.type !== "ping") throw new Error(`unexpected "${message.type}"`);
        }
      } catch {
        // Closed with its session, silent too long, or broken: nothing to serve.
      } finally {
        this.#idle.delete(stream);
      }
      if (!request) return stream.close();
      if (this.#token === token && this.#idle.size < STANDBY_CONNECTIONS) {
        this.#standby(token, control);
      }
      const connect = request;
      const served = this.#connectLocal(connect, control).then(
        (local) => this.#bridge(connect, stream, local),
        (err) => {
          stream.close();
          throw err;
        },
      );
      this.#track(connect, served.then(() => {}));
      if (!await served.catch(() => false)) return;
    }
  }

  /**
   * Bridges the server's side of a tunnel (in tunnel mode) with the local service and logs
   * the tunnel. Returns whether it ended cleanly, leaving `server` open for the next one.
   */
  async #bridge(request: Connect, server: Stream, local: Stream): Promise<boolean> {
    const target = `${request.host}:${request.port}`;
    this.#streams.add(local).add(server);
    const started = performance.now();
    // Bytes first, then the log line: formatting it is no reason for the user to wait.
    const bridged = bridge(local, new ChunkStream(server), undefined, true);
    logger.info("tunnel open: user {user} → {target}", { user: request.user, target });
    const result = await bridged;
    this.#streams.delete(local);
    this.#streams.delete(server);
    logger.info(
      "tunnel closed: user {user} → {target}; {up} bytes up, {down} bytes down, {ms} ms" +
        (result.error ? " (cut short: {error})" : ""),
      {
        user: request.user,
        target,
        up: result.backward,
        down: result.forward,
        ms: Math.round(performance.now() - started),
        error: result.error?.message,
      },
    );
    return !result.error;
  }
}

/** Hosts that mean this machine, where a client without an allow list may connect. */
const LOCAL_HOSTS = new Set(["localhost", "127.0.0.1", "::1"]);

/**
 * Whether a client may connect to `host:port`: an entry of its allow list says so, or, with
 * no list, the host is this machine.
 */
export function allows(allow: ClientConfig["allow"], host: string, port: number): boolean {
  const h = host.toLowerCase();
  if (allow === undefined) return LOCAL_HOSTS.has(h);
  return allow.some((entry) => entry.host === h && entry.port === port);
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

/** Turns a connection or handshake failure into one line that says what to check. */
export function describeError(err: unknown, host: string, port: number): string {
  const where = `${host}:${port}`;
  const message = err instanceof Error ? err.message : String(err);
  if (err instanceof RefusedError) return `server ${where} refused this client: ${message}`;
  // Certificate problems first: rustls's texts mention "DnsName", which is no DNS failure.
  if (/UnknownIssuer|unknown ca|BadSignature/i.test(message)) {
    return `server ${where} presented a certificate not signed by cafile (${message})`;
  }
  if (/not valid for name|NotValidForName/i.test(message)) {
    return `server ${where}'s certificate is not valid for the name "${host}" (${message})`;
  }
  if (/expired|not valid yet|NotValidYet/i.test(message)) {
    return `server ${where}'s certificate is expired or not yet valid (${message})`;
  }
  if (err instanceof Deno.errors.ConnectionRefused) {
    return `cannot connect to ${where}: connection refused (is the server running?)`;
  }
  if (
    /failed to lookup address|Name or service not known|name resolution|No address associated|nodename nor servname/i
      .test(message)
  ) {
    return `cannot resolve ${host}: ${message}`;
  }
  if (
    /InvalidContentType|corrupt message|InvalidMessage|unexpected handshake message/i.test(message)
  ) {
    return `${where} does not speak TLS on that port (${message})`;
  }
  return `connection to ${where} failed: ${message}`;
}
