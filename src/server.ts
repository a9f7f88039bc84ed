/**
 * The NATadm server: takes clients on the communication port and users on service ports, and
 * carries each user as a stream on the connection of the client that serves the service. A
 * composition of the registry of clients, the service listeners, the pairing of users with
 * clients, and the live tunnels.
 * @module
 */
import type { ServerConfig } from "./config.ts";
import { log } from "./log.ts";
import { VERSION } from "./version.ts";
import {
  AUTH_STEP_TIMEOUT_MS,
  FramedStream,
  type Hello,
  MAX_LOGIN_FRAME_BYTES,
  type Message,
  PROTOCOL_VERSION,
  ProtocolError,
  type UserHello,
  VersionError,
} from "./protocol.ts";
import { Mux } from "./mux.ts";
import { Registry, Session } from "./registry.ts";
import { Login } from "./login.ts";
import { ServiceListeners } from "./listeners.ts";
import { Pairing } from "./pairing.ts";
import { type TunnelInfo, Tunnels, type TunnelTarget } from "./tunnels.ts";
import { Cluster, type ClusterState } from "./cluster.ts";
import { Forward, Peers } from "./peers.ts";
import type { SharedRegistry } from "./etcd_registry.ts";
import { RegistrySync } from "./registry_sync.ts";
import type { MuxStream } from "./mux.ts";
import { type UserInfo, Users } from "./users.ts";
import { listenTls, type Stream, type TlsListener } from "./transport.ts";
import { listenError } from "./listen_error.ts";

export type { TunnelInfo } from "./tunnels.ts";
export type { UserInfo } from "./users.ts";

const logger = log("server");

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
    /** Live tunnels on its connection. */
    tunnels: number;
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
  /** Every configured user, its connections and live tunnels. */
  users: UserInfo[];
  /** Refused user logins and open requests, by reason, since start. */
  userRefusals: Record<string, number>;
  /** The cluster as this server sees it, when it is a member of one. */
  cluster?: ClusterState;
}

/** A running NATadm server. */
export class Server {
  #config: ServerConfig;
  #tls: TlsListener | undefined;
  readonly #registry = new Registry();
  readonly #tunnels: Tunnels;
  readonly #pairing: Pairing;
  readonly #listeners: ServiceListeners;
  readonly #login: Login;
  readonly #users: Users;
  /** This server's records in etcd and its copy of the cluster's (a cluster member only). */
  readonly #cluster: Cluster | undefined;
  /** Links to the other servers of the cluster (a cluster member only). */
  readonly #peers: Peers | undefined;
  /** Catches this server's registry up from a peer's when it falls behind. */
  readonly #sync: RegistrySync | undefined;
  /** Connections past the TLS handshake whose login is not finished. */
  #unauthenticated = 0;
  /** Connections still logging in, closed with the server. */
  #connecting = new Set<Stream>();
  readonly #started = Date.now();

