/**
 * Test harness: real certificates and keys in a temp dir, real `server.ts` and `client.ts`
 * processes, real sockets. Every wait has a deadline; nothing sleeps to synchronise.
 * @module
 */
import { join } from "node:path";
import { CERT_FILES, generateCertificates } from "../src/certs.ts";
import { generateKeyPair } from "../src/keys.ts";

/** The repository root, where server.ts and client.ts live. */
export const ROOT = new URL("..", import.meta.url).pathname;

/** Default deadline for a condition in tests. */
export const DEADLINE_MS = 20_000;

/** Ports {@link freePort} has handed out in this process; never handed out twice. */
const handedOut = new Set<number>();

/** The lowest port {@link freePort} hands out: above the well-known and common service ports. */
const FREE_PORT_LOW = 10_000;

/** The kernel's range for outgoing connections' local ports (Linux default when unreadable). */
const EPHEMERAL = (() => {
  try {
    const [low, high] = Deno.readTextFileSync("/proc/sys/net/ipv4/ip_local_port_range")
      .trim().split(/\s+/).map(Number);
    if (Number.isInteger(low) && Number.isInteger(high)) return { low, high };
  } catch { /* not Linux, or /proc hidden: assume Linux's default */ }
  return { low: 32_768, high: 60_999 };
})();

/**
 * Returns a TCP port that was free on every address a moment ago, that this process has not
 * been given before, and that lies outside the kernel's ephemeral range: a port taken from that
 * range (as `port: 0` gives) may be picked as the local port of any outgoing connection before the
 * program under test binds it, which made a server fail with "the port is in use".
 */
export function freePort(): number {
  const below = EPHEMERAL.low - FREE_PORT_LOW;
  const above = Math.max(0, 65_535 - EPHEMERAL.high);
  for (let attempt = 0; attempt < 10_000; attempt++) {
    const pick = Math.floor(Math.random() * (below + above));
    const port = pick < below ? FREE_PORT_LOW + pick : EPHEMERAL.high + 1 + pick - below;
    if (handedOut.has(port)) continue;
    try {
      Deno.listen({ hostname: "0.0.0.0", port }).close();
    } catch {
      continue;
    }
    handedOut.add(port);
    return port;
  }
  throw new Error("freePort: no free port outside the ephemeral range after 10,000 tries");
}

/**
 * Polls `check` until it returns a truthy value, or throws after `timeoutMs`; `what` (or what
 * it returns, computed at the deadline) says what was awaited.
 */
