/**
 * Configuration files for both programs, in TOML with the original NATadm's key names.
 *
 * Everything is validated here, at load time, so the rest of the code trusts what it gets:
 * every error names the file and the key (or line and column), and says what was expected.
 * @module
 */
import { parse, TomlError } from "smol-toml";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { dirname, resolve } from "node:path";
import { importPrivateKey, importPublicKey } from "./keys.ts";
import { checkName, fromBase64 } from "./protocol.ts";
import { Networks } from "./guard.ts";
import { DEFAULT_MAX_HANDSHAKING, DEFAULT_MAX_HANDSHAKING_PER_ADDRESS } from "./accept.ts";
import { isLogLevel } from "./log.ts";
import type { LogLevel } from "@logtape/logtape";

/** Raised for any problem in a config file; the message is ready to show the admin. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

/** One entry of the server's `services` table. */
export interface ServiceConfig {
  /** Public port on the server. */
  port: number;
  /** Client that serves it. */
  name: string;
  /** Host the client connects to, on its side. */
  host: string;
  /** Port on that host. */
  targetPort: number;
  /** Users allowed to connect; everyone when absent. */
  allowFrom?: Networks;
}

/** A loaded and validated server configuration. */
export interface ServerConfig {
  file: string;
  /** Every other file the config names (certificate, key), as absolute paths. */
  readFiles: string[];
  communicationPort: number;
  listenHost: string;
  certPem: string;
  keyPem: string;
  /** Seconds a user waits for the client before being closed. */
  pendingTimeout: number;
  /** Seconds live tunnels may run on after SIGINT/SIGTERM before they are closed. */
  shutdownGrace: number;
  /** Users waiting for their client, per service, before new ones are turned away. */
  maxPendingUsers: number;
  /** Live tunnels per client before new users are turned away. */
  maxTunnelsPerClient: number;
  /** Connections past their TLS handshake but not yet authenticated, at once. */
  maxUnauthenticated: number;
  /** Live tunnels from one user address at most (max_tunnels_per_address). */
  maxTunnelsPerAddress: number;
  /**
   * Names clients may dial this server by (server_names); absent: the names on its
   * certificate. A client's signature covers the name it dialled.
   */
  serverNames?: string[];
  /** Connections still in their TLS handshake, at once; more are closed at once. */
  maxHandshaking: number;
  /** The same, per source address. */
  maxHandshakingPerAddress: number;
  /** Status page and metrics: where to listen (none when `status_port` is absent). */
  status?: { host: string; port: number; token?: string };
  logLevel?: LogLevel;
  /** Where clients, services and users come from: this file, or etcd (`registry = "etcd"`). */
  registry: RegistrySettings;
  /** Client name → its Ed25519 public key. */
  clients: Map<string, CryptoKey>;
  /** Client name → its public key as written (base64 SPKI), to tell when a key changes. */
  clientKeyText: Map<string, string>;
  services: ServiceConfig[];
  /** User name → its key and the clients and ports it may reach (`[users]`). */
  users: Map<string, UserEntry>;
  /** Live tunnels of one user at most, over all its connections (max_tunnels_per_user). */
  maxTunnelsPerUser: number;
  /** This server as a member of a cluster (registry = "etcd" and `peer_port`); else absent. */
  cluster?: ClusterSettings;
}

/** A cluster member's own settings: its id, where its peers reach it, and its peer TLS. */
export interface ClusterSettings {
  /** `server_id`: unique in the cluster (default `peer_host:communication_port`). */
  serverId: string;
  /** `peer_host`: the host other servers dial (default `listen_host` unless a wildcard). */
  peerHost: string;
  /** `peer_port`: where other servers connect, with mutual TLS. */
  peerPort: number;
  /** `peer_certificate`: this server's certificate and key, signed by the cluster's CA. */
  certPem: string;
  keyPem: string;
  /** `peer_cafile`: the cluster's CA, which must have signed every peer's certificate. */
  caPem: string;
}

/** One rule of a user's `allow` list: a client-name glob and a port (null: any port). */
export interface UserRule {
  /** The entry as written, for messages. */
  text: string;
  /** The client-name glob (`*` any run of characters, `?` one) as a whole-name pattern. */
  client: RegExp;
  port: number | null;
}

/** One entry of the server's `[users]` table. */
export interface UserEntry {
  /** The user's Ed25519 public key. */
  key: CryptoKey;
  /** The key as written (base64 SPKI), to tell when it changes. */
  keyText: string;
  /** What the user may reach. */
  allow: UserRule[];
}

/** A loaded and validated user configuration (`user.toml`, for `connect` and `forward`). */
export interface UserConfig {
  file: string;
  /** Every other file the config names (CA, key), as absolute paths. */
  readFiles: string[];
  name: string;
  remoteHost: string;
  remotePort: number;
  caPem: string;
  key: CryptoKey;
  logLevel?: LogLevel;
}

