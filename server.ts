/**
 * NATadm server entrypoint: `deno task server [--config server.toml]`.
 * @module
 */
import { die, onShutdown, parseCommon } from "./src/cli.ts";
import {
  ConfigError,
  loadServerConfig,
  type RegistryConfig,
  type ServerConfig,
} from "./src/config.ts";
import { EtcdRegistry, type RegistryState } from "./src/etcd_registry.ts";
import { log, setupLogging } from "./src/log.ts";
import { Server } from "./src/server.ts";
import {
  formatPermissions,
  missingGrants,
  serverGrants,
  serverPermissions,
} from "./src/permissions.ts";
import { startStatusServer, statusUrl } from "./src/status.ts";

const HELP = `
Usage: server.ts [--config FILE] [--log-level LEVEL] [--log-format text|json] [--watch-config]
                 [--print-permissions]

Runs the NATadm server: accepts clients on communication_port (TLS) and users on each
port of [services], bridging every user to the named client's port. With registry = "etcd"
the clients and services come from etcd, and every change there applies at once.

  -c, --config FILE     server config (default: server.toml)
      --log-level LEVEL trace, debug, info (default), warning, error, fatal
      --log-format FMT  text (default) or json
      --watch-config    reload the config when its file changes (SIGHUP always reloads)
      --print-permissions
                        print the exact Deno permission flags this config needs, one per
                        line, and exit (--watch-config needs nothing more)
  -h, --help            show this help
  -V, --version         show the version

SIGINT/SIGTERM stop accepting and let live tunnels finish for shutdown_grace seconds; a
second signal, a second or more after the first, exits at once.
`;

const options = parseCommon("natadm-server", Deno.args, "server.toml", HELP, [
  "watch-config",
  "print-permissions",
]);
const config = await loadServerConfig(options.config).catch((err) =>
  die("natadm-server", err instanceof ConfigError ? err.message : String(err))
);
if (options.flags.has("print-permissions")) {
  console.log(formatPermissions(serverPermissions(config)));
  Deno.exit(0);
}
await setupLogging(options.logLevel ?? config.logLevel ?? "info", options.logFormat);

/** The registry in force: from the config file, or from etcd. */
type Registry = Pick<ServerConfig, "clients" | "clientKeyText" | "services" | "users">;
/** The config file in force (with registry = "etcd", without clients or services). */
let fileConfig = config;
let registry: Registry = config;
const etcd = config.registry.source === "etcd" ? new EtcdRegistry(config.registry) : undefined;
const started = Date.now();

/** Ports a service from etcd must not take, with the keys that hold them. */
function reserved(c: ServerConfig): Map<number, string> {
  const ports = new Map([[c.communicationPort, "communication_port"]]);
  if (c.status) ports.set(c.status.port, "status_port");
  return ports;
}

function compose(file: ServerConfig, from: Registry): ServerConfig {
  return {
    ...file,
    clients: from.clients,
    clientKeyText: from.clientKeyText,
    services: from.services,
    users: from.users,
  };
}

if (etcd) {
  registry = await etcd.load(reserved(config)).catch((err) =>
    die("natadm-server", (err as Error).message)
  );
}
const server = new Server(compose(config, registry), etcd);
await server.start().catch((err) => die("natadm-server", (err as Error).message));
// The status page (status_port): started once; a reload does not move it.
const statusConfig = config.status;
/** The server's state with where its registry stands, for the status page. */
const statusSource = {
  snapshot: () => ({
    ...server.snapshot(),
    registry: etcd?.state() ??
      { source: "file", connected: true, since: started } satisfies RegistryState,
  }),
};
const status = statusConfig
  ? await startStatusServer(statusSource, statusConfig).catch(async (err) => {
    await server.close();
    return die("natadm-server", (err as Error).message);
  })
  : undefined;
if (statusConfig && status) {
  // The URL goes in the text itself (unquoted, ready to click); the host has bound, so it
  // holds no "{" that LogTape would read as a placeholder.
  const url = statusUrl(statusConfig.host, status.port);
  log("status").info(`status page on ${url}`, { url });
}
let grace = config.shutdownGrace;

/**
 * Applies `next` unless it needs a permission this process was not started with (a new port
 * or file): that change needs a restart under the flags `--print-permissions` prints for it.
 * Returns whether it was applied.
 */
function apply(next: ServerConfig): boolean {
  // What the reload would use: communication_port, listen_host and the status page stay.
  const missing = missingGrants(
    serverGrants({
      ...next,
      communicationPort: config.communicationPort,
      listenHost: config.listenHost,
      status: config.status,
    }),
  );
  if (missing.length) {
    log("server").error(
      "configuration not reloaded, the old one stays in force: this change needs a restart, " +
        "as this process is not granted {missing} (restart it with the flags " +
        "--print-permissions prints)",
      { missing: missing.join(" ") },
    );
    return false;
  }
  server.reload(next);
  return true;
}

/** Re-reads the config file; an invalid file is rejected whole and the running one stays. */
async function reload(): Promise<void> {
  try {
    const next = await loadServerConfig(options.config);
    let nextRegistry: Registry = next;
    if (etcd) {
      // The registry stays in etcd; moving it needs a restart.
      if (JSON.stringify(next.registry) !== JSON.stringify(config.registry)) {
        log("server").warn("registry and etcd_* changes take effect after a restart");
      }
      nextRegistry = registry;
    } else if (next.registry.source !== "file") {
      log("server").warn("registry and etcd_* changes take effect after a restart");
      return;
    }
    if (apply(compose(next, nextRegistry))) {
      fileConfig = next;
      registry = nextRegistry;
      grace = next.shutdownGrace;
    }
  } catch (err) {
    log("server").error("configuration not reloaded, the old one stays in force: {error}", {
      error: (err as Error).message,
    });
  }
}
etcd?.start({
  reserved: () => reserved(fileConfig),
  apply(next: RegistryConfig) {
    if (!apply(compose(fileConfig, next))) return false;
    registry = next;
    return true;
  },
});
Deno.addSignalListener("SIGHUP", reload);
if (options.flags.has("watch-config")) watchConfig(config.file, reload);

/**
 * Calls `onChange` once a change to `file` has settled. It watches the file itself, not its
 * directory, so it needs no permission beyond reading the file; an editor's save renames a
 * new file over the old one, which ends the watch on the old file, so it then watches again.
 */
async function watchConfig(file: string, onChange: () => void): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const changed = () => {
    // A save comes as several events: act once it has settled.
    clearTimeout(timer);
    timer = setTimeout(onChange, 200);
  };
  for (;;) {
    let watcher: Deno.FsWatcher;
    try {
      watcher = Deno.watchFs(file, { recursive: false });
    } catch {
      // Between an editor's delete and its new file: look again shortly.
      await new Promise((resolve) => setTimeout(resolve, 200));
      continue;
    }
    try {
      for await (const event of watcher) {
        changed();
        if (event.kind === "remove" || event.kind === "rename") break;
      }
    } finally {
      try {
        watcher.close();
      } catch {
        // Closed already by leaving the loop.
      }
    }
  }
}
onShutdown(async () => {
  etcd?.close();
  await server.shutdown(grace * 1000);
  await status?.close();
  Deno.exit(0);
}, () => server.liveTunnels);
