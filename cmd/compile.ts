/**
 * `deno task compile`: self-contained `dist/natadm-server` and `dist/natadm-client` built with
 * `deno compile`, with each program's permissions baked in. `deno compile` downloads the
 * runtime it embeds; where that download is impossible this fails with one clear line.
 * @module
 */
import { join } from "node:path";
import { die } from "../src/cli.ts";

/** Permissions each program runs with; the same as its `deno task` entry. */
const TARGETS = [
  { script: "server.ts", output: "natadm-server", permissions: ["--allow-net", "--allow-read"] },
  { script: "client.ts", output: "natadm-client", permissions: ["--allow-net", "--allow-read"] },
];

const root = new URL("..", import.meta.url).pathname;
for (const target of TARGETS) {
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