/** The `registry` key and, for etcd, how to reach it. */
export type RegistrySettings = { source: "file" } | ({ source: "etcd" } & EtcdSettings);

/** How to reach the etcd that holds the registry (the `etcd_*` keys). */
export interface EtcdSettings {
  /** Base URLs (`etcd_endpoints`). */
  endpoints: string[];
  /** Key prefix of the registry (`etcd_prefix`, default "/natadm/"). */
  prefix: string;
  username?: string;
  password?: string;
  /** PEM text of `etcd_cafile`, to trust for https endpoints. */
  caPem?: string;
}

/** What a registry holds, validated: from a file's tables or from etcd's keys. */
export interface RegistryConfig {
  clients: Map<string, CryptoKey>;
  clientKeyText: Map<string, string>;
  services: ServiceConfig[];
  users: Map<string, UserEntry>;
}

/** A registry as plain data: entry name (a client or user name, a port) → its fields. */
export interface RawRegistry {
  clients: Record<string, unknown>;
  services: Record<string, unknown>;
  users: Record<string, unknown>;
}

/** The three tables of a registry. */
export type RegistryKind = keyof RawRegistry;

/** Where registry entries come from, so that every error names the file and key, or etcd key. */
export interface RegistrySource {
  /**
   * Names entry `key` of `kind`: `label` for the entry itself; `file` and `prefix` for a
   * {@link Reader} of its fields.
   */
  place(kind: RegistryKind, key: string): { label: string; file: string; prefix: string };
  /** How to add client `name`, for a service that names it and finds none. */
  addClientHint(name: string): string;
}

/** Entries from the `[clients]`, `[services]` (and `[users]`) tables of config file `file`. */
export function fileSource(file: string): RegistrySource {
  return {
    place(kind, key) {
      const at = `${kind}.${kind === "services" ? key : JSON.stringify(key)}`;
      return { label: `${file}: ${at}`, file, prefix: `${at}.` };
    },
    addClientHint: (name) =>
      `no client ${JSON.stringify(name)} in [clients]; add [clients.${
        JSON.stringify(name)
      }] with its key`,
  };
}

/** Entries from etcd keys under `prefix` (`clients/NAME`, `services/PORT`, `users/NAME`). */
export function etcdSource(prefix: string): RegistrySource {
  return {
    place(kind, key) {
      const label = `etcd ${prefix}${kind}/${key}`;
      return { label, file: label, prefix: "" };
    },
    addClientHint: (name) =>
      `no client ${JSON.stringify(name)} in etcd (${prefix}clients/${name}); add it first ` +
      "(deno task admin add-client)",
  };
}

/** A loaded and validated client configuration. */
export interface ClientConfig {
  file: string;
  /** Every other file the config names (CA, key), as absolute paths. */
  readFiles: string[];
  name: string;
  /** The first server of `remote` (the only one, in its single-pair form). */
  remoteHost: string;
  remotePort: number;
  /** Every server of `remote`, in order: the client keeps a session with each. */
  remotes: [string, number][];
  caPem: string;
  key: CryptoKey;
  /** Seconds between heartbeats and between reconnect attempts. */
  interval: number;
  infinite: boolean;
  /** Seconds live tunnels may run on after SIGINT/SIGTERM before they are closed. */
  shutdownGrace: number;
  /** Targets this client may connect to; none given means any port on this machine. */
  allow?: { host: string; port: number }[];
  /** Tunnels open at once at most; the server cannot make the client open more. */
  maxTunnels: number;
  /** New tunnels a second the server may make the client open (as many at once in a burst). */
  maxTunnelRate: number;
  logLevel?: LogLevel;
}

/**
 * New tunnels a second a server may make a client open by default: a bound on a flooding
 * server, well above what a client serves (about 1,400 a second on two cores), so that users at
 * a busy service are not turned away by it.
 */
export const DEFAULT_MAX_TUNNEL_RATE = 4000;

type Table = Record<string, unknown>;

/** Reads and validates keys of one TOML table, naming the file and key in every error. */
class Reader {
  constructor(readonly file: string, readonly table: Table, readonly prefix = "") {}

  fail(key: string, problem: string): never {
    throw new ConfigError(`${this.file}: ${this.prefix}${key}: ${problem}`);
  }

  only(keys: string[]): void {
    for (const key of Object.keys(this.table)) {
      if (!keys.includes(key)) {
        this.fail(key, `unknown key (expected one of: ${keys.join(", ")})`);
      }
    }
  }

  has(key: string): boolean {
    return this.table[key] !== undefined;
  }

  string(key: string, fallback?: string): string {
    const v = this.table[key] ?? fallback;
    if (v === undefined) this.fail(key, "required, expected a string");
    if (typeof v !== "string") this.fail(key, `expected a string, got ${describe(v)}`);
    return v;
  }

