/**
 * Soak: a real server and many real client identities on loopback, with tunnels opening and
 * closing at random for a while, every byte checked. Reports errors (must be 0), tunnels
 * completed, peak memory of the server and client processes, and descriptors at start and end.
 *
 *   deno task soak [--duration SECONDS] [--quick] [--clients N] [--procs P]
 *
 * Defaults: 600 s (`--quick`: 60 s), 200 client identities spread over 4 client processes
 * (soak/host.ts runs one `Client` per identity, each with its own key, control connection and
 * standby pool), one service and one user loop per identity: up to 200 concurrent tunnels.
 * Exits 1 if any tunnel failed, a process died, or descriptors grew.
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import {
  clientToml,
  Fixture,
  freePort,
  type Identity,
  ROOT,
  serverToml,
} from "../tests/helpers.ts";
import { establishedWith, mib, procStats } from "../tests/reliability_helpers.ts";
import type { StatusDocument } from "../src/status.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    duration: { type: "string" },
    quick: { type: "boolean", default: false },
    clients: { type: "string", default: "200" },
    procs: { type: "string", default: "4" },
    help: { type: "boolean", short: "h", default: false },
  },
});
if (values.help) {
  console.log(
    "Usage: deno task soak [--duration SECONDS (default 600)] [--quick (60 s)] " +
      "[--clients N (200)] [--procs P (4)]",
  );
  Deno.exit(0);
}
const DURATION_S = Number(values.duration ?? (values.quick ? 60 : 600));
const CLIENTS = Number(values.clients);
const PROCS = Math.min(Number(values.procs), CLIENTS);
for (const [name, v] of [["duration", DURATION_S], ["clients", CLIENTS], ["procs", PROCS]]) {
  if (!Number.isInteger(v) || (v as number) < 1) {
    console.error(`soak: --${name} must be a whole number of at least 1`);
    Deno.exit(2);
  }
}

/** Each tunnel must finish within this, or it counts as an error. */
const TUNNEL_TIMEOUT_MS = 30_000;
/** Descriptors (apart from pooled connections) a process may gain over the run. */
const FD_SLACK = 5;

const log = (text: string) => console.log(`[soak ${elapsed().toFixed(0).padStart(4)} s] ${text}`);
const started = performance.now();
const elapsed = () => (performance.now() - started) / 1000;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A child process whose stderr lines are kept (only warnings and errors are logged). */
class Child {
  readonly lines: string[] = [];
  stdout = "";
  readonly process: Deno.ChildProcess;
  readonly status: Promise<Deno.CommandStatus>;
  exited = false;

  constructor(readonly name: string, script: string, args: string[], permissions: string[]) {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", ...permissions, join(ROOT, script), ...args],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.process = child;
    this.status = child.status;
    this.status.then(() => this.exited = true);
    (async () => {
      for await (const text of child.stdout.pipeThrough(new TextDecoderStream())) {
        this.stdout += text;
      }
    })();
    (async () => {
      let rest = "";
      for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
        const parts = (rest + text).split("\n");
        rest = parts.pop()!;
        this.lines.push(...parts);
      }
      if (rest) this.lines.push(rest);
    })();
  }

  get pid(): number {
    return this.process.pid;
  }

  kill(signal: Deno.Signal): void {
    try {
      this.process.kill(signal);
    } catch {
      // Already gone.
    }
  }
}

async function waitFor<T>(what: string, timeoutMs: number, check: () => Promise<T | undefined>) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await check().catch(() => undefined);
    if (value !== undefined) return value;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(100);
  }
}

/** Random bytes that payloads are cut from. */
const POOL = new Uint8Array(1 << 20);
for (let at = 0; at < POOL.length; at += 65_536) {
  crypto.getRandomValues(POOL.subarray(at, at + 65_536));
}

/** What the user loops have seen. */
interface Counts {
  completed: number;
  aborted: number;
  errors: number;
  bytes: number;
}

/** A payload size: mostly small, some medium, a few large (up to 256 KiB). */
function payloadSize(): number {
  const r = Math.random();
  if (r < 0.7) return 1 + Math.floor(Math.random() * 4096);
  if (r < 0.95) return 4096 + Math.floor(Math.random() * 60_000);
  return 65_536 + Math.floor(Math.random() * 196_608);
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let at = 0; at < bytes.length;) {
    at += await conn.write(bytes.subarray(at, Math.min(bytes.length, at + 65_536)));
  }
}

/**
 * One tunnel: send a payload, half-close, read the echo to the end and compare; or, now and
 * then, a user that leaves mid-tunnel without reading. Returns the bytes checked.
 */
