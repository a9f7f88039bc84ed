/**
 * `deno task forward [--config user.toml] [--wait SECONDS] [BIND:]LOCAL_PORT CLIENT PORT`:
 * listens on BIND:LOCAL_PORT (default 127.0.0.1) and gives each connection its own tunnel
 * to port PORT of client CLIENT, over one logged-in user connection (logged in again if it
 * drops). For RDP, VNC, a web console.
 * @module
 */
import { die } from "../src/cli.ts";
import { ConfigError, loadUserConfig } from "../src/config.ts";
import { log, setupLogging } from "../src/log.ts";
import { acceptLoop } from "../src/accept.ts";
import { relay } from "../src/mux.ts";
import { ConnStream } from "../src/transport.ts";
import {
  EXIT_LOGIN_REFUSED,
  EXIT_UNREACHABLE,
  EXIT_USAGE,
  parseUserCommand,
  portArgument,
  UserLink,
  UserRefusedError,
} from "../src/user_link.ts";

const PROGRAM = "natadm-forward";
const HELP = `
Usage: forward.ts [--config FILE] [--wait SECONDS] [BIND:]LOCAL_PORT CLIENT PORT

Logs in to the NATadm server as the user named in FILE, listens on BIND:LOCAL_PORT
(BIND defaults to 127.0.0.1) and gives each connection there its own tunnel to port
PORT of client CLIENT, all on one connection to the server.

  -c, --config FILE     user config: name, remote, cafile, key (default: user.toml)
      --wait SECONDS    let each tunnel wait up to SECONDS for a client that is not
                        connected (default 0: refuse at once)
      --log-level LEVEL trace, debug, info (default), warning, error, fatal
      --log-format FMT  text (default) or json
  -h, --help            show this help
  -V, --version         show the version

Exit codes: 1 the server could not be reached; 2 bad arguments or config, or the local
port cannot listen; 3 the server refused the login.
`;

const logger = log("forward");
const options = parseUserCommand(PROGRAM, Deno.args, HELP, ["LOCAL_PORT", "CLIENT", "PORT"]);
const [local, client, portText] = options.args;
const split = local.lastIndexOf(":");
const bind = split < 0 ? "127.0.0.1" : local.slice(0, split).replace(/^\[(.*)\]$/, "$1");
const localPort = portArgument(PROGRAM, "LOCAL_PORT", local.slice(split + 1));
const port = portArgument(PROGRAM, "PORT", portText);
const config = await loadUserConfig(options.config).catch((err) =>
  die(PROGRAM, err instanceof ConfigError ? err.message : String(err), EXIT_USAGE)
);
await setupLogging(options.logLevel ?? config.logLevel ?? "info", options.logFormat);

const fail = (err: unknown): never =>
  die(
    PROGRAM,
    (err as Error).message,
    err instanceof UserRefusedError ? EXIT_LOGIN_REFUSED : EXIT_UNREACHABLE,
  );
let link: UserLink = await UserLink.open(config).catch(fail);
let opening: Promise<UserLink> | undefined;

/** The logged-in link, logging in again if the last one dropped. */
function current(): Promise<UserLink> {
  if (!link.closed) return Promise.resolve(link);
  opening ??= UserLink.open(config).then((next) => {
    logger.info("logged in again as {name}", { name: config.name });
    return link = next;
  }).finally(() => opening = undefined);
  return opening;
}

let listener: Deno.Listener;
try {
  listener = Deno.listen({ hostname: bind, port: localPort });
} catch (err) {
  die(PROGRAM, `cannot listen on ${bind}:${localPort}: ${(err as Error).message}`, EXIT_USAGE);
}
logger.info("forwarding {bind}:{local} to client {client} port {port} as user {name}", {
  bind,
  local: localPort,
  client,
  port,
  name: config.name,
});

async function serve(conn: Deno.Conn): Promise<void> {
  (conn as Deno.TcpConn).setNoDelay(true);
  const user = new ConnStream(conn);
  let stream;
  try {
    stream = (await current()).tunnel(client, port, options.wait);
  } catch (err) {
    user.close();
    logger.warn("connection from {remote} closed: {error}", {
      remote: user.remote,
      error: (err as Error).message,
    });
    return;
  }
  const result = await relay(user, stream);
  if (result.error && result.received === 0) {
    logger.warn("connection from {remote} refused: {reason}", {
      remote: user.remote,
      reason: result.error.message,
    });
  } else {
    logger.info("connection from {remote} closed; {up} bytes up, {down} bytes down", {
      remote: user.remote,
      up: result.sent,
      down: result.received,
    });
  }
}

await acceptLoop(listener, (conn) => void serve(conn), `local port ${localPort}`);
