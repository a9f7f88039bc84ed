/**
 * NATadm benchmark: `deno task bench [--quick] [--builtin] [--without TOOLS] [--profile]`.
 *
 * Starts everything itself on 127.0.0.1 — target services, NATadm server and client, and the
 * peers it is compared with (direct connection, OpenSSH `ssh -R`, a stunnel pair) — runs six
 * cases (first byte and connection rate also through a user's `forward`, and `connect` spawned
 * as an ssh ProxyCommand would be), and a cluster case (an etcd, two servers, a client held by
 * one of them: first byte and bulk for a user at that server, and for one forwarded to it by the
 * other; skipped without the `etcd` binary), prints one table, writes
 * bench/results/latest.{json,svg} (quick.{json,svg} for `--quick`), and stops everything it
 * started, also on error or Ctrl-C. Timing figures are informational: nothing here fails on a
 * slow result.
 * @module
 */
import { parseArgs } from "node:util";
import { Fixture } from "../tests/helpers.ts";
import {
  concurrency,
  connectionRate,
  connectSpawnLatency,
  type Context,
  firstByteLatency,
  FULL,
  idleCost,
  interactiveLatency,
  type Params,
  QUICK,
  Recorder,
  throughput,
  versionLine,
  warmUp,
} from "./cases.ts";
import { fileLimit, raiseFileLimit, run, stopAll } from "./proc.ts";
import {
  DirectSystem,
  findTools,
  LABELS,
  NatadmSystem,
  SkippedSystem,
  SshSystem,
  StunnelSystem,
  type SysId,
  type System,
  Targets,
  TOOLS,
} from "./systems.ts";
import { type Machine, renderSvg, renderTable, toJson } from "./report.ts";
import { hotSpots, renderHotSpots } from "./profile.ts";
import { burst } from "./burst.ts";
import { fairness } from "./fairness.ts";
import { fleet } from "./fleet.ts";
import { cluster } from "./cluster.ts";
import { Nginx, smallRequests } from "./http.ts";
import { PAIR_ADDR } from "./netns.ts";
import { wan } from "./wan.ts";

const CASES = [
  "throughput",
  "firstbyte",
  "interactive",
  "fairness",
  "http",
  "rate",
  "concurrency",
  "idle",
  "burst",
  "fleet",
  "cluster",
] as const;

const HELP = `Usage: deno task bench [--quick] [--builtin] [--fleet N] [--wan] [--only CASES]
                       [--without TOOLS] [--profile] [--log-level LEVEL]

  --quick            every case briefly (for CI): 1 s throughput, 50 first-byte connections
                     (and 50 through forward, 20 connect processes), 500 round trips, 1 s connection rate, 100 tunnels, 5 s idle, a fleet of
                     100 clients, a burst of 200 users, 2 s per fairness and HTTP run
  --fleet N          idle client identities in the fleet case (default 1000, --quick 100);
                     10000 needs the open-file hard limit at 20000 or more
  --wan              instead of the loopback cases, the WAN profile: server and client in two
                     network namespaces joined by a 100 Mbit/s veth link with 40 ms round trip
                     (needs root and iproute2); writes bench/results/wan.{json,svg}
  --only CASES       run only these cases, e.g. --only fleet,burst (${CASES.join(", ")})
  --builtin          measure throughput with the built-in generator/sink even if iperf3 exists
  --log-level LEVEL  passed to the NATadm server and client (default: their own, info)
  --without TOOLS    act as if these were not installed, e.g. --without sshd,stunnel,iperf3
  --profile          run the NATadm server and client under V8's CPU profiler; print their
                     hottest functions and keep the .cpuprofile files in bench/results/profile/
  -h, --help         show this help`;

const { values: opts } = parseArgs({
  args: Deno.args,
  strict: true,
  options: {
    quick: { type: "boolean", default: false },
    builtin: { type: "boolean", default: false },
    profile: { type: "boolean", default: false },
    without: { type: "string", default: "" },
    fleet: { type: "string" },
    wan: { type: "boolean", default: false },
    only: { type: "string" },
    "log-level": { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  },
});
if (opts.help) {
  console.log(HELP);
  Deno.exit(0);
}

const params: Params = { ...(opts.quick ? QUICK : FULL), builtin: opts.builtin };
if (opts.fleet !== undefined) {
  const n = Number(opts.fleet);
  if (!Number.isInteger(n) || n < 1 || n > 100_000) {
    console.error(`--fleet: expected a whole number from 1 to 100000, got "${opts.fleet}"`);
    Deno.exit(2);
  }
  params.fleet = n;
}
const only = new Set(
  (opts.only ?? CASES.join(",")).split(",").map((s) => s.trim()).filter((s) => s),
);
for (const name of only) {
  if (!(CASES as readonly string[]).includes(name)) {
    console.error(`--only: unknown case "${name}" (known: ${CASES.join(", ")})`);
    Deno.exit(2);
  }
}
/** Whether case `name` runs in this invocation. */
const want = (name: typeof CASES[number]) => only.has(name);
const programArgs = opts["log-level"] ? ["--log-level", opts["log-level"]] : [];
const RESULTS = new URL("./results/", import.meta.url).pathname;
const log = (line: string) => console.error(line);

let fixture: Fixture | undefined;
let cleaning: Promise<void> | undefined;

/** Stops everything started and removes the temp dir; safe to call twice. */
function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    await stopAll();
    await fixture?.cleanup();
  })();
  return cleaning;
}

