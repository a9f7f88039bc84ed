/**
 * NATadm client entrypoint: `deno task client [--config client.toml]`.
 * @module
 */
import { die, onShutdown, parseCommon } from "./src/cli.ts";
import { ConfigError, loadClientConfig } from "./src/config.ts";
import { setupLogging } from "./src/log.ts";
import { clientsFor, describeError } from "./src/client.ts";
import { clientPermissions, formatPermissions } from "./src/permissions.ts";

const HELP = `
Usage: client.ts [--config FILE] [--log-level LEVEL] [--log-format text|json]
                 [--check] [--print-permissions]

Runs the NATadm client: keeps a TLS control connection to the server named by "remote"
and, when a user connects to one of this client's services there, bridges that user to
the local port.

  -c, --config FILE     client config (default: client.toml)
      --log-level LEVEL trace, debug, info (default), warning, error, fatal
      --log-format FMT  text (default) or json
      --check           connect once, authenticate, print the services this client
                        serves on that server, and exit (0 on success)
      --print-permissions
                        print the exact Deno permission flags this config needs, one per
                        line, and exit
  -h, --help            show this help
  -V, --version         show the version

SIGINT/SIGTERM stop reconnecting and let live tunnels finish for shutdown_grace seconds;
a second signal, a second or more after the first, exits at once.
`;

const options = parseCommon("natadm-client", Deno.args, "client.toml", HELP, [
  "check",
  "print-permissions",
]);
const config = await loadClientConfig(options.config).catch((err) =>
  die("natadm-client", err instanceof ConfigError ? err.message : String(err))
);
if (options.flags.has("print-permissions")) {
  console.log(formatPermissions(clientPermissions(config)));
  Deno.exit(0);
}
await setupLogging(options.logLevel ?? config.logLevel ?? "info", options.logFormat);
const clients = clientsFor(config);
if (options.flags.has("check")) {
  for (const [i, client] of clients.entries()) {
    const [host, port] = config.remotes[i];
    const services = await client.check().catch((err) =>
      die("natadm-client", describeError(err, host, port))
    );
    console.log(`Authenticated to ${host}:${port} as "${config.name}".`);
    if (services.length === 0) console.log("The server routes no services to this client.");
    for (const s of services) {
      console.log(`  server port ${s.port} → ${s.host}:${s.target_port} on this machine`);
    }
  }
  Deno.exit(0);
}
onShutdown(() => {
  for (const client of clients) client.stop();
}, () => clients[0].liveTunnels);
// Each server's session runs on its own; the process ends with the worst exit code.
const codes = await Promise.all(clients.map((client) => client.run()));
Deno.exit(Math.max(...codes));
