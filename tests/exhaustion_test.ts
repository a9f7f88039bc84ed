/**
 * Descriptor exhaustion: a server under a 1,024-descriptor limit, flooded with silent
 * connections, keeps serving users and clients while the flood lasts and after it; connections
 * still in their TLS handshake are capped in total and per source address.
 * @module
 */
import assert from "node:assert/strict";
import * as net from "node:net";
import * as tls from "node:tls";
import { join } from "node:path";
import {
  clientToml,
  DEADLINE_MS,
  echoSetup,
  Process,
  Program,
  ROOT,
  roundTrip,
  runScript,
  Scope,
  waitUntil,
} from "./helpers.ts";

/** Starts `server.ts` under `prlimit --nofile=LIMIT:LIMIT` and waits until it is ready. */
async function limitedServer(scope: Scope, config: string, limit = 1024): Promise<Process> {
  const server = scope.track(
    new Process("prlimit", [
      `--nofile=${limit}:${limit}`,
      Deno.execPath(),
      "run",
      "--allow-all", // as tests run it: /proc/self/limits and /proc/net/tcp need it
      join(ROOT, "server.ts"),
      "--config",
      config,
    ]),
  );
  await server.waitFor(/NATadm server ready/);
  return server;
}

/** A silent TCP connection from `localAddress`, and whether the server has closed it. */
interface Silent {
  socket: net.Socket;
  closed: boolean;
}

/** Opens `count` silent TCP connections to 127.0.0.1:`port` from `localAddress`. */
async function flood(
  scope: Scope,
  port: number,
  count: number,
  localAddress = "127.0.0.1",
): Promise<Silent[]> {
  const out: Silent[] = [];
  scope.defer(() => out.forEach((s) => s.socket.destroy()));
  let next = 0;
  await Promise.all(Array.from({ length: 50 }, async () => {
    while (next < count) {
      next++;
      const socket = net.connect({ host: "127.0.0.1", port, localAddress });
      const silent: Silent = { socket, closed: false };
      out.push(silent);
      socket.on("error", () => {});
      socket.on("close", () => silent.closed = true);
      await new Promise<void>((resolve) => {
        socket.once("connect", () => resolve());
        socket.once("close", () => resolve());
      });
    }
  }));
  return out;
}

/**
 * Runs `client.ts --check` until it authenticates, as an operator would retry it; fails if it
 * has not within `timeoutMs`.
 */
async function checkSucceeds(clientConfig: string, timeoutMs = DEADLINE_MS): Promise<void> {
  let last = "";
  await waitUntil(
    async () => {
      const { code, stdout, stderr } = await new Program("client.ts", [
        "--config",
        clientConfig,
        "--check",
      ]).result(timeoutMs);
      last = `exit ${code}:\n${stdout}\n${stderr}`;
      return code === 0 && /Authenticated to/.test(stdout);
    },
    () => `client --check to succeed; last: ${last}`,
    timeoutMs,
  );
}

/** Asserts a user is served through `port` within `timeoutMs`. */
async function userServed(port: number, text: string, timeoutMs = DEADLINE_MS): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const answer = await Promise.race([
    roundTrip(port, text),
    new Promise<string>((_, reject) =>
      timer = setTimeout(
        () => reject(new Error(`no echo of "${text}" in ${timeoutMs} ms`)),
        timeoutMs,
      )
    ),
  ]).finally(() => clearTimeout(timer));
  assert.equal(answer, text);
}

