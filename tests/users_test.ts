/**
 * Admin access by name: users with their own keys reach clients through the communication
 * port with `connect` and `forward`, within their `allow` rules and the client's own, and
 * every tunnel's log lines name them. Real processes, real sshd, real sockets.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { CERT_FILES } from "../src/certs.ts";
import { loadServerConfig, userRuleFor } from "../src/config.ts";
import {
  clientToml,
  connectUser,
  DEADLINE_MS,
  errorLine,
  findExecutable,
  Fixture,
  freePort,
  type Identity,
  randomBytes,
  readExactly,
  ROOT,
  runScript,
  Scope,
  serverToml,
  sh,
  startEcho,
  startSshd,
  writeAll,
} from "./helpers.ts";

const CLIENT = "foo bar";

/** A `[users.NAME]` table for a server config. */
function userTable(user: Identity, allow: string[]): string {
  return `[users.${JSON.stringify(user.name)}]\nkey = "${user.publicKey}"\nallow = ${
    JSON.stringify(allow)
  }\n`;
}

/** A user.toml for `connect` and `forward`. */
function userToml(user: Identity, communicationPort: number): string {
  return [
    `name = ${JSON.stringify(user.name)}`,
    `remote = ["localhost", ${communicationPort}]`,
    `cafile = ${JSON.stringify(CERT_FILES.caCert)}`,
    `key = ${JSON.stringify(user.keyPath)}`,
  ].join("\n") + "\n";
}

/** A server with client "foo bar" (and an idle "other"), user alice, and an echo service. */
async function setup(options: {
  /** alice's allow list; `ECHO` stands for the echo port. */
  allow?: string[];
  /** The client's own allow list. */
  clientAllow?: string[];
  serverArgs?: string[];
} = {}) {
  const fixture = await Fixture.create();
  const scope = new Scope();
  scope.defer(() => fixture.cleanup());
  const echo = startEcho();
  scope.defer(() => echo.close());
  const client = await fixture.identity(CLIENT);
  const other = await fixture.identity("other");
  const alice = await fixture.identity("alice");
  const communicationPort = freePort();
  const statusPort = freePort();
  const allow = (options.allow ?? [`${CLIENT}:${echo.port}`]).map((a) =>
    a.replace("ECHO", String(echo.port))
  );
  const serverText = (users: string) =>
    serverToml({
      communicationPort,
      clients: [client, other],
      services: [],
      extra: `status_port = ${statusPort}`,
    }) + users;
  const serverConfig = await fixture.write("server.toml", serverText(userTable(alice, allow)));
  const server = await scope.server(serverConfig, options.serverArgs);
  const clientText = clientToml({ identity: client, communicationPort }) +
    (options.clientAllow ? `allow = ${JSON.stringify(options.clientAllow)}\n` : "");
  const clientConfig = await fixture.write("client.toml", clientText);
  const userConfig = await fixture.write("user.toml", userToml(alice, communicationPort));
  return {
    fixture,
    scope,
    echo,
    client,
    other,
    alice,
    communicationPort,
    statusPort,
    server,
    serverText,
    serverConfig,
    clientConfig,
    userConfig,
  };
}

/** Runs `connect` to completion with no input; returns exit code, stdout and stderr. */
function connect(config: string, args: string[]) {
  return runScript("cmd/connect.ts", ["--config", config, ...args]);
}

