/**
 * The registry in etcd: a real etcd (Debian's etcd-server), real server.ts with
 * `registry = "etcd"`, real client.ts, and `deno task admin` changing the registry while the
 * server runs. Skipped, saying why, when the `etcd` binary is not installed.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  clientToml,
  connectRefused,
  connectUser,
  errorLine,
  Fixture,
  freePort,
  type Identity,
  readExactly,
  roundTrip,
  runScript,
  Scope,
  serverToml,
  startEcho,
  waitUntil,
} from "./helpers.ts";
import { EtcdClient } from "../src/etcd.ts";
import { ETCD, Etcd } from "./etcd_server.ts";

const ignore = ETCD === undefined;
if (ignore) console.warn("etcd_test: skipped: no `etcd` binary (apt-get install etcd-server)");

/** How soon a registry change must be in force on a running server. */
const APPLY_MS = 2000;

/** One etcd, an echo target, and helpers to run the admin command and the server against it. */
async function setup(scope: Scope) {
  const fixture = await Fixture.create();
  scope.defer(() => fixture.cleanup());
  const etcd = new Etcd(join(fixture.dir, "etcd-data"));
  await etcd.start();
  scope.defer(() => etcd.kill());
  const echo = startEcho();
  scope.defer(() => echo.close());
  const communicationPort = freePort();
  const statusPort = freePort();
  const admin = (...args: string[]) => runScript("cmd/admin.ts", ["--etcd", etcd.url, ...args]);
  const etcdConfig = [
    `registry = "etcd"`,
    `etcd_endpoints = ["${etcd.url}"]`,
    `status_port = ${statusPort}`,
  ].join("\n");
  const serverConfig = await fixture.write(
    "server.toml",
    serverToml({ communicationPort, clients: [], services: [], extra: etcdConfig }),
  );
  return {
    fixture,
    etcd,
    echo,
    communicationPort,
    statusPort,
    serverConfig,
    admin,
    /** Runs admin and fails the test unless it succeeds. */
    async ok(...args: string[]): Promise<string> {
      const result = await admin(...args);
      assert.equal(result.code, 0, `admin ${args.join(" ")} failed:\n${result.stderr}`);
      return result.stdout;
    },
    async clientConfig(identity: Identity): Promise<string> {
      return await fixture.write(
        `client-${identity.name}.toml`,
        clientToml({ identity, communicationPort }),
      );
    },
    async status(): Promise<{ registry: Record<string, unknown> }> {
      const response = await fetch(`http://127.0.0.1:${statusPort}/status.json`);
      return await response.json();
    },
  };
}

/** Waits until `port` on 127.0.0.1 accepts connections, within `timeoutMs`. */
function listening(port: number, timeoutMs = APPLY_MS): Promise<boolean> {
  return waitUntil(async () => !(await connectRefused(port)), `port ${port} to listen`, timeoutMs);
}

/** An echo round trip through service `port` works. */
async function served(port: number, text = "hello through etcd\n"): Promise<void> {
  assert.equal(await roundTrip(port, text), text);
}

Deno.test({
  name: "admin adds a client and a service while the server runs: the port listens within 2 s " +
    "and the new client serves a user",
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      const env = await setup(scope);
      const server = await scope.server(env.serverConfig);
      const identity = await env.fixture.identity("web");
      const port = freePort();
      await env.ok("add-client", "web", "--key", identity.publicKey);
      await env.ok("add-service", String(port), "--client", "web", "--port", String(env.echo.port));
      await listening(port);
      await server.waitFor(/configuration reloaded: 1 services added/, APPLY_MS);
      await scope.client(await env.clientConfig(identity));
      await served(port);
      const list = await env.ok("list");
      assert.match(list, new RegExp(`${port} → web localhost:${env.echo.port}`));
    } finally {
      await scope.close();
    }
  },
});

