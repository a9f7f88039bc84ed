/**
 * The server's registry of connected clients: one session per client name, each an
 * authenticated connection carrying that client's tunnels as streams.
 * @module
 */
import type { ServerConfig } from "./config.ts";
import type { Mux, MuxStream } from "./mux.ts";
import { encodeOpen, type OpenRequest } from "./protocol.ts";
import type { TunnelTarget } from "./tunnels.ts";
import { log } from "./log.ts";

const logger = log("server");

/** One authenticated client connection and what the status page shows of it. */
export class Session implements TunnelTarget {
  /** Unix time in ms when it authenticated. */
  readonly connectedSince = Date.now();
  /**
   * Set once the client has spoken on the mux (its first ping follows `welcome` at once): only
   * then are users paired with it, so a connection cut before it heard `welcome` loses nobody.
   */
  ready = false;
  /** Set once the session takes no new tunnels (the server or the client is going away). */
  leaving = false;

  constructor(readonly name: string, readonly mux: Mux) {}

  /** Whether its connection is gone. */
  get closed(): boolean {
    return this.mux.closed;
  }

  /** Opens a stream on the client's connection to `host:port` on its side. */
  open(request: OpenRequest): MuxStream {
    return this.mux.open(encodeOpen(request));
  }

  /** The client's address, for logs. */
  get remote(): string {
    return this.mux.link.remote;
  }

  /** Unix time in ms of the last frame heard from the client. */
  get lastSeen(): number {
    return Date.now() - (performance.now() - this.mux.lastHeard);
  }

  /** Tells the client why (best effort, bounded) and closes, cutting its tunnels. */
  refuse(reason: string, retry = true): Promise<void> {
    return this.mux.goodbye({ type: "refused", reason, retry }, new Error(reason));
  }
}

/** Connected clients by name. */
export class Registry {
  #sessions = new Map<string, Session>();

  /** The session of client `name`, if it is connected, ready and takes tunnels. */
  get(name: string): Session | undefined {
    const session = this.#sessions.get(name);
    return session?.ready && !session.leaving ? session : undefined;
  }

  /** Whether client `name` has a session here at all (ready or not, leaving or not). */
  has(name: string): boolean {
    return this.#sessions.has(name);
  }

  /** Every session, including those that are leaving. */
  all(): IterableIterator<Session> {
    return this.#sessions.values();
  }

  /** Records `session` as its client's; returns the session it replaces, if any. */
  add(session: Session): Session | undefined {
    const old = this.#sessions.get(session.name);
    this.#sessions.set(session.name, session);
    return old;
  }

  /** Forgets `session` if it is still its client's current one. */
  remove(session: Session): void {
    if (this.#sessions.get(session.name) === session) this.#sessions.delete(session.name);
  }

  /**
   * Applies a reloaded config: a client no longer listed, or whose key changed (it may have
   * been stolen), is logged out at once.
   */
  reload(next: ServerConfig, old: ServerConfig): void {
    for (const [name, session] of this.#sessions) {
      if (!next.clients.has(name)) {
        logger.info("client {name} logged out: removed from the config", { name });
        session.refuse("this client was removed from the server's config");
      } else if (next.clientKeyText.get(name) !== old.clientKeyText.get(name)) {
        logger.info("client {name} logged out: its key was changed", { name });
        session.refuse("this client's key was changed on the server; log in with the new key");
      }
    }
  }
}