/** Spawns `connect` with stdin and stdout as pipes, for a live tunnel. */
function spawnConnect(config: string, args: string[]) {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-net", "--allow-read", join(ROOT, "cmd/connect.ts"), "--config", config]
      .concat(args),
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

const sshMissing = ["sshd", "ssh", "ssh-keygen"].filter((name) => !findExecutable(name));

Deno.test({
  name: "ssh with connect as ProxyCommand runs a command on the sshd behind the client",
  ignore: sshMissing.length > 0,
  async fn() {
    const sshdPort = freePort();
    const env = await setup({ allow: [`${CLIENT}:${sshdPort}`] });
    try {
      const daemon = await startSshd(env.scope, env.fixture.dir, sshdPort);
      await env.scope.client(env.clientConfig);
      const connectCommand = [
        Deno.execPath(),
        "run",
        "--allow-net",
        "--allow-read",
        join(ROOT, "cmd/connect.ts"),
        "--config",
        env.userConfig,
        `"${CLIENT}"`,
        "%p",
      ].join(" ");
      const user = (await sh("whoami", [])).trim();
      const out = await new Deno.Command(findExecutable("ssh")!, {
        args: [
          "-F",
          "/dev/null",
          "-p",
          String(sshdPort),
          "-i",
          join(env.fixture.dir, "user_ed25519"),
          "-o",
          `ProxyCommand=${connectCommand}`,
          "-o",
          "BatchMode=yes",
          "-o",
          "IdentitiesOnly=yes",
          "-o",
          "StrictHostKeyChecking=no",
          "-o",
          "UserKnownHostsFile=/dev/null",
          "-o",
          "LogLevel=ERROR",
          `${user}@foo-bar`,
          "echo",
          "natadm-by-name",
        ],
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
        signal: AbortSignal.timeout(DEADLINE_MS),
      }).output();
      const stderr = new TextDecoder().decode(out.stderr);
      assert.equal(
        out.code,
        0,
        `ssh failed: ${stderr}\nsshd:\n${daemon.lines.join("\n")}\nserver:\n${
          env.server.lines.join("\n")
        }`,
      );
      assert.equal(new TextDecoder().decode(out.stdout), "natadm-by-name\n");
      // The audit trail: both the open and the close line name the user.
      await env.server.waitFor(
        new RegExp(`tunnel open: user "alice" \\(.*\\) → client "${CLIENT}" port ${sshdPort}`),
      );
      await env.server.waitFor(
        new RegExp(`tunnel closed: user "alice" \\(.*\\) → client "${CLIENT}" port ${sshdPort};`),
      );
      await daemon.waitFor(/Accepted publickey for /);
    } finally {
      await env.scope.close();
    }
  },
});

Deno.test("forward serves an HTTP server behind the client, one tunnel per connection", async () => {
  const env = await setup({ allow: [`${CLIENT}:*`] });
  const http = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    (req) => new Response(`hello from behind NAT: ${new URL(req.url).pathname}`),
  );
  env.scope.defer(() => http.shutdown());
  try {
    await env.scope.client(env.clientConfig);
    const localPort = freePort();
    const forward = env.scope.spawn("cmd/forward.ts", [
      "--config",
      env.userConfig,
      String(localPort),
      CLIENT,
      String(http.addr.port),
    ]);
    await forward.waitFor(/forwarding "127\.0\.0\.1":\d+ to client "foo bar"/);
    for (const path of ["/one", "/two"]) {
      // A new connection each time: each is its own stream on forward's one connection.
      const response = await fetch(`http://127.0.0.1:${localPort}${path}`, {
        headers: { connection: "close" },
        signal: AbortSignal.timeout(DEADLINE_MS),
      });
      assert.equal(response.status, 200);
      assert.equal(await response.text(), `hello from behind NAT: ${path}`);
    }
    await env.server.waitFor(/tunnel closed: user "alice"/);
    assert.equal(env.server.count(/user alice connected from/), 0);
    assert.equal(env.server.count(/user "alice" connected from/), 1, "one login for both");
  } finally {
    await env.scope.close();
  }
});

Deno.test("forward carries 64 connections that each send 4 KiB at once, and stays logged in", async () => {
  const env = await setup();
  try {
    await env.scope.client(env.clientConfig);
    const localPort = freePort();
    const forward = env.scope.spawn("cmd/forward.ts", [
      "--config",
      env.userConfig,
      String(localPort),
      CLIENT,
      String(env.echo.port),
    ]);
    await forward.waitFor(/forwarding "127\.0\.0\.1":\d+ to client "foo bar"/);
    // Together more than a new connection may have unread before it logs in: the login's
    // bound must not follow the user onto its tunnels.
    const payloads = Array.from({ length: 64 }, () => randomBytes(4096));
    const conns = await Promise.all(payloads.map(() => connectUser(localPort)));
    try {
      await Promise.all(conns.map((conn, i) => writeAll(conn, payloads[i])));
      const back = await Promise.all(conns.map((conn) => readExactly(conn, 4096)));
      back.forEach((bytes, i) => assert.deepEqual(bytes, payloads[i], `connection ${i}`));
    } finally {
      for (const conn of conns) conn.close();
    }
    assert.equal(env.server.count(/user "alice" connected from/), 1, "one login for all");
    assert.equal(env.server.count(/user "alice" disconnected/), 0);
  } finally {
    await env.scope.close();
  }
});

