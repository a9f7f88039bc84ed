/**
 * Security controls, each proved against real processes, sockets and TLS: the client's allow
 * list, exact Deno permissions, private key modes, the server's limits, the failed-login
 * penalty, strict mux framing (a client that breaks it, overruns its credit or opens a stream
 * loses its own connection and nobody else's), source allow lists, key and certificate
 * rotation, and certificate verification. SECURITY.md maps every control to the test here that
 * proves it.
 */
import assert from "node:assert/strict";
import * as net from "node:net";
import { Buffer } from "node:buffer";
import { CERT_FILES } from "../src/certs.ts";
import { AUTH_FREE_FAILURES } from "../src/guard.ts";
import {
  encodeFrame,
  encodeMessage,
  encodeOpen,
  FrameType,
  INITIAL_WINDOW,
  MAX_DATA_BYTES,
  MAX_FRAME_BYTES,
  MAX_LOGIN_FRAME_BYTES,
  muxFrame,
} from "../src/protocol.ts";
import {
  clientToml,
  connectRefused,
  connectUser,
  DEADLINE_MS,
  echoSetup,
  errorLine,
  escapeRegExp,
  firstDifference,
  Fixture,
  freePort,
  type Identity,
  type Program,
  randomBytes,
  readExactly,
  runScript,
  Scope,
  waitUntil,
} from "./helpers.ts";
import {
  attemptLogin,
  closedWithin,
  countingEcho,
  dial,
  type Dialed,
  echoesThrough,
  fullServerToml,
  helloFor,
  lengthHeader,
  muxHeader,
  MuxPeer,
  type PeerStream,
  rawFrame,
  windowFrame,
} from "./hostile.ts";
import { OpensslCa } from "./openssl_ca.ts";

const encoder = new TextEncoder();
const bytes = (text: string) => encoder.encode(text);

/** A fixture removed when `scope` closes. */
async function fixtureIn(scope: Scope, hosts?: string[]): Promise<Fixture> {
  const fixture = await Fixture.create(hosts);
  scope.defer(() => fixture.cleanup());
  return fixture;
}

/** A counting echo service closed when `scope` closes. */
function echoIn(scope: Scope, hostname?: string): ReturnType<typeof countingEcho> {
  const echo = countingEcho(hostname);
  scope.defer(echo.close);
  return echo;
}

/** Closes `conn` when `scope` closes (if it is still open); returns it. */
function own<T extends { close(): void }>(scope: Scope, conn: T): T {
  scope.defer(() => {
    try {
      conn.close();
    } catch {
      // Already closed by the test.
    }
  });
  return conn;
}

/** A TLS connection to the communication port, closed when `scope` closes. */
async function dialIn(scope: Scope, port: number, caPem: string): Promise<Dialed> {
  const dialed = await dial(port, caPem);
  own(scope, dialed.stream);
  return dialed;
}

/** Our side's port of a connection: the server logs the user as `127.0.0.1:PORT`. */
function portOf(conn: Deno.Conn): number {
  return (conn.localAddr as Deno.NetAddr).port;
}

/** A pattern for the address `host:port` as the logs quote it. */
function addr(port: number, host = "127.0.0.1"): string {
  return `"?${escapeRegExp(host)}:${port}"?`;
}

/** Connects a user to `port`, checks that `text` echoes back, and hangs up. */
async function echoWorks(port: number, text = "ping"): Promise<void> {
  const user = await connectUser(port);
  try {
    assert.ok(await echoesThrough(user, bytes(text)), `no echo through service port ${port}`);
  } finally {
    user.close();
  }
}

/** Writes a server config and starts the server under `scope`. */
async function serverWith(
  scope: Scope,
  fixture: Fixture,
  options: Parameters<typeof fullServerToml>[0],
  args: string[] = [],
) {
  const file = await fixture.write("server.toml", fullServerToml(options));
  return { file, server: await scope.server(file, args) };
}

/** Client config text for `identity`, plus `allow` when given. */
function clientText(
  identity: Identity,
  communicationPort: number,
  allow?: string[],
  host?: string,
): string {
  const base = clientToml({ identity, communicationPort, host });
  return allow ? `${base}allow = ${JSON.stringify(allow)}\n` : base;
}

// ---------------------------------------------------------------------------------------------
// The client's allow list

Deno.test("client allow list: a target outside it is never dialled, and the server closes the user with the client's reason", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const identity = await fixture.identity("foo bar");
    const allowed = echoIn(scope);
    const forbidden = echoIn(scope);
    const communicationPort = freePort();
    const [okPort, badPort] = [freePort(), freePort()];
    const { server } = await serverWith(scope, fixture, {
      communicationPort,
      clients: [identity],
      services: [
        { port: okPort, name: identity.name, host: "localhost", targetPort: allowed.port },
        { port: badPort, name: identity.name, host: "localhost", targetPort: forbidden.port },
      ],
    });
    const client = await scope.client(
      await fixture.write(
        "client.toml",
        clientText(identity, communicationPort, [`localhost:${allowed.port}`]),
      ),
    );

    await echoWorks(okPort);
    const user = own(scope, await connectUser(badPort));
    const userPort = portOf(user);
    assert.ok(await closedWithin(user), "the server did not close the refused user");
    await client.waitFor(
      new RegExp(
        `refused to connect user ${addr(userPort)} to "?localhost:${forbidden.port}"?: ` +
          `"?not in the allow list`,
      ),
    );
    assert.equal(forbidden.accepted, 0, "the client connected to a target outside its list");
    assert.equal(allowed.accepted, 1);
    // The client sent its reason as it refused: the server logs it with the user.
    await server.waitFor(
      new RegExp(
        `user ${addr(userPort)} on service ${badPort} closed: client "?foo bar"? could not ` +
          `connect: "?localhost:${forbidden.port}: not in the allow list`,
      ),
      5_000,
    );
  } finally {
    await scope.close();
  }
});

Deno.test("without an allow list the client connects only to this machine: 127.0.0.2 is refused", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const identity = await fixture.identity("foo bar");
    const local = echoIn(scope);
    const elsewhere = echoIn(scope, "127.0.0.2");
    const communicationPort = freePort();
    const [okPort, badPort] = [freePort(), freePort()];
    const { server } = await serverWith(scope, fixture, {
      communicationPort,
      clients: [identity],
      services: [
        { port: okPort, name: identity.name, targetPort: local.port },
        { port: badPort, name: identity.name, host: "127.0.0.2", targetPort: elsewhere.port },
      ],
    });
    const client = await scope.client(
      await fixture.write("client.toml", clientText(identity, communicationPort)),
    );

    await echoWorks(okPort);
    const user = own(scope, await connectUser(badPort));
    const userPort = portOf(user);
    assert.ok(await closedWithin(user), "the server did not close the refused user");
    await client.waitFor(
      new RegExp(
        `refused to connect user ${addr(userPort)} to "?127\\.0\\.0\\.2:${elsewhere.port}`,
      ),
    );
    assert.equal(elsewhere.accepted, 0, "the client connected to 127.0.0.2 without an allow list");
    // 127.0.0.2 was reachable all along: the refusal is the client's choice, not the network's.
    (await Deno.connect({ hostname: "127.0.0.2", port: elsewhere.port })).close();
    await waitUntil(() => elsewhere.accepted === 1, "the direct connection to 127.0.0.2");
    await server.waitFor(
      new RegExp(
        `user ${addr(userPort)} on service ${badPort} closed: .*127\\.0\\.0\\.2:` +
          `${elsewhere.port}: not in the allow list`,
      ),
      5_000,
    );
  } finally {
    await scope.close();
  }
});

