/**
 * `deno task keygen [--out FILE]`: an Ed25519 key pair for a client or an admin user. The
 * private key goes to FILE (mode 0600; by default certs/client.key.pem in the repository); the
 * public key, for the server's `[clients."NAME"]` or `[users.NAME]` table, is the last line on
 * stdout.
 * @module
 */
import { parseArgs } from "node:util";
import { dirname, join } from "node:path";
import { DEFAULT_CERTS_DIR } from "../src/certs.ts";
import { die } from "../src/cli.ts";
import { generateKeyPair } from "../src/keys.ts";
import { prepareOutputDir, UnsafeOutputError, writeFileExclusive } from "../src/secretfile.ts";

const PROGRAM = "natadm-keygen";
const HELP = `
Usage: deno task keygen [--out FILE] [--force]

Writes a new Ed25519 private key to FILE (mode 0600) and prints its public key as a
key = "..." line, the last line of output. In the server's config that line goes
  under [clients."NAME"] for a client (whose config names FILE as its "key"), or
  under [users.NAME] for an admin user.

  --out FILE   where to write the private key (default: certs/client.key.pem in this
               repository, which git ignores); its directory is created if missing and
               refused if group or others can write it
  --force      replace an existing file (a symlink there is replaced, never followed)
`;

let values;
try {
  ({ values } = parseArgs({
    args: Deno.args,
    options: {
      out: { type: "string" },
      force: { type: "boolean" },
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
if (values.out === "") die(PROGRAM, "--out FILE must not be empty (see --help)", 2);
const out = values.out ?? join(DEFAULT_CERTS_DIR, "client.key.pem");
const { privatePem, publicKey } = generateKeyPair();
try {
  await prepareOutputDir(dirname(out));
  await writeFileExclusive(out, privatePem, { mode: 0o600, replace: values.force ?? false });
} catch (err) {
  if (err instanceof Deno.errors.AlreadyExists) {
    die(PROGRAM, `${out} already exists; use --force to replace it`);
  }
  if (err instanceof UnsafeOutputError) die(PROGRAM, err.message);
  die(PROGRAM, `cannot write ${out}: ${(err as Error).message}`);
}
console.log(`Wrote private key ${out} (mode 0600).`);
console.log(`Put the line below in the server's config: under [clients."NAME"] for a client,`);
console.log(`or under [users.NAME] for an admin user.`);
console.log(`key = "${publicKey}"`);
