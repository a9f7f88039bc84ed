/**
 * NATadm client entrypoint: `deno task client [--config client.toml]`.
 * @module
 */
import { die, onShutdown, parseCommon } from "./src/cli.ts";
import { ConfigError, loadClientConfig } from "./src/config.ts";
import { setupLogging } from "./src/log.ts";
import { Client } from "./src/client.ts";

const HELP = `
Usage: client.ts [--config FILE] [--log-level LEVEL] [--log-format text|json]

Runs the NATadm client: keeps a TLS control connection to the server named by "remote"
and, when a user connects to one of this client's services there, bridges that user to
the local port.

  -c, --config FILE     client config (default: client.toml)
      --log-level LEVEL trace, debug, info (default), warning, error, fatal
      --log-format FMT  text (default) or json
  -h, --help            show this help
  -V, --version         show the version
`;

const options = parseCommon("natadm-client", Deno.args, "client.toml", HELP);
const config = await loadClientConfig(options.config).catch((err) =>
  die("natadm-client", err instanceof ConfigError ? err.message : String(err))
);
await setupLogging(options.logLevel ?? config.logLevel ?? "info", options.logFormat);
const client = new Client(config);
onShutdown(() => client.stop());
Deno.exit(await client.run());