  /**
   * A host name or IP address (as for `listen_host`), nothing else: it goes into Deno's
   * `--allow-net`, where a comma or a space would grant more than the config says.
   */
  host(key: string, v: unknown = this.table[key]): string {
    if (typeof v !== "string" || !isHost(v)) {
      this.fail(key, `expected a host name or IP address, got ${describe(v)}`);
    }
    return v;
  }

  port(key: string, v: unknown = this.table[key]): number {
    if (v === undefined) this.fail(key, "required, expected a port number (1-65535)");
    if (typeof v !== "number" || !Number.isInteger(v) || v < 1 || v > 65535) {
      this.fail(key, `expected a port number (1-65535), got ${describe(v)}`);
    }
    return v;
  }

  seconds(key: string, fallback: number, max: number): number {
    const v = this.table[key] ?? fallback;
    if (typeof v !== "number" || !Number.isInteger(v) || v < 1 || v > max) {
      this.fail(key, `expected a whole number of seconds from 1 to ${max}, got ${describe(v)}`);
    }
    return v;
  }

  count(key: string, fallback: number): number {
    const v = this.table[key] ?? fallback;
    if (typeof v !== "number" || !Number.isInteger(v) || v < 1 || v > 1_000_000) {
      this.fail(key, `expected a whole number from 1 to 1000000, got ${describe(v)}`);
    }
    return v;
  }

  boolean(key: string, fallback: boolean): boolean {
    const v = this.table[key] ?? fallback;
    if (typeof v !== "boolean") this.fail(key, `expected true or false, got ${describe(v)}`);
    return v;
  }

  table_(key: string): Table {
    const v = this.table[key] ?? {};
    if (!isTable(v)) this.fail(key, `expected a table, got ${describe(v)}`);
    return v;
  }

  pair(key: string): [unknown, unknown] {
    const v = this.table[key];
    if (v === undefined) this.fail(key, "required, expected a list of two items");
    if (!Array.isArray(v) || v.length !== 2) {
      this.fail(key, `expected a list of two items, got ${describe(v)}`);
    }
    return [v[0], v[1]];
  }

  logLevel(): LogLevel | undefined {
    if (!this.has("log_level")) return undefined;
    const v = this.string("log_level");
    if (!isLogLevel(v)) {
      this.fail("log_level", `expected trace, debug, info, warning, error or fatal, got "${v}"`);
    }
    return v;
  }

  /**
   * Reads a file named by a key, relative to the config file's directory. A `secret` (a
   * private key) must not be readable by group or others, as OpenSSH insists too.
   */
  async file_(
    key: string,
    path: unknown,
    secret = false,
  ): Promise<{ path: string; text: string }> {
    if (typeof path !== "string" || path === "") {
      this.fail(key, `expected a file path, got ${describe(path)}`);
    }
    const full = resolve(dirname(this.file), path);
    const problem = pathProblem(full);
    if (problem) this.fail(key, `path ${JSON.stringify(full)} ${problem}`);
    const mode = secret ? (await Deno.stat(full).catch(() => null))?.mode : null;
    if (mode != null && (mode & 0o077) !== 0) {
      this.fail(
        key,
        `private key ${full} is readable by others (mode ${(mode & 0o777).toString(8)}); ` +
          `run: chmod 600 ${full}`,
      );
    }
    try {
      return { path: full, text: await Deno.readTextFile(full) };
    } catch (err) {
      if (err instanceof Deno.errors.NotCapable) {
        // A reload naming a new file, or a start under flags printed for an older config.
        this.fail(
          key,
          `cannot read ${full}: this change needs a restart, as this process is not granted ` +
            `--allow-read=${full} (restart it with the flags --print-permissions prints)`,
        );
      }
      this.fail(key, `cannot read ${full}: ${(err as Error).message}`);
    }
  }
}

/**
 * Why `path` cannot be granted exactly by Deno's `--allow-read=a,b`, or undefined: a comma
 * would split it (Deno has no escape for one) and a control character, a newline above all,
 * would split `--print-permissions` output, one flag per line.
 */
function pathProblem(path: string): string | undefined {
  if (path.includes(",")) {
    return "contains a comma, which Deno's --allow-read cannot express; rename it";
  }
  // deno-lint-ignore no-control-regex
  if (/[\x00-\x1f\x7f]/.test(path)) return "contains a control character; rename it";
  return undefined;
}

/** A DNS name or an IPv4 or IPv6 address (no brackets, port, comma or space). */
function isHost(host: string): boolean {
  return /^[A-Za-z0-9_]([A-Za-z0-9_-]*)(\.[A-Za-z0-9_]([A-Za-z0-9_-]*))*\.?$/.test(host) ||
    (host.includes(":") && /^[0-9A-Fa-f:.]+$/.test(host));
}

/** Resolves the config file's own path, refusing one that `--allow-read` cannot name. */
function configPath(file: string): string {
  const full = resolve(file);
  const problem = pathProblem(full);
  if (problem) throw new ConfigError(`${full}: the config file's path ${problem}`);
  return full;
}