/** Completes a TLS handshake with 127.0.0.1:`port` from `localAddress`; rejects on failure. */
function handshakeFrom(port: number, ca: string, localAddress: string): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const raw = net.connect({ host: "127.0.0.1", port, localAddress });
    const socket = tls.connect({ socket: raw, servername: "localhost", ca });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no TLS handshake from ${localAddress} within 5 s`));
    }, 5_000);
    socket.once("secureConnect", () => {
      clearTimeout(timer);
      resolve(socket);
    });
    socket.once("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    socket.once("close", () => {
      clearTimeout(timer);
      reject(new Error(`closed before the TLS handshake from ${localAddress} finished`));
    });
  });
}

Deno.test("under a 1,024-descriptor limit, 1,200 silent connections to the communication port do not stop users or client --check, during the flood or after", async () => {
  const scope = new Scope();
  try {
    const env = await echoSetup();
    scope.defer(env.cleanup);
    const server = await limitedServer(scope, env.serverConfig);
    await scope.client(env.clientConfig);
    await userServed(env.servicePort, "before");

    // An attacker at another address, and some silent users on the service port (fewer than
    // max_handshaking_per_address: each user's tunnel is a new connection from the client).
    const attack = await flood(scope, env.communicationPort, 1200, "127.0.0.3");
    const users = await flood(scope, env.servicePort, 40);
    await userServed(env.servicePort, "during", 10_000);
    await checkSucceeds(env.clientConfig, 15_000);
    assert.ok(attack.filter((s) => !s.closed).length > 0, "the flood was all gone already");
    await server.waitFor(/communication port \d+" is shedding connections/);

    for (const s of [...attack, ...users]) s.socket.destroy();
    await waitUntil(() => attack.every((s) => s.closed), "the flood to close");
    await userServed(env.servicePort, "after", 10_000);
    await checkSucceeds(env.clientConfig, 15_000);
    assert.equal(server.exited, false);
  } finally {
    await scope.close();
  }
});

Deno.test("when descriptors do run out, the communication, service and status ports accept again once they are freed", async () => {
  const scope = new Scope();
  try {
    const statusPort = (() => {
      const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      const port = (l.addr as Deno.NetAddr).port;
      l.close();
      return port;
    })();
    const env = await echoSetup({
      extra: [
        "max_handshaking = 100000",
        "max_handshaking_per_address = 100000",
        "max_pending_users = 100000",
        `status_port = ${statusPort}`,
      ].join("\n"),
    });
    scope.defer(env.cleanup);
    const server = await limitedServer(scope, env.serverConfig);
    await scope.client(env.clientConfig);
    await userServed(env.servicePort, "before");

    // Silent users each hold a descriptor (and ask for a tunnel, which holds another) until
    // there are none left.
    const users = await flood(scope, env.servicePort, 1200);
    await server.waitFor(/service port \d+" cannot accept connections: .*os error 24/);
    // Knock on the status and communication ports while nothing can be accepted.
    await flood(scope, statusPort, 1);
    const late = await flood(scope, env.communicationPort, 5, "127.0.0.4");

    for (const s of users) s.socket.destroy();
    await waitUntil(() => users.every((s) => s.closed), "the flood to close");
    await server.waitFor(/service port \d+" accepts connections again/);
    await userServed(env.servicePort, "after", 10_000);
    await checkSucceeds(env.clientConfig, 15_000).catch((err) => {
      console.error(
        server.lines.filter((l) => !/tunnel (open|closed)|TLS handshake with/.test(l)).join("\n"),
      );
      throw err;
    });
    const status = await fetch(`http://127.0.0.1:${statusPort}/status.json`, {
      signal: AbortSignal.timeout(10_000),
    });
    assert.equal(status.status, 200);
    await status.body?.cancel();
    assert.equal(server.exited, false);
    for (const s of late) s.socket.destroy();
  } finally {
    await scope.close();
  }
});

Deno.test("max_handshaking_per_address: 200 silent connections from one address cannot keep a TLS handshake from another address out", async () => {
  const scope = new Scope();
  try {
    const env = await echoSetup({
      extra: "max_handshaking = 150\nmax_handshaking_per_address = 50",
    });
    scope.defer(env.cleanup);
    const server = await limitedServer(scope, env.serverConfig);
    const silent = await flood(scope, env.communicationPort, 200, "127.0.0.1");
    // All but 50 are closed at once, long before the 10 s handshake timeout.
    await waitUntil(
      () => silent.filter((s) => s.closed).length >= 150,
      () => `150 of 200 to be closed, ${silent.filter((s) => s.closed).length} were`,
      5_000,
    );
    await server.waitFor(/shedding connections: .*max_handshaking_per_address/);
    const ca = await Deno.readTextFile(env.fixture.caPath);
    const other = await handshakeFrom(env.communicationPort, ca, "127.0.0.2");
    other.destroy();
    assert.equal(silent.filter((s) => !s.closed).length, 50, "the held ones were let go");
    // Shedding is logged at most once a second, not once per connection.
    assert.ok(server.count(/is shedding connections/) <= 5);
  } finally {
    await scope.close();
  }
});

Deno.test("a client turned away by the handshake cap says so in one line, naming the cap", async () => {
  const scope = new Scope();
  try {
    const env = await echoSetup({ extra: "max_handshaking_per_address = 5" });
    scope.defer(env.cleanup);
    const server = await scope.server(env.serverConfig);
    // Five silent connections hold 127.0.0.1's handshakes; a sixth shows the cap is full.
    await flood(scope, env.communicationPort, 6, "127.0.0.1");
    await server.waitFor(/shedding connections: .*max_handshaking_per_address/);
    const config = await env.fixture.write(
      "once.toml",
      clientToml({
        identity: env.identity,
        communicationPort: env.communicationPort,
        host: "127.0.0.1",
        cafile: env.fixture.caPath,
        infinite: false,
      }),
    );
    const { code, stderr } = await runScript("client.ts", ["--config", config]);
    assert.equal(code, 1, stderr);
    const lines = stderr.trim().split("\n");
    assert.equal(lines.length, 1, stderr);
    assert.match(
      lines[0],
      new RegExp(
        `server 127\\.0\\.0\\.1:${env.communicationPort} closed the connection during the TLS ` +
          "handshake .*max_handshaking_per_address",
      ),
    );
  } finally {
    await scope.close();
  }
});
