/**
 * Named users on the communication port: an admin logged in with a `[users]` key opens
 * streams on its own connection, each asking for a port of a client by name. The server
 * checks the user's `allow` rules, finds (or waits a bounded while for) the client, and
 * relays the user's stream with a new stream on the client's connection. The client's own
 * allow list still decides last.
 * @module
 */
import { type ServerConfig, userRuleFor } from "./config.ts";
import {
  decodeUserOpen,
  type FramedStream,
  type Message,
  ProtocolError,
  USER_INTERVAL_S,
  type UserHello,
  type UserOpen,
} from "./protocol.ts";
import { Mux, type MuxStream } from "./mux.ts";
import type { Registry } from "./registry.ts";
import type { TunnelInfo, Tunnels, TunnelTarget } from "./tunnels.ts";
import type { Forwarder } from "./pairing.ts";
import { log } from "./log.ts";

const logger = log("server");

/** Open requests of one user that may wait for their clients at once. */
export const MAX_WAITING_PER_USER = 16;

/** One logged-in connection of a user. */
class UserConnection {
  /** Unix time in ms when it authenticated. */
  readonly connectedSince = Date.now();
  constructor(readonly name: string, readonly mux: Mux) {}

  /** Tells the user why (best effort, bounded) and closes, cutting its tunnels. */
  refuse(reason: string): Promise<void> {
    return this.mux.goodbye({ type: "refused", reason, retry: true }, new Error(reason));
  }
}

/** A configured user as the status page shows it. */
export interface UserInfo {
  name: string;
  /** Its logged-in connections. */
  connections: { remote: string; connectedSince: number }[];
  /** Its live tunnels. */
  tunnels: TunnelInfo[];
}

/** How a user's table name is written in the config, for messages. */
function tableName(name: string): string {
  return `[users.${/^[A-Za-z0-9_-]+$/.test(name) ? name : JSON.stringify(name)}]`;
}

/** Every logged-in user, their requests and their limits. */
export class Users {
  #config: () => ServerConfig;
  #registry: Registry;
  #tunnels: Tunnels;
  #connections = new Set<UserConnection>();
  /** Live tunnels by user name. */
  #live = new Map<string, number>();
  /** Requests waiting for a client, by user name. */
  #waiting = new Map<string, number>();
  /** Wake-ups of waiting requests, by client name (with the way to it, if not here). */
  #waiters = new Map<string, Set<(target?: TunnelTarget) => void>>();
  #forward: Forwarder | undefined;
  /** Refused open requests by reason, since start. */
  readonly refusals = new Map<string, number>();

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

  /** Serves a logged-in user's connection until it ends. */
  async serve(framed: FramedStream, hello: UserHello, rttMs: number): Promise<void> {
    const config = this.#config();
    const remote = framed.stream.remote;
    // As for a client: from here the mux reads eagerly and credit bounds what the user sends;
    // the login's bound on unread bytes would cut a user opening many tunnels at once.
    framed.stream.limitUnread?.(undefined);
    // deno-lint-ignore prefer-const
    let conn: UserConnection;
    const mux: Mux = new Mux(framed.stream, {
      onOpen: (stream, payload) => this.#open(conn, stream, payload),
      onControl: (message: Message) => {
        if (message.type === "ping") return;
        if (message.type === "goodbye") {
          mux.closeWhenIdle(new Error(`the user said: ${message.reason}`));
          return;
        }
        throw new ProtocolError(`unexpected "${message.type}" from a user`);
      },
    }, { maxStreams: config.maxTunnelsPerUser + MAX_WAITING_PER_USER, rttMs });
    conn = new UserConnection(hello.name, mux);
    this.#connections.add(conn);
    logger.info("user {name} connected from {remote}", { name: hello.name, remote });
    try {
      await framed.send({ type: "welcome", services: [], pending: 0 });
    } catch (err) {
      mux.close(err as Error);
    }
    mux.startHeartbeat(USER_INTERVAL_S * 1000);
    const reason = await mux.run();
    this.#connections.delete(conn);
    logger.info("user {name} disconnected ({reason})", {
      name: hello.name,
      reason: reason.message,
    });
  }

