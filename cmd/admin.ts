/**
 * `deno task admin --etcd URL COMMAND …`: changes the registry in etcd (clients, services,
 * users) that servers with `registry = "etcd"` watch and apply at once.
 *
 * Every change reads the whole registry, applies the change, validates the result with the
 * code the server uses, and writes it in one transaction guarded by what it read (trying again
 * if someone else wrote meanwhile). An invalid change is refused with one line and exit code 1.
 * @module
 */
import { parseArgs } from "node:util";
import { parse, TomlError } from "smol-toml";
import {
  ConfigError,
  DEFAULT_ETCD_PREFIX,
  etcdEndpointProblem,
  etcdPrefixProblem,
  etcdSource,
  fileSource,
  parseRegistry,
  type RawRegistry,
  type RegistryKind,
  userRuleProblem,
} from "../src/config.ts";
import { type Compare, EtcdClient, type TxnOp } from "../src/etcd.ts";
import { CHANGED_KEY, rawRegistry, REGISTRY_KINDS, registryKey } from "../src/etcd_registry.ts";
import { die } from "../src/cli.ts";

const PROGRAM = "natadm-admin";

const HELP = `
Usage: admin.ts --etcd URL[,URL…] [--prefix P] [--user U (--password P | --password-file F)]
                [--cafile F] COMMAND [ARGS]

Changes the registry in etcd that servers with registry = "etcd" watch; they apply every
change at once. Each change is validated as the server validates its config; an invalid one
is refused (exit 1) and the registry stays as it was.

Commands:
  list                                  print clients, services and users
  add-client NAME --key KEY             add a client (KEY: the line \`deno task keygen\` prints)
  remove-client NAME                    remove a client (its sessions are logged out)
  add-service PORT --client NAME --port TARGET [--host H] [--allow-from CIDR,…]
                                        public PORT on every server → TARGET on client NAME
  remove-service PORT                   stop serving PORT
  add-user NAME --key KEY --allow RULE[,RULE…]
                                        RULE: "CLIENT-GLOB:PORT" or "CLIENT-GLOB:*"
  remove-user NAME                      remove a user
  import FILE.toml                      copy [clients] and [services] of a server config
                                        into etcd (then set registry = "etcd" in FILE and
                                        remove those tables from it)

Options:
      --etcd URL[,URL…]   etcd endpoints, e.g. http://127.0.0.1:2379 (required)
      --prefix P          key prefix of the registry (default ${DEFAULT_ETCD_PREFIX})
      --user U            etcd user, with --password or --password-file
      --cafile F          CA certificate (PEM) for https endpoints
      --replace           add-*: replace an entry that exists; import: replace differing ones
  -h, --help              show this help
`;

