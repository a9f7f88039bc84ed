/**
 * A cluster and its registry in etcd under change and failure: `deno task admin` changing the
 * registry while three servers run, etcd stopped and started again under live users, and a
 * named user's `connect` forwarded from the server it reached to the one that holds the
 * client. A real etcd, three real server.ts on 127.0.0.1/.2/.3, real client.ts and
 * cmd/connect.ts. Skipped, saying why, when the `etcd` binary is not installed.
 */
import assert from "node:assert/strict";
import { escapeRegExp, freePort, randomBytes, runScript, Scope, waitUntil } from "./helpers.ts";
import {
  echoes,
  heldBy,
  longUser,
  type Member,
  setup,
  SKIP,
  type TestCluster,
} from "./cluster_helpers.ts";

const ignore = SKIP !== undefined;
if (ignore) console.warn(`cluster_registry_test: skipped: ${SKIP}`);

/** How soon a registry change must be in force on every running server (the bound). */
const APPLY_MS = 2000;

/** A member's whole `/status.json`, as far as these tests read it. */
interface Status {
  registry: { source: string; connected: boolean; revision: number | null; error: string | null };
  clients: { name: string; connected: boolean }[];
  services: { port: number; client: string }[];
  tunnels: { client: string; by: string; via: string | null; service: number }[];
  users: { name: string; connected: boolean; tunnels: { client: string; port: number }[] }[];
  cluster: { held: Record<string, string[]>; forwarded: number; forwarded_total: number };
}

/** Member `m`'s `/status.json`. */
async function status(m: Member): Promise<Status> {
  const response = await fetch(`http://127.0.0.1:${m.statusPort}/status.json`, {
    signal: AbortSignal.timeout(2000),
  });
  return await response.json();
}

/** Whether `host:port` accepts a TCP connection now. */
async function accepts(host: string, port: number): Promise<boolean> {
  try {
    const conn = await Deno.connect({ hostname: host, port });
    conn.close();
    return true;
  } catch {
    return false;
  }
}

/**
 * Waits until `check(m)` holds on every member, polling each on its own; returns the ms each
 * took from `since` (a `performance.now()`), by member id.
 */
async function onEvery(
  members: Member[],
  check: (m: Member) => Promise<boolean>,
  what: string,
  since: number,
  timeoutMs: number,
): Promise<Record<string, number>> {
  const took: Record<string, number> = {};
  await Promise.all(members.map(async (m) => {
    await waitUntil(() => check(m), `${what} on ${m.id} (${m.host})`, timeoutMs);
    took[m.id] = Math.round(performance.now() - since);
  }));
  return took;
}

/** Echoes fresh random bytes through `port` at every member's host. */
async function servedAtEvery(env: TestCluster, port: number, size = 16 * 1024): Promise<void> {
  for (const m of env.members) await echoes(m.host, port, randomBytes(size));
}

Deno.test({
  name: "deno task admin adds a client and a service while three servers run: within 2 s every " +
    "server listens on the new port, and the new client connects and is served through each; " +
    "removing the client logs it out everywhere",
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      const env = await setup(scope);
      const [a, b, c] = env.members;
      await env.start();

      const web = await env.fixture.identity("web");
      const port = freePort();
      await env.admin("add-client", "web", "--key", web.publicKey);
      const asked = performance.now();
      await env.admin(
        "add-service",
        String(port),
        "--client",
        "web",
        "--port",
        String(env.echo.port),
      );
      const added = performance.now();
      const listening = await onEvery(
        env.members,
        (m) => accepts(m.host, port),
        `service port ${port} to listen`,
        added,
        APPLY_MS,
      );
      console.log(
        `new port listening, ms after admin add-service returned:`,
        listening,
        `(the command itself took ${Math.round(added - asked)} ms)`,
      );
      for (const [id, ms] of Object.entries(listening)) {
        assert.ok(ms <= APPLY_MS, `${id} listened on ${port} after ${ms} ms`);
      }

      const client = await env.client(web, [a, b]);
      for (const m of env.members) await heldBy(env, m, "web", ["s1", "s2"]);
      await servedAtEvery(env, port);
      // C holds no session of "web": its user goes over a peer link, A's and B's do not.
      for (const m of env.members) {
        const user = await longUser(m.host, port);
        scope.closing(user.conn);
        await user.check(`a user at ${m.id}\n`);
        const live = (await status(m)).tunnels.filter((t) => t.service === port);
        assert.equal(live.length, 1, `${m.id}: ${JSON.stringify(live)}`);
        if (m === c) assert.ok(["s1", "s2"].includes(live[0].via!), `via ${live[0].via}`);
        else assert.equal(live[0].via, null, `${m.id} served its user itself`);
        user.conn.close();
      }

      // A client that a service names cannot go: the service goes first, on every server.
      const named = await runScript("cmd/admin.ts", [
        "--etcd",
        env.etcd.url,
        "remove-client",
        "web",
      ]);
      assert.equal(named.code, 1, named.stderr);
      assert.match(named.stderr, new RegExp(`services/${port}: name: no client "web"`));
      await env.admin("remove-service", String(port));
      const removedService = performance.now();
      const closed = await onEvery(
        env.members,
        async (m) => !(await accepts(m.host, port)),
        `service port ${port} to stop listening`,
        removedService,
        APPLY_MS,
      );
      console.log(`port closed, ms after admin remove-service returned:`, closed);

      await env.admin("remove-client", "web");
      const removedClient = performance.now();
      const loggedOut = await onEvery(
        env.members,
        async (m) => {
          const s = await status(m);
          return s.cluster.held.web === undefined && !s.clients.some((x) => x.name === "web");
        },
        `"web" to be held nowhere and unknown`,
        removedClient,
        APPLY_MS,
      );
      console.log(`client logged out, ms after admin remove-client returned:`, loggedOut);
      // The servers it was attached to logged it out and told it why.
      for (const m of [a, b]) {
        await m.program!.waitFor(/client "?web"? logged out: removed from the config/, 0);
        await client.waitFor(
          new RegExp(
            `server ${escapeRegExp(m.host)}:${m.communicationPort} refused this client: ` +
              `this client was removed from the server's config`,
          ),
          APPLY_MS,
        );
      }
      // It keeps trying (infinite = true), and its next login is refused by name everywhere.
      for (const m of [a, b]) {
        await client.waitFor(
          new RegExp(
            `server ${escapeRegExp(m.host)}:${m.communicationPort} refused this client: ` +
              `unknown client name "web"`,
          ),
        );
      }
      for (const m of env.members) {
        assert.equal((await status(m)).cluster.held.web, undefined, `${m.id} holds web again`);
      }
    } finally {
      await scope.close();
    }
  },
});
