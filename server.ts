/**
 * NATadm server entrypoint: `deno task server [--config server.toml]`.
 * @module
 */
import { die, onShutdown, parseCommon } from "./src/cli.ts";
import { ConfigError, loadServerConfig } from "./src/config.ts";
import { setupLogging } from "./src/log.ts";
import { Server } from "./src/server.ts";

const HELP = `
Usage: server.ts [--config FILE] [--log-level LEVEL] [--log-format text|json]

Runs the NATadm server: accepts clients on communication_port (TLS) and users on each
port of [services], bridging every user to the named client's port.

  -c, --config FILE     server config (default: server.toml)
      --log-level LEVEL trace, debug, info (default), warning, error, fatal
      --log-format FMT  text (default) or json
  -h, --help            show this help
  -V, --version         show the version
`;

const options = parseCommon("natadm-server", Deno.args, "server.toml", HELP);
const config = await loadServerConfig(options.config).catch((err) =>
  die("natadm-server", err instanceof ConfigError ? err.message : String(err))
);
await setupLogging(options.logLevel ?? config.logLevel ?? "info", options.logFormat);
const server = new Server(config);
await server.start().catch((err) => die("natadm-server", (err as Error).message));
onShutdown(async () => {
  await server.close();
  Deno.exit(0);
});