Deno.test("connect refuses with one line and an exit code: unknown user, wrong key, not allowed, offline, client refusal", async () => {
  const env = await setup({
    allow: [`${CLIENT}:ECHO`, `${CLIENT}:9`, "away:22"],
    clientAllow: ["localhost:1"], // the client itself allows nothing the user asks for but 1
  });
  try {
    await env.scope.client(env.clientConfig);
    const mallory = await env.fixture.identity("mallory");
    const unknown = await env.fixture.write(
      "mallory.toml",
      userToml(mallory, env.communicationPort),
    );
    const wrongKey = await env.fixture.write(
      "wrong.toml",
      userToml({ ...mallory, name: "alice" }, env.communicationPort),
    );
    const cases: [string, string[], number, RegExp][] = [
      [unknown, [CLIENT, "22"], 3, /refused this user: unknown user name "mallory"/],
      [wrongKey, [CLIENT, "22"], 3, /refused this user: authentication failed/],
      [
        env.userConfig,
        [CLIENT, "80"],
        4,
        /user "alice" may not reach "foo bar":80: no entry of \[users\.alice\]\.allow matches$/,
      ],
      [env.userConfig, ["away", "22"], 4, /client "away" is not connected$/],
      [
        env.userConfig,
        [CLIENT, "9"],
        4,
        /client "foo bar" refused port 9: localhost:9: not in the allow list$/,
      ],
    ];
    for (const [config, args, code, message] of cases) {
      const result = await connect(config, args);
      assert.equal(result.code, code, `${args.join(" ")}: ${result.stderr}`);
      assert.equal(result.stdout, "", "stdout carries tunnel bytes only");
      assert.match(errorLine(result.stderr, "natadm-connect"), message);
    }
    const line = await env.server.waitFor(/refused by the client/);
    assert.match(line, /user "alice"/);
    // The status page counts each refusal by its reason.
    const metrics = await (await fetch(`http://127.0.0.1:${env.statusPort}/metrics`)).text();
    for (
      const reason of [
        "unknown_user",
        "wrong_key",
        "not_allowed",
        "client_offline",
        "client_refused",
      ]
    ) {
      assert.match(metrics, new RegExp(`natadm_user_refusals_total\\{reason="${reason}"\\} 1\n`));
    }
  } finally {
    await env.scope.close();
  }
});

Deno.test("a user allowed one port of one client reaches that and nothing else", async () => {
  const env = await setup();
  try {
    await env.scope.client(env.clientConfig);
    const otherClient = await env.scope.client(
      await env.fixture.write(
        "other.toml",
        clientToml({ identity: env.other, communicationPort: env.communicationPort }),
      ),
    );
    const echoed = await connectAndEcho(env.userConfig, [CLIENT, String(env.echo.port)]);
    assert.equal(echoed, "ping through the tunnel");
    for (const target of [[CLIENT, "80"], ["other", String(env.echo.port)], ["other", "22"]]) {
      const result = await connect(env.userConfig, target);
      assert.equal(result.code, 4, result.stderr);
      assert.match(errorLine(result.stderr, "natadm-connect"), /no entry of \[users\.alice\]/);
    }
    // The refused requests never reached a client.
    assert.equal(otherClient.count(/tunnel open/), 0);
  } finally {
    await env.scope.close();
  }
});

/** Runs connect with a line on stdin and returns what came back before it ended. */
async function connectAndEcho(config: string, args: string[]): Promise<string> {
  const child = spawnConnect(config, args);
  const writer = child.stdin.getWriter();
  await writer.write(new TextEncoder().encode("ping through the tunnel"));
  await writer.close();
  const [out] = await Promise.all([child.output(), statusWithin(child, DEADLINE_MS)]);
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  return new TextDecoder().decode(out.stdout);
}

