import assert from "node:assert/strict";
import { dirname, join } from "node:path";
import {
  clientToml,
  connectUser,
  findExecutable,
  Fixture,
  freePort,
  readExactly,
  ROOT,
  serverToml,
  startEcho,
  waitUntil,
} from "./helpers.ts";
import { VERSION } from "../src/version.ts";

const UNITS = join(ROOT, "contrib", "systemd");
const decode = (bytes: Uint8Array) => new TextDecoder().decode(bytes);

/** PATH with this test's Deno first: the shims run `deno` from PATH, as installed ones do. */
const PATH_WITH_DENO = `${dirname(Deno.execPath())}:${Deno.env.get("PATH") ?? ""}`;

/** A process whose stderr lines are collected; for commands that are not NATadm scripts. */
class Spawned {
  readonly lines: string[] = [];
  readonly #child: Deno.ChildProcess;
  readonly #done: Promise<void>;

  constructor(command: string, args: string[], env: Record<string, string> = {}, cwd?: string) {
    const child = new Deno.Command(command, {
      args,
      env,
      cwd,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.#child = child;
    this.#done = (async () => {
      let rest = "";
      for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
        const parts = (rest + text).split("\n");
        rest = parts.pop()!;
        this.lines.push(...parts);
      }
    })();
  }

  waitFor(pattern: RegExp): Promise<string> {
    return waitUntil(
      () => this.lines.find((l) => pattern.test(l)),
      `${pattern} in:\n${this.lines.join("\n")}`,
    );
  }

  async stop(): Promise<void> {
    try {
      this.#child.kill("SIGKILL");
    } catch {
      // Already exited.
    }
    await this.#child.status;
    await this.#done;
  }
}