Deno.test({
  name: "admin remove-client logs the client out within 2 s; its service stops listening",
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      const env = await setup(scope);
      const identity = await env.fixture.identity("web");
      const port = freePort();
      await env.ok("add-client", "web", "--key", identity.publicKey);
      await env.ok("add-service", String(port), "--client", "web", "--port", String(env.echo.port));
      const server = await scope.server(env.serverConfig);
      await scope.client(await env.clientConfig(identity));
      await served(port);
      // A client a service still names cannot go: the admin says which service.
      const refused = await env.admin("remove-client", "web");
      assert.equal(refused.code, 1);
      assert.match(
        errorLine(refused.stderr, "natadm-admin"),
        new RegExp(`etcd /natadm/services/${port}: name: no client "web"`),
      );
      await env.ok("remove-service", String(port));
      await waitUntil(() => connectRefused(port), `port ${port} to stop listening`, APPLY_MS);
      await env.ok("remove-client", "web");
      await server.waitFor(/client "?web"? logged out: removed from the config/, APPLY_MS);
    } finally {
      await scope.close();
    }
  },
});

Deno.test({
  name: "an invalid change is refused: by admin with one line and exit 1, and by the server " +
    "(written to etcd directly) while the last good registry keeps serving",
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      const env = await setup(scope);
      const identity = await env.fixture.identity("web");
      const port = freePort();
      await env.ok("add-client", "web", "--key", identity.publicKey);
      await env.ok("add-service", String(port), "--client", "web", "--port", String(env.echo.port));
      const server = await scope.server(env.serverConfig);
      await scope.client(await env.clientConfig(identity));
      await served(port);

      const ghost = await env.admin(
        "add-service",
        String(freePort()),
        "--client",
        "ghost",
        "--port",
        "22",
      );
      assert.equal(ghost.code, 1);
      assert.match(errorLine(ghost.stderr, "natadm-admin"), /name: no client "ghost" in etcd/);
      const badKey = await env.admin("add-client", "x", "--key", "bm90IGEga2V5");
      assert.equal(badKey.code, 1);
      assert.match(
        errorLine(badKey.stderr, "natadm-admin"),
        /^natadm-admin: error: refused, the registry is unchanged: etcd \/natadm\/clients\/x: key: expected an Ed25519 public key/,
      );

      // Written past the admin: the server refuses it and keeps the registry it had.
      const etcd = new EtcdClient({ endpoints: [env.etcd.url] });
      scope.defer(() => etcd.close());
      const badPort = freePort();
      await etcd.put(`/natadm/services/${badPort}`, "{not json");
      await server.waitFor(
        new RegExp(`registry change at etcd revision \\d+ refused.*services/${badPort}: not JSON`),
        APPLY_MS,
      );
      await etcd.delete(`/natadm/services/${badPort}`);
      const wrongPort = freePort();
      await etcd.put(`/natadm/services/${wrongPort}`, JSON.stringify({ name: "web", port: 0 }));
      await server.waitFor(
        new RegExp(`refused.*etcd /natadm/services/${wrongPort}: port: expected a port number`),
        APPLY_MS,
      );
      assert.ok(await connectRefused(badPort), "an invalid registry was applied");
      assert.ok(await connectRefused(wrongPort), "an invalid registry was applied");
      await served(port);
      // Once etcd holds a valid registry again, it applies.
      await etcd.put(
        `/natadm/services/${wrongPort}`,
        JSON.stringify({ name: "web", port: env.echo.port }),
      );
      await listening(wrongPort);
      await served(wrongPort);
    } finally {
      await scope.close();
    }
  },
});

Deno.test({
  name: "etcd stopped: the client, live tunnels and new users keep working, logs and " +
    "status.json say so, and a change written once etcd is back is applied",
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      const env = await setup(scope);
      const identity = await env.fixture.identity("web");
      const port = freePort();
      await env.ok("add-client", "web", "--key", identity.publicKey);
      await env.ok("add-service", String(port), "--client", "web", "--port", String(env.echo.port));
      const server = await scope.server(env.serverConfig);
      await scope.client(await env.clientConfig(identity));
      const live = scope.closing(await connectUser(port));
      const echoOnce = async (text: string) => {
        await live.write(new TextEncoder().encode(text));
        return new TextDecoder().decode(await readExactly(live, text.length));
      };
      assert.equal(await echoOnce("before\n"), "before\n");
      assert.equal((await env.status()).registry.connected, true);

      await env.etcd.kill();
      await server.waitFor(/etcd unreachable: serving the registry of revision \d+/);
      const down = await env.status();
      assert.equal(down.registry.source, "etcd");
      assert.equal(down.registry.connected, false);
      assert.equal(typeof down.registry.revision, "number");
      assert.equal(typeof down.registry.error, "string");
      assert.equal(await echoOnce("during\n"), "during\n");
      await served(port, "a new user while etcd is down\n");

      await env.etcd.start();
      // Written as soon as etcd answers, maybe before the server watches again: it catches up.
      const added = freePort();
      await env.ok(
        "add-service",
        String(added),
        "--client",
        "web",
        "--port",
        String(env.echo.port),
      );
      await listening(added, 10_000);
      await served(added);
      await server.waitFor(/etcd reachable again/);
      await waitUntil(async () => (await env.status()).registry.connected, "status: connected");
      assert.equal(await echoOnce("after\n"), "after\n");
    } finally {
      await scope.close();
    }
  },
});

