/**
 * `deno task certs [--out DIR] [--host NAME]...`: a CA and a server certificate for the
 * communication port, by default in the repository's `certs/` folder. Refuses to replace
 * existing files unless `--force`, and never writes through a symlink.
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { CERT_FILES, DEFAULT_CERTS_DIR, generateCertificates } from "../src/certs.ts";
import { die } from "../src/cli.ts";
import {
  pathExists,
  prepareOutputDir,
  UnsafeOutputError,
  writeFileExclusive,
} from "../src/secretfile.ts";

const PROGRAM = "natadm-certs";
const HELP = `
Usage: deno task certs [--out DIR] [--host NAME]... [--peer] [--force]

Writes a private CA and a server certificate signed by it:
  DIR/communication.ca.pem       CA certificate: every client's "cafile"
  DIR/communication.ca.key.pem   CA private key: keep it offline; only needed to issue more
  DIR/communication.crt.pem      server certificate  } the server's
  DIR/communication.key.pem      server private key  } communication_server_certificate

  --out DIR     where to write (default: certs/ in this repository, which git ignores);
                created if missing; refused if group or others can write it
  --host NAME   a name or address clients use to reach the server; repeat for several
                (default: localhost and 127.0.0.1)
  --peer        also allow the certificate as a TLS client certificate, so that it serves
                as a cluster's peer_certificate (with the CA as peer_cafile); list every
                server's peer_host with --host
  --force       replace existing files (a symlink there is replaced, never followed)
`;

let values;
try {
  ({ values } = parseArgs({
    args: Deno.args,
    options: {
      out: { type: "string" },
      host: { type: "string", multiple: true },
      force: { type: "boolean" },
      peer: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
  }));
} catch (err) {
  die(PROGRAM, `${(err as Error).message} (see --help)`, 2);
}
if (values.help) {
  console.log(HELP.trim());
  Deno.exit(0);
}
if (values.out === "") die(PROGRAM, "--out DIR must not be empty (see --help)", 2);
const hosts = values.host?.length ? values.host : ["localhost", "127.0.0.1"];
const out = values.out ?? DEFAULT_CERTS_DIR;
const force = values.force ?? false;
const paths = Object.fromEntries(
  Object.entries(CERT_FILES).map(([k, file]) => [k, join(out, file)]),
) as Record<keyof typeof CERT_FILES, string>;

/** Each file and its mode: certificates are public, keys private. */
const MODES: [keyof typeof CERT_FILES, number][] = [
  ["caCert", 0o644],
  ["cert", 0o644],
  ["caKey", 0o600],
  ["key", 0o600],
];
try {
  await prepareOutputDir(out);
  if (!force) {
    const existing = [];
    for (const path of Object.values(paths)) if (await pathExists(path)) existing.push(path);
    if (existing.length) {
      const verb = existing.length === 1 ? "exists" : "exist";
      die(PROGRAM, `${existing.join(", ")} already ${verb}; use --force to replace`);
    }
  }
  const pem = await generateCertificates(hosts, { peer: values.peer === true });
  for (const [name, mode] of MODES) {
    try {
      await writeFileExclusive(paths[name], pem[name], { mode, replace: force });
    } catch (err) {
      if (err instanceof Deno.errors.AlreadyExists) {
        die(PROGRAM, `${paths[name]} appeared while writing; use --force to replace`);
      }
      throw err;
    }
  }
} catch (err) {
  if (err instanceof UnsafeOutputError) die(PROGRAM, err.message);
  die(PROGRAM, `cannot write to ${out}: ${(err as Error).message}`);
}
console.log(`Wrote ${Object.values(paths).join(", ")}`);
console.log(`Server certificate valid for: ${hosts.join(", ")}`);