function isTable(v: unknown): v is Table {
  return typeof v === "object" && v !== null && !Array.isArray(v) && !(v instanceof Date);
}

function describe(v: unknown): string {
  if (Array.isArray(v)) return `a list of ${v.length}`;
  if (isTable(v)) return "a table";
  if (typeof v === "string") return `the string ${JSON.stringify(v)}`;
  return `${typeof v} ${String(v)}`;
}

async function readToml(file: string): Promise<Table> {
  let text: string;
  try {
    text = await Deno.readTextFile(file);
  } catch (err) {
    throw new ConfigError(`${file}: cannot read config file: ${(err as Error).message}`);
  }
  try {
    return parse(text) as Table;
  } catch (err) {
    if (err instanceof TomlError) {
      const first = err.message.split("\n")[0];
      throw new ConfigError(`${file}:${err.line}:${err.column}: TOML syntax error: ${first}`);
    }
    throw new ConfigError(`${file}: TOML syntax error: ${(err as Error).message}`);
  }
}

function statusPort(r: Reader, communicationPort: number, services: Set<number>): number {
  const port = r.port("status_port");
  if (port === communicationPort || services.has(port)) {
    r.fail("status_port", `port ${port} is already used by communication_port or a service`);
  }
  return port;
}

/**
 * Reads `key` = [certificate, private key] files: a PEM certificate and the PEM private key
 * that belongs to it, each error naming `key[0]` or `key[1]`.
 */
async function certificatePair(r: Reader, key: string): Promise<{
  cert: { path: string; text: string };
  privateKey: { path: string; text: string };
  x509: X509Certificate;
}> {
  const [certPath, keyPath] = r.pair(key);
  const cert = await r.file_(`${key}[0]`, certPath);
  const privateKey = await r.file_(`${key}[1]`, keyPath, true);
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(cert.text);
  } catch (err) {
    r.fail(`${key}[0]`, `${cert.path} is not a PEM certificate: ${(err as Error).message}`);
  }
  try {
    if (!x509.checkPrivateKey(createPrivateKey(privateKey.text))) {
      r.fail(`${key}[1]`, `${privateKey.path} is not the private key of ${cert.path}`);
    }
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    r.fail(
      `${key}[1]`,
      `${privateKey.path} is not a PEM private key: ${(err as Error).message}`,
    );
  }
  return { cert, privateKey, x509 };
}

/** Loads, validates and resolves a server config file. */
export async function loadServerConfig(file: string): Promise<ServerConfig> {
  file = configPath(file);
  const r: Reader = new Reader(file, await readToml(file));
  r.only([
    "communication_port",
    "communication_server_certificate",
    "listen_host",
    "shutdown_grace",
    "max_pending_users",
    "max_tunnels_per_client",
    "max_unauthenticated",
    "max_tunnels_per_address",
    "server_names",
    "max_handshaking",
    "max_handshaking_per_address",
    "status_port",
    "status_host",
    "status_token",
    "pending_timeout",
    "log_level",
    "registry",
    "etcd_endpoints",
    "etcd_prefix",
    "etcd_username",
    "etcd_password",
    "etcd_password_file",
    "etcd_cafile",
    "max_tunnels_per_user",
    "server_id",
    "peer_port",
    "peer_host",
    "peer_certificate",
    "peer_cafile",
    "users",
    "clients",
    "services",
  ]);
  const communicationPort = r.port("communication_port");
  const { cert, privateKey: key } = await certificatePair(r, "communication_server_certificate");

  const registry = await registrySettings(r);
  const readFiles = [cert.path, key.path];
  if (registry.source === "etcd") {
    for (const table of ["clients", "services", "users"]) {
      if (r.has(table)) {
        r.fail(
          table,
          `with registry = "etcd" the ${table} live in etcd, not in this file; move them with ` +
            `\`deno task admin --etcd URL import ${file}\` run on a copy that still has them`,
        );
      }
    }
    if (r.has("etcd_cafile")) readFiles.push(resolve(dirname(file), r.string("etcd_cafile")));
    if (r.has("etcd_password_file")) {
      readFiles.push(resolve(dirname(file), r.string("etcd_password_file")));
    }
  }
  const { clients, clientKeyText, services, users } = await parseRegistry(
    { clients: r.table_("clients"), services: r.table_("services"), users: r.table_("users") },
    fileSource(file),
    new Map([[communicationPort, "communication_port"]]),
  );
  const seen = new Set(services.map((s) => s.port));
  const listenHost = r.host("listen_host", r.string("listen_host", "0.0.0.0"));
  const cluster = await clusterSettings(r, registry, listenHost, communicationPort);
  if (cluster) readFiles.push(...cluster.files);

  return {
    file,
    readFiles,
    communicationPort,
    listenHost,
    certPem: cert.text,
    keyPem: key.text,
    pendingTimeout: r.seconds("pending_timeout", 60, 86_400),
    shutdownGrace: r.seconds("shutdown_grace", 10, 3600),
    maxPendingUsers: r.count("max_pending_users", 128),
    maxTunnelsPerClient: r.count("max_tunnels_per_client", 4096),
    maxUnauthenticated: r.count("max_unauthenticated", 1024),
    maxTunnelsPerAddress: r.count("max_tunnels_per_address", 1024),
    serverNames: r.has("server_names") ? serverNames(r) : undefined,
    maxHandshaking: r.count("max_handshaking", DEFAULT_MAX_HANDSHAKING),
    maxHandshakingPerAddress: r.count(
      "max_handshaking_per_address",
      DEFAULT_MAX_HANDSHAKING_PER_ADDRESS,
    ),
    status: r.has("status_port")
      ? {
        port: statusPort(r, communicationPort, seen),
        host: r.host("status_host", r.string("status_host", "127.0.0.1")),
        token: r.has("status_token") ? r.string("status_token") : undefined,
      }
      : undefined,
    logLevel: r.logLevel(),
    registry,
    clients,
    clientKeyText,
    services,
    users,
    maxTunnelsPerUser: r.count("max_tunnels_per_user", 64),
    cluster: cluster?.settings,
  };
}

