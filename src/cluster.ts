/**
 * Which server of a cluster holds which client, in etcd under a lease: every member writes
 * `members/ID` and `held/CLIENT/ID` (value `{"peer": "HOST:PEER_PORT"}`) under one lease it
 * keeps alive, so a dead member's records vanish by themselves within the lease's TTL. Every
 * member watches these keys and keeps a copy, to know where to forward a user whose client
 * it does not hold.
 * @module
 */
import type { ClusterSettings, EtcdSettings } from "./config.ts";
import { type EtcdClient, EtcdError, type KeyValue, type WatchEvent } from "./etcd.ts";
import { etcdClientFor } from "./etcd_registry.ts";
import { log } from "./log.ts";

const logger = log("cluster");

/** Seconds a member's records outlive its last keepalive. */
export const LEASE_TTL_S = 5;
/** How often the lease is renewed (well within its TTL). */
const KEEPALIVE_MS = 1500;
/** A request to etcd gives up after this long, so a keepalive is never late for long. */
const REQUEST_TIMEOUT_MS = 2000;

/** Another server that holds a client, and where its peer port is. */
export interface Holder {
  serverId: string;
  /** `host:peer_port`. */
  peer: string;
}

/** The cluster as this member sees it, for the status page. */
export interface ClusterState {
  /** This server's id. */
  self: string;
  /** Server ids with a live lease in etcd (this one included once registered). */
  members: string[];
  /** Client name → ids of the servers that hold it. */
  held: Record<string, string[]>;
  /** Live tunnels this server forwards to another one. */
  forwarded: number;
  /** Forwarded tunnels since start. */
  forwardedTotal: number;
}

/** This server's records in etcd and its copy of everyone's. */
export class Cluster {
  readonly settings: ClusterSettings;
  readonly #etcd: EtcdClient;
  readonly #prefix: string;
  /** Clients this server holds now (what its records must say). */
  readonly #mine = new Set<string>();
  /** Copy of etcd: client → server id → peer address. */
  readonly #held = new Map<string, Map<string, string>>();
  /** Copy of etcd: member id → peer address. */
  readonly #members = new Map<string, string>();
  #lease: string | undefined;
  #keepalive: ReturnType<typeof setTimeout> | undefined;
  #watch: { close(): void } | undefined;
  #closed = false;
  /** Writes run one after another, so a hold and a release of one client keep their order. */
  #queue: Promise<void> = Promise.resolve();
  /**
   * Clients whose record could not be written or deleted (etcd away): made right once etcd
   * answers again. A lease etcd kept through its own restart is not rewritten by a new one.
   */
  readonly #unsynced = new Set<string>();
  /** Called when a client gains a holder elsewhere. */
  onHeld: ((client: string) => void) | undefined;
  /** Called when a member joins, or its peer address changes. */
  onMembers: (() => void) | undefined;

  constructor(settings: ClusterSettings, etcd: EtcdSettings) {
    this.settings = settings;
    this.#etcd = etcdClientFor(etcd, REQUEST_TIMEOUT_MS);
    this.#prefix = etcd.prefix;
  }

  /** `host:peer_port` of this server, as its records give it. */
  get peer(): string {
    const { peerHost, peerPort } = this.settings;
    return `${peerHost.includes(":") ? `[${peerHost}]` : peerHost}:${peerPort}`;
  }

