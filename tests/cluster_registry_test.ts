/**
 * A cluster and its registry in etcd under change and failure: `deno task admin` changing the
 * registry while three servers run, etcd stopped and started again under live users, and a
 * named user's `connect` forwarded from the server it reached to the one that holds the
 * client. A real etcd, three real server.ts on 127.0.0.1/.2/.3, real client.ts and
 * cmd/connect.ts. Skipped, saying why, when the `etcd` binary is not installed.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  DEADLINE_MS,
  escapeRegExp,
  firstDifference,
  freePort,
  randomBytes,
  readExactly,
  readToEnd,
  ROOT,
  runScript,
  Scope,
  waitUntil,
} from "./helpers.ts";
import {
  echoes,
  heldBy,
  longUser,
  type Member,
  setup,
  SKIP,
  type TestCluster,
} from "./cluster_helpers.ts";
import { LEASE_TTL_S } from "../src/cluster.ts";

const ignore = SKIP !== undefined;
if (ignore) console.warn(`cluster_registry_test: skipped: ${SKIP}`);

/** How soon a registry change must be in force on every running server (the bound). */
const APPLY_MS = 2000;

/** A member's whole `/status.json`, as far as these tests read it. */
interface Status {
  registry: { source: string; connected: boolean; revision: number | null; error: string | null };
  clients: { name: string; connected: boolean }[];
  services: { port: number; client: string; waiting_users: number }[];
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
  what: string | (() => string),
  since: number,
  timeoutMs: number,
): Promise<Record<string, number>> {
  const took: Record<string, number> = {};
  await Promise.all(members.map(async (m) => {
    await waitUntil(
      () => check(m),
      () => `${typeof what === "string" ? what : what()} on ${m.id} (${m.host})`,
      timeoutMs,
    );
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

/**
 * How soon a server watches etcd again once it is back: the watch retries with a delay that
 * doubles up to 5 s (`watch` in src/etcd.ts) while etcd is away, then catches up at once.
 */
const RECONNECT_MS = 5000;

/** Waits until every member sees exactly `expected` (client → holder ids) in its copy. */
async function everyoneSees(
  env: TestCluster,
  expected: Record<string, string[]>,
  since: number,
  timeoutMs: number,
): Promise<Record<string, number>> {
  const last: Record<string, unknown> = {};
  return await onEvery(
    env.members,
    async (m) => {
      const held = (await env.cluster(m)).held;
      last[m.id] = held;
      return Object.entries(expected).every(([client, ids]) =>
        JSON.stringify(held[client] ?? []) === JSON.stringify(ids)
      );
    },
    () => `the holders ${JSON.stringify(expected)} (last seen: ${JSON.stringify(last)})`,
    since,
    timeoutMs,
  );
}

Deno.test({
  name: "etcd stopped: clients and users keep working on all three servers, a change made just " +
    "before is not lost, and everything catches up when etcd returns",
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      const env = await setup(scope);
      const [a, b, c] = env.members;
      const [
        { identity: multi, port: multiPort },
        { identity: solo, port: soloPort },
        { identity: late, port: latePort },
        { identity: gone, port: gonePort },
      ] = await env.clients("multi", "solo", "late", "gone");
      await env.start();
      await env.client(multi, [a, b, c]);
      await env.client(solo, [b]);
      const goneClient = await env.client(gone, [b]);
      await everyoneSees(
        env,
        { multi: ["s1", "s2", "s3"], solo: ["s2"], gone: ["s2"] },
        0,
        DEADLINE_MS,
      );
      // Long-lived users at A: one served by A itself, one forwarded to B.
      const local = await longUser(a.host, multiPort);
      scope.closing(local.conn);
      await local.check("local, before\n");
      const forwarded = await longUser(a.host, soloPort);
      scope.closing(forwarded.conn);
      await forwarded.check("forwarded, before\n");
      for (const m of env.members) assert.equal((await status(m)).registry.connected, true);

      // A change, and etcd killed the moment the admin command returns: the servers may or
      // may not have applied it yet, but etcd has it.
      const beforePort = freePort();
      await env.admin(
        "add-service",
        String(beforePort),
        "--client",
        "multi",
        "--port",
        String(env.echo.port),
      );
      await env.etcd.kill();
      const killed = performance.now();
      const appliedBefore = await Promise.all(env.members.map((m) => accepts(m.host, beforePort)));
      console.log(`change made just before the kill applied before it on:`, appliedBefore);

      // Every server says the registry is unreachable (the watch breaks at once; the health
      // check every 2 s catches an etcd that hangs instead).
      const noticed = await onEvery(
        env.members,
        async (m) => {
          const { registry } = await status(m);
          return registry.source === "etcd" && !registry.connected &&
            typeof registry.error === "string" && typeof registry.revision === "number";
        },
        "status.json to say registry.connected false",
        killed,
        APPLY_MS + 2000,
      );
      console.log(`registry.connected false, ms after etcd was killed:`, noticed);

      // Live tunnels run on; new users at every server are served, local and forwarded.
      await local.check("local, during\n");
      await forwarded.check("forwarded, during\n");
      await servedAtEvery(env, multiPort);
      await servedAtEvery(env, soloPort); // A and C forward to B by their copy of the records
      // A client that connects during the outage, to C only: C serves it at once. C cannot
      // record in etcd that it holds it, so A and B do not know yet: a user at A waits for it
      // (pending_timeout), as for a client that is away.
      const lateClient = await env.client(late, [c]);
      await echoes(c.host, latePort, randomBytes(16 * 1024));
      const waiting = await longUser(a.host, latePort);
      scope.closing(waiting.conn);
      const early = randomBytes(4096);
      await waiting.conn.write(early);
      await waitUntil(
        async () => (await status(a)).services.find((s) => s.port === latePort)?.waiting_users,
        "the user at A to wait for late",
      );

      // A client that leaves during the outage: B cannot delete its record, so A and C still
      // think B holds it and forward its users there, and B, which has no session of it, cuts
      // them. That is what a forwarded user sees while etcd is away: a stale record, until
      // etcd returns and B deletes it.
      await goneClient.stop();
      await waitUntil(
        async () => !(await status(b)).clients.find((x) => x.name === "gone")?.connected,
        "B to see gone leave",
      );
      const cut = await Deno.connect({ hostname: a.host, port: gonePort });
      scope.closing(cut);
      await cut.write(new TextEncoder().encode("anyone there?\n"));
      assert.equal((await readToEnd(cut)).length, 0, "cut without a byte");

      // Outlast the lease: every server has failed to renew it for longer than its TTL.
      const renewals = Math.ceil(LEASE_TTL_S / 1.5) + 1;
      await waitUntil(
        () =>
          env.members.every((m) =>
            m.program!.count(/cannot renew this server's lease/) >= renewals
          ),
        `every server to fail ${renewals} lease renewals`,
      );
      await local.check("local, after the lease TTL\n");
      await forwarded.check("forwarded, after the lease TTL\n");
      await servedAtEvery(env, soloPort);

      // etcd returns (same ports, same data), and another change is made at once.
      await env.etcd.start();
      const back = performance.now();
      const second = await env.fixture.identity("second");
      const secondPort = await env.service(second);
      const changed = performance.now();
      const applied = await onEvery(
        env.members,
        (m) => accepts(m.host, secondPort),
        `service port ${secondPort} (added after etcd returned) to listen`,
        changed,
        RECONNECT_MS + APPLY_MS,
      );
      console.log(`change after etcd returned applied, ms after admin returned:`, applied);
      const reconnected = await onEvery(
        env.members,
        async (m) => (await status(m)).registry.connected,
        "status.json to say registry.connected true",
        back,
        RECONNECT_MS + APPLY_MS,
      );
      console.log(`registry.connected true again, ms after etcd was back:`, reconnected);
      // The change made just before the kill is in force everywhere.
      await onEvery(
        env.members,
        (m) => accepts(m.host, beforePort),
        `service port ${beforePort} (added just before the kill) to listen`,
        back,
        RECONNECT_MS + APPLY_MS,
      );
      await servedAtEvery(env, beforePort);

      // The records catch up: late, which connected to C during the outage, is known to all,
      // and the user that waited for it at A is served, its early bytes first.
      await env.client(second, [a]);
      const caughtUp = await everyoneSees(
        env,
        { multi: ["s1", "s2", "s3"], solo: ["s2"], late: ["s3"], second: ["s1"], gone: [] },
        back,
        RECONNECT_MS + APPLY_MS,
      );
      console.log(`holders current on every server, ms after etcd was back:`, caughtUp);
      const echoed = await readExactly(waiting.conn, early.length);
      assert.equal(firstDifference(echoed, early), -1, "the waiting user's bytes differ");
      await servedAtEvery(env, latePort);
      // gone is held nowhere now: a user at A for it waits for it, as on a single server.
      const patient = await Deno.connect({ hostname: a.host, port: gonePort });
      scope.closing(patient);
      await waitUntil(
        async () => (await status(a)).services.find((x) => x.port === gonePort)?.waiting_users,
        "a user at A to wait for gone",
      );
      patient.close();
      await servedAtEvery(env, secondPort);
      await local.check("local, after\n");
      await forwarded.check("forwarded, after\n");
      assert.equal(lateClient.exited, false);
    } finally {
      await scope.close();
    }
  },
});

/** Reads exactly `n` bytes from a child's stdout reader, within the default deadline. */
async function readChild(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  n: number,
): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  let got = 0;
  const timer = setTimeout(() => reader.cancel(new Error("deadline")), DEADLINE_MS);
  try {
    while (got < n) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`connect's stdout ended after ${got} of ${n} bytes`);
      if (got + value.length > n) throw new Error(`connect sent more than ${n} bytes`);
      out.set(value, got);
      got += value.length;
    }
  } finally {
    clearTimeout(timer);
  }
  return out;
}