/** Reads `server_id`, `peer_port`, `peer_host`, `peer_certificate` and `peer_cafile`. */
async function clusterSettings(
  r: Reader,
  registry: RegistrySettings,
  listenHost: string,
  communicationPort: number,
): Promise<{ settings: ClusterSettings; files: string[] } | undefined> {
  const keys = ["server_id", "peer_port", "peer_host", "peer_certificate", "peer_cafile"];
  if (registry.source !== "etcd") {
    const stray = keys.find((k) => r.has(k));
    if (stray) r.fail(stray, `only used with registry = "etcd" (a cluster shares etcd)`);
    return undefined;
  }
  if (!r.has("peer_port")) {
    const stray = keys.find((k) => r.has(k));
    if (stray) r.fail("peer_port", `required with ${stray}: the port other servers connect to`);
    return undefined;
  }
  const peerPort = r.port("peer_port");
  if (peerPort === communicationPort) {
    r.fail("peer_port", `${peerPort} is already the communication_port`);
  }
  const wildcard = listenHost === "0.0.0.0" || listenHost === "::";
  if (wildcard && !r.has("peer_host")) {
    r.fail("peer_host", `required when listen_host is ${listenHost}: the host other servers dial`);
  }
  const peerHost = r.host("peer_host", r.string("peer_host", listenHost));
  const serverId = r.string(
    "server_id",
    `${peerHost.includes(":") ? `[${peerHost}]` : peerHost}:${communicationPort}`,
  );
  // deno-lint-ignore no-control-regex
  if (serverId === "" || serverId.includes("/") || /[\x00-\x1f\x7f]/.test(serverId)) {
    r.fail("server_id", `expected a non-empty name without "/", got ${JSON.stringify(serverId)}`);
  }
  if (!r.has("peer_certificate")) {
    r.fail("peer_certificate", "required with peer_port, expected [certificate, key] files");
  }
  const { cert, privateKey: key, x509: certificate } = await certificatePair(
    r,
    "peer_certificate",
  );
  const ca = await r.file_("peer_cafile", r.string("peer_cafile"));
  let caCert: X509Certificate;
  try {
    caCert = new X509Certificate(ca.text);
  } catch (err) {
    r.fail("peer_cafile", `${ca.path} is not a PEM certificate: ${(err as Error).message}`);
  }
  if (!certificate.checkIssued(caCert)) {
    r.fail("peer_certificate[0]", `${cert.path} is not signed by peer_cafile ${ca.path}`);
  }
  return {
    settings: {
      serverId,
      peerHost,
      peerPort,
      certPem: cert.text,
      keyPem: key.text,
      caPem: ca.text,
    },
    files: [cert.path, key.path, ca.path],
  };
}

/** Parses one "CLIENT-GLOB:PORT" rule; the last ':' splits, PORT is a number or `*`. */
function userRule(r: Reader, at: string, rule: unknown): UserRule {
  const expected = `expected "CLIENT:PORT" (a client-name glob with * and ?, then a port ` +
    `number or *), got ${describe(rule)}`;
  if (typeof rule !== "string") r.fail(at, expected);
  const split = rule.lastIndexOf(":");
  if (split <= 0) r.fail(at, expected);
  const glob = rule.slice(0, split);
  const portText = rule.slice(split + 1);
  if (checkName(glob)) r.fail(at, expected);
  let port: number | null = null;
  if (portText !== "*") {
    if (!/^[0-9]{1,5}$/.test(portText)) r.fail(at, expected);
    port = r.port(at, Number(portText));
  }
  const pattern = glob.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*")
    .replace(/\?/g, ".");
  return { text: rule, client: new RegExp(`^${pattern}$`, "su"), port };
}

