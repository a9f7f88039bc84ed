/**
 * The WAN profile (`--wan`): the server↔client hop crosses a slow, distant link made of real
 * kernel parts — two network namespaces joined by a veth pair, each end rate-shaped by tbf to
 * 100 Mbit/s — plus bench/delay.ts holding every chunk 20 ms each way (40 ms round trip).
 *
 * The server, the delaying relay and the user (bench/wanuser.ts) live in namespace `a`
 * (10.203.0.1); the client and the target services in namespace `b` (10.203.0.2). "direct" is
 * the user reaching the targets across the same link and relay:
 *
 *   natadm: user → server ─(TLS)→ relay(20 ms) ⇄ veth ⇄ client → target
 *   direct: user → relay(20 ms) ⇄ veth ⇄ target
 *
 * Each figure is the mean of two runs per path in ABBA order (direct, natadm, natadm, direct).
 * @module
 */
import { clientToml, type Fixture, freePort, ROOT, serverToml } from "../tests/helpers.ts";
import type { Context } from "./cases.ts";
import { fmt } from "./cases.ts";
import { linkedPair, type NetNs, netnsUnavailable, PAIR_ADDR, removeStale } from "./netns.ts";
import { Proc, stopTracked, track } from "./proc.ts";
import type { SysId, TargetPorts } from "./systems.ts";

/** The two paths compared across the link. */
type WanPath = Extract<SysId, "direct" | "natadm">;

/** One-way delay added by the relay, ms. */
export const WAN_DELAY_MS = 20;
/** Rate of the link each way. */
export const WAN_RATE = "100mbit";

const DENO = Deno.execPath();
const here = (file: string) => new URL(file, import.meta.url).pathname;

