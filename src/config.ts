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
  /** Client name → its Ed25519 public key. */
  clients: Map<string, CryptoKey>;
  /** Client name → its public key as written (base64 SPKI), to tell when a key changes. */
  clientKeyText: Map<string, string>;
  services: ServiceConfig[];
  /** User name → its key and the clients and ports it may reach (`[users]`). */
  users: Map<string, UserEntry>;
  /** Live tunnels of one user at most, over all its connections (max_tunnels_per_user). */
  maxTunnelsPerUser: number;
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

/** A loaded and validated client configuration. */
export interface ClientConfig {
  file: string;
  /** Every other file the config names (CA, key), as absolute paths. */
  readFiles: string[];
  name: string;
  remoteHost: string;
  remotePort: number;
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
  logLevel?: LogLevel;
}

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
    "max_tunnels_per_user",
    "users",
    "clients",
    "services",
  ]);
  const communicationPort = r.port("communication_port");
  const [certPath, keyPath] = r.pair("communication_server_certificate");
  const cert = await r.file_("communication_server_certificate[0]", certPath);
  const key = await r.file_("communication_server_certificate[1]", keyPath, true);
  let certificate: X509Certificate;
  try {
    certificate = new X509Certificate(cert.text);
  } catch (err) {
    r.fail(
      "communication_server_certificate[0]",
      `${cert.path} is not a PEM certificate: ${(err as Error).message}`,
    );
  }
  try {
    const privateKey = createPrivateKey(key.text);
    if (!certificate.checkPrivateKey(privateKey)) {
      r.fail(
        "communication_server_certificate[1]",
        `${key.path} is not the private key of ${cert.path}`,
      );
    }
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    r.fail(
      "communication_server_certificate[1]",
      `${key.path} is not a PEM private key: ${(err as Error).message}`,
    );
  }

  const clients = new Map<string, CryptoKey>();
  const clientKeyText = new Map<string, string>();
  const clientsTable = r.table_("clients");
  for (const [name, entry] of Object.entries(clientsTable)) {
    const at = `clients.${JSON.stringify(name)}`;
    const problem = checkName(name);
    if (problem) r.fail(at, `client name ${problem}`);
    if (!isTable(entry)) r.fail(at, `expected a table with a key, got ${describe(entry)}`);
    const c: Reader = new Reader(file, entry, `${at}.`);
    c.only(["key"]);
    const text = c.string("key").trim();
    const der = fromBase64(text);
    let publicKey: CryptoKey | undefined;
    if (der) {
      try {
        publicKey = await importPublicKey(der);
      } catch {
        // Reported below with the expected form.
      }
    }
    if (!publicKey) {
      c.fail(
        "key",
        "expected an Ed25519 public key as base64 SPKI (the line `deno task keygen` prints, " +
          "or the body of `openssl pkey -pubout`)",
      );
    }
    clients.set(name, publicKey);
    clientKeyText.set(name, text);
  }

  const services: ServiceConfig[] = [];
  const seen = new Set<number>();
  for (const [portKey, entry] of Object.entries(r.table_("services"))) {
    const at = `services.${portKey}`;
    if (!/^[0-9]+$/.test(portKey)) r.fail(at, "service keys must be port numbers (1-65535)");
    const port = r.port(at, Number(portKey));
    if (port === communicationPort) {
      r.fail(at, `port ${port} is also communication_port; pick another`);
    }
    if (seen.has(port)) r.fail(at, `port ${port} is listed twice`);
    seen.add(port);
    if (!isTable(entry)) r.fail(at, `expected a table with name and port, got ${describe(entry)}`);
    const s: Reader = new Reader(file, entry, `${at}.`);
    s.only(["name", "port", "host", "allow_from"]);
    const name = s.string("name");
    if (!clients.has(name)) {
      s.fail(
        "name",
        `no client ${JSON.stringify(name)} in [clients]; add [clients.${
          JSON.stringify(name)
        }] with its key`,
      );
    }
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

  return {
    file,
    readFiles: [cert.path, key.path],
    communicationPort,
    listenHost: r.host("listen_host", r.string("listen_host", "0.0.0.0")),
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
    clients,
    clientKeyText,
    services,
    users: await usersTable(r),
    maxTunnelsPerUser: r.count("max_tunnels_per_user", 64),
  };
}

/** Parses `[users.NAME]` tables: each a `key` and an `allow` list of "CLIENT-GLOB:PORT". */
async function usersTable(r: Reader): Promise<Map<string, UserEntry>> {
  const users = new Map<string, UserEntry>();
  for (const [name, entry] of Object.entries(r.table_("users"))) {
    const at = `users.${JSON.stringify(name)}`;
    const problem = checkName(name);
    if (problem) r.fail(at, `user name ${problem}`);
    if (!isTable(entry)) r.fail(at, `expected a table with key and allow, got ${describe(entry)}`);
    const u: Reader = new Reader(r.file, entry, `${at}.`);
    u.only(["key", "allow"]);
    const keyText = u.string("key").trim();
    const der = fromBase64(keyText);
    const key = der ? await importPublicKey(der).catch(() => undefined) : undefined;
    if (!key) {
      u.fail(
        "key",
        "expected an Ed25519 public key as base64 SPKI (the line `deno task keygen` prints, " +
          "or the body of `openssl pkey -pubout`)",
      );
    }
    const list = entry.allow;
    if (!Array.isArray(list)) {
      u.fail("allow", `required, expected a list such as ["foo bar:22", "web-*:80", "lab-?:*"]`);
    }
    const allow = list.map((rule, i) => userRule(u, `allow[${i}]`, rule));
    users.set(name, { key, keyText, allow });
  }
  return users;
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

/** Loads, validates and resolves a user config file (`user.toml`). */
export async function loadUserConfig(file: string): Promise<UserConfig> {
  file = configPath(file);
  const r: Reader = new Reader(file, await readToml(file));
  r.only(["name", "remote", "cafile", "key", "log_level"]);
  const name = r.string("name");
  const problem = checkName(name);
  if (problem) r.fail("name", problem);
  const [host, port] = r.pair("remote");
  if (typeof host !== "string" || !isHost(host)) {
    r.fail("remote", `expected ["host", port] with a host name or IP, got ${describe(host)}`);
  }
  const remotePort = r.port("remote[1]", port);
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
  return {
    file,
    readFiles: [ca.path, keyFile.path],
    name,
    remoteHost: host,
    remotePort,
    caPem: ca.text,
    key,
    logLevel: r.logLevel(),
  };
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
    "log_level",
  ]);
  const name = r.string("name");
  const problem = checkName(name);
  if (problem) r.fail("name", problem);
  const [host, port] = r.pair("remote");
  if (typeof host !== "string" || !isHost(host)) {
    r.fail("remote", `expected ["host", port] with a host name or IP, got ${describe(host)}`);
  }
  const remotePort = r.port("remote[1]", port);
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
  return {
    file,
    readFiles: [ca.path, keyFile.path],
    name,
    remoteHost: host,
    remotePort,
    caPem: ca.text,
    key,
    interval: r.seconds("interval", 5, 3600),
    infinite: r.boolean("infinite", true),
    shutdownGrace: r.seconds("shutdown_grace", 10, 3600),
    allow: r.has("allow") ? allowList(r) : undefined,
    maxTunnels: r.count("max_tunnels", 4096),
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