  /** The user on `conn` opened `stream` with this payload: check, wait if asked, and relay. */
  #open(conn: UserConnection, stream: MuxStream, payload: Uint8Array): void {
    const name = conn.name;
    let request: UserOpen;
    try {
      request = decodeUserOpen(payload);
    } catch (err) {
      return this.#refuse(name, stream, "bad_request", (err as Error).message);
    }
    const entry = this.#config().users.get(name);
    const target = `${JSON.stringify(request.client)}:${request.port}`;
    if (!entry || !userRuleFor(entry.allow, request.client, request.port)) {
      return this.#refuse(
        name,
        stream,
        "not_allowed",
        `user "${name}" may not reach ${target}: no entry of ${tableName(name)}.allow matches`,
      );
    }
    const session = this.#registry.get(request.client);
    if (session) return this.#start(name, stream, request, session);
    if (this.#forward) {
      // Another server of the cluster may hold it.
      this.#forward(request.client).then((target) => {
        if (stream.isClosed()) return;
        const local = this.#registry.get(request.client); // connected here meanwhile: it wins
        if (local ?? target) this.#start(name, stream, request, (local ?? target)!);
        else this.#await(name, stream, request);
      });
      return;
    }
    this.#await(name, stream, request);
  }

  /** No server holds the client: refuse, or wait as the request asks. */
  #await(name: string, stream: MuxStream, request: UserOpen): void {
    const offline = `client ${JSON.stringify(request.client)} is not connected`;
    if (request.wait === 0) return this.#refuse(name, stream, "client_offline", offline);
    const waiting = this.#waiting.get(name) ?? 0;
    if (waiting >= MAX_WAITING_PER_USER) {
      return this.#refuse(
        name,
        stream,
        "too_many_waiting",
        `${offline}, and user "${name}" has ${waiting} requests waiting already ` +
          `(at most ${MAX_WAITING_PER_USER})`,
      );
    }
    bump(this.#waiting, name, 1);
    logger.info("user {name} waits up to {wait} s for client {client}", {
      name,
      wait: request.wait,
      client: request.client,
    });
    this.#waitFor(request.client, request.wait * 1000, stream.done).then((session) => {
      bump(this.#waiting, name, -1);
      if (stream.isClosed()) return; // the user gave up, or its connection is gone
      if (!session) {
        return this.#refuse(
          name,
          stream,
          "client_offline",
          `${offline} (waited ${request.wait} s)`,
        );
      }
      this.#start(name, stream, request, session);
    });
  }

  /**
   * Resolves with the way to client `client` once it is ready here or on another server, or
   * undefined at the deadline.
   */
  #waitFor(
    client: string,
    ms: number,
    abandon: Promise<unknown>,
  ): Promise<TunnelTarget | undefined> {
    return new Promise((resolve) => {
      const wakes = this.#waiters.get(client) ?? new Set<(target?: TunnelTarget) => void>();
      this.#waiters.set(client, wakes);
      let done = false;
      const finish = (session: TunnelTarget | undefined) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        wakes.delete(wake);
        if (wakes.size === 0 && this.#waiters.get(client) === wakes) this.#waiters.delete(client);
        resolve(session);
      };
      const wake = (target?: TunnelTarget) => {
        const session = this.#registry.get(client) ?? target;
        if (session) finish(session);
      };
      const timer = setTimeout(() => finish(undefined), ms);
      wakes.add(wake);
      abandon.then(() => finish(undefined));
    });
  }

  /** Client `session` is ready for tunnels: requests waiting for it go ahead. */
  clientReady(session: TunnelTarget): void {
    for (const wake of [...this.#waiters.get(session.name) ?? []]) wake();
  }

  /** Another server of the cluster now holds client `name`: requests waiting for it go there. */
  heldElsewhere(name: string): void {
    if (!this.#forward || !this.#waiters.has(name)) return;
    this.#forward(name).then((target) => {
      if (!target) return;
      for (const wake of [...this.#waiters.get(name) ?? []]) wake(target);
    });
  }

  #start(name: string, stream: MuxStream, request: UserOpen, session: TunnelTarget): void {
    const live = this.#live.get(name) ?? 0;
    const max = this.#config().maxTunnelsPerUser;
    if (live >= max) {
      return this.#refuse(
        name,
        stream,
        "too_many_tunnels",
        `user "${name}" has ${live} live tunnels (max_tunnels_per_user)`,
      );
    }
    const busy = this.#tunnels.userRefusal(session.name);
    if (busy) return this.#refuse(name, stream, "client_busy", busy);
    bump(this.#live, name, 1);
    this.#tunnels.runUser(name, stream, session, request.port).then((refused) => {
      if (refused) this.#count("client_refused");
    }, (err) => {
      stream.reset(`cannot reach client ${JSON.stringify(session.name)}: ${err.message}`);
    }).finally(() => bump(this.#live, name, -1));
  }

  #refuse(name: string, stream: MuxStream, kind: string, reason: string): void {
    this.#count(kind);
    logger.warn("user {name} refused: {reason}", { name, reason, by: name });
    stream.reset(reason);
  }

  #count(kind: string): void {
    this.refusals.set(kind, (this.refusals.get(kind) ?? 0) + 1);
  }

  /**
   * Applies a reloaded config: a user no longer listed, or whose key or allow list changed,
   * is logged out at once, and its live tunnels close.
   */
  reload(next: ServerConfig, old: ServerConfig): void {
    for (const conn of this.#connections) {
      const now = next.users.get(conn.name);
      const was = old.users.get(conn.name);
      let why: string | undefined;
      if (!now) why = "this user was removed from the server's config";
      else if (now.keyText !== was?.keyText) {
        why = "this user's key was changed on the server; log in with the new key";
      } else if (
        JSON.stringify(now.allow.map((r) => r.text)) !==
          JSON.stringify(was.allow.map((r) => r.text))
      ) {
        why = "this user's allow list was changed on the server; log in again";
      }
      if (!why) continue;
      logger.info("user {name} logged out: {why}", { name: conn.name, why });
      conn.refuse(why);
    }
  }

  /** Tells every user the server is going away; live tunnels finish. */
  shutdown(): void {
    for (const conn of this.#connections) {
      conn.mux.sendControl({ type: "goodbye", reason: "the server is shutting down" })
        .catch(() => {});
      conn.mux.closeWhenIdle(new Error("the server is shutting down"));
    }
  }

  /** Closes every user connection and its tunnels. */
  close(): void {
    for (const conn of this.#connections) conn.mux.close(new Error("server closed"));
  }

  /** Every configured user with its connections and live tunnels (from `live`). */
  list(live: TunnelInfo[]): UserInfo[] {
    return [...this.#config().users.keys()].map((name) => ({
      name,
      connections: [...this.#connections].filter((c) => c.name === name).map((c) => ({
        remote: c.mux.link.remote,
        connectedSince: c.connectedSince,
      })),
      tunnels: live.filter((t) => t.service === 0 && t.by === name),
    }));
  }
}

function bump(counts: Map<string, number>, key: string, by: number): void {
  const n = (counts.get(key) ?? 0) + by;
  if (n > 0) counts.set(key, n);
  else counts.delete(key);
}