// ---------------------------------------------------------------------------------------------
// Exact Deno permissions

/** The flags `--print-permissions` prints for `script` and `config`, one per line. */
async function printedFlags(script: string, config: string): Promise<string[]> {
  const { code, stdout, stderr } = await runScript(script, [
    "--config",
    config,
    "--print-permissions",
  ]);
  assert.equal(code, 0, stderr);
  return stdout.trim().split("\n");
}

Deno.test("--print-permissions prints the server's exact flags: its ports on listen_host and its files", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const identity = await fixture.identity("foo bar");
    const [communicationPort, a, b] = [freePort(), freePort(), freePort()];
    const file = await fixture.write(
      "server.toml",
      fullServerToml({
        communicationPort,
        clients: [identity],
        services: [
          { port: a, name: identity.name, targetPort: 22 },
          { port: b, name: identity.name, targetPort: 80 },
        ],
      }),
    );
    assert.deepEqual(await printedFlags("server.ts", file), [
      // Services in port order, as TOML tables keyed by number come.
      `--allow-net=127.0.0.1:${communicationPort},127.0.0.1:${Math.min(a, b)},` +
      `127.0.0.1:${Math.max(a, b)}`,
      `--allow-read=${file},${fixture.path(CERT_FILES.cert)},${fixture.path(CERT_FILES.key)}`,
    ]);
  } finally {
    await scope.close();
  }
});

Deno.test("--print-permissions prints the client's exact flags: the server, allowed targets, its files", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const identity = await fixture.identity("foo bar");
    const communicationPort = freePort();
    const read = `--allow-read=FILE,${fixture.caPath},${identity.keyPath}`;
    const listed = await fixture.write(
      "listed.toml",
      clientText(identity, communicationPort, ["localhost:22", "[::1]:80", "10.0.0.5:3389"]),
    );
    assert.deepEqual(await printedFlags("client.ts", listed), [
      `--allow-net=localhost:${communicationPort},localhost:22,[::1]:80,10.0.0.5:3389`,
      read.replace("FILE", listed),
    ]);
    const unlisted = await fixture.write("unlisted.toml", clientText(identity, communicationPort));
    assert.deepEqual(await printedFlags("client.ts", unlisted), [
      `--allow-net=localhost:${communicationPort},localhost,127.0.0.1,[::1]`,
      read.replace("FILE", unlisted),
    ]);
  } finally {
    await scope.close();
  }
});

Deno.test("under exactly their printed flags both programs tunnel, and a target off the allow list is refused by the client's own check, not by Deno", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const identity = await fixture.identity("foo bar");
    const allowed = echoIn(scope);
    const forbidden = echoIn(scope);
    const communicationPort = freePort();
    const [okPort, badPort] = [freePort(), freePort()];
    const serverFile = await fixture.write(
      "server.toml",
      fullServerToml({
        communicationPort,
        clients: [identity],
        services: [
          { port: okPort, name: identity.name, targetPort: allowed.port },
          { port: badPort, name: identity.name, targetPort: forbidden.port },
        ],
      }),
    );
    const clientFile = await fixture.write(
      "client.toml",
      clientText(identity, communicationPort, [`localhost:${allowed.port}`]),
    );
    const serverFlags = await printedFlags("server.ts", serverFile);
    const clientFlags = await printedFlags("client.ts", clientFile);

    const server = scope.spawn("server.ts", ["--config", serverFile], serverFlags);
    await server.waitFor(/NATadm server ready/);
    const client = scope.spawn("client.ts", ["--config", clientFile], clientFlags);
    await client.waitFor(/connected to .* as/);

    await echoWorks(okPort, "under exact permissions");
    const user = own(scope, await connectUser(badPort));
    assert.ok(await closedWithin(user), "the server did not close the refused user");
    await client.waitFor(new RegExp(`localhost:${forbidden.port}"?: "?not in the allow list`));
    const denied = /NotCapable|PermissionDenied|Requires \w+ access|permission/i;
    assert.equal(client.count(denied), 0, client.lines.join("\n"));
    assert.equal(server.count(denied), 0, server.lines.join("\n"));
    assert.equal(forbidden.accepted, 0);
  } finally {
    await scope.close();
  }
});

Deno.test("Deno itself denies a connection that the client's printed flags do not list", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const identity = await fixture.identity("foo bar");
    const listed = echoIn(scope);
    const unlisted = echoIn(scope);
    const clientFile = await fixture.write(
      "client.toml",
      clientText(identity, freePort(), [`localhost:${listed.port}`]),
    );
    const flags = await printedFlags("client.ts", clientFile);
    const probe = await fixture.write(
      "probe.ts",
      `try {
  const conn = await Deno.connect({ hostname: Deno.args[0], port: Number(Deno.args[1]) });
  conn.close();
  console.log("connected");
} catch (err) {
  console.log(err.name);
}
`,
    );
    const connect = async (host: string, port: number) => {
      const out = await new Deno.Command(Deno.execPath(), {
        args: ["run", ...flags, probe, host, String(port)],
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).output();
      return new TextDecoder().decode(out.stdout).trim();
    };
    assert.equal(await connect("localhost", listed.port), "connected");
    assert.equal(await connect("localhost", unlisted.port), "NotCapable");
    assert.equal(await connect("127.0.0.1", unlisted.port), "NotCapable");
    assert.equal(unlisted.accepted, 0);
  } finally {
    await scope.close();
  }
});

// ---------------------------------------------------------------------------------------------
// Private key file modes

Deno.test("a client key readable by group or others stops the client with a chmod 600 hint", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const identity = await fixture.identity("foo bar");
    const file = await fixture.write("client.toml", clientText(identity, freePort()));
    for (const mode of [0o644, 0o640, 0o604]) {
      await Deno.chmod(identity.keyPath, mode);
      const { code, stderr } = await runScript("client.ts", ["--config", file]);
      assert.notEqual(code, 0, stderr);
      const key = escapeRegExp(identity.keyPath);
      assert.match(
        errorLine(stderr, "natadm-client"),
        new RegExp(`: key: private key ${key} is readable by others .*; run: chmod 600 ${key}$`),
      );
    }
    await Deno.chmod(identity.keyPath, 0o600);
    await printedFlags("client.ts", file); // the same config loads once the key is private
  } finally {
    await scope.close();
  }
});

