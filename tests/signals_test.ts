/**
 * Stopping the server and client as an operator does: Ctrl-C on `deno task server` (a SIGINT
 * to the whole process group, which `deno task` forwards once more) is one request for a
 * graceful shutdown, and only a signal well after it cuts the live tunnels.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { connectUser, ROOT, waitUntil } from "./helpers.ts";
import { followers, groupAlive, type GroupProcess, spawnInGroup } from "./process_group.ts";
import { exchange, randomBytes, setup } from "./reliability_helpers.ts";
import { SAME_SIGNAL_MS } from "../src/cli.ts";

/** Sends a little through an open tunnel and checks it comes back. */
async function roundTrip(user: Deno.Conn, size = 2000): Promise<void> {
  const payload = randomBytes(size);
  const { received, ended } = await exchange(user, payload, { timeoutMs: 10_000 });
  assert.equal(ended, "complete", `round trip through a live tunnel: ${ended}`);
  assert.deepEqual(received, payload);
}

/** `deno task ROLE --config FILE` in a process group of its own, as a terminal runs it. */
function denoTask(role: "server" | "client", config: string): Promise<GroupProcess> {
  const deno = Deno.execPath();
  return spawnInGroup(deno, [
    "task",
    "--config",
    join(ROOT, "deno.json"),
    role,
    "--config",
    config,
  ]);
}

for (const role of ["server", "client"] as const) {
  Deno.test(`Ctrl-C on deno task ${role}: one shutdown, the live tunnel runs on through shutdown_grace`, async () => {
    const extra = "shutdown_grace = 30\n";
    const env = await setup(role === "server" ? { serverExtra: extra } : { clientExtra: extra });
    try {
      const started = role === "server"
        ? await denoTask("server", env.serverConfig)
        : (await env.startServer(), await denoTask("client", env.clients[0].config));
      const { process: task, pgid } = started;
      env.scope.track(task);
      env.scope.defer(() => started.killGroup()); // first: a child left over holds our pipes
      if (role === "server") {
        await task.waitFor(/NATadm server ready/);
        await env.startClient();
      } else {
        await task.waitFor(/connected to .* as/);
      }
      const user = env.scope.closing(await connectUser(env.clients[0].servicePort));
      await roundTrip(user);

      const signalled = performance.now();
      Deno.kill(-pgid, "SIGINT"); // the terminal's Ctrl-C: deno task and the program both get it
      await task.waitFor(/shutting down: waiting up to 30 s for 1 live tunnels/);
      // deno task forwards the SIGINT to the program, which may come after the terminal's
      // one was handled, or merge with it; this one surely comes after.
      const [program] = followers(pgid);
      assert.ok(program, `no program under deno task in group ${pgid}`);
      Deno.kill(program, "SIGINT");
      // Past the window in which a second signal is the same Ctrl-C: the tunnel still works.
      while (performance.now() - signalled < SAME_SIGNAL_MS + 500) {
        await roundTrip(user, 10_000);
        assert.ok(!task.exited, `deno task ${role} exited during shutdown_grace`);
      }
      user.close();
      const { code, stderr } = await task.result(10_000);
      assert.doesNotMatch(stderr, /exiting at once/);
      assert.equal(code, 0, stderr);
      await waitUntil(() => !groupAlive(pgid), `process group ${pgid} to be gone`, 5000);
    } finally {
      await env.scope.close();
    }
  });
}