/** The first of `rules` that lets a user reach `client`:`port`, or undefined. */
export function userRuleFor(rules: UserRule[], client: string, port: number): UserRule | undefined {
  return rules.find((rule) =>
    (rule.port === null || rule.port === port) && rule.client.test(client)
  );
}

/** What client.toml and user.toml share: a name, the CA to trust, and the private key. */
async function identity(
  r: Reader,
): Promise<{ name: string; caPem: string; key: CryptoKey; readFiles: string[] }> {
  const name = r.string("name");
  const problem = checkName(name);
  if (problem) r.fail("name", problem);
  const ca = await r.file_("cafile", r.string("cafile"));
  try {
    new X509Certificate(ca.text);
  } catch (err) {
    r.fail("cafile", `${ca.path} is not a PEM certificate: ${(err as Error).message}`);
  }
  const keyFile = await r.file_("key", r.string("key"), true);
  let key: CryptoKey;
  try {
    key = await importPrivateKey(keyFile.text);
  } catch (err) {
    r.fail("key", `${keyFile.path} is not an Ed25519 private key: ${(err as Error).message}`);
  }
  return { name, caPem: ca.text, key, readFiles: [ca.path, keyFile.path] };
}

/** Loads, validates and resolves a user config file (`user.toml`). */
export async function loadUserConfig(file: string): Promise<UserConfig> {
  file = configPath(file);
  const r: Reader = new Reader(file, await readToml(file));
  r.only(["name", "remote", "cafile", "key", "log_level"]);
  const [host, port] = r.pair("remote");
  if (typeof host !== "string" || !isHost(host)) {
    r.fail("remote", `expected ["host", port] with a host name or IP, got ${describe(host)}`);
  }
  const remotePort = r.port("remote[1]", port);
  const { name, caPem, key, readFiles } = await identity(r);
  return {
    file,
    readFiles,
    name,
    remoteHost: host,
    remotePort,
    caPem,
    key,
    logLevel: r.logLevel(),
  };
}

/** Reads `registry` and the `etcd_*` keys. */
async function registrySettings(r: Reader): Promise<RegistrySettings> {
  const source = r.string("registry", "file");
  const etcdKeys = [
    "etcd_endpoints",
    "etcd_prefix",
    "etcd_username",
    "etcd_password",
    "etcd_password_file",
    "etcd_cafile",
  ];
  if (source === "file") {
    const stray = etcdKeys.find((k) => r.has(k));
    if (stray) r.fail(stray, `only used with registry = "etcd"`);
    return { source };
  }
  if (source !== "etcd") r.fail("registry", `expected "file" or "etcd", got "${source}"`);
  const list = r.table.etcd_endpoints;
  if (!Array.isArray(list) || list.length === 0) {
    r.fail(
      "etcd_endpoints",
      `required with registry = "etcd", expected a list of URLs such as ` +
        `["http://127.0.0.1:2379"]`,
    );
  }
  const endpoints = list.map((v, i) => etcdEndpoint(r, `etcd_endpoints[${i}]`, v));
  const prefix = r.string("etcd_prefix", DEFAULT_ETCD_PREFIX);
  const problem = etcdPrefixProblem(prefix);
  if (problem) r.fail("etcd_prefix", problem);
  const settings: RegistrySettings = { source, endpoints, prefix };
  if (r.has("etcd_username")) settings.username = r.string("etcd_username");
  if (r.has("etcd_password") && r.has("etcd_password_file")) {
    r.fail("etcd_password_file", "give etcd_password or etcd_password_file, not both");
  }
  if (r.has("etcd_password")) settings.password = r.string("etcd_password");
  if (r.has("etcd_password_file")) {
    const f = await r.file_("etcd_password_file", r.string("etcd_password_file"), true);
    settings.password = f.text.replace(/\r?\n$/, "");
  }
  if (settings.password !== undefined && settings.username === undefined) {
    r.fail("etcd_username", "required when a password is given");
  }
  if (r.has("etcd_cafile")) {
    const ca = await r.file_("etcd_cafile", r.string("etcd_cafile"));
    try {
      new X509Certificate(ca.text);
    } catch (err) {
      r.fail("etcd_cafile", `${ca.path} is not a PEM certificate: ${(err as Error).message}`);
    }
    settings.caPem = ca.text;
  }
  return settings;
}

/** The registry's key prefix in etcd unless `etcd_prefix` says otherwise. */
export const DEFAULT_ETCD_PREFIX = "/natadm/";

/** Why `prefix` cannot be an etcd prefix of the registry, or undefined. */
export function etcdPrefixProblem(prefix: string): string | undefined {
  // deno-lint-ignore no-control-regex
  if (!prefix.endsWith("/") || /[\x00-\x1f\x7f]/.test(prefix)) {
    return `expected a key prefix ending in "/" such as "/natadm/", got ${JSON.stringify(prefix)}`;
  }
  return undefined;
}