Deno.test("a server key readable by group or others stops the server with a chmod 600 hint, nothing bound", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const identity = await fixture.identity("foo bar");
    const [communicationPort, servicePort] = [freePort(), freePort()];
    const file = await fixture.write(
      "server.toml",
      fullServerToml({
        communicationPort,
        clients: [identity],
        services: [{ port: servicePort, name: identity.name, targetPort: 22 }],
      }),
    );
    const keyPath = fixture.path(CERT_FILES.key);
    await Deno.chmod(keyPath, 0o644);
    const { code, stderr } = await runScript("server.ts", ["--config", file]);
    assert.notEqual(code, 0, stderr);
    const key = escapeRegExp(keyPath);
    assert.match(
      errorLine(stderr, "natadm-server"),
      new RegExp(`private key ${key} is readable by others .*; run: chmod 600 ${key}$`),
    );
    assert.ok(await connectRefused(communicationPort));
    assert.ok(await connectRefused(servicePort));
    await Deno.chmod(keyPath, 0o600);
    await printedFlags("server.ts", file);
  } finally {
    await scope.close();
  }
});

// ---------------------------------------------------------------------------------------------
// Limits

/** Sets up a server (and, unless `client` is false, a client) for one echo service. */
async function echoWorld(
  scope: Scope,
  options: { extra?: string; client?: boolean; serverArgs?: string[] } = {},
) {
  const env = await echoSetup({ extra: options.extra });
  scope.defer(env.cleanup);
  const server = await scope.server(env.serverConfig, options.serverArgs);
  const client = options.client === false ? undefined : await scope.client(env.clientConfig);
  const caPem = await Deno.readTextFile(env.fixture.caPath);
  return { ...env, server, client, caPem };
}

Deno.test("a login frame length over MAX_LOGIN_FRAME_BYTES closes the connection and is logged; exactly the limit is read; the server keeps serving", async () => {
  const scope = new Scope();
  try {
    const w = await echoWorld(scope);
    for (const length of [MAX_LOGIN_FRAME_BYTES + 1, 0xffff_ffff]) {
      const { stream, localPort } = await dialIn(scope, w.communicationPort, w.caPem);
      await stream.write(lengthHeader(length));
      await stream.write(new Uint8Array(64));
      assert.ok(await closedWithin(stream), `a ${length}-byte header did not close the connection`);
      await w.server.waitFor(
        new RegExp(
          `connection from ${addr(localPort)} dropped: "?frame of ${length} bytes exceeds ` +
            `${MAX_LOGIN_FRAME_BYTES}`,
        ),
      );
    }
    // A frame of exactly MAX_LOGIN_FRAME_BYTES is within the limit: a hello padded with spaces.
    const atLimit = await dialIn(scope, w.communicationPort, w.caPem);
    const hello = JSON.stringify(helloFor(w.identity.name)).padEnd(MAX_LOGIN_FRAME_BYTES, " ");
    await atLimit.stream.write(lengthHeader(MAX_LOGIN_FRAME_BYTES));
    await atLimit.stream.write(bytes(hello));
    assert.equal((await atLimit.framed.read(DEADLINE_MS))?.type, "challenge");
    atLimit.stream.close();

    await echoWorks(w.servicePort, "still serving");
    assert.equal(w.server.exited, false);
  } finally {
    await scope.close();
  }
});

Deno.test("max_pending_users: with the client away, the user past the limit is closed at once and logged", async () => {
  const scope = new Scope();
  try {
    const w = await echoWorld(scope, { extra: "max_pending_users = 2", client: false });
    const waiting = [
      own(scope, await connectUser(w.servicePort)),
      own(scope, await connectUser(w.servicePort)),
    ];
    for (const user of waiting) {
      await w.server.waitFor(new RegExp(`user ${addr(portOf(user))} on service \\d+ waits for`));
    }
    const third = own(scope, await connectUser(w.servicePort));
    // Closed long before pending_timeout (60 s) could have done it.
    assert.ok(await closedWithin(third), "the user past max_pending_users was not closed");
    await w.server.waitFor(
      new RegExp(
        `user ${addr(portOf(third))} on service ${w.servicePort} refused: ` +
          `"?2 users already wait \\(max_pending_users\\)`,
      ),
    );
    // The two within the limit were kept: the client serves both once it comes.
    await scope.client(w.clientConfig);
    for (const user of waiting) assert.ok(await echoesThrough(user, bytes("kept waiting")));
  } finally {
    await scope.close();
  }
});

Deno.test("max_tunnels_per_client: a user past the client's live tunnels is refused until one ends", async () => {
  const scope = new Scope();
  try {
    const w = await echoWorld(scope, { extra: "max_tunnels_per_client = 2" });
    const live = [
      own(scope, await connectUser(w.servicePort)),
      own(scope, await connectUser(w.servicePort)),
    ];
    for (const user of live) assert.ok(await echoesThrough(user, bytes("live")));
    const third = own(scope, await connectUser(w.servicePort));
    assert.ok(await closedWithin(third), "the user past max_tunnels_per_client was not closed");
    await w.server.waitFor(
      new RegExp(
        `user ${addr(portOf(third))} on service ${w.servicePort} refused: "?client "?foo bar"? ` +
          `has 2 live tunnels \\(max_tunnels_per_client\\)`,
      ),
    );
    assert.ok(await echoesThrough(live[1], bytes("the others live on")));
    const gone = portOf(live[0]);
    live[0].close();
    await w.server.waitFor(new RegExp(`tunnel closed: user ${addr(gone)}`));
    await echoWorks(w.servicePort, "a slot is free again");
  } finally {
    await scope.close();
  }
});

Deno.test("max_tunnels_per_address: a user past its address's live tunnels is refused; another address is served", async () => {
  const scope = new Scope();
  try {
    const w = await echoWorld(scope, { extra: "max_tunnels_per_address = 2" });
    const live = [
      own(scope, await connectUser(w.servicePort)),
      own(scope, await connectUser(w.servicePort)),
    ];
    for (const user of live) assert.ok(await echoesThrough(user, bytes("live")));
    const third = own(scope, await connectUser(w.servicePort));
    assert.ok(await closedWithin(third), "the user past max_tunnels_per_address was not closed");
    await w.server.waitFor(
      new RegExp(
        `user ${addr(portOf(third))} on service ${w.servicePort} refused: "?127\\.0\\.0\\.1 has ` +
          `2 live tunnels \\(max_tunnels_per_address\\)`,
      ),
    );
    // Another address has its own count: a user from 127.0.0.2 is served.
    const other = net.connect({
      host: "127.0.0.1",
      port: w.servicePort,
      localAddress: "127.0.0.2",
    });
    scope.defer(() => other.destroy());
    const echoed = await new Promise<string>((resolve, reject) => {
      let got = "";
      other.on("data", (d: Uint8Array) => {
        got += new TextDecoder().decode(d);
        if (got === "from elsewhere") resolve(got);
      });
      other.on("error", reject);
      other.on("close", () => reject(new Error(`closed after ${JSON.stringify(got)}`)));
      other.write("from elsewhere");
    });
    assert.equal(echoed, "from elsewhere");
  } finally {
    await scope.close();
  }
});

