/**
 * The status server: a JSON document, Prometheus metrics and a self-refreshing HTML dashboard,
 * all built from the server's snapshot, on their own (by default loopback-only) port.
 *
 * With a token configured, every request must carry `Authorization: Bearer TOKEN`. The one
 * exception is the dashboard page `/`, which also accepts `?token=TOKEN` in its URL, because a
 * browser cannot add the header by itself; the page then sends that token as a Bearer header
 * on its own fetches of `/status.json`. The token is always compared in constant time.
 * Without a token, a request must name the page's own address in its `Host` header, so that a
 * DNS-rebinding page in a browser on the same machine cannot read it.
 * @module
 */
import { timingSafeEqual } from "node:crypto";
import type { ServerSnapshot } from "./server.ts";
import { listenError } from "./listen_error.ts";
import { log } from "./log.ts";
import { ACCEPT_BACKOFF_MAX_MS, ACCEPT_BACKOFF_MIN_MS } from "./accept.ts";
import type { RegistryState } from "./etcd_registry.ts";

/** What the status server shows: the server's snapshot and where its registry stands. */
export type StatusSnapshot = ServerSnapshot & { registry?: RegistryState };

/** Where the status server gets its snapshots from (the server, or a wrapper of it). */
export type StatusSource = { snapshot(): StatusSnapshot };

const logger = log("status");

/** Where the status server listens, and the token it requires (none: open to all who reach it). */
export interface StatusOptions {
  /** Address to listen on; default 127.0.0.1. */
  host?: string;
  /** Port to listen on; 0 picks a free one. */
  port: number;
  /** Bearer token every request must present. */
  token?: string;
}

/** A running status server. */
export interface StatusServer {
  /** The port actually bound. */
  port: number;
  /** Stops listening and waits for requests in flight. */
  close(): Promise<void>;
}

/** One client in `/status.json`. Times are ISO 8601 strings, or null when not connected. */
export interface ClientStatus {
  /** Its name, as in the server's `[clients]` table. */
  name: string;
  /** Whether it has an authenticated control connection now. */
  connected: boolean;
  /** The address its control connection comes from. */
  remote: string | null;
  /** When its current control connection was authenticated. */
  connected_since: string | null;
  /** When the server last heard from it (any frame, heartbeats included). */
  last_heartbeat: string | null;
  /** The protocol version it speaks. */
  protocol_version: number | null;
  /** Live tunnels on its connection. */
  tunnels: number;
}

/** One service in `/status.json`; up is user → service, down is service → user. */
export interface ServiceStatus {
  /** Its public port on the server. */
  port: number;
  /** The client that serves it. */
  client: string;
  /** `host:port` the client connects to on its side. */
  target: string;
  /** Tunnels open now. */
  live_tunnels: number;
  /** Users waiting for the client. */
  waiting_users: number;
  /** Tunnels opened since the server started, live ones included. */
  tunnels_total: number;
  /** Bytes relayed up since the server started. */
  bytes_up: number;
  /** Bytes relayed down since the server started. */
  bytes_down: number;
}

/** One live tunnel in `/status.json`; up is user → service, down is service → user. */
export interface TunnelStatus {
  /** Sequence number, unique for the server's lifetime. */
  id: number;
  /** Public port of its service; 0 for a tunnel a named user opened. */
  service: number;
  /** Who opened it: the user's name (connect, forward), or its address (a service port). */
  by: string;
  /** The client serving it. */
  client: string;
  /** The user's address. */
  user: string;
  /** When it opened (ISO 8601). */
  started: string;
  /** Bytes relayed up so far. */
  bytes_up: number;
  /** Bytes relayed down so far. */
  bytes_down: number;
  /** The server of the cluster it is forwarded to; null when the client is connected here. */
  via: string | null;
}

/** A named user's live tunnel in `/status.json`; up is user → client, down the reverse. */
export interface UserTunnelStatus {
  client: string;
  /** The port on the client's side. */
  port: number;
  /** When it opened (ISO 8601). */
  since: string;
  bytes_up: number;
  bytes_down: number;
}

/** One configured user (`[users]`) in `/status.json`. */
export interface UserStatus {
  name: string;
  /** Whether it has a logged-in connection now. */
  connected: boolean;
  /** Its logged-in connections: address and since when (ISO 8601). */
  connections: { remote: string; since: string }[];
  /** Its live tunnels. */
  tunnels: UserTunnelStatus[];
}