  /**
   * Registers this member under a new lease, reads every member's records and watches them.
   * Keeps trying in the background when etcd cannot be reached.
   */
  start(): void {
    this.#renew();
    this.#read().catch((err) =>
      logger.warn("cannot read the cluster's records from etcd yet: {error}", {
        error: (err as Error).message,
      })
    );
  }

  async #read(): Promise<void> {
    const revision = await this.#reload();
    if (this.#closed) return;
    this.#watch = this.#etcd.watch(this.#prefix, revision + 1, {
      onEvents: (events) => this.#apply(events),
      onCompacted: () => this.#reload(),
    });
  }

  /** Reads every record again; returns the revision read. */
  async #reload(): Promise<number> {
    const { kvs, revision } = await this.#etcd.rangePrefix(this.#prefix);
    this.#held.clear();
    this.#members.clear();
    for (const kv of kvs) this.#record(kv, true);
    return revision;
  }

  #apply(events: WatchEvent[]): void {
    for (const { type, kv } of events) this.#record(kv, type === "put");
  }

  /** Applies one key (a put, or a delete when `present` is false) to the copy. */
  #record(kv: KeyValue, present: boolean): void {
    const rest = kv.key.slice(this.#prefix.length);
    if (!kv.key.startsWith(this.#prefix)) return;
    if (rest.startsWith("members/")) {
      const id = rest.slice("members/".length);
      if (!present) return void this.#members.delete(id);
      const peer = peerOf(kv);
      if (peer && this.#members.get(id) !== peer) {
        this.#members.set(id, peer);
        this.onMembers?.();
      }
      return;
    }
    if (!rest.startsWith("held/")) return;
    const path = rest.slice("held/".length);
    const cut = path.lastIndexOf("/");
    if (cut <= 0) return;
    const client = path.slice(0, cut);
    const id = path.slice(cut + 1);
    const servers = this.#held.get(client) ?? new Map<string, string>();
    if (!present) {
      servers.delete(id);
      if (servers.size === 0) this.#held.delete(client);
      return;
    }
    const peer = peerOf(kv);
    if (!peer) return;
    servers.set(id, peer);
    this.#held.set(client, servers);
    if (id !== this.settings.serverId) this.onHeld?.(client);
  }

  /** The other servers that hold `client` now, as etcd last said. */
  holders(client: string): Holder[] {
    const servers = this.#held.get(client);
    if (!servers) return [];
    return [...servers].filter(([id]) => id !== this.settings.serverId)
      .map(([serverId, peer]) => ({ serverId, peer }));
  }

  /** `host:peer_port` of every other member with a live lease, as etcd last said. */
  memberPeers(): string[] {
    return [...this.#members].filter(([id]) => id !== this.settings.serverId)
      .map(([, peer]) => peer);
  }

  /** This server now holds `client`: record it. */
  hold(client: string): void {
    this.#mine.add(client);
    this.#sync(client);
  }

  /** This server no longer holds `client`: delete its record. */
  release(client: string): void {
    this.#mine.delete(client);
    this.#sync(client);
  }

  /** The cluster as this server sees it. */
  state(forwarded: number, forwardedTotal: number): ClusterState {
    const members = new Set(this.#members.keys());
    const held: Record<string, string[]> = {};
    for (const [client, servers] of [...this.#held].sort(([a], [b]) => a < b ? -1 : 1)) {
      held[client] = [...servers.keys()].sort();
      for (const id of servers.keys()) members.add(id);
    }
    return {
      self: this.settings.serverId,
      members: [...members].sort(),
      held,
      forwarded,
      forwardedTotal,
    };
  }

  /** Stops renewing and deletes this server's records at once (best effort). */
  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#keepalive);
    this.#watch?.close();
    const lease = this.#lease;
    this.#lease = undefined;
    if (lease) await this.#etcd.leaseRevoke(lease).catch(() => {});
    this.#etcd.close();
  }

  #heldKey(client: string): string {
    return `${this.#prefix}held/${client}/${this.settings.serverId}`;
  }

  async #put(client: string): Promise<void> {
    if (!this.#mine.has(client) || !this.#lease) return; // a new lease writes it
    await this.#etcd.put(this.#heldKey(client), JSON.stringify({ peer: this.peer }), this.#lease);
  }

  /**
   * Makes etcd's record of `client` say what this server does now (held or not), after the
   * writes queued before; when etcd cannot be reached, it is tried again once etcd answers.
   */
  #sync(client: string): void {
    this.#queue = this.#queue.then(async () => {
      const held = this.#mine.has(client); // as of now: a later hold or release wins
      if (this.#unsynced.size > 0) {
        // etcd did not answer the last write: wait for the lease renewal that finds it back,
        // rather than a request timeout per client.
        this.#unsynced.add(client);
        return;
      }
      try {
        if (held) await this.#put(client);
        else await this.#etcd.delete(this.#heldKey(client));
        this.#unsynced.delete(client);
      } catch (err) {
        // One warning per outage, not one per client of a fleet.
        const first = this.#unsynced.size === 0;
        this.#unsynced.add(client);
        const message = "cannot {what} in etcd, will try again when it answers: {error}";
        const values = {
          what: held ? `record that it holds client ${client}` : `delete its record of ${client}`,
          error: (err as Error).message,
        };
        if (first) logger.warn(message, values);
        else logger.debug(message, values);
      }
    });
  }

  /** etcd answers: writes again every record that failed meanwhile. */
  #resync(): void {
    if (this.#unsynced.size === 0) return;
    const clients = [...this.#unsynced];
    this.#unsynced.clear(); // a failure adds it back
    logger.info("etcd answers again: correcting {count} records of held clients", {
      count: clients.length,
    });
    for (const client of clients) this.#sync(client);
  }

  /**
   * Keeps the lease alive; when it is gone (etcd lost it, or was away longer than its TTL),
   * takes a new one and writes every record again.
   */
  async #renew(): Promise<void> {
    if (this.#closed) return;
    try {
      let alive = false;
      if (this.#lease) alive = await this.#etcd.leaseKeepAlive(this.#lease) > 0;
      if (!alive && !this.#closed) {
        const lease = await this.#etcd.leaseGrant(LEASE_TTL_S);
        await this.#etcd.put(
          `${this.#prefix}members/${this.settings.serverId}`,
          JSON.stringify({ peer: this.peer }),
          lease,
        );
        if (this.#closed) {
          await this.#etcd.leaseRevoke(lease).catch(() => {});
          return;
        }
        const again = this.#lease !== undefined;
        this.#lease = lease;
        for (const client of this.#mine) this.#sync(client);
        logger.info(
          again
            ? "cluster member {id}: lease lost, registered again with {clients} clients"
            : "cluster member {id} registered in etcd (peer {peer})",
          { id: this.settings.serverId, peer: this.peer, clients: this.#mine.size },
        );
      }
      if (!this.#closed) this.#resync();
    } catch (err) {
      logger.warn("cannot renew this server's lease in etcd: {error}", {
        error: err instanceof EtcdError ? err.message : String(err),
      });
    }
    if (!this.#closed) this.#keepalive = setTimeout(() => this.#renew(), KEEPALIVE_MS);
  }
}

function peerOf(kv: KeyValue): string | undefined {
  try {
    const value = JSON.parse(kv.value);
    if (typeof value?.peer === "string" && /^[^\s/]+:[0-9]{1,5}$/.test(value.peer)) {
      return value.peer;
    }
  } catch {
    // Not ours, or damaged: ignored.
  }
  logger.warn('etcd {key}: expected a JSON object with "peer": "HOST:PORT", ignored', {
    key: kv.key,
  });
  return undefined;
}
