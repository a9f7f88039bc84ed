/**
 * `--print-permissions` and the programs run under exactly what it prints: one flag per line
 * that no path or host can split or widen, paths with spaces work, `--watch-config` needs no
 * grant beyond the config file, and a reload that needs more permission is refused.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { CERT_FILES } from "../src/certs.ts";
import {
  clientToml,
  connectRefused,
  errorLine,
  escapeRegExp,
  Fixture,
  freePort,
  type Identity,
  ROOT,
  roundTrip,
  runScript,
  Scope,
  serverToml,
  type ServiceSpec,
  startEcho,
  waitUntil,
} from "./helpers.ts";

/** A file name that would add flags if the printed output were split on spaces. */
const HOSTILE = "e --allow-run --allow-write --allow-read=";

/** A fixture whose directory has a space and flag-like words in its name, removed at close. */
async function hostileFixture(scope: Scope): Promise<Fixture> {
  const plain = await Fixture.create();
  const dir = `${plain.dir} with space --allow-run`;
  await Deno.rename(plain.dir, dir);
  const fixture = new Fixture(dir);
  scope.defer(() => fixture.cleanup());
  // The CA, certificate and key under flag-like names too.
  for (const name of [CERT_FILES.caCert, CERT_FILES.cert, CERT_FILES.key]) {
    await Deno.rename(fixture.path(name), fixture.path(`${HOSTILE}${name}`));
  }
  return fixture;
}

/** A client identity whose key file has a flag-like name. */
async function hostileIdentity(fixture: Fixture, name: string): Promise<Identity> {
  const identity = await fixture.identity(name);
  const keyPath = fixture.path(`x --allow-run ${name}.pem`);
  await Deno.rename(identity.keyPath, keyPath);
  return { ...identity, keyPath };
}

/** The lines `--print-permissions` prints for `script` and `config` (plus `args`). */
async function printed(script: string, config: string, args: string[] = []): Promise<string[]> {
  const { code, stdout, stderr } = await runScript(
    script,
    ["--config", config, "--print-permissions", ...args],
    ["--allow-read"],
  );
  assert.equal(code, 0, stderr);
  return stdout.replace(/\n$/, "").split("\n");
}

/**
 * Argument lists a shell makes of `--print-permissions` output, the way the README and the
 * systemd units read it (bash: `mapfile -t`), each argument as its own line of JSON.
 */