/** The document served at `/status.json`. */
export interface StatusDocument {
  /** NATadm's version. */
  version: string;
  /** When the server started (ISO 8601). */
  started: string;
  /** When this document was made (ISO 8601), for ages that do not depend on the reader's clock. */
  now: string;
  /** Seconds since the server started. */
  uptime_seconds: number;
  /** Client connections refused for an unknown name or a wrong key, since start. */
  auth_failures: number;
  /** Every configured client. */
  clients: ClientStatus[];
  /** Every configured service. */
  services: ServiceStatus[];
  /** Every live tunnel. */
  tunnels: TunnelStatus[];
  /** Every configured user. */
  users: UserStatus[];
  /** Refused user logins and tunnel requests since start, by reason. */
  user_refusals: Record<string, number>;
  /** Where clients and services come from (file or etcd), and whether it is reachable. */
  registry: RegistryStatus | null;
  /** The cluster as this server sees it; null when it is no member of one. */
  cluster: ClusterStatus | null;
}

/** The cluster in `/status.json`. */
export interface ClusterStatus {
  /** This server's id (`server_id`). */
  self: string;
  /** Ids of the servers with a live lease in etcd. */
  members: string[];
  /** Client name → ids of the servers that hold it. */
  held: Record<string, string[]>;
  /** Live tunnels this server forwards to another one. */
  forwarded: number;
  /** Tunnels forwarded to another server since start. */
  forwarded_total: number;
}

/** The registry in `/status.json`. */
export interface RegistryStatus {
  source: "file" | "etcd";
  /** Whether the source answers now; false: the last registry read stays in force. */
  connected: boolean;
  /** Since when `connected` has held (ISO 8601). */
  since: string;
  /** The etcd revision of the registry in force; null for a file. */
  revision: number | null;
  /** Why etcd is unreachable, while it is. */
  error: string | null;
}

const iso = (ms: number | undefined): string | null =>
  ms === undefined ? null : new Date(ms).toISOString();

/** Turns a server snapshot into the `/status.json` document. */
export function statusDocument(snap: StatusSnapshot, now = Date.now()): StatusDocument {
  return {
    version: snap.version,
    started: new Date(snap.started).toISOString(),
    now: new Date(now).toISOString(),
    uptime_seconds: Math.max(0, (now - snap.started) / 1000),
    auth_failures: snap.authFailures,
    clients: snap.clients.map((c) => ({
      name: c.name,
      connected: c.connected,
      remote: c.remote ?? null,
      connected_since: iso(c.connectedSince),
      last_heartbeat: iso(c.lastHeartbeat),
      protocol_version: c.protocolVersion ?? null,
      tunnels: c.tunnels,
    })),
    services: snap.services.map((s) => ({
      port: s.port,
      client: s.client,
      target: `${s.host.includes(":") ? `[${s.host}]` : s.host}:${s.targetPort}`,
      live_tunnels: s.liveTunnels,
      waiting_users: s.waitingUsers,
      tunnels_total: s.tunnelsTotal,
      bytes_up: s.bytesUp,
      bytes_down: s.bytesDown,
    })),
    tunnels: snap.tunnels.map((t) => ({
      id: t.id,
      service: t.service,
      by: t.by,
      client: t.client,
      user: t.user,
      started: new Date(t.started).toISOString(),
      bytes_up: t.bytesUp,
      bytes_down: t.bytesDown,
      via: t.via ?? null,
    })),
    cluster: snap.cluster
      ? {
        self: snap.cluster.self,
        members: snap.cluster.members,
        held: snap.cluster.held,
        forwarded: snap.cluster.forwarded,
        forwarded_total: snap.cluster.forwardedTotal,
      }
      : null,
    registry: snap.registry
      ? {
        source: snap.registry.source,
        connected: snap.registry.connected,
        since: new Date(snap.registry.since).toISOString(),
        revision: snap.registry.source === "etcd" ? snap.registry.revision ?? null : null,
        error: snap.registry.error ?? null,
      }
      : null,
    users: snap.users.map((u) => ({
      name: u.name,
      connected: u.connections.length > 0,
      connections: u.connections.map((c) => ({
        remote: c.remote,
        since: new Date(c.connectedSince).toISOString(),
      })),
      tunnels: u.tunnels.map((t) => ({
        client: t.client,
        port: t.port ?? 0,
        since: new Date(t.started).toISOString(),
        bytes_up: t.bytesUp,
        bytes_down: t.bytesDown,
      })),
    })),
    user_refusals: { ...snap.userRefusals },
  };
}