const onSignal = () => {
  log("interrupted: stopping everything started");
  cleanup().finally(() => Deno.exit(130));
};
Deno.addSignalListener("SIGINT", onSignal);
Deno.addSignalListener("SIGTERM", onSignal);

/** The commit measured, marked "+changes" if src/ or an entrypoint differs from it. */
async function revision(): Promise<string> {
  const root = new URL("..", import.meta.url).pathname;
  try {
    const commit = (await run("git", ["-C", root, "rev-parse", "--short", "HEAD"])).trim();
    const dirty = (await run("git", [
      "-C",
      root,
      "status",
      "--porcelain",
      "--",
      "src",
      "server.ts",
      "client.ts",
    ])).trim();
    return dirty ? `${commit}+changes` : commit;
  } catch {
    return "unknown";
  }
}

async function loadavg(): Promise<string> {
  return (await Deno.readTextFile("/proc/loadavg").catch(() => "?")).trim();
}

async function machineInfo(tools: ReturnType<typeof findTools>): Promise<Machine> {
  const meminfo = await Deno.readTextFile("/proc/meminfo").catch(() => "");
  const cpuinfo = await Deno.readTextFile("/proc/cpuinfo").catch(() => "");
  let nproc = navigator.hardwareConcurrency;
  try {
    const out = await new Deno.Command("nproc", { stdout: "piped", stderr: "null" }).output();
    nproc = Number(new TextDecoder().decode(out.stdout).trim()) || nproc;
  } catch {
    // no nproc binary: keep the runtime's count
  }
  return {
    nproc,
    cpu: cpuinfo.match(/^model name\s*:\s*(.+)$/m)?.[1]?.trim() ?? "?",
    memTotalMiB: Math.round(Number(meminfo.match(/^MemTotal:\s+(\d+)/m)?.[1] ?? 0) / 1024),
    kernel: Deno.osRelease(),
    deno: Deno.version.deno,
    v8: Deno.version.v8,
    typescript: Deno.version.typescript,
    date: new Date().toISOString(),
    natadm: await revision(),
    loadavg: { start: await loadavg() },
    tools: {
      ssh: await versionLine(tools.ssh, ["-V"]),
      stunnel: await versionLine(tools.stunnel, ["-version"]),
      iperf3: await versionLine(tools.iperf3, ["--version"]),
      nginx: await versionLine(tools.nginx, ["-v"]),
      wrk: await versionLine(tools.wrk, ["-v"]),
    },
  };
}

