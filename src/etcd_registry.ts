/**
 * The registry in etcd: clients, services and users as keys under a prefix, read at start and
 * then watched, so every server of a cluster applies a change at once, as a reload would.
 *
 * Layout under the prefix (default `/natadm/`), each value JSON:
 * - `clients/NAME`  → `{"key": "BASE64 SPKI"}`
 * - `services/PORT` → `{"name": CLIENT, "port": TARGET, "host"?: H, "allow_from"?: [CIDR…]}`
 * - `users/NAME`    → `{"key": "BASE64 SPKI", "allow": ["CLIENT-GLOB:PORT-or-*", …]}`
 * - `meta/changed`  → when `deno task admin` last changed the registry (its writes compare it)
 * Other keys under the prefix belong to the cluster and are not the registry's.
 *
 * Every state is validated exactly as a config file is ({@link parseRegistry}); an invalid one
 * is refused and the last good one stays. When etcd cannot be reached, the server keeps the
 * registry it has and catches up from the next revision once etcd answers again.
 * @module
 */
import {
  ConfigError,
  type EtcdSettings,
  etcdSource,
  parseRegistry,
  type RawRegistry,
  type RegistryConfig,
  type RegistryKind,
} from "./config.ts";
import { CompactedError, EtcdClient, type KeyValue, type WatchEvent } from "./etcd.ts";
import type { RegistrySnapshot } from "./protocol.ts";
import { log } from "./log.ts";

const logger = log("registry");

/** The registry's tables, each a key segment under the prefix. */
export const REGISTRY_KINDS: readonly RegistryKind[] = ["clients", "services", "users"];

/** The key every admin change rewrites, so that concurrent changes cannot both succeed. */
export const CHANGED_KEY = "meta/changed";

/** Where the registry comes from and whether it is current, for the status page. */
export interface RegistryState {
  source: "file" | "etcd";
  /** Whether the source is reachable now (always true for a file). */
  connected: boolean;
  /** Unix time in ms since when `connected` has held its value. */
  since: number;
  /** The etcd revision of the registry in force (absent for a file). */
  revision?: number;
  /** Why etcd is unreachable, while it is. */
  error?: string;
}

/** The etcd key of entry `name` of `kind`. */
export function registryKey(prefix: string, kind: RegistryKind, name: string): string {
  return `${prefix}${kind}/${name}`;
}

/** A client for the etcd these settings name. */
export function etcdClientFor(settings: EtcdSettings, timeoutMs?: number): EtcdClient {
  return new EtcdClient({
    endpoints: settings.endpoints,
    username: settings.username,
    password: settings.password,
    caCerts: settings.caPem ? [settings.caPem] : undefined,
    timeoutMs,
  });
}

/**
 * Turns etcd's keys under `prefix` (key → value text) into a registry's plain data; a value
 * that is not JSON is a {@link ConfigError} naming its key. Keys of other kinds are skipped.
 */
export function rawRegistry(prefix: string, entries: Map<string, string>): RawRegistry {
  const raw: RawRegistry = { clients: {}, services: {}, users: {} };
  for (const [key, value] of entries) {
    const kind = REGISTRY_KINDS.find((k) => key.startsWith(`${prefix}${k}/`));
    if (!kind) continue;
    const name = key.slice(`${prefix}${kind}/`.length);
    try {
      raw[kind][name] = JSON.parse(value);
    } catch (err) {
      throw new ConfigError(
        `etcd ${key}: not JSON (${(err as Error).message}); expected an object such as ${
          kind === "services"
            ? `{"name": "CLIENT", "port": 22}`
            : kind === "clients"
            ? `{"key": "BASE64 SPKI"}`
            : `{"key": "BASE64 SPKI", "allow": ["CLIENT:22"]}`
        }`,
      );
    }
  }
  return raw;
}

/** Reads and validates the whole registry under `prefix`; returns it and its revision. */
export async function readRegistry(
  etcd: EtcdClient,
  prefix: string,
  reserved?: Map<number, string>,
): Promise<{ registry: RegistryConfig; entries: Map<string, string>; revision: number }> {
  const { kvs, revision } = await etcd.rangePrefix(prefix);
  const entries = toEntries(kvs);
  const registry = await parseRegistry(rawRegistry(prefix, entries), etcdSource(prefix), reserved);
  return { registry, entries, revision };
}

function sameEntries(a: Record<string, string>, b: Record<string, string>): boolean {
  const keys = Object.keys(a);
  return keys.length === Object.keys(b).length && keys.every((key) => b[key] === a[key]);
}

function toEntries(kvs: KeyValue[]): Map<string, string> {
  return new Map(kvs.map((kv) => [kv.key, kv.value]));
}

