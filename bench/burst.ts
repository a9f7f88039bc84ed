/**
 * Case: a burst of users at one service of one connected client. All of them are TCP-connected
 * to the public port before any of them sends; then each echoes its own 64 KiB at once. Counts
 * the byte-exact echoes and the public side's RSS per live tunnel (peak − before, ÷ users).
 * @module
 */
import type { Context } from "./cases.ts";
import { connect, readFull, safeClose, sameBytes, withDeadline, writeAll } from "./net.ts";
import { rssOf } from "./proc.ts";
import type { System } from "./systems.ts";

/** Bytes each user echoes. */
const BYTES = 64 * 1024;
/** How long one user may take, from its first write to its last byte back. */
const USER_DEADLINE_MS = 60_000;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Case: `users` users connect at once, then each echoes 64 KiB. */
export async function burst(ctx: Context, users: number): Promise<void> {
  ctx.log(`[burst] ${users} users connect at once to one service, then each echoes 64 KiB`);
  const payloads = Array.from({ length: users }, () => {
    const p = new Uint8Array(BYTES);
    crypto.getRandomValues(p.subarray(0, 65_536));
    return p;
  });
  for (const sys of ctx.systems.filter((s) => !s.skip && s.id !== "stunnel")) {
    try {
      await burstOne(ctx, sys, users, payloads);
    } catch (err) {
      ctx.rec.errors.push(`burst, ${sys.id}: ${(err as Error).message.split("\n")[0]}`);
      ctx.log(`  ERROR burst, ${sys.id}: ${(err as Error).message}`);
    }
    ctx.tidy();
    await sleep(ctx.params.quick ? 300 : 1000);
  }
}

async function burstOne(
  ctx: Context,
  sys: System,
  users: number,
  payloads: Uint8Array[],
): Promise<void> {
  const pub = sys.roles().pub;
  const before = rssOf(pub);
  let peak = before;
  const sampler = setInterval(() => peak = Math.max(peak, rssOf(pub)), 20);
  const conns: (Deno.TcpConn | undefined)[] = new Array(users);
  const openProblems: string[] = [];
  try {
    const opening = performance.now();
    await Promise.all(payloads.map(async (_, i) => {
      try {
        conns[i] = await connect(sys.front.echo, 20_000);
      } catch (err) {
        openProblems.push((err as Error).message);
      }
    }));
    const openMs = performance.now() - opening;
    const started = performance.now();
    const results = await Promise.all(conns.map(async (conn, i) => {
      if (!conn) return "could not connect";
      try {
        return await withDeadline(conn, USER_DEADLINE_MS, async () => {
          const back = new Uint8Array(BYTES);
          const reading = readFull(conn, back);
          await writeAll(conn, payloads[i]);
          await reading;
          return sameBytes(back, payloads[i]) ? "ok" : "bytes differ";
        });
      } catch (err) {
        return (err as Error).message.replace(/\d+ of/, "N of");
      }
    }));
    const echoMs = performance.now() - started;
    peak = Math.max(peak, rssOf(pub));
    const ok = results.filter((r) => r === "ok").length;
    const problems = new Map<string, number>();
    for (const r of results) if (r !== "ok") problems.set(r, (problems.get(r) ?? 0) + 1);
    ctx.rec.set("burst_ok", sys.id, ok);
    ctx.rec.set("burst_ms", sys.id, echoMs);
    const record: Record<string, unknown> = {
      users,
      ok,
      connectFailures: openProblems.length,
      problems: Object.fromEntries([...problems].slice(0, 5)),
      connectMs: openMs,
      echoMs,
    };
    if (pub.length > 0) {
      const per = (peak - before) / users;
      ctx.rec.set("burst_pub_per", sys.id, per);
      Object.assign(record, {
        pubPids: pub,
        rssBeforeKiB: before,
        rssPeakKiB: peak,
        perTunnelKiB: per,
      });
    }
    ctx.rec.detail("burst", sys.id, record);
    ctx.log(
      `  ${sys.id.padEnd(8)} ${ok}/${users} exact in ${echoMs.toFixed(0)} ms (all connected in ` +
        `${openMs.toFixed(0)} ms)` +
        (pub.length ? `; public side +${((peak - before) / users).toFixed(1)} KiB per tunnel` : ""),
    );
    if (problems.size) {
      ctx.log(
        `    problems: ${[...problems].slice(0, 3).map(([p, c]) => `${c}× ${p}`).join("; ")}`,
      );
    }
  } finally {
    clearInterval(sampler);
    conns.forEach(safeClose);
  }
}