async function main(): Promise<void> {
  const began = performance.now();
  const rec = new Recorder();
  const tools = findTools();
  for (const name of opts.without.split(",").map((s) => s.trim()).filter((s) => s)) {
    if (!(name in tools)) {
      throw new Error(
        `--without: unknown tool "${name}" (known: ${Object.keys(tools).join(", ")})`,
      );
    }
    tools[name as keyof typeof tools] = undefined;
  }
  const machine = await machineInfo(tools);
  log(
    `NATadm benchmark, ${params.quick ? "quick" : "full"} run: ${machine.nproc} CPUs, ` +
      `${machine.memTotalMiB} MiB, Linux ${machine.kernel}, Deno ${machine.deno}`,
  );

  const needFiles = params.tunnels * 4 + 1024;
  const files = await raiseFileLimit(needFiles);
  if (files < needFiles) {
    params.tunnels = Math.max(10, Math.floor((files - 1024) / 4));
    rec.notes.push(
      `open-file limit ${files} (hard ${fileLimit().hard}) is too low: concurrency reduced to ` +
        `${params.tunnels} tunnels; raise it with ulimit -n`,
    );
    log(`note: ${rec.notes.at(-1)}`);
  }

  // A temp dir named for the benchmark, not like the test suite's, so that nobody cleaning up
  // stray test processes by their config path hits the benchmark's.
  // 10.203.0.1: the server's address in the WAN profile's namespace.
  fixture = await Fixture.create(["localhost", "127.0.0.1", PAIR_ADDR.a]);
  const dir = await Deno.makeTempDir({ prefix: "nbench-" });
  await Deno.remove(dir);
  await Deno.rename(fixture.dir, dir);
  fixture = new Fixture(dir);
  const useIperf = !!tools.iperf3 && !params.builtin;
  const ctx0 = { params, rec, log, iperfPath: useIperf ? tools.iperf3 : undefined };
  if (opts.wan) {
    await wan({ ...ctx0, systems: [], targets: new Targets(undefined), tidy: () => {} }, fixture);
    await finish(rec, machine, {}, began, false, []);
    return;
  }
  const targets = new Targets(
    useIperf ? tools.iperf3 : undefined,
    tools.nginx ? new Nginx(tools.nginx, fixture.path("nginx")) : undefined,
  );
  await targets.start();
  if (!tools.nginx) {
    rec.notes.push(
      "nginx not installed (apt-get install nginx): HTTP target is the built-in server",
    );
  } else if (targets.nginxProblem) {
    rec.notes.push(`nginx failed (${targets.nginxProblem}): HTTP target is the built-in server`);
  }
  if (!tools.wrk) {
    rec.notes.push("wrk not installed (apt-get install wrk): HTTP load by the built-in client");
  }

  const missing = (keys: (keyof typeof TOOLS)[]) => {
    const lost = keys.filter((k) => !tools[k]);
    return lost.length === 0
      ? undefined
      : `not installed: ${lost.join(", ")} (apt-get install ${
        [...new Set(lost.map((k) => TOOLS[k].pkg))].join(" ")
      })`;
  };
  const profileDir = opts.profile ? fixture.path("profile") : undefined;
  if (opts.profile) {
    rec.notes.push("NATadm ran under the CPU profiler (--profile): a little slower");
  }
  const natadm = new NatadmSystem(fixture, targets, programArgs, profileDir);
  const sshMissing = missing(["sshd", "ssh", "ssh-keygen"]);
  const stunnelMissing = missing(["stunnel"]);
  const systems: System[] = [
    new DirectSystem(targets),
    natadm,
    sshMissing
      ? new SkippedSystem("ssh", sshMissing)
      : new SshSystem(fixture, targets, tools.sshd!, tools.ssh!, tools["ssh-keygen"]!),
    stunnelMissing
      ? new SkippedSystem("stunnel", stunnelMissing)
      : new StunnelSystem(fixture, targets, tools.stunnel!),
  ];
  if (!useIperf) {
    rec.notes.push(
      tools.iperf3
        ? "throughput measured with the built-in generator/sink (--builtin)"
        : "iperf3 not installed (apt-get install iperf3): throughput measured with the " +
          "built-in generator/sink",
    );
  }

  const skipped: Partial<Record<SysId, string>> = {};
  const startAll = async () => {
    for (const sys of systems) {
      if (sys.skip) {
        skipped[sys.id] = sys.skip;
        continue;
      }
      try {
        await sys.start();
      } catch (err) {
        await sys.stop().catch(() => {});
        const reason = `failed to start: ${(err as Error).message.split("\n")[0]}`;
        (sys as { skip?: string }).skip = reason;
        skipped[sys.id] = reason;
        rec.errors.push(`${sys.id} ${reason}`);
        log(`  ${sys.id}: ${reason}`);
      }
    }
  };
  // The fleet and the cluster have servers of their own: a run of only those needs none of the
  // systems.
  const needSystems = [...only].some((name) => name !== "fleet" && name !== "cluster");
  if (needSystems) log("starting systems");
  if (needSystems) await startAll();
  for (const [id, why] of Object.entries(skipped)) log(`  ${LABELS[id as SysId]} skipped: ${why}`);

  const ctx: Context = {
    systems,
    targets,
    params,
    rec,
    iperfPath: useIperf ? tools.iperf3 : undefined,
    log,
    tidy: () => {
      natadm.forgetLogs();
      for (const s of systems) if (s instanceof StunnelSystem) s.forgetLogs();
    },
  };

  if (needSystems) {
    log("warming up");
    await warmUp(ctx);
  }
  if (want("throughput")) await throughput(ctx);
  if (want("firstbyte")) {
    await firstByteLatency(ctx);
    await connectSpawnLatency(ctx, natadm);
  }
  if (want("interactive")) await interactiveLatency(ctx);
  if (want("fairness")) await fairness(ctx, params.fairSeconds);
  if (want("http")) await smallRequests(ctx, params.httpSeconds, tools.wrk);
  if (want("rate")) await connectionRate(ctx);

  if (want("concurrency") || want("idle")) {
    // Fresh processes for the memory figures: earlier cases grew heaps and buffers.
    log("restarting systems for the concurrency case");
    for (const sys of systems) if (!sys.skip) await sys.stop();
    await startAll();
    await warmUp(ctx);
    if (want("concurrency")) await concurrency(ctx);
    if (want("idle")) await idleCost(ctx, natadm);
  }
  if (want("burst")) {
    log("restarting systems for the burst case");
    for (const sys of systems) if (!sys.skip) await sys.stop();
    await startAll();
    await warmUp(ctx);
    await burst(ctx, params.burst);
  }
  if (want("cluster")) {
    // The cluster has servers of its own: the others would only take CPU from them.
    if (!profileDir) { for (const sys of systems) if (!sys.skip) await sys.stop(); }
    await cluster(ctx, fixture, programArgs);
  }
  if (want("fleet")) {
    // The fleet has a server of its own: the others would only take CPU from it.
    if (!profileDir) { for (const sys of systems) if (!sys.skip) await sys.stop(); }
    await fleet(ctx, fixture, params.fleet);
  }

  const profiles: string[] = [];
  if (profileDir) {
    await natadm.stop(); // a clean exit writes the profiles
    const kept = `${RESULTS}profile/`;
    await Deno.remove(kept, { recursive: true }).catch(() => {});
    for (const role of ["server", "client"]) {
      const spots = await hotSpots(`${profileDir}/${role}`);
      rec.details[`profile_${role}`] = spots;
      profiles.push(renderHotSpots(`natadm ${role}`, spots));
      await Deno.mkdir(`${kept}${role}`, { recursive: true });
      for await (const f of Deno.readDir(`${profileDir}/${role}`)) {
        await Deno.copyFile(`${profileDir}/${role}/${f.name}`, `${kept}${role}/${f.name}`);
      }
    }
  }

  await finish(rec, machine, skipped, began, useIperf, profiles);
}

