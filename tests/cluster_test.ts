/**
 * Several servers as one: a real etcd, three real server.ts on loopback (127.0.0.1, .2, .3,
 * each with its own ports and the same service ports), peer links with certificates of one CA,
 * and real client.ts attached to one or several of them. Skipped, saying why, when the `etcd`
 * binary is not installed.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  DEADLINE_MS,
  firstDifference,
  Fixture,
  freePort,
  type Identity,
  type Program,
  randomBytes,
  readExactly,
  runScript,
  Scope,
  serverToml,
  startEcho,
  waitUntil,
  writeAll,
} from "./helpers.ts";
import { ETCD, Etcd } from "./etcd_server.ts";
import { generateCertificates } from "../src/certs.ts";
import { LEASE_TTL_S } from "../src/cluster.ts";

const ignore = ETCD === undefined;
if (ignore) console.warn("cluster_test: skipped: no `etcd` binary (apt-get install etcd-server)");

/** The clients' heartbeat and reconnect interval, in seconds. */
const INTERVAL_S = 1;

interface Member {
  id: string;
  host: string;
  communicationPort: number;
  statusPort: number;
  config: string;
  program?: Program;
}

interface ClusterStatus {
  self: string;
  members: string[];
  held: Record<string, string[]>;
  forwarded: number;
  forwarded_total: number;
}

/** One etcd, an echo target, and three cluster members' configs (not started). */
async function setup(scope: Scope) {
  const fixture = await Fixture.create();
  scope.defer(() => fixture.cleanup());
  const etcd = new Etcd(join(fixture.dir, "etcd-data"));
  await etcd.start();
  scope.defer(() => etcd.kill());
  const echo = startEcho();
  scope.defer(() => echo.close());
  // One CA for the cluster; one certificate (server and client use) names every member.
  const pem = await generateCertificates(
    ["localhost", "127.0.0.1", "127.0.0.2", "127.0.0.3"],
    { peer: true },
  );
  const ca = await fixture.write("cluster.ca.pem", pem.caCert);
  const cert = await fixture.write("cluster.crt.pem", pem.cert);
  const key = await fixture.write("cluster.key.pem", pem.key, 0o600);
  const members: Member[] = [];
  for (const i of [1, 2, 3]) {
    const host = `127.0.0.${i}`;
    const communicationPort = freePort();
    const statusPort = freePort();
    const extra = [
      `registry = "etcd"`,
      `etcd_endpoints = ["${etcd.url}"]`,
      `status_port = ${statusPort}`,
      `server_id = "s${i}"`,
      `peer_port = ${freePort()}`,
      `peer_certificate = ${JSON.stringify([cert, key])}`,
      `peer_cafile = ${JSON.stringify(ca)}`,
    ].join("\n");
    const config = await fixture.write(
      `server-${i}.toml`,
      serverToml({
        communicationPort,
        clients: [],
        services: [],
        listenHost: host,
        certificate: [cert, key],
        extra,
      }),
    );
    members.push({ id: `s${i}`, host, communicationPort, statusPort, config });
  }
  const admin = async (...args: string[]) => {
    const result = await runScript("cmd/admin.ts", ["--etcd", etcd.url, ...args]);
    assert.equal(result.code, 0, `admin ${args.join(" ")} failed:\n${result.stderr}`);
  };
  return {
    fixture,
    etcd,
    echo,
    members,
    admin,
    /** Adds client `identity` and a service on a free port to its echo; returns the port. */
    async service(identity: Identity): Promise<number> {
      const port = freePort();
      await admin("add-client", identity.name, "--key", identity.publicKey);
      await admin(
        "add-service",
        String(port),
        "--client",
        identity.name,
        "--port",
        String(echo.port),
      );
      return port;
    },
    async start(): Promise<void> {
      for (const m of members) m.program = await scope.server(m.config);
    },
    /** Starts a client attached to `on` (one or several members). */
    async client(identity: Identity, on: Member[]): Promise<Program> {
      const remote = on.length === 1
        ? `["${on[0].host}", ${on[0].communicationPort}]`
        : JSON.stringify(on.map((m) => [m.host, m.communicationPort]));
      const config = await fixture.write(
        `client-${identity.name}.toml`,
        [
          `name = ${JSON.stringify(identity.name)}`,
          `remote = ${remote}`,
          `cafile = ${JSON.stringify(ca)}`,
          `key = ${JSON.stringify(identity.keyPath)}`,
          `interval = ${INTERVAL_S}`,
          `infinite = true`,
        ].join("\n") + "\n",
      );
      return await scope.client(config);
    },
    async cluster(m: Member): Promise<ClusterStatus> {
      const response = await fetch(`http://127.0.0.1:${m.statusPort}/status.json`, {
        signal: AbortSignal.timeout(2000),
      });
      return (await response.json()).cluster;
    },
  };
}

/** Waits until member `m`'s status says `client` is held by exactly `ids`. */
async function heldBy(
  env: Awaited<ReturnType<typeof setup>>,
  m: Member,
  client: string,
  ids: string[],
  timeoutMs = DEADLINE_MS,
): Promise<void> {
  let last: ClusterStatus | undefined;
  await waitUntil(
    async () => {
      last = await env.cluster(m);
      return JSON.stringify(last.held[client] ?? []) === JSON.stringify(ids);
    },
    () => `${m.id} to see ${client} held by ${ids}: ${JSON.stringify(last)}`,
    timeoutMs,
  );
}

/** A user on `host:port` that sends `bytes` and checks it gets exactly them back. */
async function echoes(host: string, port: number, bytes: Uint8Array): Promise<void> {
  const conn = await Deno.connect({ hostname: host, port });
  try {
    conn.setNoDelay(true);
    const [, back] = await Promise.all([
      writeAll(conn, bytes),
      readExactly(conn, bytes.length),
    ]);
    assert.equal(firstDifference(back, bytes), -1, `bytes through ${host}:${port} differ`);
  } finally {
    try {
      conn.close();
    } catch {
      // Closed by readExactly's deadline.
    }
  }
}

/** A user that stays connected, for checking a tunnel survives. */
async function longUser(host: string, port: number) {
  const conn = await Deno.connect({ hostname: host, port });
  conn.setNoDelay(true);
  return {
    conn,
    async check(text: string): Promise<void> {
      const bytes = new TextEncoder().encode(text);
      await writeAll(conn, bytes);
      assert.equal(new TextDecoder().decode(await readExactly(conn, bytes.length)), text);
    },
  };
}

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
      const multi = await env.fixture.identity("multi");
      const pair = await env.fixture.identity("pair");
      const solo = await env.fixture.identity("solo");
      const multiPort = await env.service(multi);
      const pairPort = await env.service(pair);
      const soloPort = await env.service(solo);
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