/** Escapes a Prometheus label value: backslash, double quote and line feed. */
export function escapeLabel(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

type Labels = Record<string, string | number>;

/** Builds one metric family: HELP, TYPE and its samples. */
class Exposition {
  #lines: string[] = [];

  family(
    name: string,
    type: "gauge" | "counter",
    help: string,
    samples: [Labels, number][],
  ): void {
    const helpText = help.replace(/\\/g, "\\\\").replace(/\n/g, "\\n");
    this.#lines.push(`# HELP ${name} ${helpText}`, `# TYPE ${name} ${type}`);
    for (const [labels, value] of samples) {
      const pairs = Object.entries(labels).map(([k, v]) => `${k}="${escapeLabel(String(v))}"`);
      const labelText = pairs.length ? `{${pairs.join(",")}}` : "";
      this.#lines.push(`${name}${labelText} ${formatValue(value)}`);
    }
  }

  text(): string {
    return this.#lines.join("\n") + "\n";
  }
}

function formatValue(v: number): string {
  if (Number.isNaN(v)) return "NaN";
  if (v === Infinity) return "+Inf";
  if (v === -Infinity) return "-Inf";
  return Number.isInteger(v) ? String(v) : v.toFixed(3);
}

/** Renders a server snapshot in the Prometheus text exposition format (version 0.0.4). */
export function metricsText(snap: ServerSnapshot, now = Date.now()): string {
  const m = new Exposition();
  const svc = (s: ServerSnapshot["services"][number]) => ({ service: s.port });
  m.family("natadm_up", "gauge", "1 while the NATadm server is running.", [[{}, 1]]);
  m.family("natadm_build_info", "gauge", "The NATadm version, as a label; always 1.", [
    [{ version: snap.version }, 1],
  ]);
  m.family("natadm_uptime_seconds", "gauge", "Seconds since the server started.", [
    [{}, Math.max(0, (now - snap.started) / 1000)],
  ]);
  m.family("natadm_clients_configured", "gauge", "Clients in the server's [clients] table.", [
    [{}, snap.clients.length],
  ]);
  m.family("natadm_clients_connected", "gauge", "Clients with an authenticated connection.", [
    [{}, snap.clients.filter((c) => c.connected).length],
  ]);
  m.family(
    "natadm_client_connected",
    "gauge",
    "1 if the client is connected, 0 if not.",
    snap.clients.map((c) => [{ client: c.name }, c.connected ? 1 : 0]),
  );
  m.family("natadm_tunnels_active", "gauge", "Live tunnels (users being served).", [
    [{}, snap.tunnels.length],
  ]);
  m.family(
    "natadm_tunnels_active_by_service",
    "gauge",
    "Live tunnels per service port.",
    snap.services.map((s) => [{ service: s.port, client: s.client }, s.liveTunnels]),
  );
  m.family(
    "natadm_tunnels_total",
    "counter",
    "Tunnels opened per service port since the server started.",
    snap.services.map((s) => [svc(s), s.tunnelsTotal]),
  );
  m.family(
    "natadm_bytes_total",
    "counter",
    "Bytes relayed per service port: up is user to service, down is service to user.",
    snap.services.flatMap((s) =>
      [
        [{ ...svc(s), direction: "up" }, s.bytesUp],
        [{ ...svc(s), direction: "down" }, s.bytesDown],
      ] as [Labels, number][]
    ),
  );
  m.family(
    "natadm_auth_failures_total",
    "counter",
    "Client connections refused for an unknown name or a wrong key.",
    [[{}, snap.authFailures]],
  );
  m.family(
    "natadm_pending_users",
    "gauge",
    "Users waiting on a service port for their client.",
    snap.services.map((s) => [svc(s), s.waitingUsers]),
  );
  m.family(
    "natadm_user_connected",
    "gauge",
    "Logged-in connections of each configured user ([users]).",
    snap.users.map((u) => [{ user: u.name }, u.connections.length]),
  );
  m.family(
    "natadm_user_tunnels_active",
    "gauge",
    "Live tunnels each named user opened (connect, forward).",
    snap.users.map((u) => [{ user: u.name }, u.tunnels.length]),
  );
  m.family(
    "natadm_user_refusals_total",
    "counter",
    "User logins and tunnel requests refused, by reason.",
    Object.entries(snap.userRefusals).map(([reason, n]) => [{ reason }, n]),
  );
  if (snap.cluster) {
    const c = snap.cluster;
    m.family("natadm_cluster_members", "gauge", "Servers of the cluster with a live lease.", [
      [{}, c.members.length],
    ]);
    m.family(
      "natadm_cluster_client_holders",
      "gauge",
      "Servers of the cluster that hold each client.",
      Object.entries(c.held).map(([client, ids]) => [{ client }, ids.length]),
    );
    m.family("natadm_forwarded_tunnels", "gauge", "Live tunnels forwarded to another server.", [
      [{}, c.forwarded],
    ]);
    m.family(
      "natadm_forwarded_tunnels_total",
      "counter",
      "Tunnels forwarded to another server since start.",
      [[{}, c.forwardedTotal]],
    );
  }
  return m.text();
}

/** SHA-256 of both sides first, so the comparison takes the same time whatever their lengths. */
async function sameSecret(given: string, expected: string): Promise<boolean> {
  const digest = async (s: string) =>
    new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(s)));
  return timingSafeEqual(await digest(given), await digest(expected));
}

