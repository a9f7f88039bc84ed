/**
 * NATadm server entrypoint: `deno task server [--config server.toml]`.
 * @module
 */
import { die, onShutdown, parseCommon } from "./src/cli.ts";
import { ConfigError, loadServerConfig } from "./src/config.ts";
import { log, setupLogging } from "./src/log.ts";
import { Server } from "./src/server.ts";
import { dirname } from "node:path";
import { serverPermissions } from "./src/permissions.ts";
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
                        print the exact Deno permission flags this config needs, and exit
                        (with --watch-config: including the config's directory)
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
  console.log(serverPermissions(config, options.flags.has("watch-config")).join(" "));
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

/** Re-reads the config; an invalid file is rejected whole and the running one stays. */
async function reload(): Promise<void> {
  try {
    const next = await loadServerConfig(options.config);
    grace = next.shutdownGrace;
    server.reload(next);
  } catch (err) {
    log("server").error("configuration not reloaded, the old one stays in force: {error}", {
      error: (err as Error).message,
    });
  }
}
Deno.addSignalListener("SIGHUP", reload);
if (options.flags.has("watch-config")) {
  (async () => {
    let timer: ReturnType<typeof setTimeout> | undefined;
    // Watch the directory, not the file: editors and config tools save by writing a new file
    // and renaming it over the old one, which would end a watch on the file itself.
    for await (const event of Deno.watchFs(dirname(config.file), { recursive: false })) {
      if (!event.paths.some((p) => p === config.file)) continue;
      // A save comes as several events: reload once it has settled.
      clearTimeout(timer);
      timer = setTimeout(reload, 200);
    }
  })();
}
onShutdown(async () => {
  await server.shutdown(grace * 1000);
  await status?.close();
  Deno.exit(0);
}, () => server.liveTunnels);