/** Checks one etcd endpoint: an http(s) URL with a host and port and nothing after. */
export function etcdEndpointProblem(v: unknown): string | undefined {
  let url: URL | undefined;
  try {
    url = typeof v === "string" ? new URL(v) : undefined;
  } catch {
    // Reported below.
  }
  const host = url?.hostname.replace(/^\[(.*)\]$/, "$1");
  if (
    !url || (url.protocol !== "http:" && url.protocol !== "https:") || !host || !isHost(host) ||
    (url.pathname !== "/" && url.pathname !== "") || url.search || url.hash || url.username
  ) {
    return `expected a URL such as "http://127.0.0.1:2379", got ${describe(v)}`;
  }
  return undefined;
}

function etcdEndpoint(r: Reader, key: string, v: unknown): string {
  const problem = etcdEndpointProblem(v);
  if (problem) r.fail(key, problem);
  return (v as string).replace(/\/+$/, "");
}

/**
 * Validates a registry from any source: the same rules for a file's tables and for etcd's
 * keys, every error naming the entry as `source` places it. `reserved` maps ports a service
 * must not take to the key that holds them (communication_port, status_port).
 */
export async function parseRegistry(
  raw: RawRegistry,
  source: RegistrySource,
  reserved: Map<number, string> = new Map(),
): Promise<RegistryConfig> {
  const entryFail: (kind: RegistryKind, key: string, problem: string) => never = (
    kind,
    key,
    problem,
  ) => {
    throw new ConfigError(`${source.place(kind, key).label}: ${problem}`);
  };
  const reader = (kind: RegistryKind, key: string, entry: Table): Reader => {
    const { file, prefix } = source.place(kind, key);
    return new Reader(file, entry, prefix);
  };

  const clients = new Map<string, CryptoKey>();
  const clientKeyText = new Map<string, string>();
  for (const [name, entry] of Object.entries(raw.clients)) {
    const problem = checkName(name);
    if (problem) entryFail("clients", name, `client name ${problem}`);
    if (!isTable(entry)) {
      entryFail("clients", name, `expected a table with a key, got ${describe(entry)}`);
    }
    const c: Reader = reader("clients", name, entry);
    c.only(["key"]);
    const { key, text } = await publicKey(c);
    clients.set(name, key);
    clientKeyText.set(name, text);
  }

  const services: ServiceConfig[] = [];
  const seen = new Set<number>();
  for (const [portKey, entry] of Object.entries(raw.services)) {
    if (!/^[0-9]+$/.test(portKey)) {
      entryFail("services", portKey, "service keys must be port numbers (1-65535)");
    }
    const port = Number(portKey);
    if (port < 1 || port > 65535) {
      entryFail("services", portKey, `expected a port number (1-65535), got number ${port}`);
    }
    const taken = reserved.get(port);
    if (taken) entryFail("services", portKey, `port ${port} is also ${taken}; pick another`);
    if (seen.has(port)) entryFail("services", portKey, `port ${port} is listed twice`);
    seen.add(port);
    if (!isTable(entry)) {
      entryFail(
        "services",
        portKey,
        `expected a table with name and port, got ${describe(entry)}`,
      );
    }
    const s: Reader = reader("services", portKey, entry);
    s.only(["name", "port", "host", "allow_from"]);
    const name = s.string("name");
    if (!clients.has(name)) s.fail("name", source.addClientHint(name));
    let allowFrom: Networks | undefined;
    if (s.has("allow_from")) {
      const list = entry.allow_from;
      if (!Array.isArray(list) || list.some((x) => typeof x !== "string")) {
        s.fail("allow_from", `expected a list of networks such as "203.0.113.0/24"`);
      }
      try {
        allowFrom = new Networks(list as string[]);
      } catch (err) {
        s.fail("allow_from", (err as Error).message);
      }
    }
    services.push({
      port,
      name,
      host: s.string("host", "localhost"),
      targetPort: s.port("port"),
      allowFrom,
    });
  }

  const users = new Map<string, UserEntry>();
  for (const [name, entry] of Object.entries(raw.users)) {
    const problem = checkName(name);
    if (problem) entryFail("users", name, `user name ${problem}`);
    if (!isTable(entry)) {
      entryFail("users", name, `expected a table with key and allow, got ${describe(entry)}`);
    }
    const u: Reader = reader("users", name, entry);
    u.only(["key", "allow"]);
    const { key, text } = await publicKey(u);
    const list = entry.allow;
    if (!Array.isArray(list)) {
      u.fail("allow", `required, expected a list such as ["foo bar:22", "web-*:80", "lab-?:*"]`);
    }
    const allow = list.map((rule, i) => userRule(u, `allow[${i}]`, rule));
    users.set(name, { key, keyText: text, allow });
  }
  return { clients, clientKeyText, services, users };
}

