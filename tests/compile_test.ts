import assert from "node:assert/strict";
import { ROOT } from "./helpers.ts";

/** Runs `deno task compile` once; both tests below read its outcome. */
const run = await new Deno.Command(Deno.execPath(), {
  args: ["task", "compile"],
  cwd: ROOT,
  stdout: "piped",
  stderr: "piped",
}).output();
const stderr = new TextDecoder().decode(run.stderr);
const unavailable = run.code !== 0 && /could not download the Deno runtime/.test(stderr);
if (unavailable) {
  console.log("compile: skipped building binaries: deno compile cannot download its runtime here");
}

Deno.test({
  name: "deno task compile builds both programs, and they print their version",
  ignore: unavailable,
  async fn() {
    assert.equal(run.code, 0, stderr);
    for (const name of ["natadm-server", "natadm-client"]) {
      const out = await new Deno.Command(`${ROOT}dist/${name}`, { args: ["--version"] }).output();
      assert.equal(out.code, 0);
      assert.match(new TextDecoder().decode(out.stdout), /natadm-(server|client) \d+\.\d+\.\d+/);
    }
  },
});

Deno.test({
  name: "deno task compile fails with one clear line when the runtime cannot be downloaded",
  ignore: !unavailable,
  fn() {
    assert.notEqual(run.code, 0);
    const ours = stderr.split("\n").filter((l) => l.startsWith("natadm-compile:"));
    assert.equal(ours.length, 1, stderr);
    assert.match(ours[0], /DENORT_BIN/);
  },
});