async function asBashReadsThem(script: string, config: string): Promise<string[]> {
  const bash = `flags=$("$0" run --allow-read "$1" --config "$2" --print-permissions) && ` +
    `mapfile -t perms <<<"$flags" && for a in "\${perms[@]}"; do printf '%s\\0' "$a"; done`;
  const out = await new Deno.Command("/bin/bash", {
    args: ["-c", bash, Deno.execPath(), join(ROOT, script), config],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  return new TextDecoder().decode(out.stdout).replace(/\0$/, "").split("\0");
}

/** What `Deno.permissions.querySync` says, in a process run with exactly `flags`. */
async function queried(
  fixture: Fixture,
  flags: string[],
  descriptors: Deno.PermissionDescriptor[],
): Promise<string[]> {
  const probe = await fixture.write(
    "probe.ts",
    `for (const d of ${JSON.stringify(descriptors)}) {
  console.log(Deno.permissions.querySync(d).state);
}`,
  );
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", ...flags, probe],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  return new TextDecoder().decode(out.stdout).trim().split("\n");
}

Deno.test("--print-permissions prints one flag per line; file names with spaces and flags in them add no flag", async () => {
  const scope = new Scope();
  try {
    const fixture = await hostileFixture(scope);
    const identity = await hostileIdentity(fixture, "a");
    const ca = fixture.path(`${HOSTILE}${CERT_FILES.caCert}`);
    const config = await fixture.write(
      "client.toml",
      clientToml({ identity, communicationPort: 4000, cafile: ca }),
    );
    const lines = await printed("client.ts", config);
    assert.deepEqual(lines, [
      "--allow-net=localhost:4000,localhost,127.0.0.1,[::1]",
      `--allow-read=${config},${ca},${identity.keyPath}`,
    ]);
    // The documented bash form turns each line into exactly one argument.
    assert.deepEqual(await asBashReadsThem("client.ts", config), lines);
    // Under those flags: the files are readable, nothing else is, and nothing more is granted.
    assert.deepEqual(
      await queried(fixture, lines, [
        { name: "read", path: ca },
        { name: "read", path: identity.keyPath },
        { name: "read", path: "/" },
        { name: "read", path: fixture.dir },
        { name: "read", path: "/ca.pem" },
        { name: "run" },
        { name: "write" },
        { name: "env" },
      ]),
      ["granted", "granted", "prompt", "prompt", "prompt", "prompt", "prompt", "prompt"],
    );
  } finally {
    await scope.close();
  }
});

/** Server config text for `fixture`'s flag-like certificate files. */
function hostileServerToml(
  fixture: Fixture,
  communicationPort: number,
  clients: Identity[],
  services: ServiceSpec[],
): string {
  return serverToml({
    communicationPort,
    clients,
    services,
    certificate: [
      fixture.path(`${HOSTILE}${CERT_FILES.cert}`),
      fixture.path(`${HOSTILE}${CERT_FILES.key}`),
    ],
  });
}

Deno.test("under exactly their printed lines, a server and client with spaces and flag-like words in every path tunnel", async () => {
  const scope = new Scope();
  try {
    const fixture = await hostileFixture(scope);
    const identity = await hostileIdentity(fixture, "a");
    const echo = startEcho();
    scope.defer(echo.close);
    const [communicationPort, servicePort] = [freePort(), freePort()];
    const serverConfig = await fixture.write(
      "server.toml",
      hostileServerToml(fixture, communicationPort, [identity], [
        { port: servicePort, name: "a", targetPort: echo.port },
      ]),
    );
    const clientConfig = await fixture.write(
      "client.toml",
      clientToml({
        identity,
        communicationPort,
        cafile: fixture.path(`${HOSTILE}${CERT_FILES.caCert}`),
      }) + `allow = ["localhost:${echo.port}"]\n`,
    );
    const server = scope.spawn(
      "server.ts",
      ["--config", serverConfig],
      await printed("server.ts", serverConfig),
    );
    await server.waitFor(/NATadm server ready/);
    const client = scope.spawn(
      "client.ts",
      ["--config", clientConfig],
      await printed("client.ts", clientConfig),
    );
    await client.waitFor(/connected to .* as/);
    assert.equal(await roundTrip(servicePort, "ping\n"), "ping\n");
  } finally {
    await scope.close();
  }
});

Deno.test("a comma or control character in a path, or a host that is not a host name or IP, is refused at load naming file and key", async () => {
  const scope = new Scope();
  try {
    const fixture = await Fixture.create();
    scope.defer(() => fixture.cleanup());
    const identity = await fixture.identity("a");
    const client = (extra: string, cafile?: string, host?: string) =>
      clientToml({ identity, communicationPort: 4000, cafile, host }) + extra;
    const server = (listenHost: string, key: string = CERT_FILES.key) =>
      serverToml({
        communicationPort: 4000,
        clients: [identity],
        services: [],
        listenHost,
        certificate: [CERT_FILES.cert, key],
      });
    await Deno.copyFile(fixture.caPath, fixture.path("ca,copy.pem"));
    await Deno.copyFile(fixture.path(CERT_FILES.key), fixture.path("key\nnext.pem"));
    await Deno.chmod(fixture.path("key\nnext.pem"), 0o600);
    const cases: [string, string, string, RegExp][] = [
      ["client.ts", "allow.toml", client(`allow = ["localhost,10.9.9.9:17000"]\n`), /allow\[0\]: /],
      ["client.ts", "allow2.toml", client(`allow = ["local host:22"]\n`), /allow\[0\]: /],
      ["client.ts", "remote.toml", client("", undefined, "example.com,10.0.0.1"), /remote: /],
      ["client.ts", "cafile.toml", client("", "ca,copy.pem"), /cafile: .*comma/],
      ["client.ts", "a,b.toml", client(""), /comma/],
      ["server.ts", "listen.toml", server("0.0.0.0,10.0.0.1"), /listen_host: /],
      [
        "server.ts",
        "key.toml",
        server("127.0.0.1", "key\nnext.pem"),
        /communication_server_certificate\[1\]: .*control character/,
      ],
    ];
    for (const [script, name, text, pattern] of cases) {
      const file = await fixture.write(name, text);
      const { code, stderr } = await runScript(script, ["--config", file, "--print-permissions"]);
      assert.equal(code, 1, `${name} was accepted: ${stderr}`);
      const program = script === "server.ts" ? "natadm-server" : "natadm-client";
      const line = errorLine(stderr, program);
      assert.ok(line.startsWith(`${program}: error: ${file}: `), line);
      assert.match(line, pattern);
    }
  } finally {
    await scope.close();
  }
});

/** A server under exactly its printed flags (plus `args`), with one service; stopped at close. */
async function exactServer(scope: Scope, args: string[] = []) {
  const fixture = await hostileFixture(scope);
  const identity = await hostileIdentity(fixture, "a");
  const communicationPort = freePort();
  const services = [{ port: freePort(), name: "a", targetPort: 22 }];
  const write = (list: ServiceSpec[], certificate?: [string, string]) =>
    fixture.write(
      "server.toml",
      certificate
        ? serverToml({ communicationPort, clients: [identity], services: list, certificate })
        : hostileServerToml(fixture, communicationPort, [identity], list),
    );
  const config = await write(services);
  const flags = await printed("server.ts", config, args);
  const server = scope.spawn("server.ts", ["--config", config, ...args], flags);
  await server.waitFor(/NATadm server ready/);
  return { fixture, config, flags, server, services, write };
}

Deno.test("--watch-config under exactly the printed flags follows in-place writes and replacements, and grants no directory", async () => {
  const scope = new Scope();
  try {
    const { fixture, config, flags, server, services, write } = await exactServer(scope, [
      "--watch-config",
    ]);
    assert.deepEqual(flags, await printed("server.ts", config));
    const reloaded = /configuration reloaded: 0 services added, 0 removed, 1 changed/;
    const waitForCount = (n: number) =>
      waitUntil(
        () => server.count(reloaded) >= n,
        () => `${n} reloads in:\n${server.lines.join("\n")}`,
      );
    // An in-place write.
    await write([{ ...services[0], targetPort: 23 }]);
    await waitForCount(1);
    // An editor-style save: a new file renamed over the old one.
    const tmp = fixture.path("server.toml.new");
    await Deno.writeTextFile(
      tmp,
      (await Deno.readTextFile(config)).replace("port = 23", "port = 24"),
    );
    await Deno.rename(tmp, config);
    await waitForCount(2);
    // The watch survived the replacement.
    await write([{ ...services[0], targetPort: 25 }]);
    await waitForCount(3);
    assert.equal(
      server.count(/NotCapable|run again with|not reloaded/),
      0,
      server.lines.join("\n"),
    );
  } finally {
    await scope.close();
  }
});

Deno.test("a reload that needs a port or file not granted says it needs a restart, names the grant, and changes nothing", async () => {
  const scope = new Scope();
  try {
    const { fixture, server, services, write } = await exactServer(scope);
    const added = { port: freePort(), name: "a", targetPort: 22 };
    await write([...services, added]);
    server.kill("SIGHUP");
    const line = await server.waitFor(/needs a restart/);
    assert.match(line, new RegExp(escapeRegExp(`--allow-net=127.0.0.1:${added.port}`)));
    assert.ok(await connectRefused(added.port), "the service needing a new grant listens");

    // A certificate at a new path: reading it is not granted either.
    const cert = fixture.path("renewed.crt.pem");
    await Deno.copyFile(fixture.path(`${HOSTILE}${CERT_FILES.cert}`), cert);
    await write(services, [cert, fixture.path(`${HOSTILE}${CERT_FILES.key}`)]);
    server.kill("SIGHUP");
    await server.waitFor(new RegExp(`needs a restart.*${escapeRegExp(`--allow-read=${cert}`)}`));

    assert.equal(server.count(/configuration reloaded/), 0, server.lines.join("\n"));
    assert.equal(server.count(/run again with/), 0, server.lines.join("\n"));

    // A change within the grants still reloads.
    await write([]);
    server.kill("SIGHUP");
    await server.waitFor(/configuration reloaded: 0 services added, 1 removed, 0 changed/);
    assert.ok(await connectRefused(services[0].port));
  } finally {
    await scope.close();
  }
});
