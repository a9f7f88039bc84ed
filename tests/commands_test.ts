/**
 * The helper commands: `deno task certs` (cmd/certs.ts) and `deno task keygen`
 * (cmd/keygen.ts), run as their tasks run them, and their output used for real.
 */
import assert from "node:assert/strict";
import { createPrivateKey, createPublicKey, X509Certificate } from "node:crypto";
import { join } from "node:path";
import { CERT_FILES } from "../src/certs.ts";
import {
  clientToml,
  errorLine,
  Fixture,
  freePort,
  roundTrip,
  runScript,
  Scope,
  serverToml,
  startEcho,
} from "./helpers.ts";

const FS = ["--allow-read", "--allow-write"];

/** Runs cmd/certs.ts with `args`, as `deno task certs` does. */
function certs(...args: string[]) {
  return runScript("cmd/certs.ts", args, FS);
}

/** Runs cmd/keygen.ts with `args`, as `deno task keygen` does. */
function keygen(...args: string[]) {
  return runScript("cmd/keygen.ts", args, FS);
}

/** Permission bits of `path`. */
async function mode(path: string): Promise<number> {
  return (await Deno.stat(path)).mode! & 0o777;
}

/** Reads every file `certs` writes in `dir`. */
async function readAll(dir: string): Promise<string[]> {
  return await Promise.all(Object.values(CERT_FILES).map((f) => Deno.readTextFile(join(dir, f))));
}

Deno.test("certs --out writes the four files, keys private, and they carry a tunnel", async () => {
  const fixture = new Fixture(await Deno.makeTempDir({ prefix: "natadm-certs-" }));
  const scope = new Scope();
  try {
    const out = fixture.path("out"); // not there yet: certs creates it
    const { code, stdout, stderr } = await certs("--out", out);
    assert.equal(code, 0, stderr);
    assert.match(stdout, /Server certificate valid for: localhost, 127\.0\.0\.1/);
    for (const file of Object.values(CERT_FILES)) {
      assert.ok((await Deno.stat(join(out, file))).isFile, `${file} written`);
    }
    assert.equal(await mode(join(out, CERT_FILES.key)), 0o600);
    assert.equal(await mode(join(out, CERT_FILES.caKey)), 0o600);

    const [caPem, caKeyPem, certPem, keyPem] = await readAll(out);
    const ca = new X509Certificate(caPem);
    const cert = new X509Certificate(certPem);
    assert.ok(ca.ca, "the CA certificate is a CA");
    assert.ok(cert.checkIssued(ca) && cert.verify(ca.publicKey), "signed by the CA");
    assert.ok(cert.checkPrivateKey(createPrivateKey(keyPem)));
    assert.ok(ca.checkPrivateKey(createPrivateKey(caKeyPem)));
    assert.equal(cert.subjectAltName, "DNS:localhost, IP Address:127.0.0.1");

    // The files as they are: the server and a client use them unchanged.
    const identity = await fixture.identity("certs user");
    const echo = startEcho();
    scope.defer(echo.close);
    const communicationPort = freePort();
    const servicePort = freePort();
    const files = new Fixture(out); // configs next to the certificates, as an admin would
    const serverConfig = await files.write(
      "server.toml",
      serverToml({
        communicationPort,
        clients: [identity],
        services: [{ port: servicePort, name: identity.name, targetPort: echo.port }],
      }),
    );
    const clientConfig = await files.write(
      "client.toml",
      clientToml({ identity, communicationPort }),
    );
    await scope.server(serverConfig);
    await scope.client(clientConfig);
    assert.equal(await roundTrip(servicePort, "made by certs"), "made by certs");
  } finally {
    await scope.close();
    await fixture.cleanup();
  }
});

