/**
 * Config and command-line errors: each one stops the program before it listens or connects,
 * with one `natadm-…: error:` line that names the file and the key (or line:column).
 */
import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { CERT_FILES } from "../src/certs.ts";
import { VERSION } from "../src/version.ts";
import { DEFAULT_MAX_TUNNEL_RATE, loadClientConfig } from "../src/config.ts";
import {
  clientToml,
  connectRefused,
  errorLine,
  escapeRegExp,
  Fixture,
  freePort,
  type Identity,
  runScript,
  serverToml,
} from "./helpers.ts";

/** What a broken server config is made from. */
interface ServerEnv {
  fixture: Fixture;
  identity: Identity;
  communicationPort: number;
  servicePort: number;
  /** A valid server config for this fixture, to break. */
  valid: string;
}

/**
 * Runs the server on the config `text` makes and checks that it failed as a config error must:
 * non-zero exit, exactly one error line starting with `natadm-server: error: FILE: KEY: `, its
 * rest matching `problem`, and neither the communication port nor the service port bound.
 */
async function serverRejects(
  text: (env: ServerEnv) => string | Promise<string>,
  key: string | ((env: ServerEnv) => string),
  problem: RegExp | ((env: ServerEnv) => RegExp),
): Promise<void> {
  const fixture = await Fixture.create();
  try {
    const identity = await fixture.identity("foo bar");
    const communicationPort = freePort();
    const servicePort = freePort();
    const valid = serverToml({
      communicationPort,
      clients: [identity],
      services: [{ port: servicePort, name: identity.name, targetPort: 22 }],
    });
    const env = { fixture, identity, communicationPort, servicePort, valid };
    const file = await fixture.write("server.toml", await text(env));
    const { code, stderr } = await runScript("server.ts", ["--config", file]);
    assert.notEqual(code, 0, stderr);
    const line = errorLine(stderr, "natadm-server");
    const prefix = `natadm-server: error: ${file}: ${typeof key === "string" ? key : key(env)}: `;
    assert.ok(line.startsWith(prefix), `expected "${prefix}…", got:\n${line}`);
    assert.match(line.slice(prefix.length), typeof problem === "function" ? problem(env) : problem);
    assert.doesNotMatch(stderr, /NATadm server ready/);
    assert.ok(await connectRefused(communicationPort), "the communication port was bound");
    assert.ok(await connectRefused(servicePort), "the service port was bound");
  } finally {
    await fixture.cleanup();
  }
}

/** Like {@link serverRejects}, for the client: one error line starting with `FILE: KEY: `. */
async function clientRejects(
  text: (fixture: Fixture, identity: Identity) => string | Promise<string>,
  key: string,
  problem: RegExp,
): Promise<void> {
  const fixture = await Fixture.create();
  try {
    const identity = await fixture.identity("foo bar");
    const file = await fixture.write("client.toml", await text(fixture, identity));
    const { code, stderr } = await runScript("client.ts", ["--config", file]);
    assert.notEqual(code, 0, stderr);
    const line = errorLine(stderr, "natadm-client");
    const prefix = `natadm-client: error: ${file}: ${key}: `;
    assert.ok(line.startsWith(prefix), `expected "${prefix}…", got:\n${line}`);
    assert.match(line.slice(prefix.length), problem);
    assert.doesNotMatch(stderr, /connected to/);
  } finally {
    await fixture.cleanup();
  }
}

/** Puts `line` among the top-level keys of a config made by serverToml. */
function withTopLevel(config: string, line: string): string {
  return config.replace("listen_host", `${line}\nlisten_host`);
}

/** A PKCS#8 PEM private key of another type than Ed25519. */
function ecPrivatePem(): string {
  return generateKeyPairSync("ec", {
    namedCurve: "P-256",
    privateKeyEncoding: { type: "pkcs8", format: "pem" },
    publicKeyEncoding: { type: "spki", format: "pem" },
  }).privateKey;
}

