/**
 * The NATadm server: takes clients on the communication port, users on service ports, and
 * pairs each user with a data connection from the client that serves the service.
 * @module
 */
import type { ServerConfig, ServiceConfig } from "./config.ts";
import { log } from "./log.ts";
import { bridge, type BridgeResult } from "./bridge.ts";
import { VERSION } from "./version.ts";
import {
  AUTH_STEP_TIMEOUT_MS,
  authPayload,
  ChunkStream,
  type DataHello,
  FramedStream,
  fromBase64,
  HEARTBEAT_MISSES,
  type Hello,
  MAX_STANDBY_PER_CLIENT,
  NONCE_BYTES,
  PROTOCOL_VERSION,
  SESSION_TOKEN_BYTES,
  STANDBY_CONNECTIONS,
  STANDBY_PING_MS,
  TUNNEL_ID_BYTES,
} from "./protocol.ts";
import { verify } from "./keys.ts";
import { AuthPenalty } from "./guard.ts";
import { timingSafeEqual } from "node:crypto";
import { acceptLoop } from "./accept.ts";
import { ConnStream, listenTls, type Stream, type TlsListener } from "./transport.ts";

const logger = log("server");

/** A user waiting on a service port for its client's data connection. */
interface PendingUser {
  user: Stream;
  service: ServiceConfig;
  /** Closes the user when nobody serves it in time; none once handed to a standby connection. */
  timer?: ReturnType<typeof setTimeout>;
  /** The one-time id currently issued for it, if any. */
  id?: string;
  /** Token of the session that id was issued to: the data connection must present it. */
  session?: string;
}

/** A live tunnel as the status page shows it. */
export interface TunnelInfo {
  /** Sequence number, unique for the server's lifetime. */
  id: number;
  /** Public port of the service. */
  service: number;
  client: string;
  /** The user's address. */
  user: string;
  /** Unix time in ms when the tunnel opened. */
  started: number;
  /** Bytes from the user to the client's service so far. */
  bytesUp: number;
  /** Bytes from the client's service to the user so far. */
  bytesDown: number;
}

/** Everything the server knows about its state, for status pages and metrics. */
export interface ServerSnapshot {
  version: string;
  /** Unix time in ms when the server started. */
  started: number;
  clients: {
    name: string;
    connected: boolean;
    remote?: string;
    /** Unix time in ms. */
    connectedSince?: number;
    /** Unix time in ms of the last frame heard from it. */
    lastHeartbeat?: number;
    protocolVersion?: number;
    standby: number;
  }[];
  services: {
    port: number;
    client: string;
    host: string;
    targetPort: number;
    liveTunnels: number;
    waitingUsers: number;
    tunnelsTotal: number;
    bytesUp: number;
    bytesDown: number;
  }[];
  tunnels: TunnelInfo[];
  authFailures: number;
}

/** Per-service counters that outlive the tunnels they count. */
interface ServiceTotals {
  tunnels: number;
  bytesUp: number;
  bytesDown: number;
}

/** One authenticated control connection, and the standby connections opened under it. */
class Session {
  #heartbeat: ReturnType<typeof setInterval> | undefined;
  #standbyPing: ReturnType<typeof setInterval> | undefined;
  closed = false;
  /** Presented by this client's standby connections. */
  readonly token = crypto.getRandomValues(new Uint8Array(SESSION_TOKEN_BYTES)).toBase64();
  /** Idle standby data connections, oldest first. */
  readonly standby: Stream[] = [];
  readonly connectedSince = Date.now();
  /** Unix time in ms of the last frame from the client. */
  lastSeen = Date.now();

  constructor(
    readonly name: string,
    readonly framed: FramedStream,
    readonly interval: number,
  ) {}

  get remote(): string {
    return this.framed.stream.remote;
  }

