/**
 * `deno task certs --out DIR [--host NAME]...`: a CA and a server certificate for the
 * communication port. Refuses to overwrite existing files unless `--force`.
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { CERT_FILES, generateCertificates } from "../src/certs.ts";
import { die } from "../src/cli.ts";

const HELP = `
Usage: deno task certs --out DIR [--host NAME]... [--force]

Writes a private CA and a server certificate signed by it:
  DIR/communication.ca.pem       CA certificate: every client's "cafile"
  DIR/communication.ca.key.pem   CA private key: keep it offline; only needed to issue more
  DIR/communication.crt.pem      server certificate  } the server's
  DIR/communication.key.pem      server private key  } communication_server_certificate

  --host NAME   a name or address clients use to reach the server; repeat for several
                (default: localhost and 127.0.0.1)
  --force       overwrite existing files
`;

let values;
try {
  ({ values } = parseArgs({
    args: Deno.args,
    options: {
      out: { type: "string" },
      host: { type: "string", multiple: true },
      force: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
  }));
} catch (err) {
  die("natadm-certs", `${(err as Error).message} (see --help)`, 2);
}
if (values.help) {
  console.log(HELP.trim());
  Deno.exit(0);
}
if (!values.out) die("natadm-certs", "--out DIR is required (see --help)", 2);
const hosts = values.host?.length ? values.host : ["localhost", "127.0.0.1"];
const out = values.out;
const paths = Object.fromEntries(
  Object.entries(CERT_FILES).map(([k, file]) => [k, join(out, file)]),
) as Record<keyof typeof CERT_FILES, string>;
if (!values.force) {
  const existing = Object.values(paths).filter((p) => {
    try {
      Deno.statSync(p);
      return true;
    } catch {
      return false;
    }
  });
  if (existing.length) {
    die("natadm-certs", `${existing.join(", ")} already exist; use --force to replace`);
  }
}
const pem = await generateCertificates(hosts);
await Deno.mkdir(out, { recursive: true });
await Deno.writeTextFile(paths.caCert, pem.caCert, { mode: 0o644 });
await Deno.writeTextFile(paths.cert, pem.cert, { mode: 0o644 });
for (const [path, text] of [[paths.caKey, pem.caKey], [paths.key, pem.key]]) {
  await Deno.writeTextFile(path, text, { mode: 0o600 });
  await Deno.chmod(path, 0o600); // mode applies only to new files; --force must tighten too
}
console.log(`Wrote ${Object.values(paths).join(", ")}`);
console.log(`Server certificate valid for: ${hosts.join(", ")}`);
