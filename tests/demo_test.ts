/**
 * `deno task demo`: it starts everything, tells the user what to try, that works, and every way
 * of stopping it (Ctrl-C, SIGTERM, a closed terminal, even SIGKILL) stops all it started and
 * removes its temp dir, which holds private keys.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { connectRefused, Program, ROOT, Scope, waitUntil } from "./helpers.ts";
import { followers, groupAlive, spawnInGroup } from "./process_group.ts";

const DEMO_PERMISSIONS = [
  "--allow-net",
  "--allow-read",
  "--allow-write",
  "--allow-run",
  "--allow-env",
];

Deno.test("demo: a page through the tunnel; Ctrl-C stops it promptly and cleans up", async () => {
  const scope = new Scope();
  let dir: string | undefined;
  try {
    const demo = scope.track(new Program("cmd/demo.ts", [], DEMO_PERMISSIONS));
    const [, port] = await demo.waitForStdout(/curl http:\/\/localhost:(\d+)\/hello/, 40_000);
    dir = demo.stdout.match(/are in (\S+)/)?.[1];
    assert.ok(dir, `no temp dir in:\n${demo.stdout}`);
    assert.ok((await Deno.stat(dir)).isDirectory);

    // Our own HTTP client, closed after use: a pooled keep-alive connection would hold a
    // tunnel open and make the demo wait out its shutdown grace.
    const http = Deno.createHttpClient({});
    const response = await fetch(`http://127.0.0.1:${port}/x`, {
      client: http,
      signal: AbortSignal.timeout(10_000),
    });
    const body = await response.text();
    http.close();
    assert.equal(response.status, 200);
    assert.match(body, /behind NAT/);
    assert.match(body, /You asked for \/x/);

    const stopping = performance.now();
    demo.kill("SIGINT");
    const { code, stderr } = await demo.result();
    const stopMs = performance.now() - stopping;
    assert.equal(code, 0, stderr);
    await assert.rejects(Deno.stat(dir), Deno.errors.NotFound, `${dir} was not removed`);
    // The demo's server went with it: nothing serves the web port any more.
    assert.ok(await connectRefused(Number(port)), `port ${port} still open after the demo`);
    // No user tunnel is live (ours is closed), so nothing should hold Ctrl-C up.
    assert.ok(stopMs < 5_000, `Ctrl-C took ${Math.round(stopMs)} ms:\n${stderr}`);
  } finally {
    await scope.close();
    if (dir) await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

/**
 * The demo in a process group of its own, as a terminal runs it, serving: its web and echo
 * ports, its temp dir, and the processes it started.
 */
async function runningDemo(scope: Scope, viaTask: boolean) {
  const demo = await spawnInGroup(
    Deno.execPath(),
    viaTask
      ? ["task", "--config", join(ROOT, "deno.json"), "demo"]
      : ["run", ...DEMO_PERMISSIONS, join(ROOT, "cmd/demo.ts")],
  );
  scope.track(demo.process);
  scope.defer(() => demo.killGroup()); // first: a child left over holds the demo's stdout open
  const [, web] = await demo.process.waitForStdout(/curl http:\/\/localhost:(\d+)\/hello/, 40_000);
  const [, echo] = await demo.process.waitForStdout(/nc localhost (\d+)/);
  const dir = demo.process.stdout.match(/are in (\S+)/)?.[1];
  assert.ok(dir, `no temp dir in:\n${demo.process.stdout}`);
  scope.defer(() => Deno.remove(dir, { recursive: true }).catch(() => {}));
  assert.ok((await Deno.stat(dir)).isDirectory);
  const started = followers(demo.pgid);
  assert.ok(started.length >= 2, `the demo started ${started.length} processes, not 2 or more`);
  return { ...demo, ports: [Number(web), Number(echo)], dir, started };
}

/** Asserts that everything the demo started is gone: processes, ports, temp dir (keys). */
async function assertAllGone(demo: Demo, how: string) {
  await waitUntil(
    () => !groupAlive(demo.pgid),
    () => `every process of the demo to exit after ${how}; left: ${followers(demo.pgid)}`,
    15_000,
  );
  for (const port of demo.ports) {
    assert.ok(await connectRefused(port), `port ${port} still open after ${how}`);
  }
  await assert.rejects(Deno.stat(demo.dir), Deno.errors.NotFound, `${demo.dir} left after ${how}`);
}

type Demo = Awaited<ReturnType<typeof runningDemo>>;

/** Ways to stop the demo: how, whether it runs under `deno task`, and the stop itself. */
const STOPS: [string, boolean, (demo: Demo) => void][] = [
  // The terminal signals deno task and the demo, and deno task forwards its SIGINT as well.
  ["Ctrl-C on deno task demo (SIGINT to its process group)", true, (d) => {
    Deno.kill(-d.pgid, "SIGINT");
  }],
  ["SIGINT to its process group", false, (d) => Deno.kill(-d.pgid, "SIGINT")],
  ["SIGTERM to the demo", false, (d) => Deno.kill(d.pgid, "SIGTERM")],
  ["a closed terminal (SIGHUP to its process group)", false, (d) => Deno.kill(-d.pgid, "SIGHUP")],
  ["SIGKILL to the demo alone", false, (d) => Deno.kill(d.pgid, "SIGKILL")],
];

for (const [how, viaTask, stop] of STOPS) {
  Deno.test(`demo: ${how} stops every process it started and removes its keys`, async () => {
    const scope = new Scope();
    try {
      const demo = await runningDemo(scope, viaTask);
      stop(demo);
      await assertAllGone(demo, how);
    } finally {
      await scope.close();
    }
  });
}
