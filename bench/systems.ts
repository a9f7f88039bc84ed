/**
 * The systems under test, each started on loopback in front of the same target services:
 * `direct` (no tunnel, the ceiling), `natadm` (server.ts + client.ts, plus a user's `forward`
 * to the echo target), `ssh` (sshd plus `ssh -R`) and `stunnel` (a TLS client/server stunnel
 * pair).
 * @module
 */
import {
  clientToml,
  type Fixture,
  freePort,
  type Identity,
  Program,
  serverToml,
} from "../tests/helpers.ts";
import { CERT_FILES } from "../src/certs.ts";
import { descendants, findPids, Proc, run, stopTracked, track, which } from "./proc.ts";
import { waitEcho } from "./net.ts";
import type { Nginx } from "./http.ts";

/** System ids, in table order. */
export const SYSTEM_IDS = ["direct", "natadm", "ssh", "stunnel"] as const;
export type SysId = typeof SYSTEM_IDS[number];

/** Column titles. */
export const LABELS: Record<SysId, string> = {
  direct: "direct",
  natadm: "natadm",
  ssh: "ssh -R",
  stunnel: "stunnel",
};

/** Ports of the target services (or of a system's front for each of them). */
export interface TargetPorts {
  echo: number;
  /** iperf3 server, when iperf3 is used. */
  iperf?: number;
  /** Built-in sink and source, always there as the fallback for throughput. */
  sink: number;
  source: number;
  /** HTTP server with a 4 KiB file: nginx if installed, else the target process's own. */
  http?: number;
}

type TargetName = keyof TargetPorts;

/** The processes that make up a system's two ends, for RSS. */
export interface Roles {
  /** The side users connect to: NATadm server, sshd session, accepting stunnel. */
  pub: number[];
  /** The side next to the target: NATadm client, ssh client, connecting stunnel. */
  nat: number[];
}

/** A system under test. */
export interface System {
  readonly id: SysId;
  /** Why it is not measured (not installed, failed to start). */
  skip?: string;
  /** The ports a user connects to, one per target service. */
  front: TargetPorts;
  /** NATadm only: the local port of a user's `forward` to the echo target (admin access). */
  forwardEcho?: number;
  start(): Promise<void>;
  stop(): Promise<void>;
  roles(): Roles;
  /** Why the system is broken (one of its processes exited), or undefined if it runs. */
  health(): string | undefined;
  /** Recent warnings and errors its processes logged, to go with a failed measurement. */
  recentProblems?(): string[];
}

/** Describes a process that exited unasked. */
function died(name: string, status: Deno.CommandStatus, lines: string[]): string {
  const how = status.signal ? `signal ${status.signal}` : `code ${status.code}`;
  const telling = lines.filter((l) => !/tunnel (open|closed)/.test(l)).slice(-4);
  const signalled = telling.some((l) => /shutting down/.test(l))
    ? " after a SIGINT/SIGTERM the benchmark did not send"
    : "";
  return `${name} exited (${how})${signalled}; last output: ${telling.join(" | ") || "none"}`;
}

/** Health of external processes: the first one that exited, described. */
function procHealth(procs: (Proc | undefined)[]): string | undefined {
  for (const p of procs) if (p?.exited) return `${p.name} exited; last output: ${p.tail(6)}`;
  return undefined;
}

const DENO = Deno.execPath();
const TARGET_SCRIPT = new URL("./target.ts", import.meta.url).pathname;
const CONNECT_SCRIPT = new URL("../cmd/connect.ts", import.meta.url).pathname;

/** The target services: echo/sink/source in a Deno process, and iperf3 -s if wanted. */
export class Targets {
  ports: TargetPorts = { echo: 0, sink: 0, source: 0 };
  /** Why nginx could not be started (the built-in HTTP server serves instead). */
  nginxProblem: string | undefined;
  #proc: Proc | undefined;
  #iperf: Proc | undefined;

  constructor(readonly iperfPath: string | undefined, readonly nginx?: Nginx) {}