const SECURITY_HEADERS = {
  "cache-control": "no-store",
  "referrer-policy": "no-referrer",
  "x-content-type-options": "nosniff",
};

function reply(status: number, body: string, type: string, extra: HeadersInit = {}): Response {
  return new Response(body, {
    status,
    headers: { "content-type": type, ...SECURITY_HEADERS, ...extra },
  });
}

const TEXT = "text/plain; charset=utf-8";

/** Host headers already refused with a warning; later refusals of them log at debug. */
const refusedHosts = new Set<string>();

/** Whether `host` is an IPv4 or IPv6 address literal (brackets removed), not a name. */
function isAddress(host: string): boolean {
  return /^\d{1,3}(\.\d{1,3}){3}$/.test(host) || host.includes(":");
}

/** Whether `host` (an address or "localhost") is on the loopback interface. */
function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
}

/**
 * Whether a request's `Host` header names the status page bound to `bound`: the bound address
 * itself; "localhost" for a loopback or wildcard address; any address literal for a wildcard
 * (0.0.0.0 or ::). A DNS-rebinding page in a browser sends its own name instead, and is
 * refused. No header (HTTP/1.0) is not a browser, and passes. The port is not compared: an
 * SSH forward or a proxy may change it.
 */
export function hostAllowed(header: string | null, bound: string): boolean {
  if (header === null) return true;
  const m = /^(?:\[([^\]]*)\]|([^:]*))(?::\d*)?$/.exec(header.trim().toLowerCase());
  if (!m) return false;
  const name = (m[1] ?? m[2]).replace(/\.$/, "");
  const self = bound.toLowerCase().replace(/^\[|\]$/g, "");
  const wildcard = self === "0.0.0.0" || self === "::";
  if (name === self) return true;
  if (name === "localhost") return wildcard || isLoopback(self);
  return wildcard && isAddress(name);
}

/**
 * Answers one request to the status server bound to `host`: the token check (or, with no
 * token, the Host check of {@link hostAllowed}), then the endpoint.
 */