export async function waitUntil<T>(
  check: () => T | Promise<T>,
  what: string | (() => string),
  timeoutMs = DEADLINE_MS,
): Promise<NonNullable<T>> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value as NonNullable<T>;
    if (Date.now() > end) {
      const described = typeof what === "function" ? what() : what;
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${described}`);
    }
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** A client identity: its private key file and the public key line for the server. */
export interface Identity {
  name: string;
  keyPath: string;
  publicKey: string;
}

/** A temp dir with a CA, a server certificate for localhost/127.0.0.1, and helpers. */
export class Fixture {
  constructor(readonly dir: string) {}

  /** Path of a file in the fixture's directory. */
  path(name: string): string {
    return join(this.dir, name);
  }

  get caPath(): string {
    return this.path(CERT_FILES.caCert);
  }

  /** Creates a fixture with fresh certificates for `hosts`. */
  static async create(hosts = ["localhost", "127.0.0.1"]): Promise<Fixture> {
    const dir = await Deno.makeTempDir({ prefix: "natadm-test-" });
    const pem = await generateCertificates(hosts);
    await Deno.writeTextFile(join(dir, CERT_FILES.caCert), pem.caCert);
    await Deno.writeTextFile(join(dir, CERT_FILES.cert), pem.cert);
    await Deno.writeTextFile(join(dir, CERT_FILES.key), pem.key, { mode: 0o600 });
    return new Fixture(dir);
  }

  /** Makes a client key pair named after `name`. */
  async identity(name: string): Promise<Identity> {
    const { privatePem, publicKey } = generateKeyPair();
    const keyPath = this.path(`key-${crypto.randomUUID()}.pem`);
    await Deno.writeTextFile(keyPath, privatePem, { mode: 0o600 });
    return { name, keyPath, publicKey };
  }

  /** Writes `text` to `name` in the fixture dir (with `mode`, if given); returns its path. */
  async write(name: string, text: string, mode?: number): Promise<string> {
    const p = this.path(name);
    await Deno.writeTextFile(p, text, mode === undefined ? {} : { mode });
    if (mode !== undefined) await Deno.chmod(p, mode); // `mode` applies only to new files
    return p;
  }

  /** Removes the fixture dir. */
  async cleanup(): Promise<void> {
    await Deno.remove(this.dir, { recursive: true }).catch(() => {});
  }
}

/** A service entry for {@link serverToml}. */
export interface ServiceSpec {
  port: number;
  name: string;
  targetPort: number;
  /** The service's `host` key, if set. */
  host?: string;
  /** The service's `allow_from` key, if set. */
  allowFrom?: string[];
}

/** Server config text for a fixture. */
export function serverToml(options: {
  communicationPort: number;
  clients: Identity[];
  services: ServiceSpec[];
  /** `listen_host` (default 127.0.0.1). */
  listenHost?: string;
  /** Certificate and key files (default: the fixture's). */
  certificate?: [string, string];
  /** Top-level lines added as they are. */
  extra?: string;
}): string {
  const [cert, key] = options.certificate ?? [CERT_FILES.cert, CERT_FILES.key];
  const lines = [
    `communication_port = ${options.communicationPort}`,
    `communication_server_certificate = ${JSON.stringify([cert, key])}`,
    `listen_host = ${JSON.stringify(options.listenHost ?? "127.0.0.1")}`,
    options.extra ?? "",
  ];
  for (const c of options.clients) {
    lines.push(`[clients.${JSON.stringify(c.name)}]`, `key = "${c.publicKey}"`);
  }
  for (const s of options.services) {
    lines.push(
      `[services.${s.port}]`,
      `name = ${JSON.stringify(s.name)}`,
      `port = ${s.targetPort}`,
    );
    if (s.host !== undefined) lines.push(`host = ${JSON.stringify(s.host)}`);
    if (s.allowFrom !== undefined) lines.push(`allow_from = ${JSON.stringify(s.allowFrom)}`);
  }
  return lines.join("\n") + "\n";
}

/** Client config text for a fixture. */
export function clientToml(options: {
  identity: Identity;
  communicationPort: number;
  host?: string;
  cafile?: string;
  interval?: number;
  infinite?: boolean;
}): string {
  return [
    `name = ${JSON.stringify(options.identity.name)}`,
    `remote = ["${options.host ?? "localhost"}", ${options.communicationPort}]`,
    `cafile = ${JSON.stringify(options.cafile ?? CERT_FILES.caCert)}`,
    `key = ${JSON.stringify(options.identity.keyPath)}`,
    `interval = ${options.interval ?? 1}`,
    `infinite = ${options.infinite ?? true}`,
  ].join("\n") + "\n";
}

/** A spawned process whose stderr lines (and stdout text) are collected as they come. */
export class Process {
  readonly lines: string[] = [];
  /** Everything written to stdout so far. */
  stdout = "";
  readonly status: Promise<Deno.CommandStatus>;
  #child: Deno.ChildProcess;
  #stdout: Promise<string>;
  #stderrDone: Promise<void>;
  /** Set once the process has exited and its stderr is fully read. */
  #exit: Deno.CommandStatus | undefined;

  /** `env` adds to (or overrides) the test's own environment for this process. */
  constructor(command: string, args: string[], env?: Record<string, string>) {
    const child = new Deno.Command(command, {
      args,
      env,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#child = child;
    this.#stdout = (async () => {
      for await (const text of child.stdout.pipeThrough(new TextDecoderStream())) {
        this.stdout += text;
      }
      return this.stdout;
    })();
    this.#stderrDone = (async () => {
      let rest = "";
      for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
        const parts = (rest + text).split("\n");
        rest = parts.pop()!;
        this.lines.push(...parts);
      }
      if (rest) this.lines.push(rest);
    })();
    this.status = this.#child.status;
    Promise.all([this.status, this.#stderrDone]).then(([status]) => this.#exit = status);
  }

  /** The process id. */
  get pid(): number {
    return this.#child.pid;
  }

  /** True once the process has exited and all its stderr has been read. */
  get exited(): boolean {
    return this.#exit !== undefined;
  }

  /**
   * Waits for a stderr line matching `pattern` and returns it; fails at once if the process
   * exits without printing one.
   */
  waitFor(pattern: RegExp, timeoutMs = DEADLINE_MS): Promise<string> {
    return waitUntil(
      () => {
        const line = this.lines.find((l) => pattern.test(l));
        if (line === undefined && this.#exit) {
          throw new Error(
            `exited with code ${this.#exit.code} before printing ${pattern}:\n${
              this.lines.join("\n")
            }`,
          );
        }
        return line;
      },
      () => `${pattern} in output:\n${this.lines.join("\n")}`,
      timeoutMs,
    );
  }

  /** Waits for stdout to match `pattern` and returns the match. */
  waitForStdout(pattern: RegExp, timeoutMs = DEADLINE_MS): Promise<RegExpMatchArray> {
    return waitUntil(
      () => this.stdout.match(pattern),
      () => `${pattern} in stdout:\n${this.stdout}\nstderr:\n${this.lines.join("\n")}`,
      timeoutMs,
    );
  }

  /** Counts stderr lines matching `pattern`. */
  count(pattern: RegExp): number {
    return this.lines.filter((l) => pattern.test(l)).length;
  }

  /** Waits for exit (with a deadline); returns exit code, stdout and stderr. */
  async result(timeoutMs = DEADLINE_MS): Promise<{ code: number; stdout: string; stderr: string }> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const status = await Promise.race([
      this.status,
      new Promise<never>((_, reject) =>
        timer = setTimeout(() => {
          this.kill("SIGKILL");
          reject(
            new Error(`process did not exit within ${timeoutMs} ms:\n${this.lines.join("\n")}`),
          );
        }, timeoutMs)
      ),
    ]).finally(() => clearTimeout(timer));
    await this.#stderrDone;
    return { code: status.code, stdout: await this.#stdout, stderr: this.lines.join("\n") };
  }

  /** Sends a signal, ignoring a process that already exited. */
  kill(signal: Deno.Signal = "SIGTERM"): void {
    try {
      this.#child.kill(signal);
    } catch {
      // Already gone.
    }
  }

  /** Stops the program and waits for it, so no test leaks a process. */
  async stop(): Promise<void> {
    this.kill("SIGKILL");
    await this.status;
    await this.#stderrDone;
    await this.#stdout;
  }
}

/** A spawned NATadm script (server.ts, client.ts, cmd/…) run by this Deno. */
export class Program extends Process {
  constructor(
    script: string,
    args: string[],
    permissions = ["--allow-net", "--allow-read"],
    env?: Record<string, string>,
  ) {
    super(Deno.execPath(), ["run", ...permissions, join(ROOT, script), ...args], env);
  }
}

/** Starts `server.ts` with a config file and waits until it is ready. */
export async function startServer(config: string, args: string[] = []): Promise<Program> {
  const server = new Program("server.ts", ["--config", config, ...args]);
  try {
    await server.waitFor(/NATadm server ready/);
  } catch (err) {
    await server.stop();
    throw err;
  }
  return server;
}

/** Starts `client.ts` with a config file and waits until it is connected. */
export async function startClient(config: string, args: string[] = []): Promise<Program> {
  const client = new Program("client.ts", ["--config", config, ...args]);
  try {
    await client.waitFor(/connected to .* as/);
  } catch (err) {
    await client.stop();
    throw err;
  }
  return client;
}

/**
 * What a test must undo, in reverse order: programs to stop, dirs to remove, listeners to
 * close. `close()` in a `finally` block undoes all of it, even after a failure.
 */
export class Scope {
  #undo: (() => unknown)[] = [];

  /** Runs `step` at {@link close}, before every step registered earlier. */
  defer(step: () => unknown): void {
    this.#undo.push(step);
  }

  /** Closes `resource` (a connection, a listener) at {@link close} if still open; returns it. */
  closing<T extends { close(): void }>(resource: T): T {
    this.defer(() => {
      try {
        resource.close();
      } catch {
        // Already closed.
      }
    });
    return resource;
  }

  /** Stops `program` at {@link close}; returns it. */
  track<T extends Process>(program: T): T {
    this.defer(() => program.stop());
    return program;
  }

  /** Starts a server ({@link startServer}) that is stopped at {@link close}. */
  async server(config: string, args: string[] = []): Promise<Program> {
    return this.track(await startServer(config, args));
  }

  /** Starts a client ({@link startClient}) that is stopped at {@link close}. */
  async client(config: string, args: string[] = []): Promise<Program> {
    return this.track(await startClient(config, args));
  }

  /** Spawns a program ({@link Program}) that is stopped at {@link close}. */
  spawn(script: string, args: string[], permissions?: string[]): Program {
    return this.track(new Program(script, args, permissions));
  }

  /** Undoes everything, last first; every step runs even if one fails. */
  async close(): Promise<void> {
    const errors: unknown[] = [];
    for (const step of this.#undo.reverse()) {
      try {
        await step();
      } catch (err) {
        errors.push(err);
      }
    }
    this.#undo = [];
    if (errors.length) throw errors[0];
  }
}

/** A TCP echo service on 127.0.0.1: the stand-in for a service behind NAT. */
export function startEcho(): { port: number; close: () => void } {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns = new Set<Deno.Conn>();
  (async () => {
    for await (const conn of listener) {
      conns.add(conn);
      conn.readable.pipeTo(conn.writable).catch(() => {}).finally(() => conns.delete(conn));
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    close: () => {
      listener.close();
      for (const c of conns) {
        try {
          c.close();
        } catch {
          // closed by pipeTo
        }
      }
    },
  };
}

/** Connects a user to a service port on 127.0.0.1 with no-delay, as `ssh` or `nc` would. */
export async function connectUser(port: number): Promise<Deno.TcpConn> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  conn.setNoDelay(true);
  return conn;
}

/** Reads exactly `n` bytes or throws at end of stream / deadline (closing `conn` then). */
export async function readExactly(
  conn: { read(p: Uint8Array): Promise<number | null>; close(): void },
  n: number,
  timeoutMs = DEADLINE_MS,
): Promise<Uint8Array<ArrayBuffer>> {
  const out = new Uint8Array(n);
  let got = 0;
  const timer = setTimeout(() => conn.close(), timeoutMs);
  try {
    while (got < n) {
      const r = await conn.read(out.subarray(got));
      if (r === null) throw new Error(`stream ended after ${got} of ${n} bytes`);
      got += r;
    }
  } finally {
    clearTimeout(timer);
  }
  return out;
}

/** Reads until end of stream (with a deadline); returns everything read. */
export async function readToEnd(
  conn: Deno.Conn,
  timeoutMs = DEADLINE_MS,
): Promise<Uint8Array<ArrayBuffer>> {
  const timer = setTimeout(() => conn.close(), timeoutMs);
  try {
    return new Uint8Array(await new Response(conn.readable).arrayBuffer());
  } finally {
    clearTimeout(timer);
  }
}

/** Sets up a fixture with one client serving one echo service; the usual test start. */
export async function echoSetup(
  options: { name?: string; extra?: string; interval?: number } = {},
): Promise<{
  fixture: Fixture;
  identity: Identity;
  echo: { port: number; close: () => void };
  communicationPort: number;
  servicePort: number;
  serverConfig: string;
  clientConfig: string;
  cleanup: () => Promise<void>;
}> {
  const fixture = await Fixture.create();
  const identity = await fixture.identity(options.name ?? "foo bar");
  const echo = startEcho();
  const communicationPort = freePort();
  const servicePort = freePort();
  const serverConfig = await fixture.write(
    "server.toml",
    serverToml({
      communicationPort,
      clients: [identity],
      services: [{ port: servicePort, name: identity.name, targetPort: echo.port }],
      extra: options.extra,
    }),
  );
  const clientConfig = await fixture.write(
    "client.toml",
    clientToml({ identity, communicationPort, interval: options.interval }),
  );
  return {
    fixture,
    identity,
    echo,
    communicationPort,
    servicePort,
    serverConfig,
    clientConfig,
    cleanup: async () => {
      echo.close();
      await fixture.cleanup();
    },
  };
}

/** Runs a NATadm script to completion (with a deadline); returns exit code, stdout, stderr. */
export function runScript(
  script: string,
  args: string[],
  permissions?: string[],
  env?: Record<string, string>,
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Program(script, args, permissions, env).result();
}

/** The one `PROGRAM: error: ...` line in `stderr`; fails unless there is exactly one. */
export function errorLine(stderr: string, program: string): string {
  const lines = stderr.split("\n").filter((l) => l.startsWith(`${program}: error: `));
  if (lines.length !== 1) {
    throw new Error(`expected one "${program}: error:" line, got ${lines.length}:\n${stderr}`);
  }
  return lines[0];
}

/** True if nothing accepts TCP connections on 127.0.0.1:`port` (connect is refused). */
export async function connectRefused(port: number): Promise<boolean> {
  try {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    conn.close();
    return false;
  } catch (err) {
    if (err instanceof Deno.errors.ConnectionRefused) return true;
    throw err;
  }
}

/**
 * Starts sshd on 127.0.0.1:`port` with its own host key and authorized_keys in `dir` (the
 * user's key is `dir`/user_ed25519), stopped with `scope`.
 */
export async function startSshd(scope: Scope, dir: string, port: number): Promise<Process> {
  // sshd wants its privilege-separation directory; as non-root it may already exist.
  await Deno.mkdir("/run/sshd", { recursive: true }).catch(() => {});
  await sh(findExecutable("ssh-keygen")!, [
    "-q",
    "-t",
    "ed25519",
    "-N",
    "",
    "-f",
    join(dir, "host_ed25519"),
  ]);
  await sh(findExecutable("ssh-keygen")!, [
    "-q",
    "-t",
    "ed25519",
    "-N",
    "",
    "-f",
    join(dir, "user_ed25519"),
  ]);
  await Deno.copyFile(join(dir, "user_ed25519.pub"), join(dir, "authorized_keys"));
  const config = join(dir, "sshd_config");
  await Deno.writeTextFile(
    config,
    [
      `Port ${port}`,
      "ListenAddress 127.0.0.1",
      `HostKey ${join(dir, "host_ed25519")}`,
      `AuthorizedKeysFile ${join(dir, "authorized_keys")}`,
      "PidFile none",
      "UsePAM no",
      "StrictModes no",
      "PermitRootLogin yes",
      "PubkeyAuthentication yes",
      "PasswordAuthentication no",
      "KbdInteractiveAuthentication no",
      "LogLevel VERBOSE",
      "",
    ].join("\n"),
  );
  const daemon = scope.track(new Process(findExecutable("sshd")!, ["-D", "-e", "-f", config]));
  await daemon.waitFor(new RegExp(`Server listening on 127\\.0\\.0\\.1 port ${port}`));
  return daemon;
}

/** Runs an external command to completion; throws with its stderr if it fails. */
export async function sh(command: string, args: string[], cwd?: string): Promise<string> {
  const out = await new Deno.Command(command, { args, cwd, stdout: "piped", stderr: "piped" })
    .output();
  const stderr = new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`${command} ${args.join(" ")} failed (${out.code}): ${stderr}`);
  return new TextDecoder().decode(out.stdout);
}

/** Absolute path of `name` on PATH (or in an sbin dir), or undefined if it is not installed. */
export function findExecutable(name: string): string | undefined {
  const dirs = (Deno.env.get("PATH") ?? "").split(":").concat(["/usr/sbin", "/usr/local/sbin"]);
  for (const dir of dirs) {
    if (!dir) continue;
    const full = join(dir, name);
    try {
      if (Deno.statSync(full).isFile) return full;
    } catch {
      // Not in this directory.
    }
  }
  return undefined;
}

/** Escapes `text` for use inside a RegExp. */
export function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** Connects a user to `port`, sends `text`, and returns what comes back (as many bytes). */
export async function roundTrip(port: number, text: string): Promise<string> {
  const user = await connectUser(port);
  try {
    const bytes = new TextEncoder().encode(text);
    await writeAll(user, bytes);
    return new TextDecoder().decode(await readExactly(user, bytes.length));
  } finally {
    try {
      user.close();
    } catch {
      // Closed by readExactly's deadline.
    }
  }
}

/** Writes all of `bytes` to `conn` (a single write may take only part). */
export async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  let done = 0;
  while (done < bytes.length) done += await conn.write(bytes.subarray(done));
}

/** `n` random bytes (WebCrypto fills at most 64 KiB per call). */
export function randomBytes(n: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(n);
  for (let at = 0; at < n; at += 65_536) crypto.getRandomValues(out.subarray(at, at + 65_536));
  return out;
}

/** Where two byte arrays first differ, or -1 if they are equal (same length, same bytes). */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}