const { values, positionals } = (() => {
  try {
    return parseArgs({
      args: Deno.args,
      strict: true,
      allowPositionals: true,
      options: {
        etcd: { type: "string" },
        prefix: { type: "string", default: DEFAULT_ETCD_PREFIX },
        user: { type: "string" },
        password: { type: "string" },
        "password-file": { type: "string" },
        cafile: { type: "string" },
        key: { type: "string" },
        client: { type: "string" },
        port: { type: "string" },
        host: { type: "string" },
        "allow-from": { type: "string" },
        allow: { type: "string", multiple: true },
        replace: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (err) {
    return die(PROGRAM, `${(err as Error).message} (see --help)`, 2);
  }
})();

if (values.help) {
  console.log(HELP.trim());
  Deno.exit(0);
}

function usage(message: string): never {
  return die(PROGRAM, `${message} (see --help)`, 2);
}

function refuse(message: string): never {
  return die(PROGRAM, message, 1);
}

if (!values.etcd) usage("--etcd URL is required");
const endpoints = values.etcd.split(",").map((e) => e.trim());
for (const endpoint of endpoints) {
  const problem = etcdEndpointProblem(endpoint);
  if (problem) usage(`--etcd: ${problem}`);
}
const prefix = values.prefix;
const prefixProblem = etcdPrefixProblem(prefix);
if (prefixProblem) usage(`--prefix: ${prefixProblem}`);
if ((values.password !== undefined || values["password-file"] !== undefined) && !values.user) {
  usage("--password and --password-file need --user");
}
const password = values["password-file"] !== undefined
  ? await Deno.readTextFile(values["password-file"]).then((t) => t.replace(/\r?\n$/, ""))
    .catch((err) => refuse(`--password-file: ${(err as Error).message}`))
  : values.password;
const caCerts = values.cafile !== undefined
  ? [await Deno.readTextFile(values.cafile).catch((err) => refuse(`--cafile: ${err.message}`))]
  : undefined;

const etcd = new EtcdClient({ endpoints, username: values.user, password, caCerts });

/** The registry's keys (and the change marker) as read, with the revision of the read. */
interface Read {
  entries: Map<string, string>;
  revision: number;
  /** mod_revision of the change marker (0: none yet). */
  changedRevision: number;
}

async function read(): Promise<Read> {
  const { kvs, revision } = await etcd.rangePrefix(prefix);
  const entries = new Map<string, string>();
  let changedRevision = 0;
  for (const kv of kvs) {
    if (kv.key === prefix + CHANGED_KEY) changedRevision = kv.modRevision;
    else if (REGISTRY_KINDS.some((k) => kv.key.startsWith(`${prefix}${k}/`))) {
      entries.set(kv.key, kv.value);
    }
  }
  return { entries, revision, changedRevision };
}

/** A change to the registry: the entries to write (a value) or delete (null). */
type Edit = Map<string, string | null>;

/**
 * Applies `plan` (which sees the current entries and returns the edit and what to print) to
 * the registry, validated whole and written only if nobody changed it since it was read.
 */
async function change(plan: (current: Map<string, string>) => { edit: Edit; done: string }) {
  for (let attempt = 1;; attempt++) {
    const current = await read();
    const { edit, done } = plan(current.entries);
    const next = new Map(current.entries);
    for (const [key, value] of edit) {
      if (value === null) next.delete(key);
      else next.set(key, value);
    }
    await parseRegistry(rawRegistry(prefix, next), etcdSource(prefix));
    const compare: Compare[] = [
      // Nothing in the registry written since the read, and no other admin change either
      // (which also catches a deletion, invisible to the first comparisons).
      ...REGISTRY_KINDS.map((kind): Compare => ({
        key: `${prefix}${kind}/`,
        prefix: true,
        target: "mod",
        result: "less",
        value: current.revision + 1,
      })),
      { key: prefix + CHANGED_KEY, target: "mod", result: "equal", value: current.changedRevision },
    ];
    const ops: TxnOp[] = [...edit].map(([key, value]) =>
      value === null ? { delete: { key } } : { put: { key, value } }
    );
    ops.push({ put: { key: prefix + CHANGED_KEY, value: new Date().toISOString() } });
    const { succeeded, revision } = await etcd.txn(compare, ops);
    if (succeeded) {
      console.log(`${done} (etcd revision ${revision})`);
      return;
    }
    if (attempt >= 5) refuse("the registry kept changing while this change was made; try again");
  }
}

function need(value: string | undefined, option: string): string {
  if (value === undefined) usage(`${command} needs ${option}`);
  return value;
}

function arg(i: number, what: string): string {
  const value = positionals[i];
  if (value === undefined) usage(`${command} needs ${what}`);
  if (positionals.length > i + 1) usage(`unexpected argument "${positionals[i + 1]}"`);
  return value;
}

function portArg(text: string, what: string): number {
  const port = /^[0-9]{1,5}$/.test(text) ? Number(text) : 0;
  if (port < 1 || port > 65535) usage(`${what} must be a port number (1-65535), got "${text}"`);
  return port;
}

function list(text: string | undefined): string[] {
  return (text ?? "").split(",").map((s) => s.trim()).filter((s) => s !== "");
}

/** An add: refuses to overwrite unless --replace. */
function add(kind: RegistryKind, name: string, value: unknown, what: string) {
  return change((current) => {
    const key = registryKey(prefix, kind, name);
    const exists = current.has(key);
    if (exists && !values.replace) refuse(`${what} exists already (add --replace to replace it)`);
    return {
      edit: new Map([[key, JSON.stringify(value)]]),
      done: `${what} ${exists ? "replaced" : "added"}`,
    };
  });
}

function remove(kind: RegistryKind, name: string, what: string) {
  return change((current) => {
    const key = registryKey(prefix, kind, name);
    if (!current.has(key)) refuse(`no ${what} in etcd (${key})`);
    return { edit: new Map([[key, null]]), done: `${what} removed` };
  });
}

async function printList(): Promise<void> {
  const { entries, revision } = await read();
  const raw = rawRegistry(prefix, entries);
  const lines = [`registry at ${prefix} (etcd revision ${revision})`, "clients:"];
  for (const [name, v] of Object.entries(raw.clients)) {
    lines.push(`  ${name}  ${(v as { key?: unknown })?.key ?? "?"}`);
  }
  lines.push("services:");
  for (const [port, v] of Object.entries(raw.services)) {
    const s = v as { name?: unknown; host?: unknown; port?: unknown; allow_from?: unknown };
    const allow = Array.isArray(s?.allow_from) ? `  from ${s.allow_from.join(",")}` : "";
    lines.push(`  ${port} → ${s?.name} ${s?.host ?? "localhost"}:${s?.port}${allow}`);
  }
  lines.push("users:");
  for (const [name, v] of Object.entries(raw.users)) {
    const u = v as { allow?: unknown };
    lines.push(`  ${name}  allow ${Array.isArray(u?.allow) ? u.allow.join(",") : "?"}`);
  }
  console.log(lines.join("\n"));
  // The registry as the servers would see it: say so if it is not valid.
  await parseRegistry(raw, etcdSource(prefix)).catch((err) =>
    refuse(`the registry in etcd is not valid, servers keep their last good one: ${err.message}`)
  );
}

async function importFile(file: string): Promise<void> {
  let table: Record<string, unknown>;
  try {
    table = parse(await Deno.readTextFile(file)) as Record<string, unknown>;
  } catch (err) {
    if (err instanceof TomlError) refuse(`${file}:${err.line}:${err.column}: TOML syntax error`);
    refuse(`${file}: ${(err as Error).message}`);
  }
  const tableOf = (name: RegistryKind): Record<string, unknown> => {
    const v = table[name] ?? {};
    if (typeof v !== "object" || v === null || Array.isArray(v)) {
      refuse(`${file}: ${name}: expected a table`);
    }
    return v as Record<string, unknown>;
  };
  const raw: RawRegistry = {
    clients: tableOf("clients"),
    services: tableOf("services"),
    users: tableOf("users"),
  };
  // Valid in the file first, so errors name the file's keys.
  await parseRegistry(raw, fileSource(file));
  const wanted = new Map<string, string>();
  for (const kind of REGISTRY_KINDS) {
    for (const [name, value] of Object.entries(raw[kind])) {
      wanted.set(registryKey(prefix, kind, name), JSON.stringify(value));
    }
  }
  if (wanted.size === 0) refuse(`${file}: no [clients], [services] or [users] to import`);
  await change((current) => {
    const edit: Edit = new Map();
    for (const [key, value] of wanted) {
      const old = current.get(key);
      if (old === value) continue;
      if (old !== undefined && JSON.stringify(JSON.parse(old)) === value) continue;
      if (old !== undefined && !values.replace) {
        refuse(`etcd ${key} exists with another value (add --replace to replace it)`);
      }
      edit.set(key, value);
    }
    const counts = REGISTRY_KINDS.map((k) => `${Object.keys(raw[k]).length} ${k}`).join(", ");
    return {
      edit,
      done: `imported ${counts} from ${file} (${edit.size} keys written); now set ` +
        `registry = "etcd" and etcd_endpoints in it, and remove its [clients] and [services]`,
    };
  });
}

const command = positionals.shift();
try {
  switch (command) {
    case "list":
      if (positionals.length) usage(`unexpected argument "${positionals[0]}"`);
      await printList();
      break;
    case "add-client": {
      const name = arg(0, "a client NAME");
      await add("clients", name, { key: need(values.key, "--key KEY") }, `client ${name}`);
      break;
    }
    case "remove-client": {
      const name = arg(0, "a client NAME");
      await remove("clients", name, `client ${name}`);
      break;
    }
    case "add-service": {
      const port = portArg(arg(0, "a public PORT"), "PORT");
      const service: Record<string, unknown> = {
        name: need(values.client, "--client NAME"),
        port: portArg(need(values.port, "--port TARGET"), "--port"),
      };
      if (values.host !== undefined) service.host = values.host;
      if (values["allow-from"] !== undefined) service.allow_from = list(values["allow-from"]);
      await add("services", String(port), service, `service ${port}`);
      break;
    }
    case "remove-service": {
      const port = portArg(arg(0, "a public PORT"), "PORT");
      await remove("services", String(port), `service ${port}`);
      break;
    }
    case "add-user": {
      const name = arg(0, "a user NAME");
      const allow = (values.allow ?? []).flatMap(list);
      if (allow.length === 0) usage("add-user needs --allow RULE");
      for (const rule of allow) {
        const problem = userRuleProblem(rule);
        if (problem) usage(`--allow: ${problem}`);
      }
      await add("users", name, { key: need(values.key, "--key KEY"), allow }, `user ${name}`);
      break;
    }
    case "remove-user": {
      const name = arg(0, "a user NAME");
      await remove("users", name, `user ${name}`);
      break;
    }
    case "import":
      await importFile(arg(0, "a FILE.toml"));
      break;
    case undefined:
      usage("no command given");
      break;
    default:
      usage(`unknown command "${command}"`);
  }
} catch (err) {
  if (err instanceof ConfigError) refuse(`refused, the registry is unchanged: ${err.message}`);
  refuse((err as Error).message);
} finally {
  etcd.close();
}