export async function handleStatusRequest(
  server: StatusSource,
  token: string | undefined,
  request: Request,
  host = "127.0.0.1",
): Promise<Response> {
  const url = new URL(request.url);
  if (token === undefined) {
    const given = request.headers.get("host");
    if (!hostAllowed(given, host)) {
      // Once per Host (a few dozen at most): a rebinding page polls, and would flood the log.
      const first = !refusedHosts.has(given ?? "") && refusedHosts.size < 64;
      refusedHosts.add(given ?? "");
      const message =
        "status request refused: Host {given} is not this page's address (DNS rebinding?)";
      if (first) logger.warn(message, { given });
      else logger.debug(message, { given });
      return reply(
        403,
        `403 Forbidden: Host "${given}" is not this status page's address. Open it as ` +
          `${statusUrl(host, Number(url.port) || 80)} or set status_token.\n`,
        TEXT,
      );
    }
  } else {
    const header = request.headers.get("authorization") ?? "";
    const bearer = /^Bearer +(.+)$/i.exec(header)?.[1];
    const query = url.pathname === "/" ? url.searchParams.get("token") : null;
    const given = bearer ?? query;
    if (given === null || given === undefined || !await sameSecret(given, token)) {
      const hint = url.pathname === "/"
        ? "Open this page as /?token=TOKEN (status_token from the server's config)."
        : "Send the header: Authorization: Bearer TOKEN (status_token from the server's config).";
      return reply(401, `401 Unauthorized. ${hint}\n`, TEXT, {
        "www-authenticate": 'Bearer realm="natadm"',
      });
    }
  }
  const paths = ["/", "/status.json", "/metrics"];
  if (!paths.includes(url.pathname)) return reply(404, "404 Not Found\n", TEXT);
  if (request.method !== "GET") {
    return reply(405, "405 Method Not Allowed: only GET\n", TEXT, { allow: "GET" });
  }
  const snap = server.snapshot();
  switch (url.pathname) {
    case "/status.json":
      return reply(200, JSON.stringify(statusDocument(snap), null, 2) + "\n", "application/json");
    case "/metrics":
      return reply(200, metricsText(snap), "text/plain; version=0.0.4; charset=utf-8");
    default:
      return reply(200, DASHBOARD_HTML, "text/html; charset=utf-8", {
        "content-security-policy":
          "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; " +
          "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
      });
  }
}

/**
 * Starts the status server for `server` on `options.host`:`options.port`. Throws a one-line
 * error naming the address if it cannot listen (e.g. the port is in use).
 */
export function startStatusServer(
  server: StatusSource,
  options: StatusOptions,
): Promise<StatusServer> {
  const host = options.host ?? "127.0.0.1";
  const serve = (port: number) =>
    Deno.serve(
      {
        hostname: host,
        port,
        onListen() {},
        onError(err) {
          logger.error("status request failed: {error}", { error: (err as Error).message });
          return reply(500, "500 Internal Server Error\n", TEXT);
        },
      },
      (request) => handleStatusRequest(server, options.token, request, host),
    );
  let http: Deno.HttpServer<Deno.NetAddr>;
  try {
    http = serve(options.port);
  } catch (err) {
    return Promise.reject(listenError(host, options.port, "status_port", err));
  }
  const port = http.addr.port;
  let closed = false;
  // Deno.serve stops for good (and its rejection would end the process) when an accept fails,
  // e.g. for want of file descriptors: log it and listen again, backing off until that works.
  const restart = (delay: number) => {
    if (closed) return;
    try {
      http = serve(port);
      watch(http);
      logger.info("status page on {host}:{port} is listening again", { host, port });
    } catch (err) {
      logger.debug("status page cannot listen again yet: {error}", {
        error: (err as Error).message,
      });
      setTimeout(() => restart(Math.min(delay * 2, ACCEPT_BACKOFF_MAX_MS)), delay);
    }
  };
  const watch = (current: Deno.HttpServer<Deno.NetAddr>) =>
    current.finished.catch((err) => {
      if (closed) return;
      logger.warn("status page on {host}:{port} stopped: {error}; listening again", {
        host,
        port,
        error: (err as Error).message,
      });
      setTimeout(() => restart(ACCEPT_BACKOFF_MIN_MS * 2), ACCEPT_BACKOFF_MIN_MS);
    });
  watch(http);
  if (!options.token && !["127.0.0.1", "::1", "localhost"].includes(host)) {
    logger.warn(
      "status page on {host} has no status_token: anyone who can reach the port sees every " +
        "client and user address",
      { host },
    );
  }
  return Promise.resolve({
    port,
    close: () => {
      closed = true;
      return http.shutdown();
    },
  });
}

/** The URL a person opens for the dashboard, e.g. `http://127.0.0.1:8080/`. */
export function statusUrl(host: string, port: number): string {
  return `http://${host.includes(":") ? `[${host}]` : host}:${port}/`;
}