  async start(): Promise<void> {
    this.#proc = track(
      new Proc("target services", DENO, ["run", "--allow-net", TARGET_SCRIPT], { keepStdin: true }),
    );
    const line = await this.#proc.waitFor(/^\{"echo"/);
    const ports = JSON.parse(line) as TargetPorts;
    this.ports = { ...ports };
    if (this.nginx) {
      try {
        await this.nginx.start();
        this.ports.http = this.nginx.port;
      } catch (err) {
        await this.nginx.stop();
        this.nginxProblem = (err as Error).message.split("\n")[0];
      }
    }
    if (this.iperfPath) {
      this.ports.iperf = freePort();
      await this.startIperf();
    }
  }

  /** (Re)starts `iperf3 -s`, e.g. after a failed test left it wedged. */
  async startIperf(): Promise<void> {
    if (!this.iperfPath || !this.ports.iperf) return;
    await stopTracked(this.#iperf);
    this.#iperf = track(
      new Proc("iperf3 -s", this.iperfPath, [
        "-s",
        "-B",
        "127.0.0.1",
        "-p",
        String(this.ports.iperf),
        "--forceflush",
      ]),
    );
    await this.#iperf.waitFor(/Server listening/);
  }

  async stop(): Promise<void> {
    await stopTracked(this.#iperf);
    await this.nginx?.stop();
    await stopTracked(this.#proc);
  }
}

function targetNames(targets: TargetPorts): TargetName[] {
  return (Object.keys(targets) as TargetName[]).filter((k) => targets[k]);
}

/** No tunnel: users connect to the targets themselves. */
export class DirectSystem implements System {
  readonly id = "direct";
  front: TargetPorts;
  constructor(readonly targets: Targets) {
    this.front = targets.ports;
  }
  start(): Promise<void> {
    this.front = { ...this.targets.ports };
    return Promise.resolve();
  }
  stop(): Promise<void> {
    return Promise.resolve();
  }
  roles(): Roles {
    return { pub: [], nat: [] };
  }
  health(): string | undefined {
    return undefined;
  }
}

/** The client name of the NATadm system, and the user that reaches it by name. */
const BENCH_CLIENT = "bench";
const BENCH_USER = "bench-admin";

/**
 * NATadm: `server.ts` and `client.ts` as real processes, one service per target; and user
 * `bench-admin`, allowed to the client's echo port, running `forward` to it.
 */
export class NatadmSystem implements System {
  readonly id = "natadm";
  skip?: string;
  front: TargetPorts = { echo: 0, sink: 0, source: 0 };
  forwardEcho = 0;
  communicationPort = 0;
  server: Program | undefined;
  client: Program | undefined;
  forward: Program | undefined;
  #main: Identity | undefined;
  #idle: Identity | undefined;
  #user: Identity | undefined;
  #serverConfig = "";
  #clientConfig = "";
  #userConfig = "";
  #stopping = false;
  #exit: { name: string; status: Deno.CommandStatus; program: Program } | undefined;

  constructor(
    readonly fixture: Fixture,
    readonly targets: Targets,
    readonly programArgs: string[],
    /** With `--profile`: where the server and client write their CPU profiles. */
    readonly profileDir?: string,
  ) {}

  /** Deno flags for one of the programs: the helper's defaults, plus the profiler if asked. */
  #flags(role: string): string[] | undefined {
    if (!this.profileDir) return undefined;
    return [
      "--allow-net",
      "--allow-read",
      "--cpu-prof",
      `--cpu-prof-dir=${this.profileDir}/${role}`,
    ];
  }

  async start(): Promise<void> {
    this.#main ??= await this.fixture.identity(BENCH_CLIENT);
    this.#idle ??= await this.fixture.identity("idle");
    this.#user ??= await this.fixture.identity(BENCH_USER);
    this.communicationPort = freePort();
    const front: Partial<TargetPorts> = {};
    const services: string[] = [];
    for (const name of targetNames(this.targets.ports)) {
      front[name] = freePort();
      services.push(
        `[services.${front[name]}]`,
        `name = "${BENCH_CLIENT}"`,
        `host = "127.0.0.1"`,
        `port = ${this.targets.ports[name]}`,
      );
    }
    this.front = front as TargetPorts;
    // The user's tunnels are not to meet the per-user limit: the rate case keeps 32 at once,
    // and closed ones are counted until both ends have seen the close.
    const user = [
      `[users.${JSON.stringify(BENCH_USER)}]`,
      `key = "${this.#user.publicKey}"`,
      `allow = ${JSON.stringify([`${BENCH_CLIENT}:${this.targets.ports.echo}`])}`,
    ];
    this.#serverConfig = await this.fixture.write(
      "server.toml",
      serverToml({
        communicationPort: this.communicationPort,
        clients: [this.#main, this.#idle],
        services: [],
        extra: "max_tunnels_per_user = 4096",
      }) + services.join("\n") + "\n" + user.join("\n") + "\n",
    );
    this.#userConfig = await this.fixture.write(
      "user.toml",
      [
        `name = ${JSON.stringify(BENCH_USER)}`,
        `remote = ["127.0.0.1", ${this.communicationPort}]`,
        `cafile = ${JSON.stringify(CERT_FILES.caCert)}`,
        `key = ${JSON.stringify(this.#user.keyPath)}`,
      ].join("\n") + "\n",
    );
    this.#clientConfig = await this.fixture.write(
      "client.toml",
      clientToml({
        identity: this.#main,
        communicationPort: this.communicationPort,
        host: "127.0.0.1",
        interval: 5,
      }),
    );
    this.#stopping = false;
    this.#exit = undefined;
    this.server = this.#watch(
      new Program(
        "server.ts",
        ["--config", this.#serverConfig, ...this.programArgs],
        this.#flags("server"),
      ),
      "natadm server",
    );
    await this.server.waitFor(/NATadm server ready/);
    this.client = this.#watch(
      new Program(
        "client.ts",
        ["--config", this.#clientConfig, ...this.programArgs],
        this.#flags("client"),
      ),
      "natadm client",
    );
    await this.client.waitFor(/connected to .* as/);
    await waitEcho(this.front.echo, "natadm");
    this.forwardEcho = freePort();
    this.forward = this.#watch(
      new Program(
        "cmd/forward.ts",
        [
          "--config",
          this.#userConfig,
          ...this.programArgs,
          `127.0.0.1:${this.forwardEcho}`,
          BENCH_CLIENT,
          String(this.targets.ports.echo),
        ],
        this.#flags("forward"),
      ),
      "natadm forward",
    );
    await this.forward.waitFor(/forwarding .* to client/);
    await waitEcho(this.forwardEcho, "natadm forward");
  }

  /**
   * Spawns `connect` as the bench user to the client's echo port, stdin and stdout piped (the
   * tunnel), stderr piped (its complaints): what an ssh `ProxyCommand` does.
   */
  spawnConnect(): Deno.ChildProcess {
    return new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--allow-net",
        "--allow-read",
        CONNECT_SCRIPT,
        "--config",
        this.#userConfig,
        ...this.programArgs,
        BENCH_CLIENT,
        String(this.targets.ports.echo),
      ],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
  }

  #watch(program: Program, name: string): Program {
    program.status.then((status) => {
      if (!this.#stopping) this.#exit ??= { name, status, program };
    });
    return track(program);
  }

  recentProblems(): string[] {
    const pick = (name: string, p: Program | undefined) =>
      (p?.lines ?? []).filter((l) => /\[(WRN|ERR|FTL)\]|cut short/.test(l)).slice(-3)
        .map((l) => `${name}: ${l.replace(/^\S+ \S+ \S+ /, "")}`);
    return [
      ...pick("server", this.server),
      ...pick("client", this.client),
      ...pick("forward", this.forward),
    ];
  }

  health(): string | undefined {
    const exit = this.#exit;
    return exit && died(exit.name, exit.status, exit.program.lines);
  }

  /** Starts a client named "idle" (no services) against `port`, e.g. a counting relay. */
  async idleClient(port: number, infinite: boolean): Promise<Program> {
    const config = await this.fixture.write(
      `idle-${infinite ? "infinite" : "once"}.toml`,
      clientToml({
        identity: this.#idle!,
        communicationPort: port,
        host: "127.0.0.1",
        interval: 5,
        infinite,
      }),
    );
    return track(new Program("client.ts", ["--config", config, ...this.programArgs]));
  }

  /** Drops collected log lines, which grow with every tunnel. */
  forgetLogs(): void {
    for (const p of [this.server, this.client, this.forward]) {
      if (p) p.lines.splice(0, p.lines.length - 200);
    }
  }

  async stop(): Promise<void> {
    this.#stopping = true;
    if (this.profileDir) {
      // The profiler writes its file at a clean exit: ask politely first.
      for (const p of [this.forward, this.client, this.server]) {
        if (!p) continue;
        p.kill("SIGTERM");
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([p.status, new Promise((r) => timer = setTimeout(r, 15_000))]);
        clearTimeout(timer);
      }
    }
    await stopTracked(this.forward);
    await stopTracked(this.client);
    await stopTracked(this.server);
    this.forward = this.client = this.server = undefined;
  }

  roles(): Roles {
    return {
      pub: findPids(["server.ts", this.#serverConfig]),
      nat: findPids(["client.ts", this.#clientConfig]),
    };
  }
}

/** OpenSSH: a private sshd and `ssh -N -R` into it, one remote forward per target. */
export class SshSystem implements System {
  readonly id = "ssh";
  skip?: string;
  front: TargetPorts = { echo: 0, sink: 0, source: 0 };
  #sshd: Proc | undefined;
  #ssh: Proc | undefined;
  #keysMade = false;

  constructor(
    readonly fixture: Fixture,
    readonly targets: Targets,
    readonly sshdPath: string,
    readonly sshPath: string,
    readonly keygenPath: string,
  ) {}

  async #keys(): Promise<void> {
    if (this.#keysMade) return;
    for (const name of ["ssh_host_key", "ssh_user_key"]) {
      await run(this.keygenPath, ["-q", "-t", "ed25519", "-N", "", "-f", this.fixture.path(name)]);
    }
    await Deno.copyFile(
      this.fixture.path("ssh_user_key.pub"),
      this.fixture.path("authorized_keys"),
    );
    this.#keysMade = true;
  }

  async start(): Promise<void> {
    await this.#keys();
    if (Deno.uid() === 0) await Deno.mkdir("/run/sshd", { recursive: true }).catch(() => {});
    const sshdPort = freePort();
    const config = await this.fixture.write(
      "sshd_config",
      [
        `Port ${sshdPort}`,
        "ListenAddress 127.0.0.1",
        `HostKey ${this.fixture.path("ssh_host_key")}`,
        `AuthorizedKeysFile ${this.fixture.path("authorized_keys")}`,
        "PermitRootLogin yes",
        "StrictModes no",
        "UsePAM no",
        "PidFile none",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "AllowTcpForwarding yes",
        "GatewayPorts no",
      ].join("\n") + "\n",
    );
    this.#sshd = track(new Proc("sshd", this.sshdPath, ["-D", "-e", "-f", config]));
    await this.#sshd.waitFor(/Server listening on/);

    const front: Partial<TargetPorts> = {};
    const forwards: string[] = [];
    // Echo last: sshd binds the forwards in order, so once echo answers all of them are up.
    for (const name of targetNames(this.targets.ports).reverse()) {
      front[name] = freePort();
      forwards.push("-R", `127.0.0.1:${front[name]}:127.0.0.1:${this.targets.ports[name]}`);
    }
    this.front = front as TargetPorts;
    const user = Deno.uid() === 0 ? "root" : (Deno.env.get("USER") ?? "root");
    this.#ssh = track(
      new Proc("ssh -R", this.sshPath, [
        "-N",
        "-T",
        "-F",
        "/dev/null",
        "-p",
        String(sshdPort),
        "-i",
        this.fixture.path("ssh_user_key"),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "LogLevel=ERROR",
        ...forwards,
        `${user}@127.0.0.1`,
      ]),
    );
    await waitEcho(this.front.echo, "ssh -R").catch((err) => {
      throw new Error(`${err.message}\nssh: ${this.#ssh?.tail()}\nsshd: ${this.#sshd?.tail()}`);
    });
  }

  async stop(): Promise<void> {
    await stopTracked(this.#ssh);
    await stopTracked(this.#sshd);
    this.#ssh = this.#sshd = undefined;
  }

  health(): string | undefined {
    return procHealth([this.#sshd, this.#ssh]);
  }

  roles(): Roles {
    return {
      pub: this.#sshd ? descendants(this.#sshd.pid) : [],
      nat: this.#ssh ? [this.#ssh.pid] : [],
    };
  }
}

/** stunnel: a client-mode stunnel taking plain TCP and a server-mode one next to the target. */
export class StunnelSystem implements System {
  readonly id = "stunnel";
  skip?: string;
  front: TargetPorts = { echo: 0, sink: 0, source: 0 };
  #accepting: Proc | undefined;
  #connecting: Proc | undefined;

  constructor(
    readonly fixture: Fixture,
    readonly targets: Targets,
    readonly stunnelPath: string,
  ) {}

  async start(): Promise<void> {
    const global = ["foreground = yes", "pid =", "syslog = no"];
    const nodelay = ["socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1"];
    const server = [...global];
    const client = [...global, "client = yes"];
    const front: Partial<TargetPorts> = {};
    for (const name of targetNames(this.targets.ports)) {
      const tls = freePort();
      front[name] = freePort();
      server.push(
        `[${name}]`,
        `accept = 127.0.0.1:${tls}`,
        `connect = 127.0.0.1:${this.targets.ports[name]}`,
        `cert = ${this.fixture.path(CERT_FILES.cert)}`,
        `key = ${this.fixture.path(CERT_FILES.key)}`,
        ...nodelay,
      );
      client.push(
        `[${name}]`,
        `accept = 127.0.0.1:${front[name]}`,
        `connect = 127.0.0.1:${tls}`,
        `CAfile = ${this.fixture.caPath}`,
        "verifyChain = yes",
        "checkHost = localhost",
        ...nodelay,
      );
    }
    this.front = front as TargetPorts;
    const serverConf = await this.fixture.write("stunnel-server.conf", server.join("\n") + "\n");
    const clientConf = await this.fixture.write("stunnel-client.conf", client.join("\n") + "\n");
    this.#connecting = track(new Proc("stunnel (target side)", this.stunnelPath, [serverConf]));
    this.#accepting = track(new Proc("stunnel (user side)", this.stunnelPath, [clientConf]));
    await this.#connecting.waitFor(/Configuration successful/);
    await this.#accepting.waitFor(/Configuration successful/);
    await waitEcho(this.front.echo, "stunnel");
  }

  /** Drops collected log lines. */
  forgetLogs(): void {
    for (const p of [this.#accepting, this.#connecting]) {
      if (p) p.lines.splice(0, p.lines.length - 200);
    }
  }

  async stop(): Promise<void> {
    await stopTracked(this.#accepting);
    await stopTracked(this.#connecting);
    this.#accepting = this.#connecting = undefined;
  }

  health(): string | undefined {
    return procHealth([this.#accepting, this.#connecting]);
  }

  roles(): Roles {
    return {
      pub: this.#accepting ? [this.#accepting.pid] : [],
      nat: this.#connecting ? [this.#connecting.pid] : [],
    };
  }
}

/** A system that is not installed. */
export class SkippedSystem implements System {
  front: TargetPorts = { echo: 0, sink: 0, source: 0 };
  constructor(readonly id: SysId, readonly skip: string) {}
  start(): Promise<void> {
    return Promise.resolve();
  }
  stop(): Promise<void> {
    return Promise.resolve();
  }
  roles(): Roles {
    return { pub: [], nat: [] };
  }
  health(): string | undefined {
    return undefined;
  }
}

/** Executables the peers need, each with the Debian package that provides it. */
export const TOOLS = {
  sshd: { names: ["sshd"], pkg: "openssh-server" },
  ssh: { names: ["ssh"], pkg: "openssh-client" },
  "ssh-keygen": { names: ["ssh-keygen"], pkg: "openssh-client" },
  stunnel: { names: ["stunnel", "stunnel4"], pkg: "stunnel4" },
  iperf3: { names: ["iperf3"], pkg: "iperf3" },
  nginx: { names: ["nginx"], pkg: "nginx" },
  wrk: { names: ["wrk"], pkg: "wrk" },
} as const;

/** Finds each tool; undefined when missing. */
export function findTools(): Record<keyof typeof TOOLS, string | undefined> {
  const out = {} as Record<keyof typeof TOOLS, string | undefined>;
  for (
    const [key, tool] of Object.entries(TOOLS) as [
      keyof typeof TOOLS,
      typeof TOOLS[keyof typeof TOOLS],
    ][]
  ) {
    out[key] = tool.names.map((n) => which(n)).find((p) => p);
  }
  return out;
}