Deno.test("server config: an unknown key is named, with the keys that are allowed", async () => {
  await serverRejects(
    (env) => withTopLevel(env.valid, 'colour = "blue"'),
    "colour",
    /^unknown key \(expected one of: communication_port, .*, services\)$/,
  );
});

Deno.test("server config: an unknown key inside a service table is named in full", async () => {
  await serverRejects(
    (env) => env.valid + "colour = 1\n",
    (env) => `services.${env.servicePort}.colour`,
    /^unknown key \(expected one of: name, port, host\b.*\)$/,
  );
});

Deno.test("server config: a value of the wrong type is named with what was expected", async () => {
  await serverRejects(
    (env) => env.valid.replace(/^communication_port = \d+/m, 'communication_port = "443"'),
    "communication_port",
    /^expected a port number \(1-65535\), got the string "443"$/,
  );
  await serverRejects(
    (env) => withTopLevel(env.valid, 'pending_timeout = "soon"'),
    "pending_timeout",
    /^expected a whole number of seconds from 1 to 86400, got the string "soon"$/,
  );
});

Deno.test("server config: a port out of range is refused wherever it appears", async () => {
  await serverRejects(
    (env) => env.valid.replace(/^communication_port = \d+/m, "communication_port = 70000"),
    "communication_port",
    /^expected a port number \(1-65535\), got number 70000$/,
  );
  await serverRejects(
    (env) => env.valid.replace(/^port = 22$/m, "port = 0"),
    (env) => `services.${env.servicePort}.port`,
    /^expected a port number \(1-65535\), got number 0$/,
  );
  await serverRejects(
    (env) => env.valid + '[services.70000]\nname = "foo bar"\nport = 22\n',
    "services.70000",
    /^expected a port number \(1-65535\), got number 70000$/,
  );
});

Deno.test("server config: a service naming a client without a [clients] entry", async () => {
  await serverRejects(
    (env) => env.valid.replace('name = "foo bar"', 'name = "ghost"'),
    (env) => `services.${env.servicePort}.name`,
    /^no client "ghost" in \[clients\]; add \[clients\."ghost"\] with its key$/,
  );
});

Deno.test("server config: a certificate file that cannot be read", async () => {
  await serverRejects(
    (env) => env.valid.replace(CERT_FILES.cert, "missing.crt.pem"),
    "communication_server_certificate[0]",
    (env) =>
      new RegExp(
        `^cannot read ${escapeRegExp(env.fixture.path("missing.crt.pem"))}: .*No such file`,
      ),
  );
});

Deno.test("server config: a certificate or key that is not PEM", async () => {
  await serverRejects(
    async (env) => {
      await env.fixture.write("garbage.crt.pem", "this is not a certificate\n");
      return env.valid.replace(CERT_FILES.cert, "garbage.crt.pem");
    },
    "communication_server_certificate[0]",
    (env) =>
      new RegExp(`^${escapeRegExp(env.fixture.path("garbage.crt.pem"))} is not a PEM certificate`),
  );
  await serverRejects(
    async (env) => {
      await env.fixture.write("garbage.key.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n", 0o600);
      return env.valid.replace(CERT_FILES.key, "garbage.key.pem");
    },
    "communication_server_certificate[1]",
    (env) =>
      new RegExp(`^${escapeRegExp(env.fixture.path("garbage.key.pem"))} is not a PEM private key`),
  );
});

Deno.test("server config: a key that does not belong to the certificate", async () => {
  const other = await Fixture.create();
  try {
    await serverRejects(
      (env) => env.valid.replace(CERT_FILES.key, other.path(CERT_FILES.key)),
      "communication_server_certificate[1]",
      (env) =>
        new RegExp(
          `^${escapeRegExp(other.path(CERT_FILES.key))} is not the private key of ${
            env.fixture.path(CERT_FILES.cert)
          }$`,
        ),
    );
  } finally {
    await other.cleanup();
  }
});

Deno.test("server config: a service on the communication port is refused", async () => {
  await serverRejects(
    (env) =>
      env.valid.replace(`[services.${env.servicePort}]`, `[services.${env.communicationPort}]`),
    (env) => `services.${env.communicationPort}`,
    (env) => new RegExp(`^port ${env.communicationPort} is also communication_port; pick another$`),
  );
});