Deno.test("deno task install puts the server, client, connect and forward shims in --root", async () => {
  const dir = await Deno.makeTempDir({ prefix: "natadm-install-" });
  try {
    const install = (extra: string[] = []) =>
      new Deno.Command(Deno.execPath(), {
        args: ["task", "install", "--root", dir, ...extra],
        cwd: ROOT,
        env: { NO_COLOR: "1" },
        stdout: "piped",
        stderr: "piped",
      }).output();
    const first = await install();
    assert.equal(first.code, 0, decode(first.stderr));
    for (const name of ["natadm-server", "natadm-client", "natadm-connect", "natadm-forward"]) {
      const shim = join(dir, "bin", name);
      assert.match(
        decode(first.stdout),
        new RegExp(`Installed ${shim} \\(--allow-net --allow-read\\)`),
      );
      // Exactly the two permissions, nothing broader.
      const text = await Deno.readTextFile(shim);
      const flags = text.match(/--allow-[a-z-]+|(?<=\s)-A(?=\s)/g)?.sort();
      assert.deepEqual(flags, ["--allow-net", "--allow-read"], text);
      // Run from elsewhere: the shim does not depend on the working directory.
      const out = await new Deno.Command(shim, {
        args: ["--version"],
        cwd: dir,
        env: { PATH: PATH_WITH_DENO },
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.equal(out.code, 0, decode(out.stderr));
      assert.equal(decode(out.stdout).trim(), `${name} ${VERSION}`);
    }
    const again = await install();
    assert.equal(again.code, 1);
    assert.match(decode(again.stderr), /natadm-install: error: natadm-server is already installed/);
    assert.equal((await install(["--force"])).code, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** The shell script both units' ExecStart runs, as bash gets it: $0 deno, $1 script, $2 config. */
const UNIT_SCRIPT = `flags=$("$0" run --allow-read "$1" --config "$2" --print-permissions) && ` +
  `mapfile -t perms <<<"$flags" && exec "$0" run "\${perms[@]}" "$1" --config "$2"`;

/**
 * An Exec line's words as systemd makes them: split at spaces, quotes removed (the units use
 * no escapes), "$$" a literal "$". Fails on anything else.
 */
function execWords(line: string): string[] {
  const words: string[] = [];
  const word = /\s*(?:'([^']*)'|"([^"]*)"|([^\s'"]+))/y;
  while (word.lastIndex < line.length) {
    const m = word.exec(line);
    assert(m, `cannot split at ${word.lastIndex}: ${line}`);
    const text = m[1] ?? m[2] ?? m[3];
    assert(!/\\|\$/.test(text.replaceAll("$$", "")), `an escape systemd would expand: ${text}`);
    words.push(text.replaceAll("$$", "$"));
  }
  return words;
}

/** A unit file's `[Service]`-and-other directives as key → values, in order. */
function parseUnit(text: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const line of text.split("\n")) {
    if (!line.trim() || /^[#;[]/.test(line.trim())) continue;
    const m = /^([A-Za-z]+)=(.*)$/.exec(line);
    assert(m, `not a directive: ${line}`);
    out.set(m[1], [...out.get(m[1]) ?? [], m[2]]);
  }
  return out;
}

for (const [program, script] of [["server", "server.ts"], ["client", "client.ts"]] as const) {
  Deno.test(`contrib/systemd/natadm-${program}.service runs sandboxed with exactly its config's permissions`, async () => {
    const unit = parseUnit(await Deno.readTextFile(join(UNITS, `natadm-${program}.service`)));
    const one = (key: string) => {
      assert.equal(unit.get(key)?.length, 1, `${key}= once`);
      return unit.get(key)![0];
    };
    for (
      const [key, value] of Object.entries({
        Restart: "always",
        User: "natadm",
        NoNewPrivileges: "yes",
        ProtectSystem: "strict",
        ProtectHome: "yes",
        PrivateTmp: "yes",
        PrivateDevices: "yes",
        RestrictAddressFamilies: "AF_INET AF_INET6",
      })
    ) {
      assert.equal(one(key), value, key);
    }
    // The program runs with exactly the flags its config needs: the inner `deno run` only
    // reads the config to print them, bash reads each printed line as one argument, and
    // nothing is granted broadly.
    const exec = one("ExecStart");
    const [shell, ...args] = execWords(exec);
    assert.equal(shell, "/bin/bash", exec);
    assert.deepEqual(args.slice(0, 2), ["-c", UNIT_SCRIPT], exec);
    assert.match(args[2], /\/deno$/);
    assert(args[3].endsWith(`/${script}`), exec);
    assert.equal(args[4], `/etc/natadm/${program}.toml`);
    assert.equal(args.length, 5, exec);
    if (program === "server") {
      assert.equal(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
      // Ambient capabilities must be in the bounding set, so that holds exactly this one.
      assert.equal(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
      assert.equal(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    } else {
      assert.equal(one("CapabilityBoundingSet"), "");
      assert(!unit.has("AmbientCapabilities"));
    }
  });
}

const systemdAnalyze = findExecutable("systemd-analyze");
if (!systemdAnalyze) {
  console.log("install: skipped systemd-analyze verify: systemd-analyze is not installed");
}

Deno.test({
  name: "systemd-analyze verify accepts both units without a warning",
  ignore: !systemdAnalyze,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "natadm-units-" });
    try {
      const files = [];
      for (const name of ["natadm-server.service", "natadm-client.service"]) {
        // verify checks that ExecStart's program exists: point it at this machine's Deno.
        const text = (await Deno.readTextFile(join(UNITS, name)))
          .replace(/^(Exec\w+=)\/\S*\/deno /gm, `$1${Deno.execPath()} `);
        files.push(join(dir, name));
        await Deno.writeTextFile(join(dir, name), text);
      }
      const out = await new Deno.Command(systemdAnalyze!, {
        args: ["verify", "--man=no", ...files],
        env: { SYSTEMD_LOG_COLOR: "0" },
        stdout: "piped",
        stderr: "piped",
      }).output();
      const report = (decode(out.stdout) + decode(out.stderr)).trim();
      assert.equal(out.code, 0, report);
      // verify exits 0 on directives it ignores; any line at all is a problem in a unit.
      assert.equal(report, "");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("the units' ExecStart lines, pointed at configs in a directory with spaces and flag-like words, run a working server and client", async () => {
  const plain = await Fixture.create();
  const fixture = new Fixture(`${plain.dir} with space --allow-run`);
  await Deno.rename(plain.dir, fixture.dir);
  const echo = startEcho();
  const spawned: Spawned[] = [];
  try {
    const identity = await fixture.identity("foo bar");
    const communicationPort = freePort();
    const servicePort = freePort();
    const serverConfig = await fixture.write(
      "server.toml",
      serverToml({
        communicationPort,
        clients: [identity],
        services: [{ port: servicePort, name: identity.name, targetPort: echo.port }],
      }),
    );
    const clientConfig = await fixture.write(
      "client.toml",
      clientToml({ identity, communicationPort }),
    );
    // The unit's ExecStart as systemd would run it, with its arguments pointed at this Deno,
    // this checkout and the test's configs.
    const command = async (program: string, config: string) => {
      const unit = parseUnit(await Deno.readTextFile(join(UNITS, `natadm-${program}.service`)));
      const [, c, script] = execWords(unit.get("ExecStart")![0]);
      return [c, script, Deno.execPath(), join(ROOT, `${program}.ts`), config];
    };
    // The unit's Environment (DENO_DIR aside: this test keeps Deno's usual cache).
    const env = { NO_COLOR: "1" };
    const server = new Spawned("/bin/bash", await command("server", serverConfig), env);
    spawned.push(server);
    await server.waitFor(/NATadm server ready/);
    const client = new Spawned("/bin/bash", await command("client", clientConfig), env);
    spawned.push(client);
    await client.waitFor(/connected to .* as/);
    const user = await connectUser(servicePort);
    try {
      const ping = new TextEncoder().encode("ping\n");
      await user.write(ping);
      assert.deepEqual(await readExactly(user, ping.length), ping);
    } finally {
      user.close();
    }
  } finally {
    for (const p of spawned) await p.stop();
    echo.close();
    await fixture.cleanup();
  }
});
