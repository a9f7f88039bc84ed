/**
 * `deno task migrate FILE [--out FILE.toml] [--force]`: converts a config file of the original
 * NATadm (`NATadm.conf` or `NATadm_server.conf`, Python literals) into this project's TOML.
 * The TOML goes to stdout (or --out); what the admin must still add goes to stderr.
 * @module
 */
import { parseArgs } from "node:util";
import { die } from "../src/cli.ts";
import { migrateConfig, MigrateError } from "../src/migrate.ts";

const PROGRAM = "natadm-migrate";
const HELP = `
Usage: deno task migrate FILE [--out FILE.toml] [--force]

Reads FILE, a config of the original NATadm (NATadm.conf for a client, NATadm_server.conf
for a server; told apart by their keys), and prints the equivalent TOML for this NATadm.
The file is parsed as Python literals only: nothing in it is evaluated.

Keys with no meaning here are kept as comments saying why they were dropped. What the
original did not have, each client's key, must be added by hand: the TOML says where,
and the steps are printed on stderr.

  -o, --out FILE   write the TOML to FILE instead of stdout
      --force      replace FILE if it exists
  -h, --help       show this help
`;

let parsed;
try {
  parsed = parseArgs({
    args: Deno.args,
    allowPositionals: true,
    options: {
      out: { type: "string", short: "o" },
      force: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
  });
} catch (err) {
  die(PROGRAM, `${(err as Error).message} (see --help)`, 2);
}
const { values, positionals } = parsed;
if (values.help) {
  console.log(HELP.trim());
  Deno.exit(0);
}
if (positionals.length !== 1) {
  die(PROGRAM, "expected exactly one FILE, the original NATadm config (see --help)", 2);
}
const file = positionals[0];
let text: string;
try {
  text = await Deno.readTextFile(file);
} catch (err) {
  die(PROGRAM, `${file}: cannot read: ${(err as Error).message}`);
}
let migration;
try {
  migration = migrateConfig(text, file);
} catch (err) {
  if (err instanceof MigrateError) die(PROGRAM, err.message);
  throw err;
}
if (values.out) {
  try {
    await Deno.writeTextFile(values.out, migration.toml, { createNew: !values.force });
  } catch (err) {
    if (err instanceof Deno.errors.AlreadyExists) {
      die(PROGRAM, `${values.out} already exists; use --force to replace it`);
    }
    die(PROGRAM, `cannot write ${values.out}: ${(err as Error).message}`);
  }
} else {
  await Deno.stdout.write(new TextEncoder().encode(migration.toml));
}
const where = values.out ? `Wrote ${values.out}` : "Printed";
console.error(`${where}: a ${migration.kind} config converted from ${file}.`);
for (const { key, reason } of migration.dropped) console.error(`Dropped ${key}: ${reason}`);
console.error("Before it loads, add what the original did not have:");
migration.todo.forEach((step, i) => console.error(`  ${i + 1}. ${step}`));
