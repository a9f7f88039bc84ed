/**
 * Several servers as one: a real etcd, three real server.ts on loopback (127.0.0.1, .2, .3,
 * each with its own ports and the same service ports), peer links with certificates of one CA,
 * and real client.ts attached to one or several of them. Skipped, saying why, when the `etcd`
 * binary is not installed.
 */
import assert from "node:assert/strict";
import { DEADLINE_MS, randomBytes, Scope, waitUntil } from "./helpers.ts";
import { LEASE_TTL_S } from "../src/cluster.ts";
import { echoes, heldBy, INTERVAL_S, longUser, setup, SKIP } from "./cluster_helpers.ts";

const ignore = SKIP !== undefined;
if (ignore) console.warn(`cluster_test: skipped: ${SKIP}`);

Deno.test({
  name: "a client attached only to server B is reached by users at server A's service port, " +
    "byte-exact under 100 concurrent users",
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      const env = await setup(scope);
      const [a, b] = env.members;
      const web = await env.fixture.identity("web");
      const port = await env.service(web);
      await env.start();
      await env.client(web, [b]);
      await heldBy(env, a, "web", ["s2"]);
      const payloads = Array.from({ length: 100 }, () => randomBytes(48 * 1024));
      await Promise.all(payloads.map((bytes) => echoes(a.host, port, bytes)));
      const status = await env.cluster(a);
      assert.equal(status.forwarded_total, 100, "every user at A was forwarded to B");
      // The users never learn where the client is: A's port served them, nothing else.
      assert.deepEqual(status.members, ["s1", "s2", "s3"]);
    } finally {
      await scope.close();
    }
  },
});

Deno.test({
  name: "kill -9 one server: clients attached to several servers keep being served through " +
    "the others within interval + 2 s, tunnels elsewhere run on, and status shows the cluster",
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      const env = await setup(scope);
      const [a, b, c] = env.members;
      const [
        { identity: multi, port: multiPort },
        { identity: pair, port: pairPort },
        { identity: solo, port: soloPort },
      ] = await env.clients("multi", "pair", "solo");
      await env.start();
      await env.client(multi, [a, b, c]);
      await env.client(pair, [b, c]);
      await env.client(solo, [b]);
      await heldBy(env, a, "multi", ["s1", "s2", "s3"]);
      await heldBy(env, a, "pair", ["s2", "s3"]);
      await heldBy(env, a, "solo", ["s2"]);
      // Status: members, and who holds what, as every member sees it.
      const before = await env.cluster(a);
      assert.equal(before.self, "s1");
      assert.deepEqual(before.members, ["s1", "s2", "s3"]);
      // Tunnels that do not touch the server about to die: forwarded A → B, and local at A.
      const forwarded = await longUser(a.host, soloPort);
      scope.closing(forwarded.conn);
      await forwarded.check("before the kill\n");
      const local = await longUser(a.host, multiPort);
      scope.closing(local.conn);
      await local.check("before the kill\n");
      assert.equal((await env.cluster(a)).forwarded, 1, "one live tunnel forwarded from A");
      // Users of "pair" at A go through B or C; make sure both ways were in use.
      await Promise.all(
        Array.from({ length: 8 }, () => echoes(a.host, pairPort, randomBytes(1024))),
      );

      await c.program!.stop(); // SIGKILL: no goodbye, no lease revoked
      const killed = performance.now();
      const deadline = (INTERVAL_S + 2) * 1000;
      await waitUntil(
        async () => {
          try {
            await echoes(a.host, pairPort, randomBytes(4096));
            await echoes(b.host, multiPort, randomBytes(4096));
            await echoes(a.host, multiPort, randomBytes(4096));
            return true;
          } catch {
            return false;
          }
        },
        "users of pair and multi served through the others",
        deadline,
      );
      // Once they are served, they stay served: every user works, not just the lucky one.
      for (let i = 0; i < 10; i++) {
        await echoes(a.host, pairPort, randomBytes(4096));
        await echoes(b.host, multiPort, randomBytes(4096));
      }
      assert.ok(performance.now() - killed < deadline + DEADLINE_MS);
      // Nothing that was not on the dead server was interrupted.
      await forwarded.check("after the kill\n");
      await local.check("after the kill\n");
      // The dead server's records vanish with its lease.
      await heldBy(env, a, "pair", ["s2"], (LEASE_TTL_S + 3) * 1000);
      await heldBy(env, a, "multi", ["s1", "s2"], 2000);
      const after = await env.cluster(b);
      assert.deepEqual(after.members, ["s1", "s2"]);
    } finally {
      await scope.close();
    }
  },
});