Deno.test("max_unauthenticated: connections past the limit are dropped at once until the silent ones leave", async () => {
  const scope = new Scope();
  try {
    const w = await echoWorld(scope, { extra: "max_unauthenticated = 3", client: false });
    const silent = [];
    for (let i = 0; i < 3; i++) silent.push(await dialIn(scope, w.communicationPort, w.caPem));
    const fourth = await dialIn(scope, w.communicationPort, w.caPem);
    const started = performance.now();
    assert.ok(await closedWithin(fourth.stream), "the connection past the limit was kept");
    // At once, not after the 10 s a silent connection gets for its first frame.
    assert.ok(performance.now() - started < 5_000, `${performance.now() - started} ms`);
    await w.server.waitFor(
      new RegExp(
        `connection from ${addr(fourth.localPort)} dropped: 3 others are still unauthenticated`,
      ),
    );
    for (const s of silent) assert.equal(w.server.count(new RegExp(addr(s.localPort))), 0);
    for (const s of silent) s.stream.close();
    // Once the silent ones have gone, a client gets in and tunnels.
    await scope.client(w.clientConfig);
    await echoWorks(w.servicePort);
  } finally {
    await scope.close();
  }
});

// ---------------------------------------------------------------------------------------------
// Failed authentication

Deno.test("failed logins from one address get slower, and each is logged once with address and name", async () => {
  const scope = new Scope();
  try {
    const w = await echoWorld(scope, { client: false });
    const impostor = await w.fixture.identity(w.identity.name); // same name, another key
    const login = (name: string, keyPath: string) =>
      attemptLogin({ port: w.communicationPort, caPem: w.caPem, name, keyPath });
    const times: number[] = [];
    const ports: number[] = [];
    for (let i = 0; i < 5; i++) {
      const attempt = await login(impostor.name, impostor.keyPath);
      attempt.dialed.stream.close();
      assert.equal(attempt.reply?.type, "refused", JSON.stringify(attempt.reply));
      times.push(attempt.ms);
      ports.push(attempt.dialed.localPort);
    }
    // The first failures are free (AUTH_FREE_FAILURES); the fastest of them is the baseline.
    const free = Math.min(...times.slice(0, AUTH_FREE_FAILURES + 1));
    assert.ok(
      times[4] - free >= 200,
      `refusals took ${times.map((t) => t.toFixed(0)).join(", ")} ms: the 5th is not slower`,
    );
    for (const port of ports) {
      const line = new RegExp(`client from ${addr(port)} refused: '?wrong key for "?foo bar"?'?$`);
      await w.server.waitFor(line);
      assert.equal(w.server.count(new RegExp(addr(port))), 1, w.server.lines.join("\n"));
    }
    assert.equal(w.server.count(/refused: '?wrong key/), 5);

    const unknown = await login("nobody", w.identity.keyPath);
    unknown.dialed.stream.close();
    assert.equal(unknown.reply?.type, "refused");
    await w.server.waitFor(
      new RegExp(`client from ${addr(unknown.dialed.localPort)} refused: '?unknown name "?nobody`),
    );
    // Slower, not locked out: the right key still gets in.
    const right = await login(w.identity.name, w.identity.keyPath);
    right.dialed.stream.close();
    assert.equal(right.reply?.type, "welcome", JSON.stringify(right.reply));
  } finally {
    await scope.close();
  }
});

// ---------------------------------------------------------------------------------------------
// Strict mux framing: a client that breaks it loses its own connection, nobody else's

/**
 * A server with clients "foo bar" (driven by hand, service `hostilePort`) and "second" (a real
 * client.ts serving an echo on `secondPort`).
 */
async function muxWorld(scope: Scope) {
  const fixture = await fixtureIn(scope);
  const first = await fixture.identity("foo bar");
  const second = await fixture.identity("second");
  const echo = echoIn(scope);
  const communicationPort = freePort();
  const [hostilePort, secondPort] = [freePort(), freePort()];
  const { server } = await serverWith(scope, fixture, {
    communicationPort,
    clients: [first, second],
    services: [
      { port: hostilePort, name: first.name, targetPort: 7 },
      { port: secondPort, name: second.name, targetPort: echo.port },
    ],
  });
  const secondClient = await scope.client(
    await fixture.write("second.toml", clientText(second, communicationPort)),
  );
  const caPem = await Deno.readTextFile(fixture.caPath);
  const login = async () => own(scope, await MuxPeer.login(communicationPort, caPem, first));
  /** Logs in as "foo bar" and has a user open a stream to it; returns both. */
  const withStream = async () => {
    const peer = await login();
    const user = own(scope, await connectUser(hostilePort));
    const stream = await peer.nextOpen(0);
    return { peer, user, stream };
  };
  return { server, secondClient, secondPort, hostilePort, login, withStream };
}

/** Waits for the server's log line saying client "foo bar" was disconnected for `why`. */
async function disconnectedFor(server: Program, why: RegExp | string): Promise<string> {
  const text = typeof why === "string" ? escapeRegExp(why) : why.source;
  return await server.waitFor(new RegExp(`client "?foo bar"? disconnected \\(.*${text}`));
}

/** One malformed mux frame, what it needs, and the reason the server gives. */
interface BadFrame {
  what: string;
  /** Whether a stream must be open first (its id is passed to `bytes`). */
  stream: boolean;
  bytes: (id: number) => Uint8Array;
  why: string;
}

const badFrames: BadFrame[] = [
  {
    what: "an unknown frame type",
    stream: false,
    bytes: () => muxHeader(9, 1, 0),
    why: "unknown mux frame type 9",
  },
  {
    what: "a DATA frame over 64 KiB",
    stream: true,
    bytes: (id) => muxHeader(FrameType.DATA, id, MAX_DATA_BYTES + 1),
    why: `mux frame type 2 of ${MAX_DATA_BYTES + 1} bytes exceeds ${MAX_DATA_BYTES}`,
  },
  {
    what: "a control frame over MAX_FRAME_BYTES",
    stream: false,
    bytes: () => muxHeader(FrameType.CONTROL, 0, MAX_FRAME_BYTES + 1),
    why: `mux frame type 0 of ${MAX_FRAME_BYTES + 1} bytes exceeds ${MAX_FRAME_BYTES}`,
  },
  {
    what: "a length of 4 GiB",
    stream: true,
    bytes: (id) => muxHeader(FrameType.DATA, id, 0xffff_ffff),
    why: "of 4294967295 bytes exceeds",
  },
  {
    what: "a control frame off stream 0",
    stream: true,
    bytes: (id) => muxFrame(FrameType.CONTROL, id, bytes(JSON.stringify({ type: "ping" }))),
    why: "control frame off stream 0",
  },
  {
    what: "a stream frame on stream 0",
    stream: false,
    bytes: () => muxFrame(FrameType.DATA, 0, bytes("x")),
    why: "stream frame on stream 0",
  },
  {
    what: "an empty DATA frame",
    stream: true,
    bytes: (id) => muxFrame(FrameType.DATA, id),
    why: "empty DATA frame",
  },
  {
    what: "an empty control frame",
    stream: false,
    bytes: () => muxFrame(FrameType.CONTROL, 0),
    why: "empty control frame",
  },
  {
    what: "a WINDOW of 3 bytes",
    stream: true,
    bytes: (id) => muxFrame(FrameType.WINDOW, id, new Uint8Array(3)),
    why: "WINDOW frame must carry 4 bytes",
  },
  {
    what: "a WINDOW of 0",
    stream: true,
    bytes: (id) => windowFrame(id, 0),
    why: "WINDOW frame of 0 bytes",
  },
  {
    what: "a WINDOW that grows the credit past its limit",
    stream: true,
    bytes: (id) => windowFrame(id, 0xffff_ffff),
    why: "window grew past its limit",
  },
  {
    what: "a FIN with a payload",
    stream: true,
    bytes: (id) => muxFrame(FrameType.FIN, id, bytes("x")),
    why: "mux frame type 4 of 1 bytes exceeds 0",
  },
  {
    what: "DATA for a stream that was never opened",
    stream: false,
    bytes: () => muxFrame(FrameType.DATA, 7, bytes("x")),
    why: "frame for stream 7, which was never opened",
  },
  {
    what: "a WINDOW for a stream above the last one opened",
    stream: true,
    bytes: (id) => windowFrame(id + 1, 1),
    why: "which was never opened",
  },
  {
    what: "an OPEN from the client",
    stream: false,
    bytes: () =>
      muxFrame(FrameType.OPEN, 1, encodeOpen({ host: "127.0.0.1", port: 22, user: "x" })),
    why: "OPEN frame from a peer that may not open",
  },
  {
    what: "a second FIN",
    stream: true,
    bytes: (id) => concat(muxFrame(FrameType.FIN, id), muxFrame(FrameType.FIN, id)),
    why: "second FIN on stream",
  },
  {
    what: "DATA after FIN",
    stream: true,
    bytes: (id) => concat(muxFrame(FrameType.FIN, id), muxFrame(FrameType.DATA, id, bytes("x"))),
    why: "DATA after FIN on stream",
  },
  {
    what: "a control message that is not JSON",
    stream: false,
    bytes: () => muxFrame(FrameType.CONTROL, 0, bytes("{not json")),
    why: "frame is not valid JSON",
  },
  {
    what: "a control message only the server may send",
    stream: false,
    bytes: () =>
      muxFrame(FrameType.CONTROL, 0, encodeMessage({ type: "welcome", services: [], pending: 0 })),
    why: 'unexpected "welcome" from a client',
  },
];

/** The byte arrays one after another, as one array. */
function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  parts.reduce((at, p) => (out.set(p, at), at + p.length), 0);
  return out;
}

Deno.test("each malformed mux frame closes only the sender's connection, with the reason logged; other clients keep working", async () => {
  const scope = new Scope();
  try {
    const w = await muxWorld(scope);
    for (const bad of badFrames) {
      const { peer, user, id } = bad.stream
        ? await w.withStream().then(({ peer, user, stream }) => ({ peer, user, id: stream.id }))
        : { peer: await w.login(), user: undefined, id: 0 };
      const before = w.server.count(/client "?foo bar"? disconnected/);
      await peer.send(bad.bytes(id));
      assert.ok(await peer.closedWithin(), `${bad.what}: the connection was kept`);
      await waitUntil(
        () => w.server.count(/client "?foo bar"? disconnected/) > before,
        `the server's line for ${bad.what}:\n${w.server.lines.join("\n")}`,
      );
      const line = w.server.lines.filter((l) => /client "?foo bar"? disconnected/.test(l)).at(-1)!;
      assert.ok(line.includes(bad.why), `${bad.what}: expected "${bad.why}" in: ${line}`);
      // The user of a stream on that connection is closed with it, not left hanging.
      if (user) assert.ok(await closedWithin(user), `${bad.what}: its user was left open`);
      await echoWorks(w.secondPort, `after ${bad.what}`);
    }
    assert.equal(w.secondClient.count(/disconnected|retrying/), 0, w.secondClient.lines.join("\n"));
    assert.equal(w.server.exited, false);
  } finally {
    await scope.close();
  }
});

Deno.test("DATA beyond the credit the server granted closes that client's connection; within it, the bytes reach the user", async () => {
  const scope = new Scope();
  try {
    const w = await muxWorld(scope);
    // Within the credit: 64 KiB, exactly the initial window, arrives whole.
    const good = await w.withStream();
    const full = randomBytes(INITIAL_WINDOW);
    await good.peer.data(good.stream, full);
    assert.equal(firstDifference(await readExactly(good.user, full.length), full), -1);
    good.peer.close();

    // Past it: the user does not read, so the server's credit is spent and not given back;
    // one byte more than it granted is refused.
    const { peer, user, stream } = await w.withStream();
    await fillCredit(peer, stream);
    await peer.data(stream, bytes("x"));
    assert.ok(await peer.closedWithin(), "DATA past the credit was accepted");
    await disconnectedFor(w.server, `stream ${stream.id} sent 1 bytes past its credit`);
    assert.ok(await drainedWithin(user), "the user of the overrun stream was left open");
    await echoWorks(w.secondPort, "after an overrun");
  } finally {
    await scope.close();
  }
});

/** Reads `conn` (at most 256 MiB) until it ends or fails: true if it did within the deadline. */
async function drainedWithin(conn: Deno.Conn, timeoutMs = DEADLINE_MS): Promise<boolean> {
  const buf = new Uint8Array(1024 * 1024);
  const timer = setTimeout(() => conn.close(), timeoutMs);
  try {
    for (let i = 0; i < 256; i++) if (await conn.read(buf) === null) return true;
    return false;
  } catch (err) {
    return !(err instanceof Deno.errors.BadResource); // closed by our deadline: not ended
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Sends on `stream` all the credit the server grants while its user reads nothing, until the
 * server grants no more (the user's socket buffers are full): then the server holds exactly
 * what it granted, and `stream.credit` is 0.
 */
async function fillCredit(peer: MuxPeer, stream: PeerStream): Promise<void> {
  const quiet = 1_000;
  let sent = 0;
  const end = Date.now() + DEADLINE_MS;
  for (;;) {
    if (stream.credit > 0) {
      const n = stream.credit;
      sent += n;
      await peer.data(stream, new Uint8Array(n));
    }
    // Wait for more credit; none for a second means the server's side is full.
    const credited = await waitUntil(() => stream.credit > 0, "more credit", quiet).then(
      () => true,
      () => false,
    );
    if (!credited) return;
    if (Date.now() > end || sent > 256 * 1024 * 1024) {
      throw new Error(`the server kept granting credit: ${sent} bytes sent`);
    }
  }
}

Deno.test("a client cannot open a stream: its OPEN closes its connection and reaches no service", async () => {
  const scope = new Scope();
  try {
    const w = await muxWorld(scope);
    const target = echoIn(scope);
    const peer = await w.login();
    await peer.frame(
      FrameType.OPEN,
      1,
      encodeOpen({ host: "127.0.0.1", port: target.port, user: "attacker" }),
    );
    assert.ok(await peer.closedWithin(), "the server kept a client that sent OPEN");
    await disconnectedFor(w.server, "OPEN frame from a peer that may not open");
    assert.equal(target.accepted, 0, "the server connected somewhere for a client's OPEN");
    assert.equal(w.server.count(/tunnel open/), 0, w.server.lines.join("\n"));
    await echoWorks(w.secondPort, "after a client's OPEN");
  } finally {
    await scope.close();
  }
});

Deno.test("frames for a stream that just ended are ignored, not fatal: the connection serves the next user", async () => {
  const scope = new Scope();
  try {
    const w = await muxWorld(scope);
    const { peer, user, stream } = await w.withStream();
    peer.echo(stream);
    assert.ok(await echoesThrough(user, bytes("first")));
    user.close(); // the server ends the stream (FIN), and resets it once we stop
    await waitUntil(() => stream.fin || stream.reset !== undefined, "the end of stream 1");
    await peer.frame(FrameType.RESET, stream.id, bytes("late"));
    await peer.send(windowFrame(stream.id, 10));
    const next = own(scope, await connectUser(w.hostilePort));
    const second = await peer.nextOpen(1);
    assert.ok(second.id > stream.id, `stream ids must grow: ${stream.id} then ${second.id}`);
    peer.echo(second);
    assert.ok(await echoesThrough(next, bytes("second user")), "the next user was not served");
    assert.equal(w.server.count(/client "?foo bar"? disconnected/), 0, w.server.lines.join("\n"));
  } finally {
    await scope.close();
  }
});

// ---------------------------------------------------------------------------------------------
// A user's bytes

Deno.test("a user's garbage, frame-like bytes included, comes back byte-exact from the echo", async () => {
  const scope = new Scope();
  try {
    const w = await echoWorld(scope);
    const parts = [
      randomBytes(65_536),
      encodeFrame(helloFor("foo bar")),
      rawFrame({ type: "data", version: 1, id: "AAAA", session: "AAAA" }),
      lengthHeader(0xffff_ffff),
      // What mux frames look like: an OPEN, a FIN, a RESET, a WINDOW, a broken header.
      muxFrame(FrameType.OPEN, 1, encodeOpen({ host: "127.0.0.1", port: 22, user: "x" })),
      muxFrame(FrameType.FIN, 1),
      muxFrame(FrameType.RESET, 1, bytes("reset")),
      windowFrame(1, 0xffff_ffff),
      muxHeader(FrameType.DATA, 0, MAX_FRAME_BYTES + 1),
      new Uint8Array([0xff, 0xfe, 0xc0, 0x80, 0xed, 0xa0, 0x80]), // invalid UTF-8
      new Uint8Array([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]),
      new Uint8Array(1024), // zeros
      randomBytes(200_003),
    ];
    const payload = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    parts.reduce((at, p) => (payload.set(p, at), at + p.length), 0);
    const user = own(scope, await connectUser(w.servicePort));
    assert.ok(await echoesThrough(user, payload), "the bytes did not come back exactly");
    const port = portOf(user);
    user.close();
    const n = payload.length;
    await w.server.waitFor(
      new RegExp(`tunnel closed: user ${addr(port)} .*; ${n} bytes up, ${n} bytes down`),
    );
  } finally {
    await scope.close();
  }
});

// ---------------------------------------------------------------------------------------------
// TLS on the communication port

/** Runs `openssl s_client` against `port` with `args`; returns its exit code and output. */
async function sClient(port: number, caPath: string, args: string[]) {
  const out = await new Deno.Command("openssl", {
    args: [
      "s_client",
      ...args,
      "-connect",
      `127.0.0.1:${port}`,
      "-servername",
      "localhost",
      "-CAfile",
      caPath,
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

Deno.test("the communication port refuses TLS 1.1 and speaks TLS 1.2 (openssl s_client)", async () => {
  const scope = new Scope();
  try {
    const w = await echoWorld(scope, { client: false });
    const old = await sClient(w.communicationPort, w.fixture.caPath, [
      "-tls1_1",
      "-cipher",
      "DEFAULT@SECLEVEL=0", // so that it is the server, not openssl, that says no
    ]);
    assert.notEqual(old.code, 0, old.stdout);
    assert.match(old.stdout, /Cipher is \(NONE\)/);
    assert.match(old.stderr, /alert/, "the server did not answer TLS 1.1 with an alert");
    const refusal = await w.server.waitFor(/TLS handshake with .* failed/);

    const tls12 = await sClient(w.communicationPort, w.fixture.caPath, ["-tls1_2"]);
    assert.equal(tls12.code, 0, tls12.stderr);
    assert.match(tls12.stdout, /Protocol\s*: TLSv1\.2/);
    assert.match(tls12.stdout, /Verify return code: 0 \(ok\)/);
    // The refusal is logged with the address it came from.
    assert.match(refusal, /TLS handshake with "?127\.0\.0\.1:\d+"? failed/);
  } finally {
    await scope.close();
  }
});

/**
 * Runs a one-shot client (`infinite = false`) of `identity` against `communicationPort` with
 * `cafile`; returns its exit code and stderr lines.
 */
async function oneShot(
  fixture: Fixture,
  identity: Identity,
  communicationPort: number,
  cafile: string,
) {
  const file = await fixture.write(
    `client-${crypto.randomUUID()}.toml`,
    clientToml({ identity, communicationPort, cafile, infinite: false }),
  );
  const { code, stderr } = await runScript("client.ts", ["--config", file]);
  return { code, lines: stderr.split("\n").filter((l) => l.trim() !== "") };
}

/** A server presenting `certificate`; the fixture's identity "foo bar" may log in. */
async function serverPresenting(scope: Scope, certificate: [string, string]) {
  const fixture = await fixtureIn(scope);
  const identity = await fixture.identity("foo bar");
  const communicationPort = freePort();
  await serverWith(scope, fixture, {
    communicationPort,
    clients: [identity],
    services: [],
    certificate,
  });
  return { fixture, identity, communicationPort };
}

/** Asserts a client's failure was one clear line matching `pattern`, and a non-zero exit. */
function oneClearLine(result: { code: number; lines: string[] }, pattern: RegExp): void {
  assert.notEqual(result.code, 0, result.lines.join("\n"));
  assert.equal(result.lines.length, 1, `expected one line, got:\n${result.lines.join("\n")}`);
  assert.match(result.lines[0], pattern);
}

Deno.test("the client accepts an openssl certificate from its cafile and refuses one from another CA", async () => {
  const scope = new Scope();
  try {
    const pki = await fixtureIn(scope);
    const trusted = await OpensslCa.create(pki, "trusted");
    const stranger = await OpensslCa.create(pki, "stranger");
    const w = await serverPresenting(
      scope,
      await stranger.issue("server", "DNS:localhost,IP:127.0.0.1"),
    );
    oneClearLine(
      await oneShot(w.fixture, w.identity, w.communicationPort, trusted.caPath),
      /presented a certificate not signed by cafile/,
    );
    const ok = await oneShot(w.fixture, w.identity, w.communicationPort, stranger.caPath);
    assert.equal(ok.code, 0, ok.lines.join("\n"));
    assert.match(ok.lines.join("\n"), /connected to .* as "?foo bar/);
  } finally {
    await scope.close();
  }
});

Deno.test("the client refuses an expired server certificate with one clear line", async () => {
  const scope = new Scope();
  try {
    const pki = await fixtureIn(scope);
    const ca = await OpensslCa.create(pki, "ca");
    const w = await serverPresenting(
      scope,
      await ca.issue("expired", "DNS:localhost,IP:127.0.0.1", {
        start: "20200101000000Z",
        end: "20200201000000Z",
      }),
    );
    oneClearLine(
      await oneShot(w.fixture, w.identity, w.communicationPort, ca.caPath),
      /certificate is expired or not yet valid/,
    );
  } finally {
    await scope.close();
  }
});

Deno.test("the client refuses a server certificate for another name with one clear line", async () => {
  const scope = new Scope();
  try {
    const pki = await fixtureIn(scope);
    const ca = await OpensslCa.create(pki, "ca");
    const w = await serverPresenting(scope, await ca.issue("other", "DNS:other.example"));
    oneClearLine(
      await oneShot(w.fixture, w.identity, w.communicationPort, ca.caPath),
      /certificate is not valid for the name "localhost"/,
    );
  } finally {
    await scope.close();
  }
});

Deno.test("a remote that speaks plain TCP, not TLS, gets one clear line from the client", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const identity = await fixture.identity("foo bar");
    const echo = echoIn(scope); // answers the ClientHello with itself
    const banner = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    scope.defer(() => banner.close());
    (async () => {
      for await (const conn of banner) {
        await conn.write(bytes("SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")).catch(() => {});
        conn.readable.cancel().catch(() => {}); // hangs up once the client does
      }
    })().catch(() => {});
    const results = [
      await oneShot(fixture, identity, echo.port, fixture.caPath),
      await oneShot(fixture, identity, (banner.addr as Deno.NetAddr).port, fixture.caPath),
    ];
    const unclear = results.filter((r) => {
      try {
        oneClearLine(r, /does not speak TLS/);
        return false;
      } catch {
        return true;
      }
    });
    assert.deepEqual(
      unclear.map((r) => r.lines),
      [],
      "each should be one line: does not speak TLS",
    );
  } finally {
    await scope.close();
  }
});

Deno.test("no client config key turns off certificate verification: such keys are unknown", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const identity = await fixture.identity("foo bar");
    const base = clientText(identity, freePort());
    // Every key a client takes; a new one belongs here only if it cannot weaken verification.
    const known = "name, remote, cafile, key, interval, infinite, shutdown_grace, allow, " +
      "max_tunnels, max_tunnel_rate, log_level";
    for (const line of ["insecure = true", "verify = false", "tls_verify = false"]) {
      const file = await fixture.write("client.toml", `${base}${line}\n`);
      const { code, stderr } = await runScript("client.ts", ["--config", file]);
      assert.notEqual(code, 0, stderr);
      const key = line.split(" ")[0];
      assert.equal(
        errorLine(stderr, "natadm-client"),
        `natadm-client: error: ${file}: ${key}: unknown key (expected one of: ${known})`,
      );
    }
    // And the CA is not optional.
    const file = await fixture.write("client.toml", base.replace(/^cafile = .*\n/m, ""));
    const { code, stderr } = await runScript("client.ts", ["--config", file]);
    assert.notEqual(code, 0, stderr);
    assert.match(errorLine(stderr, "natadm-client"), /: cafile: required/);
  } finally {
    await scope.close();
  }
});

// ---------------------------------------------------------------------------------------------
// Source allow lists (allow_from)

/** Connects from `localAddress` with node:net, sends `payload`, returns what came back. */
function exchangeFrom(
  localAddress: string,
  port: number,
  payload: Uint8Array,
): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let got = 0;
    const socket = net.connect({ host: "127.0.0.1", port, localAddress });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no echo within ${DEADLINE_MS} ms from ${localAddress}`));
    }, DEADLINE_MS);
    socket.on("connect", () => socket.write(payload));
    socket.on("data", (data: Buffer) => {
      chunks.push(data);
      got += data.length;
      if (got >= payload.length) {
        clearTimeout(timer);
        socket.destroy();
        resolve(new Uint8Array(Buffer.concat(chunks)));
      }
    });
    socket.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    socket.on("close", () => {
      clearTimeout(timer);
      if (got < payload.length) reject(new Error(`closed after ${got} bytes`));
    });
  });
}

Deno.test("allow_from: a user from outside it is closed at accept and never reaches the client; one from inside is served", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const identity = await fixture.identity("foo bar");
    const echo = echoIn(scope);
    const communicationPort = freePort();
    const servicePort = freePort();
    const { server } = await serverWith(scope, fixture, {
      communicationPort,
      clients: [identity],
      services: [{
        port: servicePort,
        name: identity.name,
        targetPort: echo.port,
        allowFrom: ["127.0.0.2/32"],
      }],
    });
    const client = await scope.client(
      await fixture.write("client.toml", clientText(identity, communicationPort)),
    );
    const outsider = own(scope, await connectUser(servicePort));
    assert.ok(await closedWithin(outsider), "a user outside allow_from was served");
    await server.waitFor(
      new RegExp(
        `user ${addr(portOf(outsider))} on service ${servicePort} refused: ` +
          `"?address not in allow_from`,
      ),
    );
    assert.equal(client.count(/tunnel open/), 0, client.lines.join("\n"));
    assert.equal(server.count(/tunnel open/), 0, server.lines.join("\n"));
    assert.equal(echo.accepted, 0);

    const payload = bytes("from 127.0.0.2");
    assert.deepEqual(await exchangeFrom("127.0.0.2", servicePort, payload), payload);
    await client.waitFor(/tunnel open: user "?127\.0\.0\.2:/);
  } finally {
    await scope.close();
  }
});

Deno.test("allow_from over IPv6: ::1/128 admits a user from ::1, 2001:db8::/32 turns it away", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope, ["localhost", "127.0.0.1", "::1"]);
    const identity = await fixture.identity("foo bar");
    const echo = echoIn(scope);
    const communicationPort = freePort();
    const [inPort, outPort] = [freePort(), freePort()];
    const { server } = await serverWith(scope, fixture, {
      communicationPort,
      listenHost: "::1",
      clients: [identity],
      services: [
        { port: inPort, name: identity.name, targetPort: echo.port, allowFrom: ["::1/128"] },
        {
          port: outPort,
          name: identity.name,
          targetPort: echo.port,
          allowFrom: ["2001:db8::/32"],
        },
      ],
    });
    await scope.client(
      await fixture.write(
        "client.toml",
        clientText(identity, communicationPort, undefined, "::1"),
      ),
    );
    const outsider = own(scope, await Deno.connect({ hostname: "::1", port: outPort }));
    assert.ok(await closedWithin(outsider), "a user outside 2001:db8::/32 was served");
    await server.waitFor(
      new RegExp(
        `user "?\\[::1\\]:${portOf(outsider)}"? on service ${outPort} refused: ` +
          `"?address not in allow_from`,
      ),
    );
    const insider = own(scope, await Deno.connect({ hostname: "::1", port: inPort }));
    assert.ok(await echoesThrough(insider, bytes("over IPv6")), "a user from ::1 was not served");
    assert.equal(echo.accepted, 1);
  } finally {
    await scope.close();
  }
});

