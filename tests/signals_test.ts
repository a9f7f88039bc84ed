/**
 * Stopping the server and client as an operator does: Ctrl-C on `deno task server` (a SIGINT
 * to the whole process group, which `deno task` forwards once more) is one request for a
 * graceful shutdown, and only a signal well after it cuts the live tunnels.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { connectUser, Process, ROOT, waitUntil } from "./helpers.ts";
import { exchange, randomBytes, setup } from "./reliability_helpers.ts";
import { SAME_SIGNAL_MS } from "../src/cli.ts";

/** Sends a little through an open tunnel and checks it comes back. */
async function roundTrip(user: Deno.Conn, size = 2000): Promise<void> {
  const payload = randomBytes(size);
  const { received, ended } = await exchange(user, payload, { timeoutMs: 10_000 });
  assert.equal(ended, "complete", `round trip through a live tunnel: ${ended}`);
  assert.deepEqual(received, payload);
}

/** The process group of `pid`, from /proc (field 5 of stat, after the command in parentheses). */
function processGroup(pid: number): number | undefined {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[2]);
  } catch {
    return undefined; // gone
  }
}

/** Processes in group `pgid` other than its leader. */
function followers(pgid: number): number[] {
  const pids: number[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    const pid = Number(entry.name);
    if (Number.isInteger(pid) && pid !== pgid && processGroup(pid) === pgid) pids.push(pid);
  }
  return pids;
}

/** Whether any process is left in process group `pgid`. */
function groupAlive(pgid: number): boolean {
  try {
    Deno.kill(-pgid, "SIGCONT"); // harmless to a running process; fails if none is left
    return true;
  } catch {
    return false;
  }
}

/**
 * `deno task ROLE --config FILE` in a session and process group of its own, as a terminal
 * runs it: the returned group id is what a terminal's Ctrl-C signals.
 */
async function denoTask(
  role: "server" | "client",
  config: string,
): Promise<{ task: Process; pgid: number }> {
  const task = new Process("setsid", [
    Deno.execPath(),
    "task",
    "--config",
    join(ROOT, "deno.json"),
    role,
    "--config",
    config,
  ]);
  // setsid makes its own process the leader of a new group, then runs deno task in it.
  await waitUntil(() => processGroup(task.pid) === task.pid, "setsid to start a group", 5000);
  return { task, pgid: task.pid };
}

for (const role of ["server", "client"] as const) {
  Deno.test(`Ctrl-C on deno task ${role}: one shutdown, the live tunnel runs on through shutdown_grace`, async () => {
    const extra = "shutdown_grace = 30\n";
    const env = await setup(role === "server" ? { serverExtra: extra } : { clientExtra: extra });
    let pgid: number | undefined;
    try {
      const started = role === "server"
        ? await denoTask("server", env.serverConfig)
        : (await env.startServer(), await denoTask("client", env.clients[0].config));
      pgid = started.pgid;
      const { task } = started;
      env.scope.defer(() => groupAlive(pgid!) && Deno.kill(-pgid!, "SIGKILL"));
      env.scope.track(task);
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
      await waitUntil(() => !groupAlive(pgid!), `process group ${pgid} to be gone`, 5000);
    } finally {
      await env.scope.close();
    }
  });
}
