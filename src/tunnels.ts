/**
 * The server's live tunnels: each a stream on its client's connection relayed to a user, with
 * the limits on how many may live at once, their counters, and their log lines.
 * @module
 */
import type { ServerConfig, ServiceConfig } from "./config.ts";
import type { OpenRequest } from "./protocol.ts";
import { type MuxStream, relay, type StreamResult } from "./mux.ts";
import type { Stream } from "./transport.ts";
import { log } from "./log.ts";

const logger = log("server");

/**
 * Where a tunnel's stream is opened: the client's own connection (a session of this server),
 * or the link to another server of the cluster that holds the client.
 */
export interface TunnelTarget {
  /** The client's name. */
  readonly name: string;
  /** The id of the server that holds the client, when it is not this one. */
  readonly via?: string;
  /** Whether the connection under it is gone. */
  readonly closed: boolean;
  /** Opens a stream to `host:port` on the client's side, for `user`. */
  open(request: OpenRequest): MuxStream;
}

/** A live tunnel as the status page shows it. */
export interface TunnelInfo {
  /** Sequence number, unique for the server's lifetime. */
  id: number;
  /** Public port of the service; 0 for a tunnel a named user opened. */
  service: number;
  client: string;
  /** The user's address. */
  user: string;
  /** Who opened it: the user's name (connect, forward), or its address (a service port). */
  by: string;
  /** The port on the client's side, for a tunnel a named user opened. */
  port?: number;
  /** Unix time in ms when the tunnel opened. */
  started: number;
  /** The server it is forwarded to, when another server of the cluster holds the client. */
  via?: string;
  /** Bytes from the user to the client's service so far. */
  bytesUp: number;
  /** Bytes from the client's service to the user so far. */
  bytesDown: number;
}

/** Per-service counters that outlive the tunnels they count. */
export interface ServiceTotals {
  tunnels: number;
  bytesUp: number;
  bytesDown: number;
}

/** Every live tunnel of the server, and the totals of those that ended. */
export class Tunnels {
  #config: () => ServerConfig;
  #live = new Map<TunnelInfo, MuxStream>();
  #seq = 0;
  #byClient = new Map<string, number>();
  #byAddress = new Map<string, number>();
  #totals = new Map<number, ServiceTotals>();
  #onDrained: (() => void) | undefined;
  /** Tunnels forwarded to another server since start. */
  forwardedTotal = 0;

  constructor(config: () => ServerConfig) {
    this.#config = config;
  }

  /** Live tunnels right now. */
  get size(): number {
    return this.#live.size;
  }

  /** Why a new tunnel for `service` from address `ip` must be refused, or null if it may open. */
  refusal(service: ServiceConfig, ip: string): string | null {
    const { maxTunnelsPerClient, maxTunnelsPerAddress } = this.#config();
    const live = this.#byClient.get(service.name) ?? 0;
    if (live >= maxTunnelsPerClient) {
      return `client ${service.name} has ${live} live tunnels (max_tunnels_per_client)`;
    }
    const mine = this.#byAddress.get(ip) ?? 0;
    if (mine >= maxTunnelsPerAddress) {
      return `${ip} has ${mine} live tunnels (max_tunnels_per_address)`;
    }
    return null;
  }