// ---------------------------------------------------------------------------------------------
// Rotation, as SECURITY.md describes it: files replaced in place, then SIGHUP

/** Starts the server under exactly its printed flags, as SECURITY.md tells production to. */
async function strictServer(scope: Scope, file: string) {
  const flags = await printedFlags("server.ts", file);
  const server = scope.spawn("server.ts", ["--config", file], flags);
  await server.waitFor(/NATadm server ready/);
  return server;
}

/** Rewrites the server config with `text`, sends SIGHUP, and waits for the reload. */
async function reloadWith(server: Program, file: string, text: string): Promise<void> {
  const before = server.count(/configuration reloaded/);
  await Deno.writeTextFile(file, text);
  server.kill("SIGHUP");
  await waitUntil(
    () => server.count(/configuration reloaded/) > before,
    `a reload:\n${server.lines.join("\n")}`,
  );
}

Deno.test("rotating a client key: after SIGHUP the old key is refused and the new one logs in, under exact flags", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const old = await fixture.identity("foo bar");
    const fresh = await fixture.identity("foo bar");
    const communicationPort = freePort();
    const config = (identity: Identity) =>
      fullServerToml({ communicationPort, clients: [identity], services: [] });
    const file = await fixture.write("server.toml", config(old));
    const server = await strictServer(scope, file);
    const caPem = await Deno.readTextFile(fixture.caPath);
    const login = async (identity: Identity) => {
      const attempt = await attemptLogin({
        port: communicationPort,
        caPem,
        name: identity.name,
        keyPath: identity.keyPath,
      });
      attempt.dialed.stream.close();
      return attempt.reply?.type;
    };
    assert.equal(await login(old), "welcome");
    await reloadWith(server, file, config(fresh));
    assert.equal(await login(old), "refused");
    assert.equal(await login(fresh), "welcome");
  } finally {
    await scope.close();
  }
});