Deno.test({
  name: "connect forwarded between servers: an admin with a key reaches, at server A, a client " +
    "held only by server B, and the tunnel shows via B at A",
  ignore,
  async fn() {
    const scope = new Scope();
    try {
      const env = await setup(scope);
      const [a, b] = env.members;
      const solo = await env.fixture.identity("solo");
      const alice = await env.fixture.identity("alice");
      await env.admin("add-client", "solo", "--key", solo.publicKey);
      await env.admin(
        "add-user",
        "alice",
        "--key",
        alice.publicKey,
        "--allow",
        `solo:${env.echo.port}`,
      );
      await env.start();
      await env.client(solo, [b]);
      await heldBy(env, a, "solo", ["s2"]);
      const userConfig = await env.fixture.write(
        "user.toml",
        [
          `name = "alice"`,
          `remote = ["${a.host}", ${a.communicationPort}]`,
          `cafile = ${JSON.stringify(env.ca)}`,
          `key = ${JSON.stringify(alice.keyPath)}`,
        ].join("\n") + "\n",
      );

      const child = new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "--allow-net",
          "--allow-read",
          join(ROOT, "cmd/connect.ts"),
          "--config",
          userConfig,
          "solo",
          String(env.echo.port),
        ],
        stdin: "piped",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      scope.defer(async () => {
        try {
          child.kill("SIGKILL");
        } catch {
          // Exited already.
        }
        await child.status;
      });
      const stdin = child.stdin.getWriter();
      const stdout = child.stdout.getReader();
      const first = randomBytes(256 * 1024);
      await Promise.all([
        stdin.write(first),
        (async () => {
          const back = await readChild(stdout, first.length);
          assert.equal(firstDifference(back, first), -1, "bytes through connect differ");
        })(),
      ]);

      // While the tunnel is open: A counts it as forwarded, via B, opened by alice; B relays
      // it as alice's too, on the client's own connection.
      const atA = await status(a);
      assert.ok(atA.cluster.forwarded >= 1, `A forwards: ${JSON.stringify(atA.cluster)}`);
      const tunnelA = atA.tunnels.filter((t) => t.client === "solo");
      assert.equal(tunnelA.length, 1, JSON.stringify(atA.tunnels));
      assert.equal(tunnelA[0].via, "s2");
      assert.equal(tunnelA[0].by, "alice");
      const aliceAtA = atA.users.find((u) => u.name === "alice");
      assert.equal(aliceAtA?.connected, true);
      assert.deepEqual(aliceAtA?.tunnels.map((t) => [t.client, t.port]), [
        ["solo", env.echo.port],
      ]);
      const atB = await status(b);
      const tunnelB = atB.tunnels.filter((t) => t.client === "solo");
      assert.equal(tunnelB.length, 1, JSON.stringify(atB.tunnels));
      assert.equal(tunnelB[0].via, null, "B serves it on the client's connection");
      assert.equal(tunnelB[0].by, "alice");
      assert.equal(atB.users.find((u) => u.name === "alice")?.connected, false, "no login at B");
      const audit = new RegExp(`tunnel open: user "alice" .*→ client "solo" port ${env.echo.port}`);
      await a.program!.waitFor(audit, 0);
      await b.program!.waitFor(audit, 0);

      // More bytes, then the end of input: connect exits 0 once the echo has sent them back.
      const second = randomBytes(64 * 1024);
      await stdin.write(second);
      await stdin.close();
      const back = await readChild(stdout, second.length);
      assert.equal(firstDifference(back, second), -1, "bytes through connect differ");
      assert.equal((await stdout.read()).done, true, "nothing after the echo");
      let exited: Deno.CommandStatus | undefined;
      child.status.then((status) => exited = status);
      const exit = await waitUntil(() => exited, "connect to exit");
      const stderr = await new Response(child.stderr).text();
      assert.equal(exit.code, 0, stderr);
      await waitUntil(async () => (await status(a)).cluster.forwarded === 0, "A's tunnel to end");
    } finally {
      await scope.close();
    }
  },
});