/** Runs the WAN profile's cases; records wan_* figures for direct and natadm. */
export async function wan(ctx: Context, fixture: Fixture): Promise<void> {
  ctx.log(
    `[wan] link: ${WAN_RATE} each way (tbf on a veth pair), ${2 * WAN_DELAY_MS} ms round trip`,
  );
  const why = await netnsUnavailable();
  if (why) {
    ctx.rec.notes.push(`WAN profile skipped: ${why}`);
    ctx.log(`  skipped: ${why}`);
    return;
  }
  await removeStale();
  const procs: Proc[] = [];
  let pair: { a: NetNs; b: NetNs } | undefined;
  const start = (name: string, ns: NetNs, args: string[], keepStdin = false) => {
    const [c, a] = ns.wrap(DENO, args);
    const p = track(new Proc(name, c, a, { keepStdin }));
    procs.push(p);
    return p;
  };
  try {
    pair = await linkedPair({ rate: WAN_RATE });
    const { a, b } = pair;
    const targets = start(
      "wan targets",
      b,
      ["run", "--allow-net", here("./target.ts"), "--host", "0.0.0.0"],
      true,
    );
    const tp = JSON.parse(await targets.waitFor(/^\{"echo"/)) as TargetPorts;
    const communicationPort = freePort();
    const names = ["echo", "sink", "source"] as const;
    const relay = start("wan delay relay", a, [
      "run",
      "--allow-net",
      here("./delay.ts"),
      "--delay",
      String(WAN_DELAY_MS),
      ...names.map((n) => `127.0.0.1:0=${PAIR_ADDR.b}:${tp[n]}`),
      `${PAIR_ADDR.a}:0=127.0.0.1:${communicationPort}`,
    ], true);
    const relayPorts = JSON.parse(await relay.waitFor(/^\[/)) as number[];
    const direct: TargetPorts = { echo: relayPorts[0], sink: relayPorts[1], source: relayPorts[2] };
    const natadm: TargetPorts = { echo: freePort(), sink: freePort(), source: freePort() };

    const identity = await fixture.identity("wan");
    const serverConfig = await fixture.write(
      "wan-server.toml",
      serverToml({
        communicationPort,
        clients: [identity],
        services: names.map((n) => ({ port: natadm[n], name: "wan", targetPort: tp[n] })),
      }),
    );
    const clientConfig = await fixture.write(
      "wan-client.toml",
      clientToml({
        identity,
        communicationPort: relayPorts[3],
        host: PAIR_ADDR.a,
        interval: 5,
      }),
    );
    const perms = ["run", "--allow-net", "--allow-read"];
    const server = start("wan server", a, [...perms, `${ROOT}server.ts`, "--config", serverConfig]);
    await server.waitFor(/NATadm server ready/);
    const client = start("wan client", b, [...perms, `${ROOT}client.ts`, "--config", clientConfig]);
    await client.waitFor(/connected to .* as/, 30_000);

    const user = async (task: string, front: TargetPorts, extra: string[] = []) => {
      const p = start(`wan user ${task}`, a, [
        "run",
        "-A",
        here("./wanuser.ts"),
        "--task",
        task,
        "--front",
        JSON.stringify(front),
        ...extra,
      ]);
      try {
        const status = await p.status;
        const line = p.lines.find((l) => l.startsWith("{"));
        if (!status.success || !line) throw new Error(`wanuser ${task} failed: ${p.tail(3)}`);
        return JSON.parse(line) as Record<string, number>;
      } finally {
        await stopTracked(p);
      }
    };
    await user("wait", natadm);
    await user("wait", direct);

    const q = ctx.params.quick;
    const seconds = q ? 3 : 8;
    const fronts: Record<WanPath, TargetPorts> = { direct, natadm };
    // The VM's host disturbs the link now and then for seconds at a time: each figure is the mean
    // of two runs per path in ABBA order, so a disturbance falls on both paths alike.
    const abba = async (
      what: string,
      measure: (front: TargetPorts) => Promise<Record<string, number>>,
      record: (id: WanPath, runs: Record<string, number>[]) => void,
    ) => {
      try {
        const runs: Record<WanPath, Record<string, number>[]> = { direct: [], natadm: [] };
        for (const id of ["direct", "natadm", "natadm", "direct"] as const) {
          runs[id].push(await measure(fronts[id]));
          if (server.exited || client.exited) {
            throw new Error(`NATadm died: ${server.exited ? server.tail(4) : client.tail(4)}`);
          }
        }
        for (const id of ["direct", "natadm"] as const) record(id, runs[id]);
      } catch (err) {
        ctx.rec.errors.push(`wan, ${what}: ${(err as Error).message.split("\n")[0]}`);
        ctx.log(`  ERROR wan, ${what}: ${(err as Error).message}`);
      }
    };
    const mean = (runs: Record<string, number>[], key: string) =>
      runs.reduce((sum, r) => sum + r[key], 0) / runs.length;

    await abba(
      "first byte",
      (front) => user("firstbyte", front, ["--count", q ? "20" : "100"]),
      (id, runs) => {
        const [p50, p99] = [mean(runs, "p50"), mean(runs, "p99")];
        ctx.rec.set("wan_fb_p50", id, p50);
        ctx.rec.set("wan_fb_p99", id, p99);
        ctx.rec.detail("wan_first_byte", id, { p50, p99, runs });
        ctx.log(`  first byte   ${id.padEnd(8)} p50 ${fmt(p50)} ms  p99 ${fmt(p99)} ms`);
      },
    );
    for (const [key, reverse] of [["up", false], ["down", true]] as const) {
      const extra = ["--seconds", String(seconds), ...(reverse ? ["--reverse"] : [])];
      await abba(`bulk ${key}`, (front) => user("bulk", front, extra), (id, runs) => {
        const mbps = mean(runs, "mbps");
        ctx.rec.set(`wan_${key}`, id, mbps);
        ctx.rec.detail(`wan_bulk_${key}`, id, { mbps, runs: runs.map((r) => r.mbps) });
        ctx.log(`  bulk ${key.padEnd(4)}    ${id.padEnd(8)} ${fmt(mbps, 2)} MB/s`);
      });
      await abba(`RTT during bulk ${key}`, (front) => user("fair", front, extra), (id, runs) => {
        const [p50, p99, mbps] = [mean(runs, "p50"), mean(runs, "p99"), mean(runs, "mbps")];
        ctx.rec.set(`wan_fair_${key}_p99`, id, p99);
        ctx.rec.detail(`wan_fair_${key}`, id, { p50, p99, mbps, runs });
        ctx.log(
          `  RTT during bulk ${key.padEnd(4)} ${id.padEnd(8)} p50 ${fmt(p50)} ms  p99 ${
            fmt(p99)
          } ms  (bulk ${fmt(mbps, 2)} MB/s)`,
        );
      });
    }
    ctx.rec.detail("wan_link", "natadm", {
      rate: WAN_RATE,
      delayEachWayMs: WAN_DELAY_MS,
      addresses: PAIR_ADDR,
    });
  } catch (err) {
    ctx.rec.errors.push(`wan: ${(err as Error).message.split("\n")[0]}`);
    ctx.log(`  ERROR wan: ${(err as Error).message}`);
  } finally {
    for (const p of procs.reverse()) await stopTracked(p);
    await stopTracked(pair?.a);
    await stopTracked(pair?.b);
  }
}
