/**
 * `deno task demo`: it starts everything, tells the user what to try, that works, and Ctrl-C
 * stops it all and removes its temp dir.
 */
import assert from "node:assert/strict";
import { connectRefused, Program, Scope } from "./helpers.ts";

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
