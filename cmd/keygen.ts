/**
 * `deno task keygen --out FILE`: a client's Ed25519 key pair. The private key goes to FILE
 * (mode 0600); the public key, for the server's `[clients]` table, is the last line on stdout.
 * @module
 */
import { parseArgs } from "node:util";
import { die } from "../src/cli.ts";
import { generateKeyPair } from "../src/keys.ts";

const HELP = `
Usage: deno task keygen --out FILE [--force]

Writes a new Ed25519 private key to FILE (mode 0600) and prints the public key, as the
server's [clients] table wants it, on the last line of output.
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
  die("natadm-keygen", `${(err as Error).message} (see --help)`, 2);
}
if (values.help) {
  console.log(HELP.trim());
  Deno.exit(0);
}
if (!values.out) die("natadm-keygen", "--out FILE is required (see --help)", 2);
const { privatePem, publicKey } = generateKeyPair();
try {
  await Deno.writeTextFile(values.out, privatePem, { mode: 0o600, createNew: !values.force });
  await Deno.chmod(values.out, 0o600);
} catch (err) {
  if (err instanceof Deno.errors.AlreadyExists) {
    die("natadm-keygen", `${values.out} already exists; use --force to replace it`);
  }
  die("natadm-keygen", `cannot write ${values.out}: ${(err as Error).message}`);
}
console.log(`Wrote private key ${values.out}. Put this in the server's config:`);
console.log(`key = "${publicKey}"`);