/** What the server gives the registry: the ports it may not take, and where to apply it. */
export interface RegistryHost {
  /** Ports services must not take (communication_port, status_port), with their keys. */
  reserved(): Map<number, string>;
  /** Applies a valid registry; returns false if the server refused it (the old one stays). */
  apply(registry: RegistryConfig, revision: number): boolean;
}

/** How long a first start keeps trying to reach etcd before it gives up. */
export const START_DEADLINE_MS = 30_000;
/** How often a server checks that etcd answers, besides its watch. */
const PROBE_INTERVAL_MS = 2000;

/**
 * What a cluster member shares of its registry with the other servers, so one that is cut off
 * from etcd catches up from a peer that is not (see docs/cluster.md, "Consistency").
 */
export interface SharedRegistry {
  /** The etcd revision this server's copy of the registry reflects. */
  readonly revision: number;
  /** The registry's keys and values at that revision. */
  snapshot(): RegistrySnapshot;
  /** Takes a peer's newer snapshot as a change from etcd; returns false if it is not newer. */
  adopt(snapshot: RegistrySnapshot, from: string): boolean;
  /** Called when a registry key changed (after the revision moved). */
  onChange: (() => void) | undefined;
}

/** A server's registry in etcd: loaded once, then watched. */
export class EtcdRegistry implements SharedRegistry {
  readonly #etcd: EtcdClient;
  readonly #prefix: string;
  #host: RegistryHost | undefined;
  /** Every registry key and its value, as etcd has them (valid or not). */
  #entries = new Map<string, string>();
  /** The revision #entries reflect. */
  #seen = 0;
  /** The revision of the registry in force. */
  #applied = 0;
  #watchUp = false;
  #probeOk = true;
  #state: RegistryState = { source: "etcd", connected: false, since: Date.now() };
  #watch: { close(): void; done: Promise<void> } | undefined;
  #probe: ReturnType<typeof setInterval> | undefined;
  /** Validations run one after another, so states apply in revision order. */
  #queue: Promise<void> = Promise.resolve();
  /** Called when a registry key changed. */
  onChange: (() => void) | undefined;

  constructor(readonly settings: EtcdSettings) {
    this.#etcd = etcdClientFor(settings);
    this.#prefix = settings.prefix;
  }

