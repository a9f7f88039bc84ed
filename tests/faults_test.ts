/**
 * Fault injection with {@link FaultProxy}: connections cut during the TLS handshake, during
 * authentication, mid-heartbeat and mid-transfer, and users that vanish. Every wait must end,
 * a user gets every byte in order or a closed connection (never wrong or reordered bytes),
 * and service resumes afterwards.
 */
import assert from "node:assert/strict";
import { connectUser, Program, waitUntil } from "./helpers.ts";
import {
  type CutRule,
  type Direction,
  FaultProxy,
  type ProxyConnection,
  TLS_APPLICATION_DATA,
  TLS_HANDSHAKE,
} from "./faultproxy.ts";
import {
  echoCheck,
  EchoStream,
  establishedWith,
  exchange,
  procStats,
  randomBytes,
  setup,
} from "./reliability_helpers.ts";
import { HANDSHAKE_TIMEOUT_MS } from "../src/transport.ts";

const CONNECTED = /connected to .* as/;

/** Cut `direction` inside the `index`-th TLS record of `type`, `within` bytes into it. */
function inRecord(direction: Direction, type: number, index: number, within: number): CutRule {
  return { direction, tlsRecord: { type, index, within } };
}

Deno.test("faults: cuts during the TLS handshake and authentication end at once; a waiting user is served", async () => {
  const env = await setup({ interval: 1, proxy: true });
  const proxy = env.proxy!;
  try {
    const { servicePort } = env.clients[0];
    const server = await env.startServer();
    // The client's first connections are cut, one fault each; the one after is left alone.
    // Upstream application-data records: 1 Finished, 2 hello, 3 auth. Downstream: 1 the
    // server's encrypted handshake, then session ticket, challenge, welcome.
    const faults = [
      inRecord("up", TLS_HANDSHAKE, 1, 10), // inside the ClientHello
      inRecord("down", TLS_HANDSHAKE, 1, 40), // inside the ServerHello
      inRecord("down", TLS_APPLICATION_DATA, 1, 100), // inside the certificate flight
      inRecord("up", TLS_APPLICATION_DATA, 1, 8), // inside the client's Finished
      inRecord("up", TLS_APPLICATION_DATA, 2, 12), // inside hello
      inRecord("up", TLS_APPLICATION_DATA, 3, 12), // inside auth
      inRecord("down", TLS_APPLICATION_DATA, 4, 12), // inside welcome (or the challenge)
    ];
    proxy.plan(...faults.map((cut) => ({ cut })));
    const user = await connectUser(servicePort);
    await server.waitFor(/waits for client/);
    const baseline = procStats(server.pid).fds; // the user's socket included
    const payload = randomBytes(10_000);
    const served = exchange(user, payload, { timeoutMs: 30_000 });
    const client = env.scope.track(new Program("client.ts", ["--config", env.clients[0].config]));
    await client.waitFor(CONNECTED, 30_000);
    const { received, ended } = await served;
    user.close();
    assert.equal(ended, "complete", "the waiting user was not served");
    assert.deepEqual(received, payload);

    const cut = proxy.connections.slice(0, faults.length);
    cut.forEach((c, i) => {
      assert.ok(!c.live, `connection ${i} (fault ${i}) is still open`);
      const lasted = c.closedAt - c.acceptedAt;
      assert.ok(lasted < 2000, `connection ${i} (fault ${i}) took ${lasted.toFixed(0)} ms to end`);
    });
    assert.ok(
      client.count(/retrying in/) >= faults.length,
      `every cut attempt is retried:\n${client.lines.join("\n")}`,
    );
    assert.equal(client.count(CONNECTED), 1);
    await echoCheck(servicePort);
    // The server let go of every cut connection, by its handshake timeout at the latest:
    // nothing is left besides the client's pooled connections.
    await waitUntil(
      () =>
        procStats(server.pid).fds - establishedWith(server.pid, env.communicationPort) < baseline,
      () =>
        `the server to close its side of every cut connection (${baseline} descriptors ` +
        `before; now ${procStats(server.pid).fds}, ` +
        `${establishedWith(server.pid, env.communicationPort)} of them pooled connections)`,
      HANDSHAKE_TIMEOUT_MS + 5000,
    );
    assert.ok(!server.exited && !client.exited);
  } finally {
    await env.scope.close();
  }
});