Deno.test({
  name: "admin import moves a server file's clients and services into etcd, and a server " +
    'with registry = "etcd" serves them',
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      const env = await setup(scope);
      const identity = await env.fixture.identity("foo bar");
      const port = freePort();
      const old = await env.fixture.write(
        "old.toml",
        serverToml({
          communicationPort: env.communicationPort,
          clients: [identity],
          services: [{
            port,
            name: identity.name,
            targetPort: env.echo.port,
            allowFrom: ["127.0.0.0/8"],
          }],
        }),
      );
      const out = await env.ok("import", old);
      assert.match(out, /imported 1 clients, 1 services, 0 users/);
      // Importing again changes nothing; the file's registry is in etcd.
      assert.match(await env.ok("import", old), /\(0 keys written\)/);

      // The file may not keep the tables once the registry is in etcd.
      const both = await env.fixture.write(
        "both.toml",
        (await Deno.readTextFile(old)).replace(
          'listen_host = "127.0.0.1"',
          `listen_host = "127.0.0.1"\nregistry = "etcd"\netcd_endpoints = ["${env.etcd.url}"]`,
        ),
      );
      const refused = await runScript("server.ts", ["--config", both]);
      assert.notEqual(refused.code, 0);
      assert.match(
        errorLine(refused.stderr, "natadm-server"),
        /clients: with registry = "etcd" the clients live in etcd, not in this file/,
      );

      await scope.server(env.serverConfig);
      await scope.client(await env.clientConfig(identity));
      await served(port);
    } finally {
      await scope.close();
    }
  },
});

Deno.test({
  name: "a server started before etcd keeps trying, saying so, and starts once etcd answers",
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      const fixture = await Fixture.create();
      scope.defer(() => fixture.cleanup());
      const etcd = new Etcd(join(fixture.dir, "etcd-data"));
      scope.defer(() => etcd.kill());
      const config = await fixture.write(
        "server.toml",
        serverToml({
          communicationPort: freePort(),
          clients: [],
          services: [],
          extra: `registry = "etcd"\netcd_endpoints = ["${etcd.url}"]`,
        }),
      );
      const server = scope.spawn("server.ts", ["--config", config]);
      await server.waitFor(/etcd not reachable yet, trying again/);
      assert.equal(server.count(/NATadm server ready/), 0);
      await etcd.start();
      await server.waitFor(/NATadm server ready/);
    } finally {
      await scope.close();
    }
  },
});

