/**
 * Logs redirected to a file or pipe carry no colour codes. NATadm's own lines never do; the
 * only coloured line is `deno task`'s own "Task …" banner, which NO_COLOR (or `deno task -q`)
 * turns plain.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { connectUser, ROOT } from "./helpers.ts";
import { spawnInGroup } from "./process_group.ts";
import { exchange, randomBytes, setup } from "./reliability_helpers.ts";

const ESC = "\x1b";

for (const noColor of [true, false]) {
  const how = noColor ? "with NO_COLOR=1, nothing is coloured" : "only deno task's banner is";
  Deno.test(`deno task server, stderr redirected: ${how}`, async () => {
    const env = await setup();
    try {
      const server = await spawnInGroup("env", [
        ...(noColor ? ["NO_COLOR=1"] : ["-u", "NO_COLOR"]),
        Deno.execPath(),
        "task",
        "--config",
        join(ROOT, "deno.json"),
        "server",
        "--config",
        env.serverConfig,
      ]);
      env.scope.track(server.process);
      env.scope.defer(() => server.killGroup());
      await server.process.waitFor(/NATadm server ready/);
      await env.startClient();
      const user = await connectUser(env.clients[0].servicePort);
      const payload = randomBytes(100);
      assert.equal((await exchange(user, payload)).ended, "complete");
      user.close();
      await server.process.waitFor(/tunnel closed/);
      Deno.kill(-server.pgid, "SIGTERM");
      const { stderr } = await server.process.result(10_000);
      const coloured = stderr.split("\n").filter((line) => line.includes(ESC));
      if (noColor) {
        assert.deepEqual(coloured, [], "coloured lines under NO_COLOR");
      } else {
        assert.ok(coloured.length <= 1, `coloured lines:\n${coloured.join("\n")}`);
        for (const line of coloured) assert.match(line, /Task.*server/);
      }
      assert.match(stderr, /INF\] natadm·server: tunnel closed/);
    } finally {
      await env.scope.close();
    }
  });
}
