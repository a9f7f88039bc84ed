/**
 * `deno task install [--root DIR] [--force]`: `deno install -g` shims named natadm-server,
 * natadm-client, natadm-connect and natadm-forward that run this checkout's server.ts,
 * client.ts, cmd/connect.ts and cmd/forward.ts with only `--allow-net --allow-read`, into
 * DIR/bin (default: Deno's install root, $DENO_INSTALL_ROOT or ~/.deno).
 * @module
 */
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { die } from "../src/cli.ts";

const PROGRAM = "natadm-install";
const HELP = `
Usage: deno task install [--root DIR] [--force]

Installs four commands with \`deno install -g\`: natadm-server and natadm-client, which run
this checkout's server.ts and client.ts, and the admin's natadm-connect and natadm-forward
(cmd/connect.ts, cmd/forward.ts), all with --allow-net --allow-read and nothing more.
They go to DIR/bin (default: Deno's install root, $DENO_INSTALL_ROOT or ~/.deno). They run
the files of this directory and \`deno\` from PATH: keep both where they are.

      --root DIR   install into DIR/bin
  -f, --force      replace commands of the same names
  -h, --help       show this help
`;

/** The commands installed, and the one set of permissions both run with. */
const TARGETS = [
  { name: "natadm-server", script: "server.ts" },
  { name: "natadm-client", script: "client.ts" },
  { name: "natadm-connect", script: "cmd/connect.ts" },
  { name: "natadm-forward", script: "cmd/forward.ts" },
];
const PERMISSIONS = ["--allow-net", "--allow-read"];

let values;
try {
  ({ values } = parseArgs({
    args: Deno.args,
    options: {
      root: { type: "string" },
      force: { type: "boolean", short: "f" },
      help: { type: "boolean", short: "h" },
    },
  }));
} catch (err) {
  die(PROGRAM, `${(err as Error).message} (see --help)`, 2);
}
if (values.help) {
  console.log(HELP.trim());
  Deno.exit(0);
}
if (values.root === "") die(PROGRAM, "--root needs a directory", 2);

const root = new URL("..", import.meta.url).pathname;
/** Where `deno install -g` puts commands: DIR/bin for --root DIR, else its own default. */
const bin = join(
  resolve(
    values.root ?? Deno.env.get("DENO_INSTALL_ROOT") ?? join(Deno.env.get("HOME") ?? "~", ".deno"),
  ),
  "bin",
);
for (const target of TARGETS) {
  const { code, stderr } = await new Deno.Command(Deno.execPath(), {
    args: [
      "install",
      "--global",
      "--name",
      target.name,
      // The import map and lock of this checkout go with the shim.
      "--config",
      join(root, "deno.json"),
      ...(values.root ? ["--root", values.root] : []),
      ...(values.force ? ["--force"] : []),
      ...PERMISSIONS,
      join(root, target.script),
    ],
    stdout: "null",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(stderr).trim();
  if (code !== 0) {
    if (/existing installation/i.test(text)) {
      die(PROGRAM, `${target.name} is already installed there; use --force to replace it`);
    }
    die(PROGRAM, `deno install failed for ${target.name}: ${text.split("\n")[0]}`);
  }
  console.log(`Installed ${join(bin, target.name)} (${PERMISSIONS.join(" ")})`);
}
if (!(Deno.env.get("PATH") ?? "").split(":").includes(bin)) {
  console.log(`Add ${bin} to PATH to run them by name.`);
}