Deno.test("client and user identities never mix, even under one name", async () => {
  const fixture = await Fixture.create();
  const scope = new Scope();
  try {
    const echo = startEcho();
    scope.defer(() => echo.close());
    const client = await fixture.identity(CLIENT);
    const userSameName = await fixture.identity(CLIENT); // a user also called "foo bar"
    const alice = await fixture.identity("alice");
    const communicationPort = freePort();
    await scope.server(
      await fixture.write(
        "server.toml",
        serverToml({ communicationPort, clients: [client], services: [] }) +
          userTable(userSameName, [`${CLIENT}:${echo.port}`]) +
          userTable(alice, [`${CLIENT}:${echo.port}`]),
      ),
    );
    await scope.client(
      await fixture.write("client.toml", clientToml({ identity: client, communicationPort })),
    );
    // The user "foo bar" logs in with its own key, beside the connected client "foo bar".
    const asUser = await fixture.write("user.toml", userToml(userSameName, communicationPort));
    assert.equal(
      await connectAndEcho(asUser, [CLIENT, String(echo.port)]),
      "ping through the tunnel",
    );
    // The client's key is no user's key, though the names match.
    const clientAsUser = await fixture.write("cu.toml", userToml(client, communicationPort));
    const result = await connect(clientAsUser, [CLIENT, String(echo.port)]);
    assert.equal(result.code, 3, result.stderr);
    assert.match(errorLine(result.stderr, "natadm-connect"), /authentication failed/);
    // A user's key cannot log in as a client, whether the name is a user's only or both.
    for (const identity of [alice, { ...alice, name: CLIENT }]) {
      const out = await runScript("client.ts", [
        "--config",
        await fixture.write(
          `c-${crypto.randomUUID()}.toml`,
          clientToml({
            identity,
            communicationPort,
            infinite: false,
          }),
        ),
      ]);
      assert.notEqual(out.code, 0);
      assert.match(out.stderr, /refused this client: (unknown client name|authentication failed)/);
    }
  } finally {
    await scope.close();
    await fixture.cleanup();
  }
});

Deno.test("removing a user on reload closes its live tunnel; --wait waits for an absent client", async () => {
  const env = await setup({ serverArgs: ["--log-format", "json"] });
  try {
    // The client is not up yet: --wait holds the request until it connects.
    const child = spawnConnect(env.userConfig, ["--wait", "30", CLIENT, String(env.echo.port)]);
    const stdout = child.stdout.getReader();
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode("early bytes"));
    await env.server.waitFor(/waits up to/);
    await env.scope.client(env.clientConfig);
    const got = await readStream(stdout, "early bytes".length);
    assert.equal(got, "early bytes");
    // JSON logs carry who opened the tunnel.
    const open = JSON.parse(await env.server.waitFor(/tunnel open: user/));
    assert.equal(open.properties.by, "alice");
    // The status page shows alice connected, with her live tunnel and its bytes.
    const status = await (await fetch(`http://127.0.0.1:${env.statusPort}/status.json`)).json();
    const alice = status.users.find((u: { name: string }) => u.name === "alice");
    assert.equal(alice.connected, true);
    assert.equal(alice.tunnels.length, 1);
    assert.equal(alice.tunnels[0].client, CLIENT);
    assert.equal(alice.tunnels[0].port, env.echo.port);
    assert.equal(alice.tunnels[0].bytes_up, "early bytes".length);
    assert.equal(alice.tunnels[0].bytes_down, "early bytes".length);
    assert.equal(status.tunnels[0].by, "alice");
    const metrics = await (await fetch(`http://127.0.0.1:${env.statusPort}/metrics`)).text();
    assert.match(metrics, /natadm_user_tunnels_active\{user="alice"\} 1\n/);
    // Remove alice and reload: her connection is logged out and the tunnel closes.
    await Deno.writeTextFile(env.serverConfig, env.serverText(""));
    env.server.kill("SIGHUP");
    const stderr = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
    const exit = await statusWithin(child, DEADLINE_MS);
    assert.equal(exit.code, 3, "logged out: the login is refused");
    let errors = "";
    for (;;) {
      const { value, done } = await stderr.read();
      if (done) break;
      errors += value;
    }
    assert.match(errors, /natadm-connect: error: .*this user was removed from the server's config/);
    await stdout.cancel();
    const closed = JSON.parse(await env.server.waitFor(/tunnel closed: user/));
    assert.equal(closed.properties.by, "alice");
    await env.server.waitFor(/user .*alice.* logged out/);
    // And she cannot log in again.
    const again = await connect(env.userConfig, [CLIENT, String(env.echo.port)]);
    assert.equal(again.code, 3);
    await writer.close().catch(() => {});
  } finally {
    await env.scope.close();
  }
});