Deno.test("server config: one port listed twice under two spellings is refused", async () => {
  await serverRejects(
    (env) => env.valid + `[services.0${env.servicePort}]\nname = "foo bar"\nport = 23\n`,
    (env) => `services.0${env.servicePort}`,
    (env) => new RegExp(`^port ${env.servicePort} is listed twice$`),
  );
});

Deno.test("server config: a client public key that is not Ed25519 base64 SPKI", async () => {
  const problem = /^expected an Ed25519 public key as base64 SPKI/;
  await serverRejects(
    (env) => env.valid.replace(env.identity.publicKey, "not base64!"),
    'clients."foo bar".key',
    problem,
  );
  // Valid base64 SPKI, but of a P-256 key.
  const ecSpki = generateKeyPairSync("ec", {
    namedCurve: "P-256",
    publicKeyEncoding: { type: "spki", format: "der" },
    privateKeyEncoding: { type: "pkcs8", format: "pem" },
  }).publicKey;
  await serverRejects(
    (env) => env.valid.replace(env.identity.publicKey, new Uint8Array(ecSpki).toBase64()),
    'clients."foo bar".key',
    problem,
  );
});

Deno.test("server config: a TOML syntax error is reported at its line and column", async () => {
  const fixture = await Fixture.create();
  try {
    const port = freePort();
    const file = await fixture.write(
      "server.toml",
      `communication_port = ${port}\nlisten_host = = "127.0.0.1"\n`,
    );
    const { code, stderr } = await runScript("server.ts", ["--config", file]);
    assert.notEqual(code, 0, stderr);
    const line = errorLine(stderr, "natadm-server");
    assert.ok(line.startsWith(`natadm-server: error: ${file}:2:15: TOML syntax error: `), line);
    assert.ok(await connectRefused(port));
  } finally {
    await fixture.cleanup();
  }
});

Deno.test("server: a config file that does not exist is named", async () => {
  const fixture = await Fixture.create();
  try {
    const file = fixture.path("nowhere.toml");
    const { code, stderr } = await runScript("server.ts", ["--config", file]);
    assert.notEqual(code, 0);
    assert.match(
      errorLine(stderr, "natadm-server"),
      new RegExp(
        `^natadm-server: error: ${escapeRegExp(file)}: cannot read config file: .*No such file`,
      ),
    );
  } finally {
    await fixture.cleanup();
  }
});

Deno.test("client config: a missing remote is named as required", async () => {
  await clientRejects(
    (_, identity) =>
      clientToml({ identity, communicationPort: freePort() }).replace(/^remote = .*\n/m, ""),
    "remote",
    /^required, expected a list of two items$/,
  );
});

Deno.test("client config: a key file that holds a key other than Ed25519", async () => {
  await clientRejects(
    async (fixture, identity) => {
      const keyPath = await fixture.write("ec.key.pem", ecPrivatePem(), 0o600);
      return clientToml({ identity: { ...identity, keyPath }, communicationPort: freePort() });
    },
    "key",
    /^\S+ec\.key\.pem is not an Ed25519 private key: expected an Ed25519 key, found ec key$/,
  );
});

