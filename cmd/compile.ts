/**
 * `deno task compile [--server-config FILE] [--client-config FILE]`: self-contained
 * `dist/natadm-server` and `dist/natadm-client` built with `deno compile`. With a config, the
 * binary gets exactly the permissions that config needs (as `--print-permissions` says);
 * without, `--allow-net --allow-read`. `deno compile` downloads the runtime it embeds; where
 * that download is impossible this fails with one clear line.
 * @module
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { die } from "../src/cli.ts";
import { loadClientConfig, loadServerConfig } from "../src/config.ts";
import { clientPermissions, serverPermissions } from "../src/permissions.ts";

const BROAD = ["--allow-net", "--allow-read"];

let values;
try {
  ({ values } = parseArgs({
    args: Deno.args,
    options: {
      "server-config": { type: "string" },
      "client-config": { type: "string" },
    },
  }));
} catch (err) {
  die("natadm-compile", (err as Error).message, 2);
}
const fail = (err: unknown) => die("natadm-compile", (err as Error).message);
const targets = [
  {
    script: "server.ts",
    output: "natadm-server",
    permissions: values["server-config"]
      ? serverPermissions(await loadServerConfig(values["server-config"]).catch(fail))
      : BROAD,
  },
  {
    script: "client.ts",
    output: "natadm-client",
    permissions: values["client-config"]
      ? clientPermissions(await loadClientConfig(values["client-config"]).catch(fail))
      : BROAD,
  },
];

const root = new URL("..", import.meta.url).pathname;
for (const target of targets) {
  const output = join(root, "dist", target.output);
  const { code, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["compile", ...target.permissions, "--output", output, join(root, target.script)],
    stdout: "null",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(stderr);
  if (code !== 0) {
    if (/base binary|denort|error sending request|dns error/i.test(text)) {
      die(
        "natadm-compile",
        "deno compile could not download the Deno runtime it embeds (no route to its " +
          "download host); set DENORT_BIN to a local denort binary or build on a connected machine",
      );
    }
    die(
      "natadm-compile",
      `deno compile failed for ${target.script}: ${text.trim().split("\n").pop()}`,
    );
  }
  console.log(`Built ${output} (${target.permissions.join(" ")})`);
}
