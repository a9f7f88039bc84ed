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

/** Returns a TCP port that was free on 127.0.0.1 a moment ago. */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** Polls `check` until it returns a truthy value, or throws after `timeoutMs`. */
export async function waitUntil<T>(
  check: () => T | Promise<T>,
  what: string,
  timeoutMs = DEADLINE_MS,
): Promise<NonNullable<T>> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value as NonNullable<T>;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
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

  /** Writes `text` to `name` in the fixture dir and returns its path. */
  async write(name: string, text: string): Promise<string> {
    const p = this.path(name);
    await Deno.writeTextFile(p, text);
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
}

/** Server config text for a fixture. */
export function serverToml(options: {
  communicationPort: number;
  clients: Identity[];
  services: ServiceSpec[];
  extra?: string;
}): string {
  const lines = [
    `communication_port = ${options.communicationPort}`,
    `communication_server_certificate = ["${CERT_FILES.cert}", "${CERT_FILES.key}"]`,
    `listen_host = "127.0.0.1"`,
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

/** A spawned NATadm program whose stderr lines are collected as they come. */
export class Program {
  readonly lines: string[] = [];
  readonly status: Promise<Deno.CommandStatus>;
  #child: Deno.ChildProcess;
  #stdout: Promise<string>;
  #stderrDone: Promise<void>;

  constructor(script: string, args: string[], permissions = ["--allow-net", "--allow-read"]) {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", ...permissions, join(ROOT, script), ...args],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#child = child;
    this.#stdout = new Response(child.stdout).text();
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
  }

  /** Waits for a stderr line matching `pattern` and returns it. */
  waitFor(pattern: RegExp, timeoutMs = DEADLINE_MS): Promise<string> {
    return waitUntil(
      () => this.lines.find((l) => pattern.test(l)),
      `${pattern} in output:\n${this.lines.join("\n")}`,
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

/** Starts `server.ts` with a config file and waits until it is ready. */
export async function startServer(config: string, args: string[] = []): Promise<Program> {
  const server = new Program("server.ts", ["--config", config, ...args]);
  await server.waitFor(/NATadm server ready/);
  return server;
}

/** Starts `client.ts` with a config file and waits until it is connected. */
export async function startClient(config: string, args: string[] = []): Promise<Program> {
  const client = new Program("client.ts", ["--config", config, ...args]);
  await client.waitFor(/connected to .* as/);
  return client;
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

/** Reads exactly `n` bytes or throws at end of stream / deadline. */
export async function readExactly(
  conn: Deno.Conn,
  n: number,
  timeoutMs = DEADLINE_MS,
): Promise<Uint8Array> {
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
export async function readToEnd(conn: Deno.Conn, timeoutMs = DEADLINE_MS): Promise<Uint8Array> {
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
