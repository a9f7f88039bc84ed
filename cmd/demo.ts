/**
 * `deno task demo`: NATadm's main job on loopback. Makes certificates and a client key in a
 * temporary directory, starts a small web service and an echo service "behind NAT", a server
 * and a client as separate processes, checks a request through the tunnel, and prints how to
 * try it. Runs until Ctrl-C, then stops everything and removes the directory.
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

/** Copies a child's stderr to ours with a prefix, and resolves when a line matches. */
function follow(child: Deno.ChildProcess, prefix: string, ready: RegExp): Promise<void> {
  return new Promise((resolve) => {
    (async () => {
      let rest = "";
      for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
        const lines = (rest + text).split("\n");
        rest = lines.pop()!;
        for (const line of lines) {
          console.error(`${prefix} ${line}`);
          if (ready.test(line)) resolve();
        }
      }
    })();
  });
}

const dir = await Deno.makeTempDir({ prefix: "natadm-demo-" });
const ports = {
  communication: freePort(PREFERRED.communication),
  web: freePort(PREFERRED.web),
  echo: freePort(PREFERRED.echo),
};

// The services "behind NAT": bound to loopback ports that the public never sees.
const web = Deno.serve(
  { hostname: "127.0.0.1", port: 0, onListen: () => {} },
  (req) =>
    new Response(`Hello from the machine behind NAT. You asked for ${new URL(req.url).pathname}\n`),
);
const echoListener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
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

function spawn(script: string, config: string): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-net", "--allow-read", join(root, script), "--config", config],
    stdin: "null",
    stdout: "inherit",
    stderr: "piped",
  }).spawn();
}

const server = spawn("server.ts", serverToml);
const serverReady = follow(server, "[server]", /NATadm server ready/);
let client: Deno.ChildProcess | undefined;

let stopping = false;
async function stop(code: number): Promise<never> {
  if (!stopping) {
    stopping = true;
    for (const child of [client, server]) {
      if (!child) continue;
      try {
        child.kill("SIGTERM");
      } catch {
        // Already exited.
      }
    }
    await Promise.allSettled([client?.status, server.status]);
    await web.shutdown();
    echoListener.close();
    await Deno.remove(dir, { recursive: true });
  }
  Deno.exit(code);
}
Deno.addSignalListener("SIGINT", () => stop(0));
Deno.addSignalListener("SIGTERM", () => stop(0));
server.status.then((s) => !stopping && (console.error("demo: the server exited", s), stop(1)));

const timeout = new Promise<never>((_, reject) =>
  setTimeout(() => reject(new Error("server and client did not start")), READY_TIMEOUT_MS)
);
try {
  await Promise.race([serverReady, timeout]);
  // Started once the server listens, so its first attempt connects rather than waits.
  client = spawn("client.ts", clientToml);
  client.status.then((s) => !stopping && (console.error("demo: the client exited", s), stop(1)));
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
  console.error(`demo: ${(err as Error).message}`);
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