  /**
   * @param shared the registry in etcd, for a cluster member: announced to its peers, and
   * caught up from them when this server falls behind
   */
  constructor(config: ServerConfig, shared?: SharedRegistry) {
    this.#config = config;
    const current = () => this.#config;
    this.#tunnels = new Tunnels(current);
    let forward: ((name: string) => Promise<TunnelTarget | undefined>) | undefined;
    if (config.cluster && config.registry.source === "etcd") {
      this.#cluster = new Cluster(config.cluster, config.registry);
      const sync = shared
        ? new RegistrySync(shared, (peer) => this.#peers!.fetchRegistry(peer))
        : undefined;
      this.#sync = sync;
      this.#peers = new Peers(config.cluster, config.listenHost, {
        onOpen: (stream, request) => this.#peerOpen(stream, request),
        registry: shared,
        onRevision: (peer, revision) => sync?.heard(peer, revision),
      });
      if (shared) shared.onChange = () => this.#peers?.announce();
      forward = (name) => this.#forward(name);
      this.#cluster.onHeld = (name) => {
        this.#pairing.heldElsewhere(name);
        this.#users.heldElsewhere(name);
      };
    }
    this.#pairing = new Pairing(current, this.#registry, this.#tunnels, forward);
    this.#listeners = new ServiceListeners(
      config.listenHost,
      (user, service) => this.#pairing.arrive(user, service),
    );
    this.#login = new Login(current);
    this.#users = new Users(current, this.#registry, this.#tunnels, forward);
  }

  /** The peer port actually bound, for a cluster member. */
  get peerPort(): number | undefined {
    return this.#peers?.port;
  }

  /**
   * The way to client `name` through another server of the cluster that holds it: over the
   * link that is up first, else the first that can be dialled; undefined if none.
   */
  async #forward(name: string): Promise<TunnelTarget | undefined> {
    const peers = this.#peers!;
    const holders = this.#cluster!.holders(name);
    holders.sort((a, b) => Number(peers.isUp(b.peer)) - Number(peers.isUp(a.peer)));
    for (const holder of holders) {
      try {
        const mux = await peers.link(holder.peer);
        if (!mux.closed) return new Forward(name, holder.serverId, mux);
      } catch (err) {
        logger.warn("cannot reach server {id} ({peer}) that holds client {client}: {error}", {
          id: holder.serverId,
          peer: holder.peer,
          client: name,
          error: (err as Error).message,
        });
      }
    }
    return undefined;
  }

  /** Another server forwards a user to a client of ours: relay it on the client's connection. */
  #peerOpen(
    stream: MuxStream,
    request: { client: string; port: number; host: string; by: string },
  ) {
    const session = this.#registry.get(request.client);
    if (!session) {
      return stream.reset(
        `client ${JSON.stringify(request.client)} is not connected to server ` +
          this.#config.cluster!.serverId,
      );
    }
    const busy = this.#tunnels.userRefusal(request.client);
    if (busy) return stream.reset(busy);
    this.#tunnels.runUser(request.by, stream, session, request.port, request.host).catch((err) =>
      stream.reset(`cannot reach client ${JSON.stringify(request.client)}: ${err.message}`)
    );
  }

  /** The communication port actually bound. */
  get communicationPort(): number {
    return this.#tls?.port ?? this.#config.communicationPort;
  }

  /** Live tunnels right now. */
  get liveTunnels(): number {
    return this.#tunnels.size;
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
        // The login is lockstep: a peer never has more than one frame in flight to us.
        firstUnreadLimit: 4 + MAX_LOGIN_FRAME_BYTES,
        onConnection: (stream) => this.#handleConnection(stream),
        onHandshakeError: (remote, err) =>
          logger.info("TLS handshake with {remote} failed: {error}", {
            remote,
            error: err.message,
          }),
      });
    } catch (err) {
      throw listenError(listenHost, communicationPort, "communication_port", err);
    }
    if (this.#peers) {
      try {
        await this.#peers.listen();
      } catch (err) {
        this.close();
        throw err;
      }
      this.#cluster!.onMembers = () => this.#peers?.linkMembers();
      this.#cluster!.start();
      this.#peers.keepLinks(() => this.#cluster!.memberPeers());
    }
    for (const service of this.#config.services) {
      try {
        this.#listeners.open(service);
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

  /**
   * Applies a new configuration without a restart: added services start listening, removed
   * ones stop (their live tunnels run on), changed ones apply to their next user; clients no
   * longer listed, or whose key changed, are logged out. `communication_port` and
   * `listen_host` need a restart; a new certificate applies at once.
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
    this.#config = next;
    const { added, removed, changed, failed } = this.#listeners.reconcile(next.services);
    for (const error of failed) logger.error("{error}", { error });
    this.#registry.reload(next, old);
    this.#users.reload(next, old);
    const summary = "configuration reloaded: {added} services added, {removed} removed, " +
      "{changed} changed";
    if (failed.length === 0) logger.info(summary, { added, removed, changed });
    else {
      logger.warn(summary + ", {failed} could not listen", {
        added,
        removed,
        changed,
        failed: failed.length,
      });
    }
  }

  /**
   * Stops accepting users and clients, tells every client to expect no new tunnels, lets live
   * tunnels finish for up to `graceMs`, then closes whatever is left.
   */
  async shutdown(graceMs: number): Promise<void> {
    this.#stopListening();
    // Other servers stop forwarding here at once, instead of when the lease runs out.
    await this.#cluster?.close();
    for (const session of this.#registry.all()) {
      session.leaving = true;
      session.mux.sendControl({ type: "goodbye", reason: "the server is shutting down" })
        .catch(() => {});
    }
    this.#users.shutdown();
    const live = this.#tunnels.size;
    if (live > 0) {
      logger.info("shutting down: waiting up to {grace} s for {live} live tunnels", {
        grace: graceMs / 1000,
        live,
      });
      await this.#tunnels.drained(graceMs);
      const cut = this.#tunnels.size;
      if (cut > 0) logger.warn("shutting down: {cut} tunnels cut at the end of the grace", { cut });
    }
    logger.info("server stopped");
    this.close();
  }

  #stopListening(): void {
    this.#listeners.close();
    this.#tls?.close();
    this.#tls = undefined;
  }

  /** Stops listening and closes every connection, tunnel and waiting user. */
  close(): void {
    this.#stopListening();
    for (const session of this.#registry.all()) session.mux.close(new Error("server closed"));
    this.#pairing.close();
    this.#users.close();
    for (const stream of this.#connecting) stream.close();
    this.#sync?.close();
    this.#peers?.close();
    this.#cluster?.close();
  }

  /** The server's state right now: clients, services, live tunnels and counters. */
  snapshot(): ServerSnapshot {
    const live = this.#tunnels.list();
    return {
      version: VERSION,
      started: this.#started,
      clients: [...this.#config.clients.keys()].map((name) => {
        const session = this.#registry.get(name);
        return session
          ? {
            name,
            connected: true,
            remote: session.remote,
            connectedSince: session.connectedSince,
            lastHeartbeat: session.lastSeen,
            protocolVersion: PROTOCOL_VERSION,
            tunnels: session.mux.streams.size,
          }
          : { name, connected: false, tunnels: 0 };
      }),
      services: this.#config.services.map((s) => {
        const totals = this.#tunnels.totalsOf(s.port);
        const mine = live.filter((t) => t.service === s.port);
        return {
          port: s.port,
          client: s.name,
          host: s.host,
          targetPort: s.targetPort,
          liveTunnels: mine.length,
          waitingUsers: this.#pairing.waitingOn(s),
          tunnelsTotal: totals.tunnels + mine.length,
          bytesUp: totals.bytesUp + mine.reduce((n, t) => n + t.bytesUp, 0),
          bytesDown: totals.bytesDown + mine.reduce((n, t) => n + t.bytesDown, 0),
        };
      }),
      tunnels: live,
      authFailures: this.#login.failures,
      users: this.#users.list(live),
      userRefusals: Object.fromEntries([...this.#login.userFailures, ...this.#users.refusals]),
      cluster: this.#cluster?.state(
        live.filter((t) => t.via !== undefined).length,
        this.#tunnels.forwardedTotal,
      ),
    };
  }

  /** A connection finished its TLS handshake: log it in, then serve it as a client. */
  async #handleConnection(stream: Stream): Promise<void> {
    if (this.#unauthenticated >= this.#config.maxUnauthenticated) {
      logger.warn("connection from {remote} dropped: {count} others are still unauthenticated", {
        remote: stream.remote,
        count: this.#unauthenticated,
      });
      return stream.close();
    }
    this.#unauthenticated++;
    this.#connecting.add(stream);
    const framed = new FramedStream(stream, MAX_LOGIN_FRAME_BYTES);
    let loggedIn: { hello: Hello | UserHello; rttMs: number } | null = null;
    try {
      const first = await framed.read(AUTH_STEP_TIMEOUT_MS);
      if (first === null) return stream.close();
      if (first.type !== "hello" && first.type !== "user") {
        throw new Error(`expected "hello" or "user" first, got "${first.type}"`);
      }
      loggedIn = await this.#login.run(framed, first, framed.lastPayload);
    } catch (err) {
      if (err instanceof VersionError) {
        // An older or newer peer: say so plainly, so its admin knows to upgrade.
        logger.warn("client from {remote} refused: {error}", {
          remote: stream.remote,
          error: err.message,
        });
        await framed.send({ type: "refused", retry: true, reason: err.message }).catch(() => {});
      } else {
        logger.warn("connection from {remote} dropped: {error}", {
          remote: stream.remote,
          error: (err as Error).message,
        });
      }
      stream.close();
    } finally {
      this.#unauthenticated--;
      this.#connecting.delete(stream);
    }
    if (loggedIn?.hello.type === "user") {
      await this.#users.serve(framed, loggedIn.hello, loggedIn.rttMs);
    } else if (loggedIn) await this.#serveClient(framed, loggedIn.hello, loggedIn.rttMs);
  }

  /** Serves a logged-in client connection until it ends. */
  async #serveClient(framed: FramedStream, hello: Hello, rttMs: number): Promise<void> {
    const stream = framed.stream;
    const remote = stream.remote;
    const services = this.#config.services.filter((s) => s.name === hello.name).map((s) => ({
      port: s.port,
      host: s.host,
      target_port: s.targetPort,
    }));
    if (hello.check) {
      // An admin's `client.ts --check`: tell it the services and leave the live session be.
      logger.info("client {name} checked in from {remote} (--check)", { name: hello.name, remote });
      await framed.send({ type: "welcome", services, pending: 0 }).catch(() => {});
      return stream.close();
    }
    // From here the mux reads eagerly, and credit bounds what a client may send.
    stream.limitUnread?.(undefined);
    let session: Session | undefined = undefined;
    const mux = new Mux(stream, {
      onControl: (message: Message) => {
        if (session && !session.ready) {
          // The client heard welcome and answered: users may be paired with it now.
          session.ready = true;
          this.#cluster?.hold(session.name);
          this.#pairing.connected(session);
          this.#users.clientReady(session);
        }
        if (message.type === "ping") return;
        if (message.type === "goodbye" && session) {
          // The client is stopping: no new tunnels for it; live ones finish on this connection.
          logger.info("client {name} is leaving ({reason}); {live} live tunnels finish first", {
            name: hello.name,
            reason: message.reason,
            live: mux.streams.size,
          });
          session.leaving = true;
          this.#registry.remove(session);
          if (!this.#registry.has(hello.name)) this.#cluster?.release(hello.name);
          mux.closeWhenIdle(new Error(`client said: ${message.reason}`));
          return;
        }
        throw new ProtocolError(`unexpected "${message.type}" from a client`);
      },
    }, { maxStreams: this.#config.maxTunnelsPerClient, rttMs });
    session = new Session(hello.name, mux);
    const old = this.#registry.add(session);
    if (old) {
      logger.info("client {name}: new connection from {remote} replaces the one from {old}", {
        name: hello.name,
        remote,
        old: old.remote,
      });
      await old.refuse(`replaced by a newer connection from ${remote}`, false);
    }
    logger.info("client {name} connected from {remote}", { name: hello.name, remote });
    try {
      await framed.send({
        type: "welcome",
        services,
        pending: this.#pairing.waitingFor(hello.name),
      });
    } catch (err) {
      mux.close(err as Error);
    }
    mux.startHeartbeat(hello.interval * 1000);
    const reason = await mux.run();
    this.#registry.remove(session);
    if (session.ready && !this.#registry.has(hello.name)) this.#cluster?.release(hello.name);
    logger.info("client {name} disconnected ({reason})", {
      name: hello.name,
      reason: reason.message,
    });
  }
}