async function tunnel(port: number): Promise<{ kind: "completed" | "aborted"; bytes: number }> {
  const n = payloadSize();
  const offset = Math.floor(Math.random() * (POOL.length - n));
  const payload = POOL.subarray(offset, offset + n);
  const conn = await Deno.connect({
    hostname: "127.0.0.1",
    port,
    signal: AbortSignal.timeout(10_000),
  });
  conn.setNoDelay(true);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    conn.close();
  }, TUNNEL_TIMEOUT_MS);
  try {
    if (Math.random() < 0.05) {
      await writeAll(conn, payload.subarray(0, Math.min(n, 2048)));
      return { kind: "aborted", bytes: 0 };
    }
    const writing = writeAll(conn, payload).then(() => conn.closeWrite());
    const received = new Uint8Array(n);
    let got = 0;
    for (;;) {
      // Past n, read one more byte: anything extra is an error too.
      const r = await conn.read(got < n ? received.subarray(got) : new Uint8Array(1));
      if (r === null) break;
      if (got + r > n) throw new Error(`more bytes came back than the ${n} sent`);
      got += r;
    }
    await writing;
    if (got !== n) throw new Error(`${got} of ${n} bytes came back`);
    for (let i = 0; i < n; i++) {
      if (received[i] !== payload[i]) throw new Error(`byte ${i} of ${n} came back wrong`);
    }
    return { kind: "completed", bytes: n };
  } catch (err) {
    throw timedOut ? new Error(`no end within ${TUNNEL_TIMEOUT_MS} ms (${n} bytes)`) : err;
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch {
      // Already closed.
    }
  }
}

/** Opens tunnels to `port` one after another, with random pauses, until `deadline`. */
async function userLoop(
  port: number,
  deadline: number,
  counts: Counts,
  errors: string[],
): Promise<void> {
  await sleep(Math.random() * 1000); // do not start in lockstep
  while (performance.now() < deadline) {
    try {
      const { kind, bytes } = await tunnel(port);
      counts[kind]++;
      counts.bytes += bytes;
    } catch (err) {
      counts.errors++;
      if (errors.length < 20) errors.push(`service ${port}: ${(err as Error).message}`);
    }
    await sleep(Math.random() * 50);
  }
}

// --- Set up: certificates, keys, configs, processes. ---------------------------------------

