/**
 * Case: a user whose client is held by another server of a cluster (docs/cluster.md). One etcd,
 * two `server.ts` sharing its registry — A on 127.0.0.1 and B on 127.0.0.2, the same service
 * ports on both, each with its own communication, status and peer ports — and one `client.ts`
 * attached to B only, with a service per target (echo, sink, source, iperf3). Against that one
 * client, two paths:
 *
 *   direct:    user → B:service → client → target
 *   forwarded: user → A:service ═(peer link, mutual TLS)═> B → client → target
 *
 * First byte p50/p99 over fresh connections (as the first-byte case, the path that goes first
 * alternating by round), and bulk throughput each way on 1 stream (iperf3 or the built-in
 * generator/sink, as the throughput case; runs in ABBA order, each path's figure the mean of
 * its two). Targets: forwarded first byte p50 ≤ direct + 1 ms; forwarded bulk ≥ 0.8× direct.
 * @module
 */
import { join } from "node:path";
import { clientToml, type Fixture, freePort, ROOT, waitUntil } from "../tests/helpers.ts";
import { ETCD, Etcd } from "../tests/etcd_server.ts";
import { clusterServerToml } from "../tests/cluster_helpers.ts";
import { generateCertificates } from "../src/certs.ts";
import { type Context, firstByte, fmt, latencyStats, sampleFirstBytes } from "./cases.ts";
import { bulk } from "./fairness.ts";
import { waitEcho } from "./net.ts";
import { cpuMs, Proc, run, stopTracked, track } from "./proc.ts";
import type { TargetPorts } from "./systems.ts";

const DENO = Deno.execPath();
/** The one client, attached to B only. */
const CLIENT = "cluster-bench";
/** How long each start-up step may take. */
const STEP_MS = 30_000;

/** One server of the two. */
interface Member {
  id: "A" | "B";
  host: string;
  communicationPort: number;
  statusPort: number;
  config: string;
  proc?: Proc;
}

const round2 = (x: number) => Math.round(x * 100) / 100;

/** The two paths to the same client. */
type Path = "direct" | "forwarded";

/** What A's or B's `/status.json` says (the fields used here). */
interface Status {
  cluster: { held: Record<string, string[]>; forwarded_total: number };
  tunnels: unknown[];
}

/** `m`'s `/status.json`, or undefined if it does not answer. */
async function status(m: Member): Promise<Status | undefined> {
  try {
    const response = await fetch(`http://127.0.0.1:${m.statusPort}/status.json`, {
      signal: AbortSignal.timeout(2000),
    });
    const doc = await response.json();
    return doc.cluster ? doc as Status : undefined;
  } catch {
    return undefined;
  }
}