Deno.test("client config: an unknown key and a wrong type are named", async () => {
  await clientRejects(
    (_, identity) => clientToml({ identity, communicationPort: freePort() }) + "colour = 1\n",
    "colour",
    /^unknown key \(expected one of: name, remote, /,
  );
  await clientRejects(
    (_, identity) =>
      clientToml({ identity, communicationPort: freePort() }).replace(
        "infinite = true",
        'infinite = "yes"',
      ),
    "infinite",
    /^expected true or false, got the string "yes"$/,
  );
});

Deno.test("client config: max_tunnel_rate bounds a server's opens, 4000 a second unless set", async () => {
  const fixture = await Fixture.create();
  try {
    const identity = await fixture.identity("rate");
    const base = clientToml({ identity, communicationPort: freePort() });
    const plain = await loadClientConfig(await fixture.write("plain.toml", base));
    assert.equal(plain.maxTunnelRate, DEFAULT_MAX_TUNNEL_RATE);
    assert.ok(DEFAULT_MAX_TUNNEL_RATE >= 4000, "the default turns away no busy service's users");
    const set = await loadClientConfig(
      await fixture.write("set.toml", base + "max_tunnel_rate = 250\n"),
    );
    assert.equal(set.maxTunnelRate, 250);
  } finally {
    await fixture.cleanup();
  }
  await clientRejects(
    (_, identity) =>
      clientToml({ identity, communicationPort: freePort() }) + "max_tunnel_rate = 0\n",
    "max_tunnel_rate",
    /^expected a whole number from 1 to 1000000, got number 0$/,
  );
});

Deno.test("client config: a TOML syntax error is reported at its line and column", async () => {
  const fixture = await Fixture.create();
  try {
    const file = await fixture.write("client.toml", 'name = "x"\n\ninterval = = 1\n');
    const { code, stderr } = await runScript("client.ts", ["--config", file]);
    assert.notEqual(code, 0, stderr);
    assert.match(
      errorLine(stderr, "natadm-client"),
      new RegExp(`^natadm-client: error: ${escapeRegExp(file)}:3:12: TOML syntax error: `),
    );
  } finally {
    await fixture.cleanup();
  }
});

for (const [script, program] of [["server.ts", "natadm-server"], ["client.ts", "natadm-client"]]) {
  Deno.test(`${script}: an unknown option exits 2 with one line pointing at --help`, async () => {
    const { code, stdout, stderr } = await runScript(script, ["--bogus"]);
    assert.equal(code, 2, stderr);
    assert.equal(stdout, "");
    assert.match(errorLine(stderr, program), /'--bogus'.*\(see --help\)$/);
  });

  Deno.test(`${script}: a bad --log-level exits 2 and lists the levels`, async () => {
    const { code, stderr } = await runScript(script, ["--log-level", "loud"]);
    assert.equal(code, 2, stderr);
    assert.match(errorLine(stderr, program), /--log-level must be trace, .*, got "loud"$/);
  });

  Deno.test(`${script}: --help prints usage and exits 0`, async () => {
    for (const flag of ["--help", "-h"]) {
      const { code, stdout, stderr } = await runScript(script, [flag]);
      assert.equal(code, 0, stderr);
      assert.ok(stdout.startsWith(`Usage: ${script} [--config FILE]`), stdout);
      assert.match(stdout, /--log-format/);
      assert.match(stdout, /--version/);
    }
  });

  Deno.test(`${script}: --version prints the name and version and exits 0`, async () => {
    for (const flag of ["--version", "-V"]) {
      const { code, stdout, stderr } = await runScript(script, [flag]);
      assert.equal(code, 0, stderr);
      assert.equal(stdout, `${program} ${VERSION}\n`);
    }
  });
}

Deno.test("server: a service port already in use stops the start, naming the port", async () => {
  const fixture = await Fixture.create();
  const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const identity = await fixture.identity("foo bar");
    const communicationPort = freePort();
    const port = (taken.addr as Deno.NetAddr).port;
    const file = await fixture.write(
      "server.toml",
      serverToml({
        communicationPort,
        clients: [identity],
        services: [{ port, name: identity.name, targetPort: 22 }],
      }),
    );
    const { code, stderr } = await runScript("server.ts", ["--config", file]);
    assert.notEqual(code, 0, stderr);
    assert.match(
      errorLine(stderr, "natadm-server"),
      new RegExp(
        `^natadm-server: error: cannot listen on 127\\.0\\.0\\.1:${port} \\(services\\.${port}\\): `,
      ),
    );
    assert.doesNotMatch(stderr, /NATadm server ready/);
    assert.ok(await connectRefused(communicationPort), "the communication port stayed bound");
  } finally {
    taken.close();
    await fixture.cleanup();
  }
});
