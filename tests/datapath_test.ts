/**
 * The data path at scale, through real server and client processes: a burst of users at a
 * connected client is served in full, and a bulk tunnel does not starve another tunnel of the
 * same client. Speed targets live in `deno task bench`; these are behaviour with generous
 * guards.
 */
import assert from "node:assert/strict";
import {
  clientToml,
  connectUser,
  DEADLINE_MS,
  echoSetup,
  findExecutable,
  firstDifference,
  Fixture,
  freePort,
  Process,
  randomBytes,
  readExactly,
  Scope,
  serverToml,
  startEcho,
  writeAll,
} from "./helpers.ts";

/** Users in the burst: all connected before any of them sends. */
const BURST = 1000;

/** Bytes each user of the burst echoes. */
const BURST_BYTES = 64 * 1024;

Deno.test("a burst of 1,000 users at a connected client is served, every byte exact", async () => {
  const env = await echoSetup({ extra: "max_pending_users = 16" });
  const scope = new Scope();
  try {
    const server = await scope.server(env.serverConfig);
    await scope.client(env.clientConfig);
    const users = await Promise.all(
      Array.from({ length: BURST }, async () => scope.closing(await connectUser(env.servicePort))),
    );
    // Every user is connected before any sends: the server must pair them all at once,
    // whatever max_pending_users says (it is for clients that are away).
    const results = await Promise.all(users.map(async (user) => {
      const payload = randomBytes(BURST_BYTES);
      try {
        const [, back] = await Promise.all([
          writeAll(user, payload),
          readExactly(user, payload.length, DEADLINE_MS * 3),
        ]);
        return firstDifference(back, payload) === -1;
      } catch {
        return false;
      }
    }));
    const served = results.filter(Boolean).length;
    assert.equal(served, BURST, `${served} of ${BURST} users were served byte-exact`);
    assert.equal(server.count(/max_pending_users/), 0, "users were turned away by the queue");
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

const IPERF3 = findExecutable("iperf3");

Deno.test({
  name:
    "a bulk tunnel does not starve another tunnel of the same client (p99 round trip < 50 ms), either way",
  ignore: !IPERF3,
  fn: async () => {
    // The bulk transfer runs between iperf3 processes, so this process only echoes and times
    // the interactive tunnel: what is measured is NATadm's queueing, not this test's own.
    const fixture = await Fixture.create();
    const scope = new Scope();
    try {
      const identity = await fixture.identity("foo bar");
      const echo = startEcho();
      scope.defer(echo.close);
      const iperfPort = freePort();
      const communicationPort = freePort();
      const [echoService, bulkService] = [freePort(), freePort()];
      const iperf = scope.track(
        new Process(IPERF3!, ["-s", "-B", "127.0.0.1", "-p", String(iperfPort), "--forceflush"]),
      );
      await iperf.waitForStdout(/Server listening/);
      await scope.server(
        await fixture.write(
          "server.toml",
          serverToml({
            communicationPort,
            clients: [identity],
            services: [
              { port: echoService, name: identity.name, targetPort: echo.port },
              { port: bulkService, name: identity.name, targetPort: iperfPort },
            ],
          }),
        ),
      );
      await scope.client(
        await fixture.write("client.toml", clientToml({ identity, communicationPort })),
      );
      const interactive = scope.closing(await connectUser(echoService));
      const one = new Uint8Array([42]);
      await writeAll(interactive, one); // the tunnel is open before the load starts
      await readExactly(interactive, 1);
      for (const reverse of [false, true]) {
        const bulk = scope.track(
          new Process(IPERF3!, [
            "-c",
            "127.0.0.1",
            "-p",
            String(bulkService),
            "-t",
            "30",
            "-i",
            "0.5",
            "--forceflush",
            ...(reverse ? ["-R"] : []),
          ]),
        );
        // Measure once the transfer reports its first full interval.
        await bulk.waitForStdout(/0\.00-0\.50 .*[MG]Bytes/);
        const samples: number[] = [];
        for (let i = 0; i < 300; i++) {
          const started = performance.now();
          await writeAll(interactive, one);
          await readExactly(interactive, 1);
          samples.push(performance.now() - started);
        }
        assert.ok(!bulk.exited, "the bulk transfer ended while we measured");
        await bulk.stop();
        samples.sort((a, b) => a - b);
        const p99 = samples[Math.floor(samples.length * 0.99)];
        const way = reverse ? "service → user" : "user → service";
        assert.ok(p99 < 50, `interactive p99 ${p99.toFixed(1)} ms during bulk ${way}`);
      }
    } finally {
      await scope.close();
      await fixture.cleanup();
    }
  },
});