log(`${CLIENTS} client identities in ${PROCS} processes, ${DURATION_S} s`);
const fixture = await Fixture.create();
const children: Child[] = [];
let exitCode = 1;
try {
  const identities: Identity[] = [];
  for (let i = 0; i < CLIENTS; i++) identities.push(await fixture.identity(`soak-${i}`));
  const [communicationPort, statusPort, ...servicePorts] = Array.from(
    { length: CLIENTS + 2 },
    freePort,
  );

  const echo = new Child("echo", "soak/echo.ts", [], ["--allow-net"]);
  children.push(echo);
  const echoPort = await waitFor("the echo service", 20_000, () => {
    const m = /^(\d+)\n/.exec(echo.stdout);
    return Promise.resolve(m ? Number(m[1]) : undefined);
  });

  const serverConfig = await fixture.write(
    "server.toml",
    serverToml({
      communicationPort,
      clients: identities,
      services: identities.map((id, i) => ({
        port: servicePorts[i],
        name: id.name,
        targetPort: echoPort,
      })),
      extra: `status_port = ${statusPort}\nlog_level = "warning"`,
    }),
  );
  const configs: string[] = [];
  for (const [i, identity] of identities.entries()) {
    configs.push(
      await fixture.write(
        `client-${i}.toml`,
        clientToml({ identity, communicationPort, interval: 5 }),
      ),
    );
  }
  const server = new Child("server", "server.ts", ["--config", serverConfig], [
    "--allow-net",
    "--allow-read",
  ]);
  children.push(server);
  const status = async (): Promise<StatusDocument> => {
    const response = await fetch(`http://127.0.0.1:${statusPort}/status.json`);
    if (!response.ok) throw new Error(`status.json: HTTP ${response.status}`);
    return await response.json();
  };
  await waitFor("the server's status page", 30_000, () => status());

  const hosts: Child[] = [];
  for (let p = 0; p < PROCS; p++) {
    const mine = configs.filter((_, i) => i % PROCS === p);
    hosts.push(new Child(`clients-${p}`, "soak/host.ts", mine, ["--allow-net", "--allow-read"]));
  }
  children.push(...hosts);
  await waitFor(`all ${CLIENTS} clients to connect`, 120_000, async () => {
    const doc = await status();
    return doc.clients.every((c) => c.connected) ? doc : undefined;
  });
  log(`all clients connected, each over one connection`);

  const measured = [server, ...hosts];
  const measure = () =>
    measured.map((p) => {
      const { fds, rss } = procStats(p.pid);
      const pool = establishedWith(p.pid, communicationPort);
      return { name: p.name, fds, rss, pool, other: fds - pool };
    });
  const start = measure();
  const peaks = new Map(start.map((m) => [m.name, m.rss]));

  // --- Load: one user loop per service, tunnels opening and closing at random. ------------

  const counts: Counts = { completed: 0, aborted: 0, errors: 0, bytes: 0 };
  const errors: string[] = [];
  const deadline = performance.now() + DURATION_S * 1000;

  let sampling = true;
  const sampler = (async () => {
    let lastReport = performance.now();
    while (sampling) {
      for (const p of measured) {
        if (p.exited) continue;
        try {
          peaks.set(p.name, Math.max(peaks.get(p.name)!, procStats(p.pid).rss));
        } catch {
          // Exited between the check and the read.
        }
      }
      if (performance.now() - lastReport >= 10_000) {
        lastReport = performance.now();
        const rate = (counts.completed + counts.aborted) / elapsed();
        log(
          `${counts.completed} completed, ${counts.aborted} aborted, ${counts.errors} errors ` +
            `(~${rate.toFixed(0)}/s); server ${mib(procStats(server.pid).rss)}`,
        );
      }
      await sleep(1000);
    }
  })();

  await Promise.all(servicePorts.map((port) => userLoop(port, deadline, counts, errors)));
  sampling = false;
  await sampler;

  // --- Wind down: every tunnel closed, descriptors back, clean exits. ------------------------

  const died = children.filter((c) => c.exited).map((c) => c.name);
  const last = await waitFor("every tunnel to close on the server", 30_000, async () => {
    const doc = await status();
    return doc.tunnels.length === 0 ? doc : undefined;
  }).catch((err) => {
    errors.push((err as Error).message);
    counts.errors++;
    return undefined;
  });
  // Let descriptors settle; a leak stays above the start however long we wait.
  let end = measure();
  const leaking = () =>
    end.filter((m, i) => m.other > start[i].other + FD_SLACK).map((m) => m.name);
  const settle = Date.now() + 15_000;
  while (leaking().length > 0 && Date.now() < settle) {
    await sleep(500);
    end = measure();
  }
  const serverTotal = last?.services.reduce((n, s) => n + s.tunnels_total, 0);

  for (const host of hosts) host.kill("SIGTERM");
  const hostCodes = await Promise.all(hosts.map((h) => h.status.then((s) => s.code)));
  server.kill("SIGTERM");
  const serverCode = (await server.status).code;

  const warnings = children.flatMap((c) =>
    c.lines.filter((l) => /\[(WRN|ERR|FTL)\]|error/i.test(l)).map((l) => `${c.name}: ${l}`)
  );

  // --- Report. -----------------------------------------------------------------------------

  console.log("\n== soak report");
  console.log(`duration:            ${DURATION_S} s`);
  console.log(
    `client identities:   ${CLIENTS} in ${PROCS} processes (concurrent tunnels ≤ ${CLIENTS})`,
  );
  console.log(
    `tunnels completed:   ${counts.completed} (+ ${counts.aborted} aborted by the user on purpose)`,
  );
  console.log(`bytes echoed:        ${mib(counts.bytes)}`);
  console.log(`server counted:      ${serverTotal ?? "?"} tunnels`);
  console.log(`errors:              ${counts.errors}`);
  for (const e of errors) console.log(`  ${e}`);
  console.log(`warnings logged:     ${warnings.length}`);
  for (const w of warnings.slice(0, 10)) console.log(`  ${w}`);
  console.log("process          peak RSS    fds start → end   (pooled conns start → end)");
  for (const [i, m] of end.entries()) {
    console.log(
      `${m.name.padEnd(16)} ${mib(peaks.get(m.name)!).padStart(10)}   ` +
        `${String(start[i].fds).padStart(5)} → ${String(m.fds).padEnd(5)}     ` +
        `(${start[i].pool} → ${m.pool})`,
    );
  }
  const leaks = leaking();
  if (leaks.length) console.log(`descriptor growth:   ${leaks.join(", ")}`);
  if (died.length) console.log(`died during the run: ${died.join(", ")}`);
  console.log(`exit codes:          server ${serverCode}, clients ${hostCodes.join(" ")}`);
  const ok = counts.errors === 0 && leaks.length === 0 && died.length === 0 &&
    serverCode === 0 && hostCodes.every((c) => c === 0);
  console.log(JSON.stringify({
    ok,
    duration_s: DURATION_S,
    clients: CLIENTS,
    procs: PROCS,
    completed: counts.completed,
    aborted: counts.aborted,
    errors: counts.errors,
    warnings: warnings.length,
    server_tunnels_total: serverTotal ?? null,
    processes: end.map((m, i) => ({
      name: m.name,
      peak_rss_mib: +(peaks.get(m.name)! / 1048576).toFixed(1),
      fds_start: start[i].fds,
      fds_end: m.fds,
      pooled_start: start[i].pool,
      pooled_end: m.pool,
    })),
  }));
  console.log(ok ? "soak: OK" : "soak: FAILED");
  exitCode = ok ? 0 : 1;
} catch (err) {
  console.error(`soak: ${(err as Error).stack ?? err}`);
  for (const c of children) {
    if (c.lines.length) console.error(`--- ${c.name} stderr:\n${c.lines.slice(-20).join("\n")}`);
  }
} finally {
  for (const c of children) c.kill("SIGKILL");
  await Promise.all(children.map((c) => c.status));
  await fixture.cleanup();
}
Deno.exit(exitCode);