/** A child's exit status; kills it and fails if it has not exited within `ms`. */
async function statusWithin(child: Deno.ChildProcess, ms: number): Promise<Deno.CommandStatus> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      child.status,
      new Promise<never>((_, reject) =>
        timer = setTimeout(() => {
          child.kill("SIGKILL");
          reject(new Error(`connect did not exit within ${ms} ms`));
        }, ms)
      ),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Reads `n` bytes of text from a child's stdout, or fails after {@link DEADLINE_MS}. */
async function readStream(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  n: number,
): Promise<string> {
  let text = "";
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<never>((_, reject) =>
    timer = setTimeout(
      () => reject(new Error(`no ${n} bytes from connect: "${text}"`)),
      DEADLINE_MS,
    )
  );
  try {
    while (text.length < n) {
      const { value, done } = await Promise.race([reader.read(), deadline]);
      if (done) break;
      text += new TextDecoder().decode(value);
    }
  } finally {
    clearTimeout(timer);
  }
  return text;
}

Deno.test("a bad [users] table stops the server with one line naming the file and key", async () => {
  const fixture = await Fixture.create();
  try {
    const alice = await fixture.identity("alice");
    const base = serverToml({ communicationPort: freePort(), clients: [], services: [] });
    const cases: [string, string, RegExp][] = [
      [
        `[users.alice]\nkey = "${alice.publicKey}"\nallow = ["foo bar"]\n`,
        'users."alice".allow[0]',
        /expected "CLIENT:PORT" \(a client-name glob with \* and \?, then a port number or \*\), got the string "foo bar"$/,
      ],
      [
        `[users.alice]\nkey = "${alice.publicKey}"\nallow = ["web-*:http"]\n`,
        'users."alice".allow[0]',
        /expected "CLIENT:PORT"/,
      ],
      [
        `[users.alice]\nkey = "${alice.publicKey}"\nallow = ["web:70000"]\n`,
        'users."alice".allow[0]',
        /expected a port number \(1-65535\), got number 70000$/,
      ],
      [
        `[users.alice]\nkey = "not a key"\nallow = []\n`,
        'users."alice".key',
        /expected an Ed25519 public key as base64 SPKI/,
      ],
      [`[users.alice]\nkey = "${alice.publicKey}"\n`, 'users."alice".allow', /required/],
      [
        `[users.alice]\nkey = "${alice.publicKey}"\nallow = []\nrole = "root"\n`,
        'users."alice".role',
        /unknown key \(expected one of: key, allow\)$/,
      ],
    ];
    for (const [table, key, problem] of cases) {
      const file = await fixture.write("server.toml", base + table);
      const { code, stderr } = await runScript("server.ts", ["--config", file]);
      assert.notEqual(code, 0, stderr);
      const line = errorLine(stderr, "natadm-server");
      const prefix = `natadm-server: error: ${file}: ${key}: `;
      assert.ok(line.startsWith(prefix), `expected "${prefix}…", got:\n${line}`);
      assert.match(line.slice(prefix.length), problem);
    }
  } finally {
    await fixture.cleanup();
  }
});

Deno.test("allow rules: * and ? match client names whole, the port is a number or *", async () => {
  const fixture = await Fixture.create();
  try {
    const alice = await fixture.identity("alice");
    const file = await fixture.write(
      "server.toml",
      serverToml({ communicationPort: freePort(), clients: [], services: [] }) +
        userTable(alice, ["foo bar:22", "web-*:80", "lab-?:*", "a.b:1"]),
    );
    const rules = (await loadServerConfig(file)).users.get("alice")!.allow;
    const cases: [string, number, string | undefined][] = [
      ["foo bar", 22, "foo bar:22"],
      ["foo bar", 80, undefined],
      ["foo barx", 22, undefined],
      ["web-1", 80, "web-*:80"],
      ["web-", 80, "web-*:80"],
      ["web-1", 22, undefined],
      ["xweb-1", 80, undefined],
      ["lab-7", 3389, "lab-?:*"],
      ["lab-77", 22, undefined],
      ["a.b", 1, "a.b:1"],
      ["axb", 1, undefined], // a dot is a dot, not any character
    ];
    for (const [client, port, rule] of cases) {
      assert.equal(userRuleFor(rules, client, port)?.text, rule, `${client}:${port}`);
    }
  } finally {
    await fixture.cleanup();
  }
});
