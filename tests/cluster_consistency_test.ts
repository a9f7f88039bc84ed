/**
 * Two servers of a cluster that disagree about the registry: one is cut off from etcd (its
 * etcd endpoint is a proxy the test cuts) while the others see a change. The cut-off server
 * learns the change from its peers, so a removed client's key is served nowhere for longer
 * than the watch delay.
 */
import assert from "node:assert/strict";
import { randomBytes, Scope, waitUntil } from "./helpers.ts";
import { FaultProxy } from "./faultproxy.ts";
import { echoes, heldBy, type Member, setup, SKIP, type TestCluster } from "./cluster_helpers.ts";
import { WATCH_DELAY_MS } from "../src/registry_sync.ts";

const ignore = SKIP !== undefined;
if (ignore) console.warn(`cluster_consistency_test: skipped: ${SKIP}`);

/** What member `m`'s status page says of its registry and of client `name`. */
async function view(env: TestCluster, m: Member, name: string) {
  const response = await fetch(`http://127.0.0.1:${m.statusPort}/status.json`, {
    signal: AbortSignal.timeout(2000),
  });
  const status = await response.json();
  return {
    etcd: status.registry.connected as boolean,
    revision: status.registry.revision as number,
    connected: status.clients.some((c: { name: string; connected: boolean }) =>
      c.name === name && c.connected
    ),
    held: (await env.cluster(m)).held[name] ?? [],
  };
}

/** Whether nothing listens on `host:port`. */
async function refused(host: string, port: number): Promise<boolean> {
  try {
    const conn = await Deno.connect({ hostname: host, port });
    conn.close();
    return false;
  } catch (err) {
    if (err instanceof Deno.errors.ConnectionRefused) return true;
    throw err;
  }
}

Deno.test({
  name: "a server cut off from etcd takes a removal from its peers: the removed client is " +
    "logged out and its port closed everywhere within the watch delay, and nothing reverts " +
    "when etcd returns",
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      let proxy: FaultProxy | undefined;
      const env = await setup(scope, {
        etcdUrl: (i, etcd) => {
          if (i !== 2) return etcd.url;
          proxy = FaultProxy.start({ targetPort: etcd.clientPort });
          return `http://127.0.0.1:${proxy.port}`;
        },
      });
      scope.defer(() => proxy!.close());
      const [a, b, c] = env.members;
      const web = await env.fixture.identity("web");
      const port = await env.service(web);
      await env.start();
      const client = await env.client(web, [b]);
      await heldBy(env, a, "web", ["s2"]);
      await echoes(b.host, port, randomBytes(1024));
      await echoes(a.host, port, randomBytes(1024));

      // B loses etcd; A and C still hear it.
      await proxy!.refuse(true);
      proxy!.drop();
      await waitUntil(async () => !(await view(env, b, "web")).etcd, "B to say etcd is away");
      assert.ok((await view(env, a, "web")).etcd, "A still hears etcd");

      // The admin removes the service and the client. B cannot hear it from etcd.
      await env.admin("remove-service", String(port));
      await env.admin("remove-client", "web");
      const removed = performance.now();
      await b.program!.waitFor(
        /client "?web"? logged out: removed from the config/,
        WATCH_DELAY_MS,
      );
      for (const m of [a, b, c]) {
        await waitUntil(
          () => refused(m.host, port),
          `${m.id} to stop listening on ${port}`,
          Math.max(1, WATCH_DELAY_MS - (performance.now() - removed)),
        );
      }
      const took = performance.now() - removed;
      console.log(`the removal reached every server ${Math.round(took)} ms after the admin's`);
      assert.ok(took <= WATCH_DELAY_MS, `the removal took ${took} ms to reach every server`);
      // B knows it took the change from a peer, not from etcd.
      assert.ok(
        b.program!.lines.some((l) => /registry taken from peer/.test(l)),
        "B says where its registry came from",
      );
      // The client's key opens no session anywhere: its retries are refused.
      await client.waitFor(/refused|not (known|in the config)|unknown client/i);
      for (const m of [a, b, c]) assert.equal((await view(env, m, "web")).connected, false);

      // etcd comes back to B: the watch replays what B already took, and nothing reverts.
      await proxy!.refuse(false);
      await waitUntil(async () => (await view(env, b, "web")).etcd, "B to hear etcd again");
      const [va, vb] = [await view(env, a, "web"), await view(env, b, "web")];
      assert.ok(vb.revision >= va.revision - 2, `B caught up: ${vb.revision} vs ${va.revision}`);
      assert.equal(vb.connected, false);
      assert.ok(await refused(b.host, port), "B's port for the removed service stays closed");
    } finally {
      await scope.close();
    }
  },
});