/** The live control connection among `from` onwards: the one with hello and auth sent. */
function controlAmong(proxy: FaultProxy, from: number): Promise<ProxyConnection> {
  return waitUntil(
    () =>
      proxy.connections.slice(from).find((c) =>
        c.live && c.records("up", TLS_APPLICATION_DATA) >= 3
      ),
    "the new control connection",
  );
}

Deno.test("faults: cuts mid-heartbeat, both ways: both sides reconnect; a tunnel on the cut connection ends, never with wrong bytes", async () => {
  const env = await setup({ interval: 1, proxy: true });
  const proxy = env.proxy!;
  try {
    const { servicePort, identity } = env.clients[0];
    const server = await env.startServer();
    const client = await env.startClient();
    const gone = new RegExp(`client "${identity.name}" disconnected`);
    let control = await controlAmong(proxy, 0);
    for (const [round, direction] of (["up", "down"] as Direction[]).entries()) {
      const stream = new EchoStream(await connectUser(servicePort), { pauseMs: 5 });
      await stream.receivedAtLeast(64 * 1024);
      // Wait for a heartbeat to have passed, then cut inside the next one.
      const seen = control.records(direction);
      await waitUntil(() => control.records(direction) > seen, `a ping ${direction}`, 5000);
      control.cut(inRecord(direction, TLS_APPLICATION_DATA, control.records(direction) + 1, 10));
      const mark = proxy.connections.length;
      await waitUntil(() => !control.live, `the cut inside a ping ${direction}`, 5000);
      await waitUntil(() => server.count(gone) > round, "the server to drop the client", 10_000);
      await waitUntil(() => client.count(CONNECTED) > round + 1, "a reconnect", 10_000);
      control = await controlAmong(proxy, mark);
      await echoCheck(servicePort);
      // The tunnel rode on the cut connection (as with ssh -R): it ended, with a prefix.
      await waitUntil(() => stream.ended, "the cut tunnel to end", 10_000);
      assert.notEqual(stream.ended, "mismatch", `byte ${stream.mismatchAt} came back wrong`);
      stream.stop();
    }
  } finally {
    await env.scope.close();
  }
});

Deno.test("faults: the client's connection cut mid-transfer, either way: a prefix then a close, never wrong bytes", async () => {
  const env = await setup({ interval: 1, proxy: true });
  const proxy = env.proxy!;
  try {
    const { servicePort } = env.clients[0];
    await env.startServer();
    await env.startClient();
    for (const direction of ["up", "down", "up", "down"] as Direction[]) {
      // The client's one connection carries every tunnel: find the live one, then cut it.
      const carrying = await controlAmong(proxy, 0);
      const stream = new EchoStream(await connectUser(servicePort), { pauseMs: 1 });
      await stream.receivedAtLeast(128 * 1024);
      carrying.cutAfter(direction, 1 + Math.floor(Math.random() * 100_000));
      await waitUntil(
        () => stream.ended,
        `the user's connection to end after a cut ${direction}`,
        10_000,
      );
      assert.notEqual(
        stream.ended,
        "mismatch",
        `byte ${stream.mismatchAt} came back wrong after a cut ${direction}`,
      );
      assert.ok(stream.received <= stream.sent);
      stream.stop();
      await echoCheck(servicePort, 100_000, 15_000);
    }
    // Latency on every chunk slows the tunnel down but changes no byte.
    proxy.delay(20);
    await echoCheck(servicePort, 300_000);
  } finally {
    await env.scope.close();
  }
});

Deno.test("faults: a user that vanishes mid-transfer: the tunnel is closed to the target within 1 s", async () => {
  const env = await setup({ interval: 1 });
  try {
    const { servicePort, target } = env.clients[0];
    const server = await env.startServer();
    await env.startClient();
    const users = FaultProxy.start({ targetPort: servicePort });
    env.scope.defer(() => users.close());
    const stream = new EchoStream(await connectUser(users.port), { pauseMs: 1 });
    await stream.receivedAtLeast(128 * 1024);
    assert.equal(target.live, 1);
    users.drop();
    const dropped = performance.now();
    await waitUntil(() => target.live === 0, "the target's connection to close", 5000);
    const after = performance.now() - dropped;
    assert.ok(
      after <= 1000,
      `the target's connection closed ${after.toFixed(0)} ms after the user`,
    );
    await waitUntil(() => server.count(/tunnel closed/) === 1, "the server to log the tunnel");
    stream.stop();
    await echoCheck(users.port);
  } finally {
    await env.scope.close();
  }
});
