/**
 * Pairing users with their client: a user whose client is connected gets a tunnel at once;
 * one whose client is away waits (up to `max_pending_users` per service, `pending_timeout`
 * each) and is served the moment the client connects.
 * @module
 */
import type { ServerConfig, ServiceConfig } from "./config.ts";
import type { Registry } from "./registry.ts";
import type { Tunnels, TunnelTarget } from "./tunnels.ts";
import type { Stream } from "./transport.ts";
import { log } from "./log.ts";

const logger = log("server");

/** A user waiting on a service port for its client to connect. */
interface Waiting {
  user: Stream;
  service: ServiceConfig;
  timer: ReturnType<typeof setTimeout>;
}

/**
 * Finds another server of the cluster that holds client `name` and returns the way to it, or
 * undefined when none does (or none can be reached).
 */
export type Forwarder = (name: string) => Promise<TunnelTarget | undefined>;

/** Users on their way to a client, and those waiting for one that is away. */
export class Pairing {
  #config: () => ServerConfig;
  #registry: Registry;
  #tunnels: Tunnels;
  /** Waiting users by client name, oldest first. */
  #waiting = new Map<string, Waiting[]>();

  #forward: Forwarder | undefined;

  /** @param forward where a cluster member finds a client another server holds */
  constructor(
    config: () => ServerConfig,
    registry: Registry,
    tunnels: Tunnels,
    forward?: Forwarder,
  ) {
    this.#config = config;
    this.#registry = registry;
    this.#tunnels = tunnels;
    this.#forward = forward;
  }

  /** A user connected to `service`'s port: serve, queue or turn away. */
  arrive(user: Stream, service: ServiceConfig): void {
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
    const refusal = this.#tunnels.refusal(service, user.remoteIp);
    if (refusal) return turnAway(refusal);
    const session = this.#registry.get(service.name);
    if (session) {
      // The usual case: the client is connected, so the tunnel is one frame away. A burst is
      // bounded by the tunnel limits and each stream's credit, not by a queue.
      this.#serve(user, session, service);
      return;
    }
    if (this.#forward) {
      // Another server of the cluster may hold it: carry the user there, else wait here.
      this.#forward(service.name).then((target) => {
        if (user.isClosed()) return user.close();
        const local = this.#registry.get(service.name); // connected here meanwhile: it wins
        if (local ?? target) this.#serve(user, (local ?? target)!, service);
        else this.#wait(user, service, turnAway);
      });
      return;
    }
    this.#wait(user, service, turnAway);
  }

  /** Queues `user` until its client connects, within the limits. */
  #wait(user: Stream, service: ServiceConfig, turnAway: (why: string) => void): void {
    const queue = this.#waiting.get(service.name) ?? [];
    const waiting = queue.filter((w) => w.service.port === service.port).length;
    if (waiting >= this.#config().maxPendingUsers) {
      return turnAway(`${waiting} users already wait (max_pending_users)`);
    }
    const entry: Waiting = {
      user,
      service,
      timer: setTimeout(() => this.#expire(entry), this.#config().pendingTimeout * 1000),
    };
    queue.push(entry);
    this.#waiting.set(service.name, queue);
    logger.info("user {user} on service {port} waits for client {client}", {
      user: user.remote,
      port: service.port,
      client: service.name,
    });
  }

  /** Users waiting for client `name` right now. */
  waitingFor(name: string): number {
    return this.#waiting.get(name)?.length ?? 0;
  }

  /** Users waiting on service `port` right now. */
  waitingOn(service: ServiceConfig): number {
    return (this.#waiting.get(service.name) ?? []).filter((w) => w.service.port === service.port)
      .length;
  }

  /** Client `target` connected here, or another server took it: everyone waiting is served. */
  connected(target: TunnelTarget): void {
    const queue = this.#waiting.get(target.name);
    if (!queue) return;
    this.#waiting.delete(target.name);
    for (const entry of queue) {
      clearTimeout(entry.timer);
      this.#serve(entry.user, target, entry.service);
    }
  }

  /** Another server of the cluster now holds client `name`: users waiting for it go there. */
  heldElsewhere(name: string): void {
    if (!this.#forward || !this.#waiting.has(name)) return;
    this.#forward(name).then((target) => {
      if (target && !this.#registry.get(name)) this.connected(target);
    });
  }

  #serve(user: Stream, session: TunnelTarget, service: ServiceConfig): void {
    this.#tunnels.run(user, session, service).catch((err) => {
      user.close();
      logger.warn("user {user} on service {port} closed: {error}", {
        user: user.remote,
        port: service.port,
        error: (err as Error).message,
      });
    });
  }

  /** Nobody served `entry` within pending_timeout: close it and say so. */
  #expire(entry: Waiting): void {
    const queue = this.#waiting.get(entry.service.name) ?? [];
    const at = queue.indexOf(entry);
    if (at >= 0) queue.splice(at, 1);
    if (queue.length === 0) this.#waiting.delete(entry.service.name);
    entry.user.close();
    logger.warn(
      "user {user} on service {port} closed: client {client} did not connect within {timeout} s",
      {
        user: entry.user.remote,
        port: entry.service.port,
        client: entry.service.name,
        timeout: this.#config().pendingTimeout,
      },
    );
  }

  /** Closes every waiting user. */
  close(): void {
    for (const queue of this.#waiting.values()) {
      for (const entry of queue) {
        clearTimeout(entry.timer);
        entry.user.close();
      }
    }
    this.#waiting.clear();
  }
}