/** Case: first byte and bulk throughput for a user at B (direct) and at A (forwarded to B). */
export async function cluster(
  ctx: Context,
  fixture: Fixture,
  programArgs: string[],
): Promise<void> {
  ctx.log(
    "[cluster] one client attached to server B only; users at B (direct) and at A (forwarded " +
      "A → B over the peer link)",
  );
  if (ETCD === undefined) {
    const why = "no `etcd` binary (apt-get install etcd-server)";
    ctx.rec.notes.push(`cluster case skipped: ${why}`);
    ctx.log(`  skipped: ${why}`);
    return;
  }
  const dir = fixture.path("cluster");
  const started: Proc[] = [];
  const start = (name: string, script: string, config: string) => {
    const p = track(
      new Proc(name, DENO, [
        "run",
        "--allow-net",
        "--allow-read",
        join(ROOT, script),
        "--config",
        config,
        ...programArgs,
      ]),
    );
    started.push(p);
    return p;
  };
  let etcd: Etcd | undefined;
  const etcdHandle = track({ stop: () => etcd?.kill() ?? Promise.resolve() });
  const members: Member[] = [];
  /** Which process died, if one did: said with a failed step. */
  const dead = () => {
    const p = started.find((p) => p.exited);
    return p ? `; ${p.name} exited: ${p.tail(4)}` : "";
  };
  const record: Record<string, unknown> = {};
  try {
    await Deno.mkdir(dir, { recursive: true });
    etcd = new Etcd(join(dir, "etcd-data"));
    await etcd.start();
    const etcdUrl = etcd.url;

    // One CA for the cluster; one certificate (server and client use) names both members.
    const pem = await generateCertificates(["localhost", "127.0.0.1", "127.0.0.2"], {
      peer: true,
    });
    const ca = join(dir, "ca.pem"), cert = join(dir, "crt.pem"), key = join(dir, "key.pem");
    await Deno.writeTextFile(ca, pem.caCert);
    await Deno.writeTextFile(cert, pem.cert);
    await Deno.writeTextFile(key, pem.key, { mode: 0o600 });

    // The registry, as an operator makes it: the client and one service per target.
    const admin = (...args: string[]) =>
      run(DENO, [
        "run",
        "--allow-net",
        "--allow-read",
        join(ROOT, "cmd/admin.ts"),
        "--etcd",
        etcdUrl,
        ...args,
      ], STEP_MS);
    const identity = await fixture.identity(CLIENT);
    await admin("add-client", CLIENT, "--key", identity.publicKey);
    const names = (["echo", "sink", "source", "iperf"] as const).filter(
      (n) => ctx.targets.ports[n],
    );
    const front: Partial<TargetPorts> = {};
    for (const name of names) {
      front[name] = freePort();
      await admin(
        "add-service",
        String(front[name]),
        "--client",
        CLIENT,
        "--port",
        String(ctx.targets.ports[name]),
        // As the single-server case has it: no name to resolve on each tunnel.
        "--host",
        "127.0.0.1",
      );
    }
    const ports = front as TargetPorts;

    for (const [i, id] of (["A", "B"] as const).entries()) {
      const host = `127.0.0.${i + 1}`;
      const communicationPort = freePort(), statusPort = freePort();
      const config = join(dir, `server-${id}.toml`);
      await Deno.writeTextFile(
        config,
        clusterServerToml({
          id,
          host,
          communicationPort,
          statusPort,
          etcdUrl,
          certificate: [cert, key],
          ca,
        }),
      );
      members.push({ id, host, communicationPort, statusPort, config });
    }
    const [a, b] = members;
    for (const m of members) {
      m.proc = start(`cluster server ${m.id}`, "server.ts", m.config);
      await m.proc.waitFor(/NATadm server ready/, STEP_MS);
    }
    const clientConfig = join(dir, "client.toml");
    await Deno.writeTextFile(
      clientConfig,
      clientToml({
        identity,
        communicationPort: b.communicationPort,
        host: b.host,
        cafile: ca,
        interval: 5,
      }),
    );
    const client = start("cluster client", "client.ts", clientConfig);
    await client.waitFor(/connected to .* as/, STEP_MS);
    // Both servers must know that B holds the client: A learns it from etcd's watch.
    for (const m of members) {
      let last: Status | undefined;
      await waitUntil(
        async () => {
          if (dead()) throw new Error(`waiting for ${m.id}'s status${dead()}`);
          last = await status(m);
          return JSON.stringify(last?.cluster.held[CLIENT]) === JSON.stringify(["B"]);
        },
        () => `${m.id}'s status.json to show ${CLIENT} held by B: ${JSON.stringify(last?.cluster)}`,
        STEP_MS,
      );
    }
    const hosts: Record<Path, string> = { direct: b.host, forwarded: a.host };
    await waitEcho(ports.echo, "cluster, direct", STEP_MS, hosts.direct);
    await waitEcho(ports.echo, "cluster, forwarded", STEP_MS, hosts.forwarded);
    const forwardedBefore = (await status(a))?.cluster.forwarded_total ?? 0;
    /**
     * Waits until neither server has a tunnel left, so that a run starts with the previous
     * one's tunnels gone (iperf3 -s takes one test at a time).
     */
    const settled = () =>
      waitUntil(
        async () => {
          for (const m of members) if ((await status(m))?.tunnels.length !== 0) return false;
          return true;
        },
        () => `the tunnels of the previous run to close on A and B${dead()}`,
        STEP_MS,
      );
    const paths: Path[] = ["direct", "forwarded"];

    /** Runs one measurement; a failure is recorded and the next one still runs. */
    const attempt = async (what: string, fn: () => Promise<void>) => {
      try {
        await fn();
      } catch (err) {
        const message = `cluster ${what}: ${(err as Error).message.split("\n")[0]}${dead()}`;
        ctx.rec.errors.push(message);
        ctx.log(`  ERROR ${message}`);
      }
    };

    await attempt("warm-up", async () => {
      // Fills JIT caches on every hop, and has A dial its peer link to B.
      const conns = ctx.params.quick ? 20 : 100;
      for (const path of paths) {
        for (let i = 0; i < conns; i++) await firstByte(ports.echo, hosts[path]);
      }
    });

    await attempt("first byte", async () => {
      const { firstByte: total, rounds } = ctx.params;
      ctx.log(`  first byte: ${total} fresh connections per path`);
      const samples: Record<Path, number[]> = { direct: [], forwarded: [] };
      const failures: Record<Path, { count: number }> = {
        direct: { count: 0 },
        forwarded: { count: 0 },
      };
      const perRound = Math.ceil(total / rounds);
      for (let round = 0; round < rounds; round++) {
        for (const path of round % 2 === 0 ? paths : [...paths].reverse()) {
          const list = samples[path];
          const n = Math.min(perRound, total - list.length);
          await sampleFirstBytes(ports.echo, n, list, failures[path], hosts[path]).catch((err) => {
            throw new Error(`${path}: ${(err as Error).message}`);
          });
        }
      }
      const stats: Record<string, unknown> = {};
      for (const path of paths) {
        const s = latencyStats(samples[path]);
        const prefix = path === "direct" ? "cl" : "cl_fwd";
        ctx.rec.set(`${prefix}_fb_p50`, "natadm", s.p50);
        ctx.rec.set(`${prefix}_fb_p99`, "natadm", s.p99);
        stats[path] = { ...s, failures: failures[path].count };
        ctx.log(
          `  ${path.padEnd(9)} p50 ${fmt(s.p50)} ms  p90 ${fmt(s.p90)} ms  p99 ${
            fmt(s.p99)
          } ms  (n=${s.n})`,
        );
      }
      record.firstByte = stats;
    });

    const pids: Record<string, number> = { A: a.proc!.pid, B: b.proc!.pid, client: client.pid };
    const useIperf = !!ctx.iperfPath && !ctx.params.builtin && !!ports.iperf;
    const seconds = ctx.params.throughputSeconds;
    ctx.log(
      `  bulk, 1 stream, ${seconds} s per run, two runs per path in ABBA order ` +
        `(${useIperf ? "iperf3" : "built-in"})`,
    );
    for (const [way, reverse] of [["up", false], ["down", true]] as const) {
      await attempt(`bulk ${way}`, async () => {
        const runs: Record<Path, number[]> = { direct: [], forwarded: [] };
        // CPU each NATadm process spent on each path's runs: where a forwarded byte costs more.
        const cpu: Record<Path, Record<string, number>> = { direct: {}, forwarded: {} };
        const first: Path = reverse ? "forwarded" : "direct";
        const second: Path = reverse ? "direct" : "forwarded";
        for (const path of [first, second, second, first]) {
          const once = () =>
            bulk(ports, seconds, reverse, useIperf ? ctx.iperfPath : undefined, hosts[path]);
          await settled();
          const before = Object.entries(pids).map(([role, pid]) => [role, cpuMs(pid)] as const);
          let value: number;
          try {
            value = await once();
          } catch (err) {
            if (!useIperf) throw err;
            // A failed test can leave iperf3 -s waiting on it: restart it and try once more.
            ctx.log(`  retrying ${way} ${path} after: ${(err as Error).message}`);
            await ctx.targets.startIperf();
            value = await once();
          }
          for (const [role, ms] of before) {
            cpu[path][role] = (cpu[path][role] ?? 0) + cpuMs(pids[role]) - ms;
          }
          runs[path].push(value);
        }
        const mean = (xs: number[]) => xs.reduce((s, x) => s + x, 0) / xs.length;
        const direct = mean(runs.direct), forwarded = mean(runs.forwarded);
        ctx.rec.set(`cl_${way}`, "natadm", direct);
        ctx.rec.set(`cl_fwd_${way}`, "natadm", forwarded);
        /** CPU ms per MB moved, by process, on `path` (MB ≈ MB/s × seconds, summed over runs). */
        const perMB = (path: Path) => {
          const mb = runs[path].reduce((sum, x) => sum + x * seconds, 0);
          const entries = Object.entries(cpu[path]);
          return Object.fromEntries(entries.map(([role, ms]) => [role, round2(ms / mb)]));
        };
        record[way] = {
          runsMBps: runs,
          direct,
          forwarded,
          ratio: forwarded / direct,
          cpuMsPerMB: { direct: perMB("direct"), forwarded: perMB("forwarded") },
        };
        const show = (path: Path) =>
          Object.entries(perMB(path)).map(([role, x]) => `${role} ${fmt(x, 1)}`).join(", ");
        ctx.log(
          `  ${(way === "up" ? "upload" : "download").padEnd(9)} direct ${fmt(direct, 1)} MB/s  ` +
            `forwarded ${fmt(forwarded, 1)} MB/s  (${fmt(forwarded / direct, 2)}×); CPU ms/MB ` +
            `direct: ${show("direct")}; forwarded: ${show("forwarded")}`,
        );
      });
    }

    // Proof the forwarded figures went through the peer link: A counted them as forwarded.
    const after = (await status(a))?.cluster;
    if (after) record.forwardedByA = after.forwarded_total - forwardedBefore;
    if (!after || after.forwarded_total <= forwardedBefore) {
      const message = `cluster: ${
        after ? "A's status.json counted no forwarded tunnel" : "A's status.json did not answer"
      }${dead()}`;
      ctx.rec.errors.push(message);
      ctx.log(`  ERROR ${message}`);
    }
    const p50 = ctx.rec.get("cl_fb_p50", "natadm"), fwdP50 = ctx.rec.get("cl_fwd_fb_p50", "natadm");
    if (p50 !== undefined && fwdP50 !== undefined) record.forwardedExtraP50Ms = fwdP50 - p50;
    record.throughputTool = useIperf ? "iperf3" : "built-in";
    record.servers = members.map((m) => ({ id: m.id, host: m.host }));
  } catch (err) {
    const message = `cluster: ${(err as Error).message.split("\n")[0]}${dead()}`;
    ctx.rec.errors.push(message);
    ctx.log(`  ERROR ${message}`);
  } finally {
    ctx.rec.detail("cluster", "natadm", record);
    for (const p of started.reverse()) await stopTracked(p);
    await stopTracked(etcdHandle);
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}
