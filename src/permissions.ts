/**
 * The exact Deno permissions each program needs for its config, so that production runs can
 * grant nothing more: Deno itself then refuses any other connection or file.
 *
 * Each flag is one argument (`--allow-net=…`, `--allow-read=…`), printed on a line of its own;
 * config loading refuses commas and control characters in paths and anything but a host name
 * or IP address as a host, so no spelling of a path or host can split a flag or add another.
 * @module
 */
import type { ClientConfig, ServerConfig } from "./config.ts";

/** What a program may do: listen on or connect to `net` (host:port), read `read` (paths). */
export interface Grants {
  net: string[];
  read: string[];
  /** Any host and port (a cluster member dials the peers etcd names, wherever they are). */
  anyNet?: boolean;
}

function netHost(host: string): string {
  return host.includes(":") ? `[${host}]` : host;
}

/**
 * The server's grants: listen on its ports (nothing outbound) and read its config and certs.
 * `--watch-config` needs nothing more: it watches the config file itself, not its directory.
 * With the registry in etcd, services come and go without a restart, so it may listen on any
 * port of `listen_host`, and it connects to the etcd endpoints.
 */
export function serverGrants(config: ServerConfig): Grants {
  const host = netHost(config.listenHost);
  const net = [config.communicationPort, ...config.services.map((s) => s.port)].map((p) =>
    `${host}:${p}`
  );
  if (config.registry.source === "etcd") {
    net.unshift(host);
    for (const endpoint of config.registry.endpoints) {
      const url = new URL(endpoint);
      net.push(`${url.hostname}:${url.port || (url.protocol === "https:" ? 443 : 80)}`);
    }
  }
  if (config.status) net.push(`${netHost(config.status.host)}:${config.status.port}`);
  return { net, read: [config.file, ...config.readFiles], anyNet: config.cluster !== undefined };
}

/** The client's grants: connect to the server and its allowed targets, read its files. */
export function clientGrants(config: ClientConfig): Grants {
  const targets = config.allow
    ? config.allow.map((t) => `${netHost(t.host)}:${t.port}`)
    : ["localhost", "127.0.0.1", "[::1]"];
  return {
    net: [...config.remotes.map(([host, port]) => `${netHost(host)}:${port}`), ...targets],
    read: [config.file, ...config.readFiles],
  };
}

/** Deno's flags for `grants`, one argument each (to pass as separate argv elements). */
export function permissionFlags(grants: Grants): string[] {
  const net = grants.anyNet ? "--allow-net" : `--allow-net=${grants.net.join(",")}`;
  return [net, `--allow-read=${grants.read.join(",")}`];
}

/** Flags for the server's config (see {@link serverGrants}). */
export function serverPermissions(config: ServerConfig): string[] {
  return permissionFlags(serverGrants(config));
}

/** Flags for the client's config (see {@link clientGrants}). */
export function clientPermissions(config: ClientConfig): string[] {
  return permissionFlags(clientGrants(config));
}

/**
 * What `--print-permissions` writes: one flag per line. Read it into separate arguments, e.g.
 * in bash `mapfile -t perms <<<"$flags"; deno run "${perms[@]}" server.ts …`.
 */
export function formatPermissions(flags: string[]): string {
  return flags.join("\n");
}

/** The grants this process does not hold, as the flags that would grant them; empty if none. */
export function missingGrants(grants: Grants): string[] {
  if (grants.anyNet && Deno.permissions.querySync({ name: "net" }).state !== "granted") {
    grants = { ...grants, net: ["*"] };
  }
  const net = grants.net.filter((host) =>
    host === "*" || Deno.permissions.querySync({ name: "net", host }).state !== "granted"
  );
  const read = grants.read.filter((path) =>
    Deno.permissions.querySync({ name: "read", path }).state !== "granted"
  );
  return [
    ...(net.includes("*") ? ["--allow-net"] : net.length ? [`--allow-net=${net.join(",")}`] : []),
    ...(read.length ? [`--allow-read=${read.join(",")}`] : []),
  ];
}
