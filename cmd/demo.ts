/**
 * `deno task demo`: NATadm's main job on loopback. Makes certificates and a client key in a
 * temporary directory, starts a small web service and an echo service "behind NAT", a server
 * and a client as separate processes, checks a request through the tunnel, and prints how to
 * try it. Runs until Ctrl-C, then stops everything and removes the directory.
 *
 * Every way of stopping it cleans up, because the directory holds private keys: SIGINT, SIGTERM
 * and SIGHUP (the terminal closed) all run one clean-up, however often they come. If the demo
 * dies without it (SIGKILL, a crash), a small `sh` guard it started does the clean-up: the guard
 * ignores the terminal's signals and reads the demo's child pids on its stdin, a pipe only the
 * demo holds, so the kernel closes it whenever and however the demo ends.
 * @module
 */
import { join } from "node:path";
import { CERT_FILES, generateCertificates } from "../src/certs.ts";
import { generateKeyPair } from "../src/keys.ts";

/** Ports the demo prefers, so its instructions read the same every time; any free one else. */
const PREFERRED = { communication: 12345, web: 18080, echo: 17007 };
const READY_TIMEOUT_MS = 30_000;
const root = new URL("..", import.meta.url).pathname;

function freePort(preferred: number): number {
  for (const port of [preferred, 0]) {
    try {
      const listener = Deno.listen({ hostname: "127.0.0.1", port });
      const bound = (listener.addr as Deno.NetAddr).port;
      listener.close();
      return bound;
    } catch {
      // Preferred port taken: fall through to one the system picks.
    }
  }
  throw new Error("no free port on 127.0.0.1");
}

/** Prints a line on stderr; a closed terminal (EIO) or pipe must not stop the clean-up. */
function say(line: string): void {
  try {
    console.error(line);
  } catch {
    // Nowhere left to print to.
  }
}

/** Copies a child's stderr to ours with a prefix, and resolves when a line matches. */
function follow(child: Deno.ChildProcess, prefix: string, ready: RegExp): Promise<void> {
  return new Promise((resolve) => {
    (async () => {
      let rest = "";
      for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
        const lines = (rest + text).split("\n");
        rest = lines.pop()!;
        for (const line of lines) {
          say(`${prefix} ${line}`);
          if (ready.test(line)) resolve();
        }
      }
    })().catch(() => {});
  });
}

/** How long the children get to exit after SIGTERM (their shutdown_grace is 2 s). */
const CHILD_EXIT_MS = 5_000;

/** Runs in `sh` beside the demo: see the module comment. `$1` is the temp dir. */
const GUARD_SCRIPT = `
trap '' INT TERM HUP
pids=
while read -r line; do
  [ "$line" = done ] && exit 0
  pids="$pids $line"
done
[ -n "$pids" ] && kill -TERM $pids 2>/dev/null
i=0
while [ $i -lt 50 ]; do
  alive=
  for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ -z "$alive" ] && break
  sleep 0.1
  i=$((i + 1))
done
[ -n "$pids" ] && kill -KILL $pids 2>/dev/null
rm -rf "$1"
`;

/** Everything the clean-up undoes, filled in as it is started. */
const started: {
  dir?: string;
  guard?: { process: Deno.ChildProcess; writer: WritableStreamDefaultWriter<Uint8Array> };
  children: Deno.ChildProcess[];
  web?: Deno.HttpServer;
  echo?: Deno.Listener;
} = { children: [] };

/** Resolves after `ms`, or with the promise, whichever is first. */
function within<T>(promise: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    promise,
    new Promise<undefined>((resolve) => timer = setTimeout(() => resolve(undefined), ms)),
  ]).finally(() => clearTimeout(timer));
}

let stopping: Promise<never> | undefined;

/**
 * Stops everything the demo started and removes its directory, then exits with `code`. The
 * first call does it; every later call (a second Ctrl-C, the one `deno task` forwards, a child
 * that exits meanwhile) waits for the same clean-up instead of exiting half-way.
 */
function stop(code: number): Promise<never> {
  stopping ??= (async () => {
    const kill = (child: Deno.ChildProcess, signal: Deno.Signal) => {
      try {
        child.kill(signal);
      } catch {
        // Already exited.
      }
    };
    for (const child of started.children) kill(child, "SIGTERM");
    const exited = Promise.allSettled(started.children.map((c) => c.status));
    if (await within(exited, CHILD_EXIT_MS) === undefined) {
      say("demo: a process did not stop within 5 s of SIGTERM: killing it");
      for (const child of started.children) kill(child, "SIGKILL");
      await within(exited, CHILD_EXIT_MS);
    }
    await within(started.web?.shutdown() ?? Promise.resolve(), 1000).catch(() => {});
    try {
      started.echo?.close();
    } catch {
      // Already closed.
    }
    if (started.dir) await Deno.remove(started.dir, { recursive: true }).catch(() => {});
    if (started.guard) {
      // All done: the guard may go without touching anything.
      await started.guard.writer.write(new TextEncoder().encode("done\n")).catch(() => {});
      await started.guard.writer.close().catch(() => {});
      await within(started.guard.process.status, 2000);
    }
    Deno.exit(code);
  })();
  return stopping;
}
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  Deno.addSignalListener(signal, () => stop(0));
}

