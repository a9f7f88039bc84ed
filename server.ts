/**
 * NATadm server entrypoint: `deno task server [--config server.toml]`.
 * @module
 */
import { die, onShutdown, parseCommon } from "./src/cli.ts";
import { ConfigError, loadServerConfig } from "./src/config.ts";
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
port of [services], bridging every user to the named client's port.

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
const server = new Server(config);
await server.start().catch((err) => die("natadm-server", (err as Error).message));
// The status page (status_port): started once; a reload does not move it.
const statusConfig = config.status;
const status = statusConfig
  ? await startStatusServer(server, statusConfig).catch(async (err) => {
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
 * Re-reads the config; an invalid file is rejected whole and the running one stays. So is one
 * that needs a permission this process was not started with (a new port or file): that
 * change needs a restart under the flags `--print-permissions` prints for it.
 */
async function reload(): Promise<void> {
  try {
    const next = await loadServerConfig(options.config);
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
      return;
    }
    grace = next.shutdownGrace;
    server.reload(next);
  } catch (err) {
    log("server").error("configuration not reloaded, the old one stays in force: {error}", {
      error: (err as Error).message,
    });
  }
}
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
  await server.shutdown(grace * 1000);
  await status?.close();
  Deno.exit(0);
}, () => server.liveTunnels);
