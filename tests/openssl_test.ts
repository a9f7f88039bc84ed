/**
 * Certificates and keys made by `openssl` work as well as NATadm's own: an admin may bring an
 * existing CA (EC or RSA) and client keys made with `openssl genpkey`.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { CERT_FILES } from "../src/certs.ts";
import {
  clientToml,
  findExecutable,
  Fixture,
  freePort,
  type Identity,
  roundTrip,
  Scope,
  serverToml,
  sh,
  startEcho,
} from "./helpers.ts";

const openssl = findExecutable("openssl");
if (!openssl) console.log("openssl tests skipped: no openssl on PATH");

/** `openssl req -newkey` arguments for a key of `kind`. */
function newKey(kind: "ec" | "rsa"): string[] {
  return kind === "ec" ? ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] : [
    "-newkey",
    "rsa:2048",
  ];
}

/**
 * Writes, with openssl only, a CA and a server certificate for localhost/127.0.0.1 into `dir`
 * under the names NATadm's configs use, and an Ed25519 client key; returns the client's
 * identity with its public key taken from `openssl pkey -pubout`.
 */
async function opensslFixture(dir: string, kind: "ec" | "rsa"): Promise<Identity> {
  const run = (...args: string[]) => sh(openssl!, args, dir);
  await run(
    "req",
    "-x509",
    ...newKey(kind),
    "-nodes",
    "-keyout",
    "ca.key",
    "-out",
    CERT_FILES.caCert,
    "-days",
    "2",
    "-subj",
    `/CN=openssl test CA (${kind})`,
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
  );
  await run(
    "req",
    "-new",
    ...newKey(kind),
    "-nodes",
    "-keyout",
    CERT_FILES.key,
    "-out",
    "server.csr",
    "-subj",
    "/CN=localhost",
  );
  await Deno.writeTextFile(
    join(dir, "server.ext"),
    [
      "subjectAltName = DNS:localhost, IP:127.0.0.1",
      "basicConstraints = CA:FALSE",
      `keyUsage = critical, digitalSignature${kind === "rsa" ? ", keyEncipherment" : ""}`,
      "extendedKeyUsage = serverAuth",
      "",
    ].join("\n"),
  );
  await run(
    "x509",
    "-req",
    "-in",
    "server.csr",
    "-CA",
    CERT_FILES.caCert,
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-days",
    "2",
    "-extfile",
    "server.ext",
    "-out",
    CERT_FILES.cert,
  );
  await run("genpkey", "-algorithm", "ed25519", "-out", "client.key");
  // NATadm refuses private keys others can read; some openssl builds write them 0644.
  for (const key of ["ca.key", CERT_FILES.key, "client.key"]) {
    await Deno.chmod(join(dir, key), 0o600);
  }
  const publicPem = await run("pkey", "-in", "client.key", "-pubout");
  const publicKey = publicPem.replace(/-----[A-Z ]+-----/g, "").replace(/\s+/g, "");
  return { name: `openssl ${kind}`, keyPath: join(dir, "client.key"), publicKey };
}

for (const kind of ["ec", "rsa"] as const) {
  Deno.test({
    name: `openssl-made ${kind === "ec" ? "EC P-256" : "RSA 2048"} certificates and an ` +
      "openssl Ed25519 client key carry a tunnel",
    ignore: !openssl,
    async fn() {
      const fixture = new Fixture(await Deno.makeTempDir({ prefix: "natadm-openssl-" }));
      const scope = new Scope();
      try {
        const identity = await opensslFixture(fixture.dir, kind);
        const echo = startEcho();
        scope.defer(echo.close);
        const communicationPort = freePort();
        const servicePort = freePort();
        await scope.server(
          await fixture.write(
            "server.toml",
            serverToml({
              communicationPort,
              clients: [identity],
              services: [{ port: servicePort, name: identity.name, targetPort: echo.port }],
            }),
          ),
        );
        const client = await scope.client(
          await fixture.write("client.toml", clientToml({ identity, communicationPort })),
        );
        assert.match(client.lines.join("\n"), new RegExp(`as "openssl ${kind}"`));
        assert.equal(await roundTrip(servicePort, `via openssl ${kind}`), `via openssl ${kind}`);
      } finally {
        await scope.close();
        await fixture.cleanup();
      }
    },
  });
}