const dir = await Deno.makeTempDir({ prefix: "natadm-demo-" });
started.dir = dir;
{
  const process = new Deno.Command("sh", {
    args: ["-c", GUARD_SCRIPT, "natadm-demo-guard", dir],
    stdin: "piped",
    stdout: "null",
    stderr: "null",
  }).spawn();
  started.guard = { process, writer: process.stdin.getWriter() };
}
const ports = {
  communication: freePort(PREFERRED.communication),
  web: freePort(PREFERRED.web),
  echo: freePort(PREFERRED.echo),
};

// The services "behind NAT": bound to loopback ports that the public never sees.
const web = started.web = Deno.serve(
  { hostname: "127.0.0.1", port: 0, onListen: () => {} },
  (req) =>
    new Response(`Hello from the machine behind NAT. You asked for ${new URL(req.url).pathname}\n`),
);
const echoListener = started.echo = Deno.listen({ hostname: "127.0.0.1", port: 0 });
(async () => {
  for await (const conn of echoListener) {
    conn.readable.pipeTo(conn.writable).catch(() => {});
  }
})().catch(() => {});

const certs = await generateCertificates(["localhost", "127.0.0.1"]);
await Deno.writeTextFile(join(dir, CERT_FILES.caCert), certs.caCert);
await Deno.writeTextFile(join(dir, CERT_FILES.cert), certs.cert);
await Deno.writeTextFile(join(dir, CERT_FILES.key), certs.key, { mode: 0o600 });
const clientKey = generateKeyPair();
await Deno.writeTextFile(join(dir, "client.key.pem"), clientKey.privatePem, { mode: 0o600 });

const serverToml = join(dir, "server.toml");
await Deno.writeTextFile(
  serverToml,
  `# Written by deno task demo.
communication_port = ${ports.communication}
communication_server_certificate = ["${CERT_FILES.cert}", "${CERT_FILES.key}"]
listen_host = "127.0.0.1"
shutdown_grace = 2

[clients."demo machine"]
key = "${clientKey.publicKey}"

[services.${ports.web}]
name = "demo machine"
port = ${(web.addr as Deno.NetAddr).port}

[services.${ports.echo}]
name = "demo machine"
port = ${(echoListener.addr as Deno.NetAddr).port}
`,
);
const clientToml = join(dir, "client.toml");
await Deno.writeTextFile(
  clientToml,
  `# Written by deno task demo.
name = "demo machine"
remote = ["localhost", ${ports.communication}]
cafile = "${CERT_FILES.caCert}"
key = "client.key.pem"
interval = 5
shutdown_grace = 2
`,
);

async function spawn(script: string, config: string): Promise<Deno.ChildProcess> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-net", "--allow-read", join(root, script), "--config", config],
    stdin: "null",
    stdout: "inherit",
    stderr: "piped",
  }).spawn();
  started.children.push(child);
  await started.guard!.writer.write(new TextEncoder().encode(`${child.pid}\n`));
  return child;
}

const server = await spawn("server.ts", serverToml);
const serverReady = follow(server, "[server]", /NATadm server ready/);
server.status.then((s) => {
  if (!stopping) say(`demo: the server exited (code ${s.code})`);
  stop(1);
});

const timeout = new Promise<never>((_, reject) =>
  setTimeout(() => reject(new Error("server and client did not start")), READY_TIMEOUT_MS)
);
try {
  await Promise.race([serverReady, timeout]);
  // Started once the server listens, so its first attempt connects rather than waits.
  const client = await spawn("client.ts", clientToml);
  client.status.then((s) => {
    if (!stopping) say(`demo: the client exited (code ${s.code})`);
    stop(1);
  });
  await Promise.race([follow(client, "[client]", /connected to .* as/), timeout]);
  // Prove the tunnel before telling anyone to use it. Our own HTTP client, closed after, so no
  // idle keep-alive tunnel is left for Ctrl-C to wait on.
  const http = Deno.createHttpClient({});
  const response = await fetch(`http://127.0.0.1:${ports.web}/check`, {
    client: http,
    signal: AbortSignal.timeout(10_000),
  });
  const body = await response.text();
  http.close();
  if (!body.includes("behind NAT")) throw new Error(`unexpected reply through the tunnel: ${body}`);
} catch (err) {
  say(`demo: ${(err as Error).message}`);
  await stop(1);
}

console.log(`
NATadm demo is running: a server, a client and two services behind it, on loopback.
Files (certificates, client key, server.toml, client.toml) are in ${dir}

Try it:
  curl http://localhost:${ports.web}/hello     # a web service on the client, through the server
  nc localhost ${ports.echo}                   # an echo service: type a line, it comes back

Each user gets a tunnel of their own at once; the logs below show it open and close.
Press Ctrl-C to stop (this removes ${dir}).
`);