  /** Opens a stream on `target` for `user` and relays the two until both ends are done. */
  async run(user: Stream, target: TunnelTarget, service: ServiceConfig): Promise<StreamResult> {
    const stream = target.open({
      host: service.host,
      port: service.targetPort,
      user: user.remote,
    });
    const started = performance.now();
    const info: TunnelInfo = {
      id: ++this.#seq,
      service: service.port,
      client: service.name,
      user: user.remote,
      by: user.remote,
      started: Date.now(),
      bytesUp: 0,
      bytesDown: 0,
    };
    if (target.via) {
      info.via = target.via;
      this.forwardedTotal++;
    }
    this.#live.set(info, stream);
    bump(this.#byClient, service.name, 1);
    bump(this.#byAddress, user.remoteIp, 1);
    // Bytes first, then the log line: formatting it is no reason for the user to wait.
    const relayed = relay(user, stream);
    logger.info(
      "tunnel open: user {user} → service {port} → client {client} {target}" +
        (target.via ? " via server {via}" : ""),
      {
        user: user.remote,
        by: user.remote,
        port: service.port,
        client: service.name,
        target: `${service.host}:${service.targetPort}`,
        via: target.via,
      },
    );
    const result = await relayed;
    this.#live.delete(info);
    bump(this.#byClient, service.name, -1);
    bump(this.#byAddress, user.remoteIp, -1);
    const totals = this.totalsOf(service.port);
    totals.tunnels++;
    totals.bytesUp += result.sent;
    totals.bytesDown += result.received;
    if (result.resetByPeer && result.received === 0) {
      // Reset by the client before a byte came back: it could not, or would not, connect.
      logger.warn(
        "user {user} on service {port} closed: client {client} could not connect: {reason}",
        {
          user: user.remote,
          port: service.port,
          client: service.name,
          reason: result.error?.message,
        },
      );
    }
    logger.info(
      "tunnel closed: user {user} → service {port} → client {client}; {up} bytes up, {down} bytes down, {ms} ms" +
        (result.error ? " (cut short: {error})" : ""),
      {
        user: user.remote,
        by: user.remote,
        port: service.port,
        client: service.name,
        up: result.sent,
        down: result.received,
        ms: Math.round(performance.now() - started),
        error: result.error?.message,
      },
    );
    if (this.#live.size === 0) this.#onDrained?.();
    return result;
  }

  /** Why a named user's new tunnel to client `name` must be refused, or null if it may open. */
  userRefusal(name: string): string | null {
    const { maxTunnelsPerClient } = this.#config();
    const live = this.#byClient.get(name) ?? 0;
    if (live >= maxTunnelsPerClient) {
      return `client "${name}" has ${live} live tunnels (max_tunnels_per_client)`;
    }
    return null;
  }

  /**
   * Opens a stream on `session` to `host:port` (`localhost` unless given) for user `by` (a
   * name that logged in, or for a stream from a peer server, whoever it forwards) and relays
   * it with the user's own stream until both ends are done. A reset from the client, or any
   * other cut, reaches the user as a reset with the reason. Resolves with whether the client
   * refused the port.
   */
  async runUser(
    by: string,
    userStream: MuxStream,
    session: TunnelTarget,
    port: number,
    host = "localhost",
  ): Promise<boolean> {
    const stream = session.open({ host, port, user: by });
    const started = performance.now();
    const info: TunnelInfo = {
      id: ++this.#seq,
      service: 0,
      client: session.name,
      user: userStream.remote,
      by,
      port,
      started: Date.now(),
      bytesUp: 0,
      bytesDown: 0,
    };
    if (session.via) {
      info.via = session.via;
      this.forwardedTotal++;
    }
    this.#live.set(info, stream);
    bump(this.#byClient, session.name, 1);
    // The user's stream as the relay's local end, except that closing it is left to us: a
    // reset then carries the client's reason instead of a bare "closed".
    const local: Stream = {
      remote: userStream.remote,
      remoteIp: userStream.remoteIp,
      read: (p) => userStream.read(p),
      write: (bytes) => userStream.write(bytes),
      closeWrite: () => userStream.closeWrite(),
      close: () => {},
      isClosed: () => userStream.isClosed(),
    };
    const relayed = relay(local, stream);
    const fields = { by, user: userStream.remote, client: session.name, port };
    logger.info("tunnel open: user {by} ({user}) → client {client} port {port}", fields);
    const result = await relayed;
    this.#live.delete(info);
    bump(this.#byClient, session.name, -1);
    // Reset by the client before a byte came back (not cut by the user or a lost connection):
    // it could not, or would not, connect.
    const refused = result.error !== undefined && result.received === 0 &&
      !session.closed && !userStream.isClosed();
    if (result.error) {
      userStream.reset(
        refused
          ? `client "${session.name}" refused port ${port}: ${result.error.message}`
          : result.error.message,
      );
    } else userStream.close();
    if (refused) {
      logger.warn(
        "user {by} ({user}) → client {client} port {port} refused by the client: " +
          "{reason}",
        { ...fields, reason: result.error!.message },
      );
    }
    logger.info(
      "tunnel closed: user {by} ({user}) → client {client} port {port}; {up} bytes up, " +
        "{down} bytes down, {ms} ms" + (result.error ? " (cut short: {error})" : ""),
      {
        ...fields,
        up: result.sent,
        down: result.received,
        ms: Math.round(performance.now() - started),
        error: result.error?.message,
      },
    );
    if (this.#live.size === 0) this.#onDrained?.();
    return refused;
  }

  /** The counters of service `port`, created on first use. */
  totalsOf(port: number): ServiceTotals {
    let totals = this.#totals.get(port);
    if (!totals) this.#totals.set(port, totals = { tunnels: 0, bytesUp: 0, bytesDown: 0 });
    return totals;
  }

  /** The live tunnels, with their byte counts as of now. */
  list(): TunnelInfo[] {
    return [...this.#live].map(([info, stream]) => ({
      ...info,
      bytesUp: stream.result.sent,
      bytesDown: stream.result.received,
    }));
  }

  /** Resolves once no tunnel is live, or after `graceMs`. */
  async drained(graceMs: number): Promise<void> {
    if (this.#live.size === 0) return;
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      new Promise<void>((resolve) => this.#onDrained = resolve),
      new Promise<void>((resolve) => timer = setTimeout(resolve, graceMs)),
    ]);
    clearTimeout(timer);
  }
}

function bump(counts: Map<string, number>, key: string, by: number): void {
  const n = (counts.get(key) ?? 0) + by;
  if (n > 0) counts.set(key, n);
  else counts.delete(key);
}
