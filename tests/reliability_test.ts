/**
 * Reliability with real processes: reconnecting and its backoff, what each failure says, dead
 * peers, control and data connections failing independently, a client killed mid-transfer,
 * and graceful shutdown of both programs.
 */
import assert from "node:assert/strict";
import {
  clientToml,
  connectRefused,
  connectUser,
  Fixture,
  freePort,
  Program,
  waitUntil,
} from "./helpers.ts";
import {
  echoCheck,
  EchoStream,
  exchange,
  logTime,
  randomBytes,
  setup,
  timeUntil,
} from "./reliability_helpers.ts";
import { SAME_SIGNAL_MS } from "../src/cli.ts";

const CONNECTED = /connected to .* as/;
const RETRYING = /retrying in "?([0-9.]+)"? s/;

/** Sends a little through an open tunnel and checks it comes back. */
async function roundTrip(user: Deno.Conn, size = 2000): Promise<void> {
  const payload = randomBytes(size);
  const { received, ended } = await exchange(user, payload, { timeoutMs: 10_000 });
  assert.equal(ended, "complete", `round trip through a live tunnel: ${ended}`);
  assert.deepEqual(received, payload);
}

/** Reads until the connection ends; returns how long that took in ms (fails past `timeoutMs`). */
async function timeToClose(user: Deno.Conn, timeoutMs: number): Promise<number> {
  const start = performance.now();
  const buf = new Uint8Array(64 * 1024);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    user.close();
  }, timeoutMs);
  try {
    while (await user.read(buf) !== null);
  } catch {
    // Reset or closed: ended all the same.
  } finally {
    clearTimeout(timer);
  }
  assert.ok(!timedOut, `the user's connection was still open after ${timeoutMs} ms`);
  return performance.now() - start;
}

Deno.test("reconnect: a client is back within interval + 1 s of a killed server's restart", async () => {
  const env = await setup({ interval: 2 });
  try {
    const { servicePort } = env.clients[0];
    const first = await env.startServer();
    const client = await env.startClient();
    await echoCheck(servicePort);
    first.kill("SIGKILL");
    await first.status;
    await client.waitFor(RETRYING, 10_000);
    const server = await env.startServer();
    const ready = logTime(await server.waitFor(/NATadm server ready/));
    await waitUntil(
      () => client.count(CONNECTED) >= 2,
      () => `the client to reconnect:\n${client.lines.join("\n")}\n${server.lines.join("\n")}`,
      15_000,
    );
    const back = logTime(client.lines.filter((l) => CONNECTED.test(l))[1]);
    assert.ok(
      back - ready <= 3000,
      `reconnected ${back - ready} ms after the server was ready (interval 2 s):\n` +
        client.lines.join("\n"),
    );
    await echoCheck(servicePort);
    assert.ok(!client.exited);
  } finally {
    await env.scope.close();
  }
});

Deno.test("reconnect: delays grow from 1 s, doubling, capped at interval, with the waits kept", async () => {
  const interval = 4;
  const env = await setup({ interval }); // no server: every attempt is refused
  try {
    const client = env.scope.track(new Program("client.ts", ["--config", env.clients[0].config]));
    await waitUntil(() => client.count(RETRYING) >= 4, () => client.lines.join("\n"), 20_000);
    const lines = client.lines.filter((l) => RETRYING.test(l)).slice(0, 4);
    const delays = lines.map((l) => Number(RETRYING.exec(l)![1]));
    const report = `delays ${delays.join(", ")} s:\n${lines.join("\n")}`;
    delays.forEach((delay, i) => {
      const base = Math.min(interval, 2 ** i);
      assert.ok(delay <= interval, `delay ${i + 1} is over interval: ${report}`);
      // Jitter takes up to half off; one decimal is printed.
      assert.ok(delay >= 0.5 * base - 0.05 && delay <= base + 0.05, `delay ${i + 1}: ${report}`);
      if (i > 0) {
        // The ceiling doubles until the cap; jitter may put one delay below the one before.
        assert.ok(delay >= 0.5 * Math.min(interval, 2 ** i) - 0.05, `delays shrink: ${report}`);
        const waited = logTime(lines[i]) - logTime(lines[i - 1]);
        assert.ok(waited >= delays[i - 1] * 1000 - 100, `waited ${waited} ms: ${report}`);
      }
      assert.match(lines[i], /connection refused/);
    });
    assert.ok(!client.exited, "the client gave up");
  } finally {
    await env.scope.close();
  }
});