  /** Where the registry stands now, for the status page. */
  state(): RegistryState {
    return { ...this.#state, revision: this.#applied };
  }

  /** The etcd revision this server's copy of the keys reflects. */
  get revision(): number {
    return this.#seen;
  }

  /** The registry's keys and values at {@link revision}. */
  snapshot(): RegistrySnapshot {
    const entries: Record<string, string> = {};
    for (const [key, value] of this.#entries) {
      if (this.#isRegistryKey(key)) entries[key] = value;
    }
    return { revision: this.#seen, entries };
  }

  /**
   * A peer's copy at a newer revision (this server could not hear it from etcd): taken as the
   * registry's keys, validated and applied exactly as a change from etcd. Events the watch
   * replays later for revisions up to it are skipped.
   */
  adopt(snapshot: RegistrySnapshot, from: string): boolean {
    if (snapshot.revision <= this.#seen) return false;
    const mine = this.snapshot().entries;
    const theirs = Object.fromEntries(
      Object.entries(snapshot.entries).filter(([key]) => this.#isRegistryKey(key)),
    );
    if (sameEntries(mine, theirs)) {
      // Only the cluster's own keys moved on: nothing to apply.
      this.#seen = snapshot.revision;
      return true;
    }
    for (const key of Object.keys(mine)) this.#entries.delete(key);
    for (const [key, value] of Object.entries(theirs)) this.#entries.set(key, value);
    logger.info(
      "registry taken from peer {peer} at etcd revision {revision} (this server had {seen})",
      { peer: from, revision: snapshot.revision, seen: this.#seen },
    );
    this.#seen = snapshot.revision;
    const copy = new Map(this.#entries);
    this.#queue = this.#queue.then(() => this.#validateAndApply(copy, snapshot.revision));
    this.onChange?.();
    return true;
  }

  /**
   * Reads the registry for a first start, trying again for up to `deadlineMs` while etcd
   * cannot be reached; throws a one-line error when it cannot, or when the registry is invalid.
   */
  async load(reserved: Map<number, string>, deadlineMs = START_DEADLINE_MS): Promise<
    RegistryConfig
  > {
    const end = Date.now() + deadlineMs;
    let delay = 250;
    for (;;) {
      try {
        const { registry, entries, revision } = await readRegistry(
          this.#etcd,
          this.#prefix,
          reserved,
        );
        this.#entries = entries;
        this.#seen = this.#applied = revision;
        this.#setConnected(true);
        logger.info("registry read from etcd {endpoints} at revision {revision}", {
          endpoints: this.settings.endpoints.join(","),
          revision,
        });
        return registry;
      } catch (err) {
        if (err instanceof ConfigError) throw err;
        if (Date.now() + delay > end) {
          throw new Error(
            `cannot read the registry from etcd (${this.settings.endpoints.join(", ")}) in ${
              Math.round(deadlineMs / 1000)
            } s: ${(err as Error).message}`,
          );
        }
        logger.warn("etcd not reachable yet, trying again: {error}", {
          error: (err as Error).message,
        });
        await new Promise((resolve) => setTimeout(resolve, delay));
        delay = Math.min(delay * 2, 4000);
      }
    }
  }

  /** Watches for changes from the revision loaded on, applying each valid state to `host`. */
  start(host: RegistryHost): void {
    this.#host = host;
    // Just read from etcd: reachable until the watch or the health check says otherwise.
    this.#watchUp = true;
    this.#watch = this.#etcd.watch(this.#prefix, this.#seen + 1, {
      onEvents: (events, revision) => this.#onEvents(events, revision),
      onConnected: () => {
        this.#watchUp = true;
        this.#update();
      },
      onDisconnected: (error) => {
        this.#watchUp = false;
        this.#update(error.message);
      },
      onCompacted: (error) => this.#reloadAll(error),
    });
    this.#probe = setInterval(async () => {
      const ok = await this.#etcd.healthy();
      if (this.#probe === undefined) return;
      this.#probeOk = ok;
      this.#update(ok ? undefined : "etcd does not answer its health check");
    }, PROBE_INTERVAL_MS);
  }

  /** Stops watching. */
  close(): void {
    clearInterval(this.#probe);
    this.#probe = undefined;
    this.#watch?.close();
    this.#etcd.close();
  }

  #update(error?: string): void {
    this.#setConnected(this.#watchUp && this.#probeOk, error);
  }

  #setConnected(connected: boolean, error?: string): void {
    if (connected === this.#state.connected) {
      if (!connected && error) this.#state.error = error;
      return;
    }
    this.#state = { source: "etcd", connected, since: Date.now(), error };
    if (connected) {
      if (this.#host) {
        logger.info("etcd reachable again: registry current from revision {revision}", {
          revision: this.#seen,
        });
      }
    } else {
      logger.warn(
        "etcd unreachable: serving the registry of revision {revision} until it returns ({error})",
        { revision: this.#applied, error: error ?? "no answer" },
      );
    }
  }

  #onEvents(events: WatchEvent[], revision: number): void {
    // Revisions a peer's snapshot already brought (adopt) are not applied twice.
    const fresh = events.filter((e) => e.kv.modRevision > this.#seen);
    if (revision <= this.#seen) return;
    for (const { type, kv } of fresh) {
      if (type === "put") this.#entries.set(kv.key, kv.value);
      else this.#entries.delete(kv.key);
    }
    this.#seen = revision;
    // Changes only to keys that are not the registry's (cluster data) need no reload.
    if (!fresh.some((e) => this.#isRegistryKey(e.kv.key))) return;
    const snapshot = new Map(this.#entries);
    this.#queue = this.#queue.then(() => this.#validateAndApply(snapshot, revision));
    this.onChange?.();
  }

  #isRegistryKey(key: string): boolean {
    return REGISTRY_KINDS.some((k) => key.startsWith(`${this.#prefix}${k}/`));
  }

  async #validateAndApply(snapshot: Map<string, string>, revision: number): Promise<void> {
    let registry: RegistryConfig;
    try {
      registry = await parseRegistry(
        rawRegistry(this.#prefix, snapshot),
        etcdSource(this.#prefix),
        this.#host?.reserved(),
      );
    } catch (err) {
      logger.error(
        "registry change at etcd revision {revision} refused, the registry of revision " +
          "{applied} stays in force: {error}",
        { revision, applied: this.#applied, error: (err as Error).message },
      );
      return;
    }
    try {
      if (this.#host?.apply(registry, revision)) this.#applied = revision;
    } catch (err) {
      logger.error("registry of etcd revision {revision} could not be applied: {error}", {
        revision,
        error: (err as Error).message,
      });
    }
  }

  /** The watch's history was compacted: read everything again; returns that revision. */
  async #reloadAll(error: CompactedError): Promise<number> {
    logger.warn("{error}; reading the whole registry again", { error: error.message });
    const { kvs, revision } = await this.#etcd.rangePrefix(this.#prefix);
    this.#entries = toEntries(kvs);
    this.#seen = revision;
    const snapshot = new Map(this.#entries);
    this.#queue = this.#queue.then(() => this.#validateAndApply(snapshot, revision));
    await this.#queue;
    return revision;
  }
}