Deno.test("certs refuses to overwrite existing files unless --force", async () => {
  const dir = await Deno.makeTempDir({ prefix: "natadm-certs-" });
  try {
    assert.equal((await certs("--out", dir)).code, 0);
    const before = await readAll(dir);

    const again = await certs("--out", dir);
    assert.notEqual(again.code, 0);
    assert.match(
      errorLine(again.stderr, "natadm-certs"),
      /communication\.ca\.pem.* already exist; use --force to replace$/,
    );
    assert.deepEqual(await readAll(dir), before, "files changed without --force");

    // A key file loosened by hand is tightened again by --force.
    await Deno.chmod(join(dir, CERT_FILES.key), 0o644);
    const forced = await certs("--out", dir, "--force");
    assert.equal(forced.code, 0, forced.stderr);
    const after = await readAll(dir);
    for (let i = 0; i < after.length; i++) assert.notEqual(after[i], before[i], "not replaced");
    assert.equal(await mode(join(dir, CERT_FILES.key)), 0o600);
    assert.equal(await mode(join(dir, CERT_FILES.caKey)), 0o600);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("certs --host puts every name and address in the certificate", async () => {
  const dir = await Deno.makeTempDir({ prefix: "natadm-certs-" });
  try {
    const hosts = ["nat.example.com", "192.0.2.7", "localhost", "2001:db8::1"];
    const { code, stdout, stderr } = await certs(
      "--out",
      dir,
      ...hosts.flatMap((h) => ["--host", h]),
    );
    assert.equal(code, 0, stderr);
    assert.match(stdout, /valid for: nat\.example\.com, 192\.0\.2\.7, localhost, 2001:db8::1/);
    const cert = new X509Certificate(await Deno.readTextFile(join(dir, CERT_FILES.cert)));
    const names = cert.subjectAltName!.split(", ");
    assert.deepEqual(names.slice(0, 3), [
      "DNS:nat.example.com",
      "IP Address:192.0.2.7",
      "DNS:localhost",
    ]);
    assert.match(names[3], /^IP Address:2001:(db8::1|DB8:0:0:0:0:0:1)$/i);
    assert.equal(names.length, 4);
    assert.equal(cert.checkHost("nat.example.com"), "nat.example.com");
    assert.equal(cert.checkIP("192.0.2.7"), "192.0.2.7");
    assert.equal(cert.checkHost("other.example.com"), undefined);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("certs with an empty --out or an unknown option exits 2", async () => {
  const empty = await certs("--out", "");
  assert.equal(empty.code, 2);
  assert.match(errorLine(empty.stderr, "natadm-certs"), /--out DIR must not be empty/);
  const bogus = await certs("--bogus");
  assert.equal(bogus.code, 2);
  assert.match(errorLine(bogus.stderr, "natadm-certs"), /'--bogus'/);
});

Deno.test("keygen writes a private key (0600) and prints a key line that authenticates", async () => {
  const fixture = await Fixture.create();
  const scope = new Scope();
  try {
    const keyPath = fixture.path("client.key.pem");
    const { code, stdout, stderr } = await keygen("--out", keyPath);
    assert.equal(code, 0, stderr);
    assert.equal(await mode(keyPath), 0o600);
    const last = stdout.trimEnd().split("\n").at(-1)!;
    const match = last.match(/^key = "([A-Za-z0-9+/=]+)"$/);
    assert.ok(match, `last line is not key = "<base64>": ${last}`);
    const publicKey = match[1];
    const pem = await Deno.readTextFile(keyPath);
    const derived = createPublicKey(createPrivateKey(pem)).export({ type: "spki", format: "der" });
    assert.equal(new Uint8Array(derived).toBase64(), publicKey, "printed key is not the pair's");

    // The printed line, pasted into [clients], lets a client with that key file in.
    const identity = { name: "keygen user", keyPath, publicKey };
    const echo = startEcho();
    scope.defer(echo.close);
    const communicationPort = freePort();
    const servicePort = freePort();
    await scope.server(
      await fixture.write(
        "server.toml",
        [
          `communication_port = ${communicationPort}`,
          `communication_server_certificate = ["${CERT_FILES.cert}", "${CERT_FILES.key}"]`,
          `listen_host = "127.0.0.1"`,
          `[clients."keygen user"]`,
          last,
          `[services.${servicePort}]`,
          `name = "keygen user"`,
          `port = ${echo.port}`,
          "",
        ].join("\n"),
      ),
    );
    await scope.client(
      await fixture.write("client.toml", clientToml({ identity, communicationPort })),
    );
    assert.equal(await roundTrip(servicePort, "keygen works"), "keygen works");
  } finally {
    await scope.close();
    await fixture.cleanup();
  }
});

Deno.test("keygen refuses to overwrite a key file unless --force", async () => {
  const dir = await Deno.makeTempDir({ prefix: "natadm-keygen-" });
  try {
    const keyPath = join(dir, "client.key.pem");
    assert.equal((await keygen("--out", keyPath)).code, 0);
    const before = await Deno.readTextFile(keyPath);
    const again = await keygen("--out", keyPath);
    assert.notEqual(again.code, 0);
    assert.equal(
      errorLine(again.stderr, "natadm-keygen"),
      `natadm-keygen: error: ${keyPath} already exists; use --force to replace it`,
    );
    assert.equal(await Deno.readTextFile(keyPath), before, "key replaced without --force");
    await Deno.chmod(keyPath, 0o644);
    const forced = await keygen("--out", keyPath, "--force");
    assert.equal(forced.code, 0, forced.stderr);
    assert.notEqual(await Deno.readTextFile(keyPath), before);
    assert.equal(await mode(keyPath), 0o600);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("keygen's help and hint say where the key line goes: [clients] or [users.NAME]", async () => {
  const dir = await Deno.makeTempDir({ prefix: "natadm-keygen-" });
  try {
    const help = await keygen("--help");
    assert.equal(help.code, 0, help.stderr);
    assert.match(help.stdout, /\[clients\."NAME"\].*client/s);
    assert.match(help.stdout, /\[users\.NAME\].*admin user/s);
    const { code, stdout, stderr } = await keygen("--out", join(dir, "admin.key.pem"));
    assert.equal(code, 0, stderr);
    const lines = stdout.trimEnd().split("\n");
    assert.match(lines.at(-1)!, /^key = "[A-Za-z0-9+/=]+"$/, "the key line is still last");
    const hint = lines.slice(0, -1).join("\n");
    assert.match(hint, /\[clients\."NAME"\]/);
    assert.match(hint, /\[users\.NAME\]/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