/** Prints the table and notes, and writes the JSON and SVG records. */
async function finish(
  rec: Recorder,
  machine: Machine,
  skipped: Partial<Record<SysId, string>>,
  began: number,
  useIperf: boolean,
  profiles: string[],
): Promise<void> {
  const seconds = (performance.now() - began) / 1000;
  machine.loadavg.end = await loadavg();
  const table = renderTable(rec, params, skipped);
  console.log(table);
  for (const [id, why] of Object.entries(skipped)) {
    console.log(`${LABELS[id as SysId]}: skipped, ${why}`);
  }
  console.log(
    `throughput by ${useIperf ? "iperf3" : "the built-in generator/sink"}; ` +
      "public side = natadm server / sshd session / user-side stunnel, " +
      "NAT side = natadm client / ssh / target-side stunnel; RSS per tunnel = (peak - idle) / N; " +
      "idle and seed figures are TCP payload bytes through a counting relay",
  );
  for (const note of rec.notes) console.log(`note: ${note}`);
  for (const p of profiles) console.log(p);
  for (const error of rec.errors) console.log(`error: ${error}`);

  await Deno.mkdir(RESULTS, { recursive: true });
  // The README's figures come from latest.json: a WAN or --only run must not overwrite it.
  const base = opts.wan
    ? (params.quick ? "quick-wan" : "wan")
    : only.size < CASES.length
    ? "partial"
    : (params.quick ? "quick" : "latest");
  const json = toJson(rec, params, machine, skipped, seconds, useIperf ? "iperf3" : "built-in");
  await Deno.writeTextFile(`${RESULTS}${base}.json`, JSON.stringify(json, null, 2) + "\n");
  await Deno.writeTextFile(`${RESULTS}${base}.svg`, renderSvg(rec, params, machine));
  // Keep `deno fmt --check` clean: let the formatter settle the layout of what we wrote.
  await new Deno.Command(Deno.execPath(), {
    args: ["fmt", "--quiet", `${RESULTS}${base}.json`, `${RESULTS}${base}.svg`],
    cwd: new URL("..", import.meta.url).pathname,
    stdout: "null",
    stderr: "null",
    signal: AbortSignal.timeout(30_000),
  }).output().catch(() => {});
  console.log(
    `wrote bench/results/${base}.json and bench/results/${base}.svg in ${seconds.toFixed(0)} s`,
  );
}

let code = 0;
try {
  await main();
} catch (err) {
  console.error(`bench failed: ${(err as Error).stack ?? err}`);
  code = 1;
} finally {
  await cleanup();
}
Deno.exit(code);
