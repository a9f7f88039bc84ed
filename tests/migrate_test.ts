import assert from "node:assert/strict";
import { join } from "node:path";
import { parse as parseToml } from "smol-toml";
import { errorLine, Fixture, ROOT, runScript } from "./helpers.ts";
import { CERT_FILES } from "../src/certs.ts";
import { loadClientConfig, loadServerConfig } from "../src/config.ts";
import { MigrateError, parsePythonConfig, type PyValue } from "../src/migrate.ts";

/** TOML parsed into plain objects (smol-toml's have no prototype), to compare deeply. */
const parse = (text: string) => JSON.parse(JSON.stringify(parseToml(text)));

const FIXTURES = join(ROOT, "tests", "fixtures");
const fixture = (name: string) => join(FIXTURES, name);

/** Runs cmd/migrate.ts on a file, as `deno task migrate` does. */
function migrate(args: string[]) {
  return runScript("cmd/migrate.ts", args, ["--allow-read", "--allow-write"]);
}

/**
 * A temp dir laid out as the original's install: `certs/` with the communication certificates
 * and `conf/`, where the migrated TOML goes, so `../certs/...` paths resolve from it.
 */
async function installLayout(): Promise<
  { fx: Fixture; conf: string; cleanup: () => Promise<void> }
> {
  const fx = await Fixture.create();
  await Deno.mkdir(fx.path("certs"));
  await Deno.mkdir(fx.path("conf"));
  for (const name of [CERT_FILES.caCert, CERT_FILES.cert, CERT_FILES.key]) {
    await Deno.copyFile(fx.path(name), join(fx.path("certs"), name));
  }
  return { fx, conf: fx.path("conf"), cleanup: () => fx.cleanup() };
}