Deno.test("reconnect: a refused login keeps retrying and connects once SIGHUP fixes the key", async () => {
  const env = await setup({ interval: 2 });
  try {
    const { identity, config, servicePort } = env.clients[0];
    const impostor = await env.fixture.identity(identity.name);
    await env.writeServer({ clients: [{ ...identity, publicKey: impostor.publicKey }] });
    const server = await env.startServer();
    const client = env.scope.track(new Program("client.ts", ["--config", config]));
    const refused = /refused this client: authentication failed.*retrying in/;
    await waitUntil(() => client.count(refused) >= 2, () => client.lines.join("\n"), 15_000);
    assert.ok(!client.exited, "the client gave up after a refusal");
    await env.writeServer();
    server.kill("SIGHUP");
    await server.waitFor(/configuration reloaded/);
    await client.waitFor(CONNECTED, 10_000);
    await echoCheck(servicePort);
  } finally {
    await env.scope.close();
  }
});

Deno.test("reconnect: DNS failure, refused connection, TLS error and refused login say different things", async () => {
  const env = await setup();
  const other = await Fixture.create(); // another CA, which did not sign the server's certificate
  env.scope.defer(() => other.cleanup());
  try {
    await env.startServer();
    const { identity } = env.clients[0];
    const impostor = await env.fixture.identity(identity.name);
    const cases = {
      dns: {
        toml: clientToml({
          identity,
          communicationPort: env.communicationPort,
          host: "nonexistent.invalid",
        }),
        expected: /cannot resolve nonexistent\.invalid/,
      },
      refused: {
        toml: clientToml({ identity, communicationPort: freePort() }),
        expected: /connection refused/,
      },
      tls: {
        toml: clientToml({
          identity,
          communicationPort: env.communicationPort,
          cafile: other.caPath,
        }),
        expected: /certificate not signed by cafile/,
      },
      auth: {
        toml: clientToml({
          identity: { ...identity, keyPath: impostor.keyPath },
          communicationPort: env.communicationPort,
        }),
        expected: /refused this client: authentication failed/,
      },
    };
    const programs = await Promise.all(
      Object.entries(cases).map(async ([name, { toml }]) => {
        const file = await env.fixture.write(`client-${name}.toml`, toml);
        return env.scope.track(new Program("client.ts", ["--config", file]));
      }),
    );
    const lines = await Promise.all(programs.map((p) => p.waitFor(RETRYING, 15_000)));
    const names = Object.keys(cases) as (keyof typeof cases)[];
    names.forEach((name, i) => {
      for (const [j, other] of names.entries()) {
        const matches = cases[other].expected.test(lines[i]);
        assert.equal(
          matches,
          i === j,
          `${name}'s line ${matches ? "matches" : "misses"} ${other}'s message:\n${
            lines.join("\n")
          }`,
        );
      }
    });
  } finally {
    await env.scope.close();
  }
});

Deno.test("dead peers: a stalled control connection is noticed by both sides; waiting users are served on return", async () => {
  const env = await setup({ interval: 1, proxy: true });
  const proxy = env.proxy!;
  try {
    const { servicePort, identity } = env.clients[0];
    const server = await env.startServer();
    const client = await env.startClient();
    const control = await proxy.waitForConnection(1);
    await proxy.refuse(true);
    control.stall("both");
    const stalled = performance.now();
    const gone = new RegExp(`client "${identity.name}" disconnected`);
    await server.waitFor(gone, 10_000);
    const serverNoticed = performance.now() - stalled;
    await client.waitFor(RETRYING, 10_000);
    const clientNoticed = performance.now() - stalled;
    const bound = 3 * 1000 + 1500;
    assert.ok(serverNoticed <= bound, `server noticed after ${serverNoticed} ms (interval 1 s)`);
    assert.ok(clientNoticed <= bound, `client noticed after ${clientNoticed} ms (interval 1 s)`);

    const user = await connectUser(servicePort);
    await server.waitFor(/waits for client/);
    const payload = randomBytes(5000);
    const served = exchange(user, payload, { timeoutMs: 15_000 });
    const before = proxy.connections.length;
    control.resume();
    await proxy.refuse(false);
    await waitUntil(() => client.count(CONNECTED) >= 2, "the client to reconnect", 10_000);
    const { received, ended } = await served;
    user.close();
    assert.equal(ended, "complete", "the waiting user was not served");
    assert.deepEqual(received, payload);
    assert.ok(proxy.connections.length > before, "the client did not come back through the proxy");
  } finally {
    await env.scope.close();
  }
});

Deno.test("client SIGKILLed mid-transfer: its users are closed within 1 s, another client's tunnel runs on", async () => {
  const env = await setup({ names: ["a", "b"] });
  try {
    const [a, b] = env.clients;
    const server = await env.startServer();
    const clientA = await env.startClient(0);
    await env.startClient(1);
    const userB = await connectUser(b.servicePort);
    await roundTrip(userB);
    const stream = new EchoStream(await connectUser(a.servicePort), { pauseMs: 1 });
    await stream.receivedAtLeast(256 * 1024);
    clientA.kill("SIGKILL");
    await clientA.status;
    const killed = performance.now();
    await waitUntil(() => stream.ended, "user a's connection to close", 5000);
    assert.notEqual(
      stream.ended,
      "mismatch",
      `user a received a wrong byte at ${stream.mismatchAt}`,
    );
    const after = stream.endedAt - killed;
    assert.ok(after <= 1000, `user a was closed ${after.toFixed(0)} ms after the client died`);
    await roundTrip(userB);
    userB.close();
    await echoCheck(b.servicePort);
    assert.equal(server.count(/client "b" disconnected/), 0, "client b was disturbed");
    stream.stop();
  } finally {
    await env.scope.close();
  }
});

