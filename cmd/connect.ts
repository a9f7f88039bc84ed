/**
 * `deno task connect [--config user.toml] [--wait SECONDS] CLIENT PORT`: logs in as a named
 * user and bridges stdin and stdout to port PORT of client CLIENT, made to be an ssh
 * `ProxyCommand`: stdout carries only the tunnel's bytes, everything else goes to stderr.
 * @module
 */
import { die } from "../src/cli.ts";
import { ConfigError, loadUserConfig } from "../src/config.ts";
import { setupLogging } from "../src/log.ts";
import {
  EXIT_LOGIN_REFUSED,
  EXIT_TUNNEL_REFUSED,
  EXIT_UNREACHABLE,
  EXIT_USAGE,
  parseUserCommand,
  portArgument,
  UserLink,
  UserRefusedError,
} from "../src/user_link.ts";

const PROGRAM = "natadm-connect";
const HELP = `
Usage: connect.ts [--config FILE] [--wait SECONDS] CLIENT PORT

Logs in to the NATadm server as the user named in FILE and bridges stdin and stdout to
port PORT of client CLIENT (as the client sees it: localhost:PORT there). Made to be an
ssh ProxyCommand:

  Host foo-bar
    ProxyCommand natadm-connect --config ~/.config/natadm/user.toml "foo bar" %p

  -c, --config FILE     user config: name, remote, cafile, key (default: user.toml)
      --wait SECONDS    wait up to SECONDS for a client that is not connected (default 0:
                        fail at once)
      --log-level LEVEL trace, debug, info, warning (default), error, fatal; on stderr
      --log-format FMT  text (default) or json
  -h, --help            show this help
  -V, --version         show the version

Exit codes: 0 the tunnel ended cleanly; 1 the server could not be reached or the tunnel
was cut; 2 bad arguments or config; 3 the server refused the login (unknown user, wrong
key); 4 the tunnel was refused (not allowed, client not connected, client refused the port).
`;

const options = parseUserCommand(PROGRAM, Deno.args, HELP, ["CLIENT", "PORT"]);
const [client, portText] = options.args;
const port = portArgument(PROGRAM, "PORT", portText);
const config = await loadUserConfig(options.config).catch((err) =>
  die(PROGRAM, err instanceof ConfigError ? err.message : String(err), EXIT_USAGE)
);
await setupLogging(options.logLevel ?? config.logLevel ?? "warning", options.logFormat);

const link = await UserLink.open(config).catch((err) =>
  die(
    PROGRAM,
    (err as Error).message,
    err instanceof UserRefusedError ? EXIT_LOGIN_REFUSED : EXIT_UNREACHABLE,
  )
);
const stream = link.tunnel(client, port, options.wait);

// stdin → tunnel, then a half-close: the far side sees the end of our input.
(async () => {
  const buf = new Uint8Array(64 * 1024);
  for (;;) {
    const n = await Deno.stdin.read(buf);
    if (n === null) break;
    await stream.write(buf.subarray(0, n)); // resolves once copied out: buf is free again
  }
  await stream.closeWrite();
})().catch(() => {});

// tunnel → stdout, until the far side ends its direction.
const buf = new Uint8Array(64 * 1024);
let received = 0;
try {
  for (;;) {
    const n = await stream.read(buf);
    if (n === null) break;
    received += n;
    for (let done = 0; done < n;) done += await Deno.stdout.write(buf.subarray(done, n));
  }
} catch (err) {
  const reason = (err as Error).message;
  // A reset before the first byte is the server's or the client's answer to the request.
  if (received === 0 && !link.closed) die(PROGRAM, reason, EXIT_TUNNEL_REFUSED);
  if (err instanceof UserRefusedError) die(PROGRAM, reason, EXIT_LOGIN_REFUSED);
  die(PROGRAM, `tunnel to "${client}":${port} cut: ${reason}`, EXIT_UNREACHABLE);
}
Deno.exit(0);