/** Why `rule` is not a user's "CLIENT-GLOB:PORT" or "CLIENT-GLOB:*" rule, or undefined. */
export function userRuleProblem(rule: unknown): string | undefined {
  const m = typeof rule === "string" ? /^(.+):([0-9]+|\*)$/.exec(rule) : null;
  const port = m && m[2] !== "*" ? Number(m[2]) : 1;
  if (!m || checkName(m[1]) !== null || port < 1 || port > 65535) {
    return `expected "CLIENT:PORT" with a client name or glob (* and ?) and a port or *, got ${
      describe(rule)
    }`;
  }
  return undefined;
}

/** Reads the `key` field: an Ed25519 public key as base64 SPKI. */
async function publicKey(r: Reader): Promise<{ key: CryptoKey; text: string }> {
  const text = r.string("key").trim();
  const der = fromBase64(text);
  if (der) {
    try {
      return { key: await importPublicKey(der), text };
    } catch {
      // Reported below with the expected form.
    }
  }
  r.fail(
    "key",
    "expected an Ed25519 public key as base64 SPKI (the line `deno task keygen` prints, " +
      "or the body of `openssl pkey -pubout`)",
  );
}

/** Loads, validates and resolves a client config file. */
export async function loadClientConfig(file: string): Promise<ClientConfig> {
  file = configPath(file);
  const r: Reader = new Reader(file, await readToml(file));
  r.only([
    "name",
    "remote",
    "cafile",
    "key",
    "interval",
    "infinite",
    "shutdown_grace",
    "allow",
    "max_tunnels",
    "max_tunnel_rate",
    "log_level",
  ]);
  const remotes = clientRemotes(r);
  const [host, remotePort] = remotes[0];
  const { name, caPem, key, readFiles } = await identity(r);
  return {
    file,
    readFiles,
    name,
    remoteHost: host,
    remotePort,
    remotes,
    caPem,
    key,
    interval: r.seconds("interval", 5, 3600),
    infinite: r.boolean("infinite", true),
    shutdownGrace: r.seconds("shutdown_grace", 10, 3600),
    allow: r.has("allow") ? allowList(r) : undefined,
    maxTunnels: r.count("max_tunnels", 4096),
    maxTunnelRate: r.count("max_tunnel_rate", DEFAULT_MAX_TUNNEL_RATE),
    logLevel: r.logLevel(),
  };
}

/** Parses `server_names = ["natadm.example.com", …]`: the names clients may know us by. */
function serverNames(r: Reader): string[] {
  const v = r.table.server_names;
  if (!Array.isArray(v) || v.length === 0) {
    r.fail("server_names", `expected a list of host names, got ${describe(v)}`);
  }
  return v.map((entry, i) => {
    if (typeof entry !== "string" || !/^[A-Za-z0-9.:_-]{1,255}$/.test(entry)) {
      r.fail(`server_names[${i}]`, `expected a host name or address, got ${describe(entry)}`);
    }
    return entry.toLowerCase();
  });
}

/** Parses `allow = ["host:port", "[v6]:port", …]`. */
function allowList(r: Reader): { host: string; port: number }[] {
  const v = r.table.allow;
  if (!Array.isArray(v)) {
    r.fail("allow", `expected a list of "host:port" strings, got ${describe(v)}`);
  }
  return v.map((entry, i) => {
    const at = `allow[${i}]`;
    const m = typeof entry === "string"
      ? /^(?:\[([^\]]+)\]|([^:\s]+)):([0-9]+)$/.exec(entry)
      : null;
    if (!m || !isHost(m[1] ?? m[2])) {
      r.fail(at, `expected "host:port" (IPv6 as "[::1]:22"), got ${describe(entry)}`);
    }
    return { host: (m[1] ?? m[2]).toLowerCase(), port: r.port(at, Number(m[3])) };
  });
}

/**
 * Reads a client's `remote`: one `["host", port]` pair, or a list of them (a client attached
 * to several servers of a cluster).
 */
function clientRemotes(r: Reader): [string, number][] {
  const v = r.table.remote;
  const several = Array.isArray(v) && v.length > 0 && v.every(Array.isArray);
  if (!several) {
    const [host, port] = r.pair("remote");
    if (typeof host !== "string" || !isHost(host)) {
      r.fail("remote", `expected ["host", port] with a host name or IP, got ${describe(host)}`);
    }
    return [[host, r.port("remote[1]", port)]];
  }
  const seen = new Set<string>();
  return (v as unknown[][]).map((pair, i) => {
    const at = `remote[${i}]`;
    if (pair.length !== 2 || typeof pair[0] !== "string" || !isHost(pair[0])) {
      r.fail(at, `expected ["host", port] with a host name or IP, got ${describe(pair)}`);
    }
    const entry: [string, number] = [pair[0], r.port(`${at}[1]`, pair[1])];
    const key = `${entry[0].toLowerCase()}:${entry[1]}`;
    if (seen.has(key)) r.fail(at, `${entry[0]}:${entry[1]} is listed twice`);
    seen.add(key);
    return entry;
  });
}