Deno.test("server SIGTERM: new users refused at once, the live tunnel finishes, exit 0", async () => {
  const env = await setup();
  try {
    const { servicePort } = env.clients[0];
    const server = await env.startServer();
    await env.startClient();
    const user = await connectUser(servicePort);
    await roundTrip(user);
    server.kill("SIGTERM");
    await timeUntil(() => connectRefused(servicePort), "the service port to close", 1000);
    assert.ok(await connectRefused(env.communicationPort), "the communication port still accepts");
    await roundTrip(user, 100_000);
    // (A probe above may have got in before the port closed: it counts as a tunnel too.)
    await server.waitFor(/shutting down: waiting up to 10 s for \d+ live tunnels/);
    assert.ok(!server.exited, "the server exited with a tunnel still live");
    user.close();
    assert.equal((await server.result(5000)).code, 0);
  } finally {
    await env.scope.close();
  }
});

Deno.test("client SIGTERM: stops reconnecting, the live tunnel finishes, exit 0", async () => {
  const env = await setup({ interval: 1 });
  try {
    const server = await env.startServer();
    const client = await env.startClient();
    const user = await connectUser(env.clients[0].servicePort);
    await roundTrip(user);
    client.kill("SIGTERM");
    // The client says goodbye: no new tunnels, but its connection stays for the live one.
    await server.waitFor(/client "a" is leaving/);
    // Longer than two reconnect delays: traffic keeps flowing, nobody reconnects.
    const end = performance.now() + 2500;
    while (performance.now() < end) {
      await roundTrip(user, 10_000);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.equal(server.count(/client "a" connected/), 1, "the stopping client reconnected");
    assert.equal(client.count(RETRYING), 0, "the stopping client retries");
    assert.ok(!client.exited, "the client exited with a tunnel still live");
    user.close();
    assert.equal((await client.result(5000)).code, 0);
    await server.waitFor(/client "a" disconnected/);
  } finally {
    await env.scope.close();
  }
});

for (const role of ["server", "client"] as const) {
  /** `setup` options that give the program under test this `shutdown_grace`. */
  const grace = (seconds: number) =>
    role === "server"
      ? { serverExtra: `shutdown_grace = ${seconds}\n` }
      : { clientExtra: `shutdown_grace = ${seconds}\n` };

  /** Server and client running with `shutdown_grace = seconds` on `role`, and a live tunnel. */
  const withTunnel = async (seconds: number) => {
    const env = await setup(grace(seconds));
    try {
      const programs = { server: await env.startServer(), client: await env.startClient() };
      const user = await connectUser(env.clients[0].servicePort);
      await roundTrip(user);
      return { env, program: programs[role], user };
    } catch (err) {
      await env.scope.close();
      throw err;
    }
  };

  Deno.test(`${role} SIGTERM: a tunnel still open after shutdown_grace is closed, exit 0`, async () => {
    const { env, program, user } = await withTunnel(2);
    try {
      program.kill("SIGTERM");
      const closedAfter = await timeToClose(user, 10_000);
      user.close();
      assert.ok(
        closedAfter >= 1500 && closedAfter <= 5000,
        `closed after ${closedAfter} ms, grace 2 s`,
      );
      assert.equal((await program.result(5000)).code, 0);
    } finally {
      await env.scope.close();
    }
  });

  Deno.test(`${role}: a second SIGTERM a second after the first exits at once and says so`, async () => {
    const { env, program, user } = await withTunnel(600);
    try {
      program.kill("SIGTERM");
      await program.waitFor(/shutting down: waiting up to 600 s/);
      // The program took the first signal before it said so: count the window from here, not
      // from the kill, which a busy machine may deliver late.
      const first = performance.now();
      // One within SAME_SIGNAL_MS of the first is the same Ctrl-C (tests/signals_test.ts).
      await timeUntil(() => performance.now() - first > SAME_SIGNAL_MS, "the window", 5000);
      program.kill("SIGTERM");
      const { code, stderr } = await program.result(2000);
      assert.notEqual(code, 0, "an interrupted shutdown exited 0");
      // Both roles count their live tunnels: the one of this test.
      assert.match(stderr, /WRN.*second signal.*exiting at once, cutting 1 live/);
      await timeToClose(user, 2000);
      user.close();
    } finally {
      await env.scope.close();
    }
  });
}