  startHeartbeat(): void {
    this.#heartbeat = setInterval(() => {
      this.framed.send({ type: "ping" }).catch(() => this.close());
    }, this.interval * 1000);
    // Idle standby connections hear from us now and then, so the client can tell a live one
    // from one a NAT box forgot; a write that fails drops it here.
    this.#standbyPing = setInterval(() => {
      // The pool shrinks back after a burst here, on the side that hands connections out, so
      // no user can be given one the client is closing at that moment.
      while (this.standby.length > STANDBY_CONNECTIONS) this.standby.shift()!.close();
      for (const stream of [...this.standby]) {
        new FramedStream(stream).send({ type: "ping" }).catch(() => {
          const at = this.standby.indexOf(stream);
          if (at >= 0) this.standby.splice(at, 1);
          stream.close();
        });
      }
    }, STANDBY_PING_MS);
  }

  /** The oldest idle standby connection still open, if any; dead ones are dropped. */
  takeStandby(): Stream | undefined {
    for (let stream = this.standby.shift(); stream; stream = this.standby.shift()) {
      if (!stream.isClosed()) return stream;
      stream.close();
    }
    return undefined;
  }

  /** Tells the client why (best effort, bounded by the socket) and closes. */
  async refuse(reason: string, retry = true): Promise<void> {
    await this.framed.send({ type: "refused", reason, retry }).catch(() => {});
    this.close();
  }

  close(): void {
    this.closed = true;
    clearInterval(this.#heartbeat);
    clearInterval(this.#standbyPing);
    this.framed.stream.close();
    for (const stream of this.standby.splice(0)) stream.close();
  }
}

/** A running NATadm server. */
export class Server {
  #config: ServerConfig;
  #tls: TlsListener | undefined;
  /** Service port → its listener and the service it serves now (reload may change it). */
  #listeners = new Map<number, { listener: Deno.Listener; service: ServiceConfig }>();
  #sessions = new Map<string, Session>();
  #byToken = new Map<string, Session>();
  #waiting = new Map<string, PendingUser[]>();
  #byId = new Map<string, PendingUser>();
  /** Users handed to a standby connection, by the id sent with them, until their tunnel ends. */
  #viaStandby = new Map<string, PendingUser>();
  #tunnels = new Map<TunnelInfo, { user: Stream; data: Stream; counts: BridgeResult }>();
  #tunnelSeq = 0;
  /** Live tunnels per client name, for max_tunnels_per_client. */
  #liveByClient = new Map<string, number>();
  /** Called when the last live tunnel closes, during a graceful shutdown. */
  #onDrained: (() => void) | undefined;
  #totals = new Map<number, ServiceTotals>();
  #authFailures = 0;
  #penalty = new AuthPenalty();
  /** Connections past the TLS handshake whose first frame or authentication is pending. */
  #unauthenticated = 0;
  readonly #started = Date.now();
  #connections = new Set<Stream>();

  constructor(config: ServerConfig) {
    this.#config = config;
  }

  /** The communication port actually bound. */
  get communicationPort(): number {
    return this.#tls?.port ?? this.#config.communicationPort;
  }

  /** Binds every port; throws a one-line error (and binds nothing) if any port fails. */
  async start(): Promise<void> {
    const { listenHost, communicationPort } = this.#config;
    try {
      this.#tls = await listenTls({
        hostname: listenHost,
        port: communicationPort,
        cert: this.#config.certPem,
        key: this.#config.keyPem,
        name: "communication port",
        maxHandshaking: this.#config.maxHandshaking,
        maxHandshakingPerAddress: this.#config.maxHandshakingPerAddress,
        onConnection: (stream) => this.#handleConnection(stream),
        onHandshakeError: (remote, err) =>
          logger.info("TLS handshake with {remote} failed: {error}", {
            remote,
            error: err.message,
          }),
      });
    } catch (err) {
      throw new Error(
        `cannot listen on ${listenHost}:${communicationPort} (communication_port): ${
          (err as Error).message
        }`,
      );
    }
    for (const service of this.#config.services) {
      try {
        this.#listen(service);
      } catch (err) {
        this.close();
        throw err;
      }
    }
    logger.info("NATadm server ready: communication port {port}, services {services}", {
      port: this.communicationPort,
      services: this.#config.services.map((s) => `${s.port}→${s.name}:${s.targetPort}`).join(
        ", ",
      ) || "none",
    });
  }

  /** Opens a service's public port; throws a one-line error naming the port. */
  #listen(service: ServiceConfig): void {
    const host = this.#config.listenHost;
    let listener: Deno.Listener;
    try {
      listener = Deno.listen({ hostname: host, port: service.port });
    } catch (err) {
      throw new Error(
        `cannot listen on ${host}:${service.port} (services.${service.port}): ${
          (err as Error).message
        }`,
      );
    }
    this.#listeners.set(service.port, { listener, service });
    this.#acceptUsers(listener, service.port);
  }

  /**
   * Applies a new configuration without a restart: added services start listening, removed
   * ones stop (their live tunnels run on), changed ones apply to their next user; client keys
   * apply to the next authentication, and clients no longer listed are disconnected.
   * `communication_port` and `listen_host` need a restart; a new certificate applies at once.
   */
  reload(next: ServerConfig): void {
    const old = this.#config;
    if (next.communicationPort !== old.communicationPort || next.listenHost !== old.listenHost) {
      logger.warn("communication_port and listen_host changes take effect after a restart");
      next = { ...next, communicationPort: old.communicationPort, listenHost: old.listenHost };
    }
    if (next.certPem !== old.certPem || next.keyPem !== old.keyPem) {
      this.#tls?.setCertificate(next.certPem, next.keyPem);
    }
    const wanted = new Map(next.services.map((s) => [s.port, s]));
    let added = 0, removed = 0, changed = 0;
    for (const [port, entry] of this.#listeners) {
      const service = wanted.get(port);
      if (!service) {
        entry.listener.close();
        this.#listeners.delete(port);
        removed++;
      } else if (JSON.stringify(service) !== JSON.stringify(entry.service)) {
        entry.service = service;
        changed++;
      }
    }
    this.#config = next;
    for (const service of next.services) {
      if (this.#listeners.has(service.port)) continue;
      try {
        this.#listen(service);
        added++;
      } catch (err) {
        logger.error("{error}", { error: (err as Error).message });
      }
    }
    for (const [name, session] of this.#sessions) {
      if (!next.clients.has(name)) {
        session.refuse("this client was removed from the server's config");
      } else if (next.clientKeyText.get(name) !== old.clientKeyText.get(name)) {
        // A rotated key must shut out whoever logged in with the old one (it may be stolen).
        session.refuse("this client's key was changed on the server; log in with the new key");
      }
    }
    logger.info(
      "configuration reloaded: {added} services added, {removed} removed, {changed} changed",
      { added, removed, changed },
    );
  }

  /** Live tunnels right now. */
  get liveTunnels(): number {
    return this.#tunnels.size;
  }

  /**
   * Stops accepting users and clients, lets live tunnels finish for up to `graceMs`, then
   * closes whatever is left.
   */
  async shutdown(graceMs: number): Promise<void> {
    this.#stopListening();
    for (const session of this.#sessions.values()) {
      await session.refuse("the server is shutting down");
    }
    const live = this.#tunnels.size;
    if (live > 0) {
      logger.info("shutting down: waiting up to {grace} s for {live} live tunnels", {
        grace: graceMs / 1000,
        live,
      });
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        new Promise<void>((resolve) => this.#onDrained = resolve),
        new Promise<void>((resolve) => timer = setTimeout(resolve, graceMs)),
      ]);
      clearTimeout(timer);
    }
    this.close();
  }

  #stopListening(): void {
    for (const { listener } of this.#listeners.values()) listener.close();
    this.#listeners.clear();
    this.#tls?.close();
    this.#tls = undefined;
  }

  /** Stops listening and closes every connection, tunnel and waiting user. */
  close(): void {
    this.#stopListening();
    for (const session of this.#sessions.values()) session.close();
    for (const users of this.#waiting.values()) {
      for (const pending of users) {
        clearTimeout(pending.timer);
        pending.user.close();
      }
    }
    this.#waiting.clear();
    this.#byId.clear();
    for (const { user, data } of this.#tunnels.values()) {
      user.close();
      data.close();
    }
    for (const stream of this.#connections) stream.close();
  }

  #totalsOf(port: number): ServiceTotals {
    let totals = this.#totals.get(port);
    if (!totals) this.#totals.set(port, totals = { tunnels: 0, bytesUp: 0, bytesDown: 0 });
    return totals;
  }

  /** The server's state right now: clients, services, live tunnels and counters. */
  snapshot(): ServerSnapshot {
    const live = [...this.#tunnels].map(([info, { counts }]) => ({
      ...info,
      bytesUp: counts.forward,
      bytesDown: counts.backward,
    }));
    return {
      version: VERSION,
      started: this.#started,
      clients: [...this.#config.clients.keys()].map((name) => {
        const session = this.#sessions.get(name);
        return session
          ? {
            name,
            connected: true,
            remote: session.remote,
            connectedSince: session.connectedSince,
            lastHeartbeat: session.lastSeen,
            protocolVersion: PROTOCOL_VERSION,
            standby: session.standby.length,
          }
          : { name, connected: false, standby: 0 };
      }),
      services: this.#config.services.map((s) => {
        const totals = this.#totalsOf(s.port);
        const mine = live.filter((t) => t.service === s.port);
        return {
          port: s.port,
          client: s.name,
          host: s.host,
          targetPort: s.targetPort,
          liveTunnels: mine.length,
          waitingUsers: (this.#waiting.get(s.name) ?? []).filter((p) => p.service === s).length,
          tunnelsTotal: totals.tunnels + mine.length,
          bytesUp: totals.bytesUp + mine.reduce((n, t) => n + t.bytesUp, 0),
          bytesDown: totals.bytesDown + mine.reduce((n, t) => n + t.bytesDown, 0),
        };
      }),
      tunnels: live,
      authFailures: this.#authFailures,
    };
  }

  #acceptUsers(listener: Deno.Listener, port: number): Promise<void> {
    return acceptLoop(listener, (conn) => {
      (conn as Deno.TcpConn).setNoDelay(true);
      const service = this.#listeners.get(port)?.service;
      if (service) this.#userArrived(new ConnStream(conn), service);
      else conn.close();
    }, `service port ${port}`);
  }

  #userArrived(user: Stream, service: ServiceConfig): void {
    const turnAway = (why: string) => {
      user.close();
      logger.warn("user {user} on service {port} refused: {why}", {
        user: user.remote,
        port: service.port,
        why,
      });
    };
    if (service.allowFrom && !service.allowFrom.has(user.remoteIp)) {
      return turnAway("address not in allow_from");
    }
    const queue = this.#waiting.get(service.name);
    // Counted only when a queue exists: with the client connected there is none, and the hot
    // path stays free of scans.
    const waiting = queue ? queue.filter((p) => p.service.port === service.port).length : 0;
    if (waiting >= this.#config.maxPendingUsers) {
      return turnAway(`${waiting} users already wait (max_pending_users)`);
    }
    const live = this.#liveByClient.get(service.name) ?? 0;
    if (live >= this.#config.maxTunnelsPerClient) {
      return turnAway(`client ${service.name} has ${live} live tunnels (max_tunnels_per_client)`);
    }
    const session = this.#sessions.get(service.name);
    const standby = session?.takeStandby();
    if (standby) {
      // The usual case: a connection is ready, so the user never waits in a queue.
      this.#useStandby({ user, service }, standby);
      return;
    }
    const pending: PendingUser = {
      user,
      service,
      timer: setTimeout(() => this.#expire(pending), this.#config.pendingTimeout * 1000),
    };
    if (queue) queue.push(pending);
    else this.#waiting.set(service.name, [pending]);
    if (session) {
      this.#issue(pending, session);
    } else {
      logger.info("user {user} on service {port} waits for client {client}", {
        user: user.remote,
        port: service.port,
        client: service.name,
      });
    }
  }

  /** Nobody served `pending` within pending_timeout: close it and say so. */
  #expire(pending: PendingUser): void {
    this.#forget(pending);
    pending.user.close();
    logger.warn(
      "user {user} on service {port} closed: client {client} did not connect within {timeout} s",
      {
        user: pending.user.remote,
        port: pending.service.port,
        client: pending.service.name,
        timeout: this.#config.pendingTimeout,
      },
    );
  }

  /** Removes a waiting user from every index, without closing it. */
  #forget(pending: PendingUser): void {
    clearTimeout(pending.timer);
    if (pending.id) this.#byId.delete(pending.id);
    const queue = this.#waiting.get(pending.service.name);
    const at = queue?.indexOf(pending) ?? -1;
    if (queue && at >= 0) queue.splice(at, 1);
    if (queue?.length === 0) this.#waiting.delete(pending.service.name);
  }

  /** Asks `session`'s client for a data connection for `pending`, under a fresh one-time id. */
  #issue(pending: PendingUser, session: Session): void {
    if (pending.id) this.#byId.delete(pending.id);
    const id = crypto.getRandomValues(new Uint8Array(TUNNEL_ID_BYTES)).toBase64();
    pending.id = id;
    pending.session = session.token;
    this.#byId.set(id, pending);
    session.framed.send({
      type: "connect",
      id,
      host: pending.service.host,
      port: pending.service.targetPort,
      user: pending.user.remote,
    }).catch(() => session.close());
  }

  /** Hands `pending`'s user to an idle standby connection: no round trip, no handshake. */
  async #useStandby(pending: PendingUser, standby: Stream): Promise<void> {
    const { service, user } = pending;
    const id = crypto.getRandomValues(new Uint8Array(TUNNEL_ID_BYTES)).toBase64();
    // Not awaited: the bridge's first write queues behind this frame on the same socket, and
    // if the connection turns out dead the bridge fails and closes the user.
    new FramedStream(standby).send({
      type: "connect",
      id,
      host: service.host,
      port: service.targetPort,
      user: user.remote,
    }).catch(() => standby.close());
    // Remembered while the tunnel lives, so the client's `reject` for it can be reported. It
    // travels on the control connection and may arrive after this tunnel has failed, so a
    // tunnel that failed before carrying a byte back stays remembered a little longer.
    this.#viaStandby.set(id, pending);
    const result = await this.#tunnel(user, standby, service);
    if (result.error && result.backward === 0) {
      setTimeout(() => this.#viaStandby.delete(id), AUTH_STEP_TIMEOUT_MS);
    } else {
      this.#viaStandby.delete(id);
    }
  }

  /** Parks a standby connection on its session until a user needs it. */
  #park(stream: Stream, token: string): void {
    const session = this.#byToken.get(token);
    if (!session || session.closed || session.standby.length >= MAX_STANDBY_PER_CLIENT) {
      logger.warn("standby connection from {remote} refused: {why}", {
        remote: stream.remote,
        why: !session || session.closed
          ? "unknown or ended session"
          : `${MAX_STANDBY_PER_CLIENT} already idle`,
      });
      return stream.close();
    }
    session.standby.push(stream);
  }

  async #handleConnection(stream: Stream): Promise<void> {
    if (this.#unauthenticated >= this.#config.maxUnauthenticated) {
      logger.warn("connection from {remote} dropped: {count} others are still unauthenticated", {
        remote: stream.remote,
        count: this.#unauthenticated,
      });
      return stream.close();
    }
    this.#connections.add(stream);
    this.#unauthenticated++;
    let counted = true;
    const authenticated = () => {
      if (counted) this.#unauthenticated--;
      counted = false;
    };
    const framed = new FramedStream(stream);
    try {
      const first = await framed.read(AUTH_STEP_TIMEOUT_MS);
      if (first === null) return stream.close();
      if (first.type !== "hello" && first.type !== "data" && first.type !== "standby") {
        throw new Error(`expected "hello", "data" or "standby" first, got "${first.type}"`);
      }
      if (first.version !== PROTOCOL_VERSION) {
        await framed.send({
          type: "refused",
          retry: true,
          reason:
            `protocol version ${first.version} is not supported (server speaks ${PROTOCOL_VERSION})`,
        });
        throw new Error(`unsupported protocol version ${first.version}`);
      }
      if (first.type === "data") {
        this.#connections.delete(stream);
        authenticated();
        return this.#pair(stream, first);
      }
      if (first.type === "standby") {
        this.#connections.delete(stream);
        authenticated();
        return this.#park(stream, first.session);
      }
      await this.#control(framed, first, authenticated);
    } catch (err) {
      logger.warn("connection from {remote} dropped: {error}", {
        remote: stream.remote,
        error: (err as Error).message,
      });
      stream.close();
    } finally {
      authenticated();
      this.#connections.delete(stream);
    }
  }

  async #control(
    framed: FramedStream,
    hello: Hello,
    authenticated: () => void,
  ): Promise<void> {
    const remote = framed.stream.remote;
    const ip = framed.stream.remoteIp;
    // An address that keeps failing waits longer for every answer, so guessing is slow.
    const delay = this.#penalty.delay(ip);
    if (delay > 0) await new Promise((resolve) => setTimeout(resolve, delay));
    const key = this.#config.clients.get(hello.name);
    if (!key) {
      this.#penalty.fail(ip);
      this.#authFailures++;
      logger.warn("client from {remote} refused: unknown name {name}", {
        remote,
        name: hello.name,
      });
      await framed.send({
        type: "refused",
        retry: true,
        reason: `unknown client name "${hello.name}": the server has no [clients] entry for it`,
      });
      return framed.stream.close();
    }
    const nonce = crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
    await framed.send({ type: "challenge", nonce: nonce.toBase64() });
    const auth = await framed.read(AUTH_STEP_TIMEOUT_MS);
    if (auth === null) return framed.stream.close();
    if (auth.type !== "auth") throw new Error(`expected "auth", got "${auth.type}"`);
    const signature = fromBase64(auth.signature)!;
    if (!await verify(key, signature, authPayload(nonce, hello.name))) {
      this.#penalty.fail(ip);
      this.#authFailures++;
      logger.warn("client from {remote} refused: wrong key for {name}", {
        remote,
        name: hello.name,
      });
      await framed.send({
        type: "refused",
        retry: true,
        reason:
          `authentication failed: the key does not match the one configured for "${hello.name}"`,
      });
      return framed.stream.close();
    }

    this.#penalty.succeed(ip);
    authenticated();
    const services = this.#config.services.filter((s) => s.name === hello.name).map((s) => ({
      port: s.port,
      host: s.host,
      target_port: s.targetPort,
    }));
    if (hello.check) {
      // An admin's `client.ts --check`: tell it the services and leave the live session be.
      logger.info("client {name} checked in from {remote} (--check)", { name: hello.name, remote });
      const none = new Uint8Array(SESSION_TOKEN_BYTES).toBase64();
      await framed.send({ type: "welcome", services, pending: 0, session: none });
      return framed.stream.close();
    }
    const session = new Session(hello.name, framed, hello.interval);
    const old = this.#sessions.get(hello.name);
    this.#sessions.set(hello.name, session);
    this.#byToken.set(session.token, session);
    if (old) {
      logger.info("client {name}: new connection from {remote} replaces the one from {old}", {
        name: hello.name,
        remote,
        old: old.remote,
      });
      await old.refuse(`replaced by a newer connection from ${remote}`, false);
    }
    logger.info("client {name} connected from {remote}", { name: hello.name, remote });

    const waiting = [...(this.#waiting.get(hello.name) ?? [])];
    await framed.send({
      type: "welcome",
      services,
      pending: waiting.length,
      session: session.token,
    });
    for (const pending of waiting) this.#issue(pending, session);
    session.startHeartbeat();

    let reason = "connection closed";
    try {
      for (;;) {
        const message = await framed.read(HEARTBEAT_MISSES * hello.interval * 1000);
        if (message === null) break;
        session.lastSeen = Date.now();
        if (message.type === "ping") continue;
        if (message.type === "reject") {
          this.#rejected(session, message.id, message.reason);
          continue;
        }
        throw new Error(`unexpected "${message.type}" on a control connection`);
      }
    } catch (err) {
      reason = (err as Error).message;
    } finally {
      session.close();
      this.#byToken.delete(session.token);
      if (this.#sessions.get(hello.name) === session) this.#sessions.delete(hello.name);
    }
    logger.info("client {name} disconnected ({reason})", { name: hello.name, reason });
  }

  /** The client could not open the tunnel for `id`: close that user and say why. */
  #rejected(session: Session, id: string, reason: string): void {
    const pending = this.#byId.get(id) ?? this.#viaStandby.get(id);
    if (!pending || pending.service.name !== session.name) return;
    this.#forget(pending);
    pending.user.close();
    logger.warn(
      "user {user} on service {port} closed: client {client} could not connect: {reason}",
      {
        user: pending.user.remote,
        port: pending.service.port,
        client: session.name,
        reason,
      },
    );
  }

  async #pair(data: Stream, hello: DataHello): Promise<void> {
    const pending = this.#byId.get(hello.id);
    if (!pending) {
      logger.warn("data connection from {remote} refused: unknown, used or expired id", {
        remote: data.remote,
      });
      return data.close();
    }
    if (!sameToken(pending.session, hello.session)) {
      // Ids are bound to the session they were issued to: another client's id is no use.
      logger.warn("data connection from {remote} refused: id belongs to another session", {
        remote: data.remote,
      });
      return data.close();
    }
    this.#forget(pending);
    await this.#tunnel(pending.user, data, pending.service);
  }

  /** Bridges a user with its data connection and logs the tunnel's life. */
  async #tunnel(user: Stream, data: Stream, service: ServiceConfig): Promise<BridgeResult> {
    const started = performance.now();
    const info: TunnelInfo = {
      id: ++this.#tunnelSeq,
      service: service.port,
      client: service.name,
      user: user.remote,
      started: Date.now(),
      bytesUp: 0,
      bytesDown: 0,
    };
    const counts: BridgeResult = { forward: 0, backward: 0 };
    this.#tunnels.set(info, { user, data, counts });
    this.#liveByClient.set(service.name, (this.#liveByClient.get(service.name) ?? 0) + 1);
    // Bytes first, then the log line: formatting it is no reason for the user to wait.
    const bridged = bridge(user, new ChunkStream(data), counts, true);
    logger.info("tunnel open: user {user} → service {port} → client {client} {target}", {
      user: user.remote,
      port: service.port,
      client: service.name,
      target: `${service.host}:${service.targetPort}`,
    });
    const result = await bridged;
    this.#tunnels.delete(info);
    const left = this.#liveByClient.get(service.name)! - 1;
    if (left > 0) this.#liveByClient.set(service.name, left);
    else this.#liveByClient.delete(service.name);
    if (this.#tunnels.size === 0) this.#onDrained?.();
    const totals = this.#totalsOf(service.port);
    totals.tunnels++;
    totals.bytesUp += result.forward;
    totals.bytesDown += result.backward;
    logger.info(
      "tunnel closed: user {user} → service {port} → client {client}; {up} bytes up, {down} bytes down, {ms} ms" +
        (result.error ? " (cut short: {error})" : ""),
      {
        user: user.remote,
        port: service.port,
        client: service.name,
        up: result.forward,
        down: result.backward,
        ms: Math.round(performance.now() - started),
        error: result.error?.message,
      },
    );
    if (!result.error) await this.#recycle(data);
    return result;
  }

  /** After a clean tunnel the client offers the data connection back as a standby one. */
  async #recycle(data: Stream): Promise<void> {
    try {
      const next = await new FramedStream(data).read(AUTH_STEP_TIMEOUT_MS);
      if (next?.type === "standby") return this.#park(data, next.session);
      if (next !== null) throw new Error(`expected "standby", got "${next.type}"`);
    } catch (err) {
      logger.debug("data connection from {remote} not reused: {error}", {
        remote: data.remote,
        error: (err as Error).message,
      });
    }
    data.close();
  }
}

/** Compares session tokens in constant time. */
function sameToken(expected: string | undefined, given: string): boolean {
  if (expected === undefined || expected.length !== given.length) return false;
  const enc = new TextEncoder();
  return timingSafeEqual(enc.encode(expected), enc.encode(given));
}