/**
 * The dashboard: one self-contained page (inline CSS and JS, no external assets). It fetches
 * `/status.json` every 2 s and renders it; every value goes through `esc` before it reaches
 * innerHTML. Narrow screens get one card per row instead of a wide table.
 */
const DASHBOARD_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>NATadm status</title>
<style>
:root {
  color-scheme: light dark;
  --bg: #f6f7f9; --fg: #1d2330; --muted: #667085; --card: #fff; --line: #e3e6eb;
  --ok: #12805c; --off: #b42318; --accent: #2457c5;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #12151b; --fg: #e6e9ef; --muted: #98a2b3; --card: #1b2029; --line: #2b3240;
    --ok: #3ccb8f; --off: #f97066; --accent: #7aa2f7;
  }
}
* { box-sizing: border-box; }
body {
  margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
}
header { padding: 16px 20px 8px; display: flex; flex-wrap: wrap; align-items: baseline;
  gap: 4px 16px; }
h1 { font-size: 20px; margin: 0; }
h2 { font-size: 16px; margin: 24px 0 8px; }
main { padding: 0 20px 24px; max-width: 1200px; }
.muted { color: var(--muted); }
#state { font-size: 13px; }
#state.err { color: var(--off); font-weight: 600; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr)); gap: 10px; }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 10px 14px; }
.tile b { display: block; font-size: 24px; font-variant-numeric: tabular-nums; }
.tile span { color: var(--muted); font-size: 13px; }
table { width: 100%; border-collapse: collapse; background: var(--card);
  border: 1px solid var(--line); border-radius: 10px; overflow: hidden; }
th, td { text-align: left; padding: 8px 12px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
tr:last-child td { border-bottom: 0; }
td.num { font-variant-numeric: tabular-nums; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  overflow-wrap: anywhere; }
.dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 6px; }
.on { color: var(--ok); } .on .dot { background: var(--ok); }
.off { color: var(--off); } .off .dot { background: var(--off); }
.empty { color: var(--muted); padding: 12px; background: var(--card);
  border: 1px dashed var(--line); border-radius: 10px; }
@media (max-width: 720px) {
  header, main { padding-left: 12px; padding-right: 12px; }
  table, tbody, tr, td { display: block; width: 100%; }
  table { border: 0; background: none; }
  thead { display: none; }
  tr { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
    margin-bottom: 10px; padding: 6px 0; }
  td { border: 0; padding: 3px 12px; display: flex; gap: 12px; }
  td::before { content: attr(data-label); color: var(--muted); flex: 0 0 40%; font-size: 13px; }
}
</style>
</head>
<body>
<header>
  <h1>NATadm</h1>
  <span class="muted" id="version"></span>
  <span id="state" class="muted">loading…</span>
</header>
<main>
  <noscript>
    <p class="empty">This page needs JavaScript; the same data is at /status.json.</p>
  </noscript>
  <section class="tiles" id="tiles"></section>
  <h2>Clients</h2><div id="clients"></div>
  <h2>Services</h2><div id="services"></div>
  <h2>Live tunnels</h2><div id="tunnels"></div>
  <h2>Users</h2><div id="users"></div>
</main>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
function esc(v) {
  return String(v).replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}