Deno.test("rotating a client key out closes the session that logged in with it", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const stolen = await fixture.identity("foo bar");
    const fresh = await fixture.identity("foo bar");
    const communicationPort = freePort();
    const servicePort = freePort();
    const config = (identity: Identity) =>
      fullServerToml({
        communicationPort,
        clients: [identity],
        services: [{ port: servicePort, name: identity.name, targetPort: 7 }],
      });
    const file = await fixture.write("server.toml", config(stolen));
    const server = await scope.server(file);
    const caPem = await Deno.readTextFile(fixture.caPath);
    // Whoever holds the stolen key is logged in when the admin rotates it.
    const thief = own(scope, await MuxPeer.login(communicationPort, caPem, stolen));
    await reloadWith(server, file, config(fresh));
    assert.ok(
      await thief.closedWithin(5_000),
      "the session of a key that is no longer configured is still open after the reload",
    );
    // It was told why, as a refusal that the real client logs.
    const refused = thief.controls.find((m) => m.type === "refused");
    assert.match(JSON.stringify(refused), /key was changed on the server/);
  } finally {
    await scope.close();
  }
});

Deno.test("a server certificate replaced in place is presented after SIGHUP; a cafile with both CAs trusts either", async () => {
  const scope = new Scope();
  try {
    const fixture = await fixtureIn(scope);
    const next = await fixtureIn(scope); // a new CA and a certificate from it
    const identity = await fixture.identity("foo bar");
    const communicationPort = freePort();
    const text = fullServerToml({ communicationPort, clients: [identity], services: [] });
    const file = await fixture.write("server.toml", text);
    const server = await strictServer(scope, file);
    const bundle = await fixture.write(
      "both.ca.pem",
      (await Deno.readTextFile(fixture.caPath)) + (await Deno.readTextFile(next.caPath)),
    );
    const check = (cafile: string) => oneShot(fixture, identity, communicationPort, cafile);

    // Step 1 of a CA rotation: clients get a cafile with both CAs, and still connect.
    assert.equal((await check(bundle)).code, 0);
    // Step 2: the server's files are replaced in place, and SIGHUP applies them.
    for (const name of [CERT_FILES.cert, CERT_FILES.key]) {
      await Deno.writeTextFile(fixture.path(name), await Deno.readTextFile(next.path(name)));
    }
    await reloadWith(server, file, text);
    oneClearLine(await check(fixture.caPath), /not signed by cafile/);
    assert.equal((await check(next.caPath)).code, 0);
    assert.equal((await check(bundle)).code, 0);
  } finally {
    await scope.close();
  }
});