Deno.test("a client NATadm.conf becomes TOML that loads once the admin adds the key", async () => {
  const { code, stdout, stderr } = await migrate([fixture("NATadm.conf")]);
  assert.equal(code, 0, stderr);
  // The admin's steps are on stderr; stdout is nothing but the TOML.
  assert.match(stderr, /client config/);
  assert.match(stderr, /deno task keygen --out client\.key\.pem/);
  assert.match(stderr, /\[clients\."foo bar"\]/);
  assert.deepEqual(parse(stdout), {
    name: "foo bar",
    remote: ["example.com", 12345],
    cafile: "../certs/communication.ca.pem",
    interval: 5,
    infinite: true,
  });
  const layout = await installLayout();
  try {
    // Without the key it does not load, and says what is missing.
    const file = join(layout.conf, "client.toml");
    await Deno.writeTextFile(file, stdout);
    await assert.rejects(loadClientConfig(file), /key: required/);
    // The admin's addition: run keygen, uncomment the key line.
    const identity = await layout.fx.identity("foo bar");
    assert.match(stdout, /^# key = "client\.key\.pem"$/m);
    await Deno.copyFile(identity.keyPath, join(layout.conf, "client.key.pem"));
    await Deno.writeTextFile(file, stdout.replace(/^# key = /m, "key = "));
    const config = await loadClientConfig(file);
    assert.equal(config.name, "foo bar");
    assert.equal(config.remoteHost, "example.com");
    assert.equal(config.remotePort, 12345);
    assert.equal(config.interval, 5);
    assert.equal(config.infinite, true);
  } finally {
    await layout.cleanup();
  }
});

/** Replaces each client's commented key line in migrated server TOML with a real key. */
async function fillServerKeys(toml: string, fx: Fixture): Promise<string> {
  const lines = toml.split("\n");
  let client: string | undefined;
  for (const [i, line] of lines.entries()) {
    const table = /^\[clients\.(.+)\]$/.exec(line);
    if (table) client = JSON.parse(table[1]);
    if (client && /^# key = "PASTE/.test(line)) {
      lines[i] = `key = "${(await fx.identity(client)).publicKey}"`;
      client = undefined;
    }
  }
  return lines.join("\n");
}

Deno.test("a server NATadm_server.conf becomes TOML that loads once the admin adds keys", async () => {
  const { code, stdout, stderr } = await migrate([fixture("NATadm_server.conf")]);
  assert.equal(code, 0, stderr);
  const toml = parse(stdout) as Record<string, unknown>;
  assert.equal(toml.communication_port, 12345);
  assert.deepEqual(toml.communication_server_certificate, [
    "../certs/communication.crt.pem",
    "../certs/communication.key.pem",
  ]);
  // 'client' in the original's service dicts is mapped to name.
  assert.deepEqual(toml.services, {
    10022: { name: "foo bar", port: 22 },
    10080: { name: "web box", port: 80 },
    10443: { name: "web box", port: 443 },
  });
  assert.deepEqual(Object.keys(toml.clients as object), ["foo bar", "web box"]);
  for (const name of ["foo bar", "web box"]) {
    assert(stderr.includes(`[clients."${name}"]`), stderr);
  }
  const layout = await installLayout();
  try {
    const file = join(layout.conf, "server.toml");
    await Deno.writeTextFile(file, stdout);
    await assert.rejects(loadServerConfig(file), /clients\."foo bar"\.key: required/);
    await Deno.writeTextFile(file, await fillServerKeys(stdout, layout.fx));
    const config = await loadServerConfig(file);
    assert.equal(config.communicationPort, 12345);
    assert.deepEqual([...config.clients.keys()], ["foo bar", "web box"]);
    assert.deepEqual(
      config.services.map((s) => [s.port, s.name, s.host, s.targetPort]),
      [
        [10022, "foo bar", "localhost", 22],
        [10080, "web box", "localhost", 80],
        [10443, "web box", "localhost", 443],
      ],
    );
  } finally {
    await layout.cleanup();
  }
});

Deno.test("the control port keys of older releases are dropped, each with a comment why", async () => {
  const { code, stdout, stderr } = await migrate([fixture("NATadm_server_control.conf")]);
  assert.equal(code, 0, stderr);
  for (const [line, key] of [[2, "control_port"], [3, "control_server_certificate"]] as const) {
    assert.match(stdout, new RegExp(`^# Dropped \\(line ${line}\\):\\n#   ${key} = `, "m"));
    assert.match(stderr, new RegExp(`^Dropped ${key}: .*control port`, "m"));
  }
  assert(stdout.includes("\n#   control_client_ca = '../certs/control.ca.pem'\n"), stdout);
  assert.match(stdout, /WAITFOR/);
  const toml = parse(stdout);
  assert(!("control_port" in toml) && !("control_client_ca" in toml));
  const layout = await installLayout();
  try {
    const file = join(layout.conf, "server.toml");
    await Deno.writeTextFile(file, await fillServerKeys(stdout, layout.fx));
    const config = await loadServerConfig(file);
    assert.deepEqual(config.services.map((s) => [s.port, s.name, s.targetPort]), [
      [10022, "foo bar", 22],
    ]);
  } finally {
    await layout.cleanup();
  }
});

Deno.test("escapes, raw strings, continuations and lists come through; unknown keys are noted", async () => {
  const { code, stdout, stderr } = await migrate([fixture("NATadm_escapes.conf")]);
  assert.equal(code, 0, stderr);
  assert.deepEqual(parse(stdout), {
    name: 'café "bar" é\\ A',
    remote: ["example.com", 12345],
    cafile: "..\\certs\\communication.ca.pem",
    interval: 30,
    infinite: false,
  });
  assert(stdout.includes("\n# Dropped (line 11):\n#   debug = True\n# debug is not a key"), stdout);
  assert.match(stderr, /^Dropped debug: /m);
});

/** Malformed files: each must fail with one error line naming file:line:column and why. */
const MALFORMED: [file: string, at: string, why: RegExp][] = [
  ["bad_unterminated.conf", "2:11", /unterminated string/],
  ["bad_unknown_name.conf", "3:10", /unknown name os\.system: expected a value/],
  ["bad_call.conf", "4:12", /function call int\(\.\.\.\) is not allowed/],
  ["bad_trailing.conf", "1:28", /expected the end of the line .* found the number 12346/],
  ["bad_import.conf", "1:1", /expected an assignment `key = value`, found .*"import"/],
  ["bad_unclosed.conf", "5:1", /"\{" opened at 3:12 is never closed/],
  ["bad_service_port.conf", "3:48", /services\[10022\]\['port'\]: expected a port number/],
  ["bad_mixed.conf", "4:1", /services is a server key, but name \(1:1\) is a client key/],
];

for (const [name, at, why] of MALFORMED) {
  Deno.test(`malformed ${name}: non-zero exit, one error naming ${name}:${at}`, async () => {
    const file = fixture(name);
    const { code, stdout, stderr } = await migrate([file]);
    assert.equal(code, 1, stderr);
    assert.equal(stdout, "", "no TOML for a file that cannot be read");
    const line = errorLine(stderr, "natadm-migrate");
    assert(line.startsWith(`natadm-migrate: error: ${file}:${at}: `), line);
    assert.match(line, why);
  });
}

Deno.test("deno task migrate --out writes the file, and will not replace it without --force", async () => {
  const dir = await Deno.makeTempDir({ prefix: "natadm-migrate-" });
  try {
    const out = join(dir, "client.toml");
    const run = (extra: string[]) =>
      new Deno.Command(Deno.execPath(), {
        args: ["task", "migrate", fixture("NATadm.conf"), "--out", out, ...extra],
        cwd: ROOT,
        stdout: "piped",
        stderr: "piped",
      }).output();
    const first = await run([]);
    assert.equal(first.code, 0, new TextDecoder().decode(first.stderr));
    assert.equal(first.stdout.length, 0);
    assert.equal((parse(await Deno.readTextFile(out)) as { name: string }).name, "foo bar");
    const second = await run([]);
    assert.equal(second.code, 1);
    assert.match(new TextDecoder().decode(second.stderr), /already exists; use --force/);
    assert.equal((await run(["--force"])).code, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Strips positions so parsed values compare by content. */
function plain(v: PyValue): unknown {
  switch (v.type) {
    case "none":
      return null;
    case "tuple":
      return { tuple: v.items.map(plain) };
    case "list":
      return v.items.map(plain);
    case "dict":
      return v.entries.map((e) => [plain(e.key), plain(e.value)]);
    default:
      return v.value;
  }
}

Deno.test("the literal parser follows Python on the subset it reads", () => {
  const read = (text: string) =>
    Object.fromEntries(parsePythonConfig(text, "t.conf").map((a) => [a.name, plain(a.value)]));
  assert.deepEqual(
    read(
      "a = (1)\nb = (1,)\nc = ()\nd = [1, -2, +3, 1.5, None, True]\r\ne = {(1, 'x'): {}}\n" +
        "f = 'it''s'\ng = '''multi\nline'''\nh = u'\\x41\\101\\n'\ni = 'C:\\dir'\n",
    ),
    {
      a: 1,
      b: { tuple: [1] },
      c: { tuple: [] },
      d: [1, -2, 3, 1.5, null, true],
      e: [[{ tuple: [1, "x"] }, []]],
      f: "its",
      g: "multi\nline",
      h: "AA\n",
      i: "C:\\dir",
    },
  );
  const fails = (text: string, pattern: RegExp) =>
    assert.throws(() => parsePythonConfig(text, "t.conf"), (err: Error) => {
      assert(err instanceof MigrateError, String(err));
      assert.match(err.message, pattern);
      return true;
    });
  // In a raw string a backslash keeps the line break after it, as in Python.
  assert.deepEqual(read("j = r'a\\\nb'\nk = r'''c\\\nd'''\n"), { j: "a\\\nb", k: "c\\\nd" });
  fails("f = 'it''s", /t\.conf:1:9: unterminated string/);
  fails("a = 1\n  b = 2\n", /t\.conf:2:1: unexpected indentation/);
  fails("a = {1: 'x', True: 'y'}", /t\.conf:1:14: duplicate key 1 in the dict \(first at 1:6\)/);
  fails("a = {[1]: 2}", /t\.conf:1:6: a list cannot be a dict key/);
  fails("a = {1, 2}", /t\.conf:1:7: expected ":" .* \(sets are not supported\)/);
  fails("a = 010", /t\.conf:1:5: 010: leading zeros/);
  fails("a = 0x1F", /t\.conf:1:5: 0x1F is not a number/);
  fails("a = f'{x}'", /t\.conf:1:5: f-strings are not supported/);
  fails("a = 1 + 2", /t\.conf:1:7: .*found "\+" \(expressions are not evaluated/);
  fails("a = 1; b = 2", /t\.conf:1:6: expected the end of the line/);
  fails("a = 1\na = 2", /t\.conf:2:1: a is assigned a second time \(first at 1:1\)/);
  fails("a = (1, 2]", /t\.conf:1:10: "\]" does not match "\(" opened at 1:5/);
  fails("a = '\\x4'", /t\.conf:1:6: invalid \\x escape/);
  fails("os.system('x')", /t\.conf:1:3: expected "=" after os/);
  fails("print('x')", /t\.conf:1:6: expected "=" after print, found a call of print/);
  fails("a = __import__('os').system('x')", /t\.conf:1:5: function call __import__/);
  fails("a = lambda: 1", /t\.conf:1:5: unknown name lambda/);
  fails("\uFEFFa = 1 2", /t\.conf:1:7: expected the end of the line/);
  fails("a = 'é' é", /t\.conf:1:9: expected the end of the line .* the name é/);
  fails("a = '😀😀' b", /t\.conf:1:10: expected the end of the line .* the name b/);
  fails("a = '''x\ny😀''' z", /t\.conf:2:7: expected the end of the line .* the name z/);
});

/** Runs `fn` with `text` written to a file named `name` in a temp dir, removed afterwards. */
async function withFile(
  name: string,
  text: string,
  fn: (file: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "natadm-migrate-" });
  try {
    const file = join(dir, name);
    await Deno.writeTextFile(file, text);
    await fn(file);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Hostile files: each must end, within the deadline, in one error naming file:line:column. */
const HOSTILE: [name: string, text: () => string, at: string, why: RegExp][] = [
  ["backslash_eof.conf", () => "name = 'abc\\", "1:8", /unterminated string/],
  ["raw_backslash_eof.conf", () => "name = r'abc\\", "1:8", /unterminated string/],
  ["triple_backslash_eof.conf", () => "a = 1\nname = '''abc\\", "2:8", /unterminated string/],
  [
    "nested_20000.conf",
    () => `name = ${"[".repeat(20_000)}${"]".repeat(20_000)}\n`,
    "1:108",
    /nested more than 100 deep \(MAX_NESTING\)/,
  ],
];

for (const [name, text, at, why] of HOSTILE) {
  Deno.test(`hostile ${name}: exits within the deadline with one error naming ${name}:${at}`, async () => {
    await withFile(name, text(), async (file) => {
      // The deadline kills a parser that never ends, so a hang fails the test instead of the run.
      const { code, stdout, stderr } = await migrate([file]);
      assert.equal(code, 1, stderr);
      assert.equal(stdout, "");
      assert(!/RangeError|stack/i.test(stderr), stderr);
      const line = errorLine(stderr, "natadm-migrate");
      assert(line.startsWith(`natadm-migrate: error: ${file}:${at}: `), line);
      assert.match(line, why);
    });
  });
}

Deno.test("a 40,000-item list on one line is read in linear time, its columns exact", async () => {
  // Items of varying width, astral characters included, so columns must count code points; the
  // unknown name at the end makes the error name the column of the last item.
  const items = Array.from({ length: 40_000 }, (_, i) => (i % 3 === 2 ? "'😀'" : String(i)));
  const line = `big = [${items.join(", ")}, oops]`;
  const column = [...line].length - "oops]".length + 1;
  await withFile("big_list.conf", `name = 'x'\n${line}\n`, async (file) => {
    // Linear, this takes milliseconds; recounting each token's column took minutes, past the
    // deadline of migrate().
    const { code, stderr } = await migrate([file]);
    assert.equal(code, 1, stderr);
    const error = errorLine(stderr, "natadm-migrate");
    assert(
      error.startsWith(`natadm-migrate: error: ${file}:2:${column}: unknown name oops`),
      error,
    );
  });
});

Deno.test("a dropped key of 200,000 lines, or 50,000 dropped keys, become comments", async () => {
  // Both once ended in a RangeError: more lines than a call can take as spread arguments.
  const client = "name = 'x'\nremote = ('example.com', 1)\ncafile = 'ca.pem'\n";
  const variants: [name: string, extra: string, commented: RegExp, count: number][] = [
    ["long_key.conf", `long = [${"1,\n".repeat(200_000)}]\n`, /^# {3}(long = \[)?1,$/, 200_000],
    [
      "many_keys.conf",
      Array.from({ length: 50_000 }, (_, i) => `k${i} = ${i}\n`).join(""),
      /^# {3}k\d+ = \d+$/,
      50_000,
    ],
  ];
  for (const [name, extra, commented, count] of variants) {
    await withFile(name, client + extra, async (file) => {
      const out = `${file}.toml`;
      const { code, stderr } = await migrate([file, "--out", out]);
      assert.equal(code, 0, stderr.slice(0, 2_000));
      const toml = await Deno.readTextFile(out);
      assert.equal(toml.split("\n").filter((l) => commented.test(l)).length, count);
      assert.equal((parse(toml) as { name: string }).name, "x");
    });
  }
});

Deno.test("keys named like Object's own properties are dropped like any unknown key", async () => {
  const keys = ["constructor", "toString", "__proto__", "hasOwnProperty"];
  const text = "name = 'x'\nremote = ('example.com', 1)\ncafile = 'ca.pem'\n" +
    keys.map((k) => `${k} = 1\n`).join("");
  await withFile("proto_keys.conf", text, async (file) => {
    const { code, stdout, stderr } = await migrate([file]);
    assert.equal(code, 0, stderr);
    for (const key of keys) {
      assert.match(stderr, new RegExp(`^Dropped ${key}: ${key} is not a key of the original`, "m"));
    }
    assert.equal((parse(stdout) as { name: string }).name, "x");
  });
});

Deno.test(`brackets nested exactly MAX_NESTING (100) deep parse; one more is refused`, () => {
  // ((1,),): every level a one-item tuple.
  const nested = (depth: number) => `a = ${"(".repeat(depth)}1${",)".repeat(depth)}`;
  const [a] = parsePythonConfig(nested(100), "t.conf");
  let v = a.value;
  for (let depth = 0; depth < 100; depth++) {
    assert(v.type === "tuple" && v.items.length === 1);
    v = v.items[0];
  }
  assert.deepEqual(plain(v), 1);
  assert.throws(
    () => parsePythonConfig(nested(101), "t.conf"),
    (err: Error) => {
      assert(err instanceof MigrateError, String(err));
      assert.match(err.message, /^t\.conf:1:105: .*nested more than 100 deep \(MAX_NESTING\)/);
      return true;
    },
  );
});