function span(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds / 3600) % 24;
  const m = Math.floor(seconds / 60) % 60, s = seconds % 60;
  if (d) return d + " d " + h + " h";
  if (h) return h + " h " + m + " m";
  if (m) return m + " m " + s + " s";
  return s + " s";
}
function ago(when, now, suffix = " ago") {
  if (!when) return "—";
  const t = new Date(when);
  return '<span title="' + esc(t.toLocaleString()) + '">' +
    esc(span((new Date(now) - t) / 1000) + suffix) + "</span>";
}
function table(headers, rows, empty) {
  if (!rows.length) return '<p class="empty">' + esc(empty) + "</p>";
  const head = "<thead><tr>" + headers.map((h) => "<th>" + esc(h) + "</th>").join("") +
    "</tr></thead>";
  const body = rows.map((cells) =>
    "<tr>" + cells.map((html, i) =>
      '<td data-label="' + esc(headers[i]) + '">' + html + "</td>").join("") + "</tr>").join("");
  return "<table>" + head + "<tbody>" + body + "</tbody></table>";
}
function tile(value, label) {
  return '<div class="tile"><b>' + esc(value) + "</b><span>" + esc(label) + "</span></div>";
}
function render(s) {
  const r = s.registry;
  $("version").textContent = "v" + s.version + " · up " + span(s.uptime_seconds) +
    (r && r.source === "etcd"
      ? " · registry in etcd, revision " + r.revision +
        (r.connected ? "" : " · etcd UNREACHABLE since " + new Date(r.since).toLocaleString())
      : "");
  const connected = s.clients.filter((c) => c.connected).length;
  const waiting = s.services.reduce((n, v) => n + v.waiting_users, 0);
  $("tiles").innerHTML = tile(connected + " / " + s.clients.length, "clients connected") +
    tile(s.tunnels.length, "live tunnels") + tile(waiting, "users waiting") +
    tile(s.auth_failures, "auth failures");
  $("clients").innerHTML = table(
    ["Client", "State", "Address", "Connected", "Last heartbeat", "Protocol"],
    s.clients.map((c) => [
      "<b>" + esc(c.name) + "</b>",
      c.connected ? '<span class="on"><i class="dot"></i>connected</span>'
        : '<span class="off"><i class="dot"></i>offline</span>',
      c.remote ? "<code>" + esc(c.remote) + "</code>" : "—",
      ago(c.connected_since, s.now),
      ago(c.last_heartbeat, s.now),
      c.protocol_version === null ? "—" : "v" + esc(c.protocol_version),
    ]),
    "No clients configured.",
  );
  $("services").innerHTML = table(
    ["Port", "Client", "Target", "Live", "Waiting", "Total", "Up", "Down"],
    s.services.map((v) => [
      "<code>" + esc(v.port) + "</code>", esc(v.client), "<code>" + esc(v.target) + "</code>",
      esc(v.live_tunnels), esc(v.waiting_users), esc(v.tunnels_total),
      '<span title="' + esc(v.bytes_up) + ' bytes">' + esc(bytes(v.bytes_up)) + "</span>",
      '<span title="' + esc(v.bytes_down) + ' bytes">' + esc(bytes(v.bytes_down)) + "</span>",
    ]),
    "No services configured.",
  );
  $("tunnels").innerHTML = table(
    ["#", "User", "Service", "Client", "Open for", "Up", "Down"],
    s.tunnels.map((t) => [
      esc(t.id),
      t.by === t.user ? "<code>" + esc(t.user) + "</code>"
        : "<b>" + esc(t.by) + "</b> <code>" + esc(t.user) + "</code>",
      "<code>" + esc(t.service || "by name") + "</code>",
      esc(t.client), ago(t.started, s.now, ""),
      '<span title="' + esc(t.bytes_up) + ' bytes">' + esc(bytes(t.bytes_up)) + "</span>",
      '<span title="' + esc(t.bytes_down) + ' bytes">' + esc(bytes(t.bytes_down)) + "</span>",
    ]),
    "No live tunnels.",
  );
  const refusals = Object.entries(s.user_refusals).map(([k, n]) => esc(k) + " " + esc(n));
  $("users").innerHTML = table(
    ["User", "State", "Connections", "Live tunnels"],
    s.users.map((u) => [
      "<b>" + esc(u.name) + "</b>",
      u.connected ? '<span class="on"><i class="dot"></i>connected</span>'
        : '<span class="off"><i class="dot"></i>offline</span>',
      u.connections.map((c) => "<code>" + esc(c.remote) + "</code> " + ago(c.since, s.now))
        .join("<br>") || "—",
      u.tunnels.map((t) => esc(t.client) + ":" + esc(t.port) + " " + ago(t.since, s.now, "") +
        " ↑" + esc(bytes(t.bytes_up)) + " ↓" + esc(bytes(t.bytes_down))).join("<br>") || "—",
    ]),
    "No users configured.",
  ) + (refusals.length ? '<p class="muted">Refused: ' + refusals.join(", ") + "</p>" : "");
}
async function refresh() {
  const state = $("state");
  try {
    const res = await fetch("status.json", {
      cache: "no-store",
      headers: token ? { authorization: "Bearer " + token } : {},
    });
    if (!res.ok) throw new Error("HTTP " + res.status);
    render(await res.json());
    state.className = "muted";
    state.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    state.className = "err";
    state.textContent = "cannot reach the server (" + err.message + "); retrying";
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
`;
