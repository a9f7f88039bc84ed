/**
 * Case: interactive 1-byte round trips on one tunnel while a bulk transfer runs through another
 * tunnel of the same client (for NATadm: another service of the same client; for ssh -R:
 * another forward of the same session), in each direction. Reports the round trips' p50/p99.
 * @module
 */
import {
  builtinDownload,
  builtinUpload,
  type Context,
  fmt,
  iperf,
  latencyStats,
  ONE,
  pingPong,
} from "./cases.ts";
import { connect, readFull, safeClose, withDeadline } from "./net.ts";
import type { System, TargetPorts } from "./systems.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The two directions of the bulk transfer. */
export const FAIRNESS_RUNS = [
  { key: "fair_up", reverse: false, what: "bulk user→service" },
  { key: "fair_down", reverse: true, what: "bulk service→user" },
] as const;

/**
 * Runs a bulk transfer through `front` on `host` for `seconds` (iperf3 if given, else
 * built-in); returns MB/s.
 */
export function bulk(
  front: TargetPorts,
  seconds: number,
  reverse: boolean,
  iperfPath: string | undefined,
  host = "127.0.0.1",
): Promise<number> {
  if (iperfPath && front.iperf) return iperf(iperfPath, front.iperf, seconds, reverse, 1, host);
  return reverse
    ? builtinDownload(front.source, seconds, 1, host)
    : builtinUpload(front.sink, seconds, 1, host);
}

/** 1-byte round trips on `conn` until `until` (performance.now()); each one's milliseconds. */
export async function pingUntil(conn: Deno.TcpConn, until: number): Promise<number[]> {
  const out: number[] = [];
  const back = new Uint8Array(1);
  await withDeadline(conn, until - performance.now() + 30_000, async () => {
    while (performance.now() < until && out.length < 1_000_000) {
      const start = performance.now();
      await conn.write(ONE);
      await readFull(conn, back);
      out.push(performance.now() - start);
    }
  });
  return out;
}

/** Round trips on the echo tunnel while a bulk transfer runs through the same system. */
export async function duringBulk(
  front: TargetPorts,
  seconds: number,
  reverse: boolean,
  iperfPath: string | undefined,
): Promise<{ samples: number[]; mbps: number }> {
  const conn = await connect(front.echo);
  try {
    await pingPong(conn, 50); // the tunnel is set up and warm before anything is timed
    const transfer = bulk(front, seconds, reverse, iperfPath);
    // Let the transfer get up to speed; stop before it winds down.
    await sleep(Math.min(500, seconds * 200));
    const samples = await pingUntil(conn, performance.now() + seconds * 1000 * 0.7);
    const mbps = await transfer;
    return { samples, mbps };
  } finally {
    safeClose(conn);
  }
}

/** Case: interactive round trips during a bulk transfer, both directions, every system. */
export async function fairness(ctx: Context, seconds: number): Promise<void> {
  ctx.log(`[fairness] 1-byte round trips during a ${seconds} s bulk transfer on another tunnel`);
  const iperfPath = ctx.params.builtin ? undefined : ctx.iperfPath;
  for (const run of FAIRNESS_RUNS) {
    for (const sys of ctx.systems.filter((s: System) => !s.skip)) {
      try {
        const { samples, mbps } = await duringBulk(sys.front, seconds, run.reverse, iperfPath);
        const s = latencyStats(samples);
        ctx.rec.set(`${run.key}_p50`, sys.id, s.p50);
        ctx.rec.set(`${run.key}_p99`, sys.id, s.p99);
        ctx.rec.detail(run.key, sys.id, { ...s, bulkMBps: mbps });
        ctx.log(
          `  ${run.what.padEnd(18)} ${sys.id.padEnd(8)} p50 ${fmt(s.p50)} ms  p99 ${
            fmt(s.p99)
          } ms` +
            `  (n=${s.n}, bulk ${fmt(mbps, 1)} MB/s)`,
        );
      } catch (err) {
        ctx.rec.errors.push(
          `fairness ${run.what}, ${sys.id}: ${(err as Error).message.split("\n")[0]}`,
        );
        ctx.log(`  ERROR fairness ${run.what}, ${sys.id}: ${(err as Error).message}`);
        if (iperfPath) await ctx.targets.startIperf().catch(() => {});
      }
      ctx.tidy();
      await sleep(ctx.params.quick ? 100 : 300);
    }
  }
}