Deno.test({
  name: "the etcd client: guarded transactions, leases, and a watch that resumes after compaction",
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      const fixture = await Fixture.create();
      scope.defer(() => fixture.cleanup());
      const server = new Etcd(join(fixture.dir, "etcd-data"));
      await server.start();
      scope.defer(() => server.kill());
      // The first endpoint is dead: every request falls over to the second.
      const etcd = new EtcdClient({
        endpoints: [`http://127.0.0.1:${freePort()}`, server.url],
        timeoutMs: 2000,
      });
      scope.defer(() => etcd.close());

      const rev = await etcd.put("/t/a", "1");
      await etcd.put("/u/other", "x");
      const guard = {
        key: "/t/",
        prefix: true,
        target: "mod" as const,
        result: "less" as const,
        value: rev + 1,
      };
      const ok = await etcd.txn([guard], [{ put: { key: "/t/b", value: "2" } }]);
      assert.ok(ok.succeeded);
      // Written since `rev`: the same guard now fails and writes nothing.
      const stale = await etcd.txn([guard], [{ put: { key: "/t/c", value: "3" } }]);
      assert.equal(stale.succeeded, false);
      const { kvs } = await etcd.rangePrefix("/t/");
      assert.deepEqual(kvs.map((kv) => [kv.key, kv.value]), [["/t/a", "1"], ["/t/b", "2"]]);

      const lease = await etcd.leaseGrant(30);
      await etcd.put("/t/leased", "held", lease);
      assert.ok(await etcd.leaseKeepAlive(lease) > 0);
      await etcd.leaseRevoke(lease);
      assert.equal((await etcd.rangePrefix("/t/leased")).kvs.length, 0);

      // History up to now is compacted: a watch from revision 1 must read everything again.
      const now = (await etcd.rangePrefix("/t/")).revision;
      const compact = await fetch(`${server.url}/v3/kv/compaction`, {
        method: "POST",
        body: JSON.stringify({ revision: String(now), physical: true }),
      });
      assert.equal(compact.status, 200, await compact.text());
      const seen: string[] = [];
      let compacted = 0;
      const watch = etcd.watch("/t/", 1, {
        onEvents: (events) => seen.push(...events.map((e) => `${e.type} ${e.kv.key}`)),
        onCompacted: (err) => {
          compacted = err.compactRevision;
          return Promise.resolve(now);
        },
      });
      scope.defer(() => watch.close());
      await waitUntil(() => compacted === now, "the watch to report the compaction");
      await etcd.put("/t/d", "4");
      await etcd.delete("/t/a");
      await waitUntil(() => seen.length === 2, () => `two events, got ${seen}`);
      assert.deepEqual(seen, ["put /t/d", "delete /t/a"]);
    } finally {
      await scope.close();
    }
  },
});

Deno.test('server permissions with registry = "etcd": any port of listen_host, and etcd', async () => {
  const fixture = await Fixture.create();
  try {
    const port = freePort();
    const file = await fixture.write(
      "server.toml",
      serverToml({
        communicationPort: port,
        clients: [],
        services: [],
        extra:
          `registry = "etcd"\netcd_endpoints = ["http://10.0.0.5:2379", "https://etcd.example"]`,
      }),
    );
    const { loadServerConfig } = await import("../src/config.ts");
    const { serverGrants } = await import("../src/permissions.ts");
    const grants = serverGrants(await loadServerConfig(file));
    assert.deepEqual(grants.net, [
      "127.0.0.1",
      `127.0.0.1:${port}`,
      "10.0.0.5:2379",
      "etcd.example:443",
    ]);
  } finally {
    await fixture.cleanup();
  }
});

Deno.test("server config: registry and etcd_* keys are validated like the others", async () => {
  const fixture = await Fixture.create();
  try {
    const base = serverToml({ communicationPort: freePort(), clients: [], services: [] });
    const cases: [string, RegExp][] = [
      [`registry = "consul"`, /registry: expected "file" or "etcd", got "consul"/],
      [`registry = "etcd"`, /etcd_endpoints: required with registry = "etcd"/],
      [
        `registry = "etcd"\netcd_endpoints = ["127.0.0.1:2379"]`,
        /etcd_endpoints\[0\]: expected a URL such as "http:\/\/127\.0\.0\.1:2379"/,
      ],
      [
        `registry = "etcd"\netcd_endpoints = ["http://127.0.0.1:2379"]\netcd_prefix = "natadm"`,
        /etcd_prefix: expected a key prefix ending in "\/"/,
      ],
      [`etcd_endpoints = ["http://127.0.0.1:2379"]`, /etcd_endpoints: only used with registry/],
      [
        `registry = "etcd"\netcd_endpoints = ["http://127.0.0.1:2379"]\netcd_password = "x"`,
        /etcd_username: required when a password is given/,
      ],
    ];
    const { loadServerConfig } = await import("../src/config.ts");
    for (const [extra, expected] of cases) {
      const file = await fixture.write("server.toml", base.replace("\n", `\n${extra}\n`));
      await assert.rejects(loadServerConfig(file), expected, extra);
    }
  } finally {
    await fixture.cleanup();
  }
});
