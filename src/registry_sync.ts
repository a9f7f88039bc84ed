/**
 * Keeps a cluster member's registry from falling behind its peers': every peer announces the
 * etcd revision of its registry (see {@link Peers}); a server that stays behind a peer for
 * longer than {@link CATCH_UP_GRACE_MS} — it cannot hear etcd, or hears it late — takes the
 * peer's copy and applies it exactly as a change from etcd. So two servers that disagree
 * about the registry (one saw a change, one not yet) disagree for at most about a second,
 * as long as they can reach each other (docs/cluster.md, "Consistency").
 * @module
 */
import type { SharedRegistry } from "./etcd_registry.ts";
import type { RegistrySnapshot } from "./protocol.ts";
import { log } from "./log.ts";

const logger = log("registry");

/**
 * How long a server may stay behind a peer's announced revision before it asks that peer for
 * its registry. A server that hears etcd has the change within milliseconds, so this only
 * spares it a needless copy.
 */
export const CATCH_UP_GRACE_MS = 500;

/**
 * The watch delay: the longest a registry change takes to apply on every server that hears
 * etcd, or hears a peer that does (the grace, a heartbeat of slack, the copy and applying it).
 */
export const WATCH_DELAY_MS = 2000;

/** Asks the server at `peer` for its registry. */
export type SnapshotFetcher = (peer: string) => Promise<RegistrySnapshot>;

/** Follows the peers' announced revisions and catches up from one that is ahead. */
export class RegistrySync {
  readonly #registry: SharedRegistry;
  readonly #fetch: SnapshotFetcher;
  /** The newest revision a peer announced that this server does not have yet. */
  #ahead: { peer: string; revision: number } | undefined;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #fetching = false;
  #closed = false;

  constructor(registry: SharedRegistry, fetch: SnapshotFetcher) {
    this.#registry = registry;
    this.#fetch = fetch;
  }

  /** The server at `peer` announced that its registry is at `revision`. */
  heard(peer: string, revision: number): void {
    if (this.#closed || revision <= this.#registry.revision) return;
    if (!this.#ahead || revision > this.#ahead.revision) this.#ahead = { peer, revision };
    if (this.#timer === undefined && !this.#fetching) {
      this.#timer = setTimeout(() => this.#catchUp(), CATCH_UP_GRACE_MS);
    }
  }

  async #catchUp(): Promise<void> {
    this.#timer = undefined;
    const ahead = this.#ahead;
    this.#ahead = undefined;
    if (this.#closed || !ahead || ahead.revision <= this.#registry.revision) return;
    this.#fetching = true;
    try {
      const snapshot = await this.#fetch(ahead.peer);
      this.#registry.adopt(snapshot, ahead.peer);
    } catch (err) {
      logger.warn(
        "registry behind peer {peer} (revision {mine} < {theirs}) and its copy could not be " +
          "read: {error}",
        {
          peer: ahead.peer,
          mine: this.#registry.revision,
          theirs: ahead.revision,
          error: (err as Error).message,
        },
      );
    } finally {
      this.#fetching = false;
    }
    // Announced again meanwhile (or the copy failed): the next announcement starts over.
    if (this.#ahead && !this.#closed) {
      this.#timer = setTimeout(() => this.#catchUp(), CATCH_UP_GRACE_MS);
    }
  }

  /** Stops following. */
  close(): void {
    this.#closed = true;
    clearTimeout(this.#timer);
  }
}
