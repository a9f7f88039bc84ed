/**
 * The six benchmark cases. Each runs every measured system in turn (rotating the order between
 * rounds so no system always goes first), records one figure per metric and system, and keeps
 * going when one system fails: the failure is recorded and shown under the table.
 * @module
 */
import type { NatadmSystem, SysId, System, Targets } from "./systems.ts";
import {
  connect,
  CountingRelay,
  readFull,
  safeClose,
  sameBytes,
  withDeadline,
  writeAll,
} from "./net.ts";
import { memory, rssOf, stopTracked } from "./proc.ts";

/** How long and how many, per case. */
export interface Params {
  quick: boolean;
  /** Seconds per throughput run. */
  throughputSeconds: number;
  /** Fresh connections for first-byte latency, per system (and through NATadm's `forward`). */
  firstByte: number;
  /** `connect` processes spawned one after another, each timed to its first echoed byte. */
  connectSpawns: number;
  /** Round trips for interactive latency, per system. */
  roundTrips: number;
  /** Seconds of the connection-rate run, per system. */
  rateSeconds: number;
  /** Parallel workers of the connection-rate run. */
  rateWorkers: number;
  /** Simultaneous tunnels of the concurrency case. */
  tunnels: number;
  /** Bytes each of those tunnels echoes. */
  tunnelBytes: number;
  /** Seconds the idle control connection is watched. */
  idleSeconds: number;
  /** Sample-based cases are split into this many rounds, alternating the systems. */
  rounds: number;
  /** Idle client identities of the fleet case (`--fleet N`). */
  fleet: number;
  /** Users arriving at once in the burst case. */
  burst: number;
  /** Seconds of each bulk transfer the fairness case times round trips during. */
  fairSeconds: number;
  /** Seconds of each HTTP load run. */
  httpSeconds: number;
  /** Use the built-in generator/sink even when iperf3 is installed. */
  builtin: boolean;
}

export const FULL: Omit<Params, "builtin"> = {
  quick: false,
  throughputSeconds: 5,
  firstByte: 500,
  connectSpawns: 100,
  roundTrips: 5000,
  rateSeconds: 5,
  rateWorkers: 32,
  tunnels: 1000,
  tunnelBytes: 64 * 1024,
  idleSeconds: 20,
  rounds: 5,
  fleet: 1000,
  burst: 1000,
  fairSeconds: 5,
  httpSeconds: 5,
};

export const QUICK: Omit<Params, "builtin"> = {
  quick: true,
  throughputSeconds: 1,
  firstByte: 50,
  connectSpawns: 20,
  roundTrips: 500,
  rateSeconds: 1,
  rateWorkers: 32,
  tunnels: 100,
  tunnelBytes: 64 * 1024,
  idleSeconds: 5,
  rounds: 5,
  fleet: 100,
  burst: 200,
  fairSeconds: 2,
  httpSeconds: 2,
};

/** Figures by metric and system, plus errors and raw details for the JSON file. */
export class Recorder {
  values: Record<string, Partial<Record<SysId, number>>> = {};
  errors: string[] = [];
  notes: string[] = [];
  details: Record<string, unknown> = {};

  set(key: string, sys: SysId, value: number): void {
    (this.values[key] ??= {})[sys] = value;
  }

  get(key: string, sys: SysId): number | undefined {
    return this.values[key]?.[sys];
  }

  detail(key: string, sys: SysId, value: unknown): void {
    ((this.details[key] ??= {}) as Record<string, unknown>)[sys] = value;
  }
}

/** What every case gets. */
export interface Context {
  systems: System[];
  targets: Targets;
  params: Params;
  rec: Recorder;
  iperfPath?: string;
  log: (line: string) => void;
  /** Called between systems: drop collected log lines and such. */
  tidy: () => void;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function measured(ctx: Context): System[] {
  return ctx.systems.filter((s) => !s.skip);
}

/** The measured systems, rotated by `round` so that the order alternates. */
function order(ctx: Context, round: number): System[] {
  const list = measured(ctx);
  const k = list.length ? round % list.length : 0;
  return [...list.slice(k), ...list.slice(0, k)];
}

/**
 * Runs `fn` for each system of round `round`; records a failure instead of throwing. If one
 * of the system's processes died meanwhile, records that, restarts the system and runs `fn`
 * once more, so one crash does not empty the rest of the table.
 */
async function forEach(
  ctx: Context,
  round: number,
  what: string,
  fn: (sys: System) => Promise<void>,
): Promise<void> {
  for (const sys of order(ctx, round)) {
    for (let attempt = 1; attempt <= 2; attempt++) {
      let failure: string | undefined;
      try {
        await fn(sys);
      } catch (err) {
        failure = `${what}, ${sys.id}: ${(err as Error).message.split("\n")[0]}`;
      }
      const broken = sys.health();
      if (!broken) {
        if (failure) {
          ctx.rec.errors.push(failure);
          ctx.log(`  ERROR ${failure}`);
          for (const line of sys.recentProblems?.() ?? []) {
            ctx.rec.errors.push(`  ${sys.id} ${line}`);
            ctx.log(`    ${line}`);
          }
        }
        break;
      }
      ctx.rec.errors.push(`${what}, ${sys.id}: ${broken}`);
      ctx.log(`  CRASH ${sys.id}: ${broken}; restarting it`);
      await sys.stop().catch(() => {});
      try {
        await sys.start();
      } catch (err) {
        const reason = `restart failed: ${(err as Error).message.split("\n")[0]}`;
        (sys as { skip?: string }).skip = reason;
        ctx.rec.errors.push(`${sys.id}: ${reason}`);
        break;
      }
      if (attempt === 1) ctx.log(`  retrying ${what} on ${sys.id}`);
    }
    ctx.tidy();
    await sleep(ctx.params.quick ? 100 : 300);
  }
}

/** The value at percentile `p` (0–100) of ascending `sorted`. */
export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}

export function fmt(n: number, digits = 3): string {
  return Number.isFinite(n) ? n.toFixed(digits) : String(n);
}

// ---------------------------------------------------------------------------------------------
// Warm-up

/** A few fresh connections and round trips through every system, so JITs and caches are warm. */
export async function warmUp(ctx: Context): Promise<void> {
  const conns = ctx.params.quick ? 20 : 100;
  await forEach(ctx, 0, "warm-up", async (sys) => {
    for (let i = 0; i < conns; i++) await firstByte(sys.front.echo);
    if (sys.forwardEcho) { for (let i = 0; i < conns; i++) await firstByte(sys.forwardEcho); }
    const conn = await connect(sys.front.echo);
    try {
      await pingPong(conn, conns * 5);
    } finally {
      safeClose(conn);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// 1. Bulk throughput

interface IperfJson {
  error?: string;
  end?: { sum_received?: { bits_per_second?: number } };
}

/** One iperf3 client run against `host`:`port`; returns the received MB/s. */
export async function iperf(
  path: string,
  port: number,
  seconds: number,
  reverse: boolean,
  streams: number,
  host = "127.0.0.1",
): Promise<number> {
  const args = ["-c", host, "-p", String(port), "-t", String(seconds), "-J"];
  args.push("--connect-timeout", "5000");
  if (reverse) args.push("-R");
  if (streams > 1) args.push("-P", String(streams));
  const out = await new Deno.Command(path, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout((seconds + 30) * 1000),
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  let json: IperfJson;
  try {
    json = JSON.parse(text) as IperfJson;
  } catch {
    const err = new TextDecoder().decode(out.stderr).trim();
    throw new Error(`iperf3 exited with ${out.code} without JSON: ${err || text.slice(0, 200)}`);
  }
  if (json.error) throw new Error(`iperf3: ${json.error}`);
  const bps = json.end?.sum_received?.bits_per_second;
  if (typeof bps !== "number") throw new Error("iperf3 JSON has no end.sum_received");
  return bps / 8 / 1e6;
}

/** Built-in upload: write for `seconds` into the sink, half-close, wait until it hangs up. */
export async function builtinUpload(
  port: number,
  seconds: number,
  streams: number,
  host = "127.0.0.1",
): Promise<number> {
  const chunk = new Uint8Array(256 * 1024);
  for (let i = 0; i < chunk.length; i += 65_536) {
    crypto.getRandomValues(chunk.subarray(i, i + 65_536));
  }
  const start = performance.now();
  const end = start + seconds * 1000;
  const sent = await Promise.all(
    Array.from({ length: streams }, async () => {
      const conn = await connect(port, 10_000, host);
      try {
        return await withDeadline(conn, seconds * 1000 + 30_000, async () => {
          let bytes = 0;
          while (performance.now() < end) {
            await writeAll(conn, chunk);
            bytes += chunk.length;
          }
          await conn.closeWrite();
          const scratch = new Uint8Array(1024);
          for (let i = 0; i < 1000; i++) if (await conn.read(scratch) === null) break;
          return bytes;
        });
      } finally {
        safeClose(conn);
      }
    }),
  );
  const total = sent.reduce((a, b) => a + b, 0);
  return total / ((performance.now() - start) / 1000) / 1e6;
}

/** Built-in download: read from the source for `seconds`. */
export async function builtinDownload(
  port: number,
  seconds: number,
  streams: number,
  host = "127.0.0.1",
): Promise<number> {
  const start = performance.now();
  const end = start + seconds * 1000;
  const got = await Promise.all(
    Array.from({ length: streams }, async () => {
      const conn = await connect(port, 10_000, host);
      try {
        return await withDeadline(conn, seconds * 1000 + 30_000, async () => {
          const buf = new Uint8Array(256 * 1024);
          let bytes = 0;
          while (performance.now() < end) {
            const n = await conn.read(buf);
            if (n === null) throw new Error("source ended early");
            bytes += n;
          }
          return bytes;
        });
      } finally {
        safeClose(conn);
      }
    }),
  );
  const total = got.reduce((a, b) => a + b, 0);
  return total / ((performance.now() - start) / 1000) / 1e6;
}

export const THROUGHPUT_RUNS = [
  { key: "up1", reverse: false, streams: 1, what: "upload, 1 stream" },
  { key: "down1", reverse: true, streams: 1, what: "download, 1 stream" },
  { key: "up4", reverse: false, streams: 4, what: "upload, 4 streams" },
  { key: "down4", reverse: true, streams: 4, what: "download, 4 streams" },
] as const;

/** Case 1: MB/s each direction, 1 and 4 streams. */
export async function throughput(ctx: Context): Promise<void> {
  const { throughputSeconds: seconds } = ctx.params;
  const useIperf = !!ctx.iperfPath && !ctx.params.builtin && !!ctx.targets.ports.iperf;
  ctx.log(`[1/6] bulk throughput, ${seconds} s per run (${useIperf ? "iperf3" : "built-in"})`);
  let round = 0;
  for (const t of THROUGHPUT_RUNS) {
    await forEach(ctx, round++, `throughput ${t.what}`, async (sys) => {
      let value: number;
      if (useIperf) {
        try {
          value = await iperf(ctx.iperfPath!, sys.front.iperf!, seconds, t.reverse, t.streams);
        } catch (err) {
          // A failed test can leave iperf3 -s waiting on it: restart it and try once more.
          ctx.log(`  retrying ${sys.id} ${t.what} after: ${(err as Error).message}`);
          await ctx.targets.startIperf();
          value = await iperf(ctx.iperfPath!, sys.front.iperf!, seconds, t.reverse, t.streams);
        }
      } else {
        value = t.reverse
          ? await builtinDownload(sys.front.source, seconds, t.streams)
          : await builtinUpload(sys.front.sink, seconds, t.streams);
      }
      ctx.rec.set(t.key, sys.id, value);
      ctx.log(`  ${t.what.padEnd(20)} ${sys.id.padEnd(8)} ${fmt(value, 1)} MB/s`);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// 2. First-byte latency

export const ONE = new Uint8Array([0x2a]);

/** Fresh connection to `host`:`port`, 1 byte out, its echo back; returns milliseconds. */
export async function firstByte(port: number, host = "127.0.0.1"): Promise<number> {
  const start = performance.now();
  const conn = await connect(port, 10_000, host);
  try {
    const back = new Uint8Array(1);
    await withDeadline(conn, 10_000, async () => {
      await conn.write(ONE);
      await readFull(conn, back);
    });
    return performance.now() - start;
  } finally {
    safeClose(conn);
  }
}

export function latencyStats(
  samples: number[],
): { p50: number; p90: number; p99: number; n: number } {
  const sorted = [...samples].sort((a, b) => a - b);
  return {
    p50: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    p99: percentile(sorted, 99),
    n: sorted.length,
  };
}

/**
 * Takes up to `n` first-byte samples through `host`:`port` into `list`, counting failures in
 * `failures`; throws once more than a tenth of `n` failed.
 */
export async function sampleFirstBytes(
  port: number,
  n: number,
  list: number[],
  failures: { count: number },
  host = "127.0.0.1",
): Promise<void> {
  let failed = 0;
  for (let i = 0; i < n; i++) {
    try {
      list.push(await firstByte(port, host));
    } catch (err) {
      failures.count++;
      if (++failed > n / 10) {
        throw new Error(`${failed} failed connections, the last: ${(err as Error).message}`);
      }
    }
  }
}

/**
 * Case 2: p50/p90/p99 of connect + 1-byte echo over fresh connections; for NATadm also through
 * a user's `forward`, in the same rounds (which path goes first alternates by round).
 */
export async function firstByteLatency(ctx: Context): Promise<void> {
  const { firstByte: total, rounds } = ctx.params;
  ctx.log(`[2/6] first-byte latency, ${total} fresh connections per system`);
  const samples = new Map<SysId, number[]>();
  const failures = new Map<SysId, { count: number }>();
  const forwarded: number[] = [];
  const forwardFailures = { count: 0 };
  const perRound = Math.ceil(total / rounds);
  for (let round = 0; round < rounds; round++) {
    await forEach(ctx, round, "first-byte latency", async (sys) => {
      const list = samples.get(sys.id) ?? [];
      samples.set(sys.id, list);
      const failed = failures.get(sys.id) ?? { count: 0 };
      failures.set(sys.id, failed);
      const viaPublic = () =>
        sampleFirstBytes(sys.front.echo, Math.min(perRound, total - list.length), list, failed);
      const viaForward = async () => {
        if (!sys.forwardEcho) return;
        const n = Math.min(perRound, total - forwarded.length);
        await sampleFirstBytes(sys.forwardEcho, n, forwarded, forwardFailures).catch((err) => {
          throw new Error(`through forward: ${(err as Error).message}`);
        });
      };
      if (round % 2 === 0) {
        await viaPublic();
        await viaForward();
      } else {
        await viaForward();
        await viaPublic();
      }
    });
  }
  for (const [id, list] of samples) {
    const s = latencyStats(list);
    ctx.rec.set("fb_p50", id, s.p50);
    ctx.rec.set("fb_p90", id, s.p90);
    ctx.rec.set("fb_p99", id, s.p99);
    ctx.rec.detail("first_byte", id, { ...s, failures: failures.get(id)?.count ?? 0 });
    ctx.log(
      `  ${id.padEnd(8)} p50 ${fmt(s.p50)} ms  p90 ${fmt(s.p90)} ms  p99 ${
        fmt(s.p99)
      } ms  (n=${s.n})`,
    );
  }
  if (forwarded.length > 0) {
    const s = latencyStats(forwarded);
    ctx.rec.set("fwd_fb_p50", "natadm", s.p50);
    ctx.rec.set("fwd_fb_p90", "natadm", s.p90);
    ctx.rec.set("fwd_fb_p99", "natadm", s.p99);
    ctx.rec.detail("first_byte_forward", "natadm", { ...s, failures: forwardFailures.count });
    ctx.log(
      `  forward  p50 ${fmt(s.p50)} ms  p90 ${fmt(s.p90)} ms  p99 ${fmt(s.p99)} ms  (n=${s.n})`,
    );
  }
}

/** Reads until `buf` is full or the stream ends; returns how many bytes arrived. */
async function readSome(reader: ReadableStreamDefaultReader<Uint8Array>, buf: Uint8Array) {
  let got = 0;
  while (got < buf.length) {
    const { value, done } = await reader.read();
    if (done) break;
    const take = Math.min(value.length, buf.length - got);
    buf.set(value.subarray(0, take), got);
    got += take;
  }
  return got;
}

/** The first `max` characters of a stream, then the rest discarded. */
async function head(stream: ReadableStream<Uint8Array>, max = 2000): Promise<string> {
  let text = "";
  const decoder = new TextDecoder();
  for await (const chunk of stream) {
    if (text.length < max) text += decoder.decode(chunk, { stream: true });
  }
  return text.slice(0, max);
}

/**
 * One `connect` process (from {@link NatadmSystem.spawnConnect}): 1 byte written to its stdin
 * at once, timed from the spawn to its echo on stdout; then stdin is closed and the process
 * must exit 0 on its own. Returns milliseconds.
 */
export async function connectOnce(spawn: () => Deno.ChildProcess): Promise<number> {
  const start = performance.now();
  const child = spawn();
  const stderr = head(child.stderr);
  const stdout = child.stdout.getReader();
  const writer = child.stdin.getWriter();
  const timer = setTimeout(() => child.kill("SIGKILL"), 20_000);
  try {
    await writer.write(ONE);
    const back = new Uint8Array(1);
    const got = await readSome(stdout, back);
    const ms = performance.now() - start;
    await writer.close();
    const more = await readSome(stdout, new Uint8Array(1));
    const status = await child.status;
    if (got !== 1 || back[0] !== ONE[0] || more !== 0 || status.code !== 0) {
      const why = (await stderr).trim().split("\n").at(-1) ?? "";
      throw new Error(
        `connect: ${got === 1 ? "echo" : "no echo"}, exit ${status.code}${
          status.signal ? ` (${status.signal})` : ""
        }${why ? `: ${why}` : ""}`,
      );
    }
    return ms;
  } finally {
    clearTimeout(timer);
    try {
      child.kill("SIGKILL");
    } catch {
      // already exited
    }
    await child.status;
    await writer.close().catch(() => {});
    await stdout.cancel().catch(() => {});
    await stderr.catch(() => "");
  }
}

/**
 * NATadm only: `connect` spawned N times one after another, each timed from spawn to its first
 * echoed byte (process start-up and login included, as an ssh `ProxyCommand` sees it).
 */
export async function connectSpawnLatency(ctx: Context, natadm: NatadmSystem): Promise<void> {
  const { connectSpawns: n } = ctx.params;
  if (natadm.skip || n <= 0) return;
  ctx.log(`  connect: ${n} processes spawned one after another, spawn to first echoed byte`);
  const spawn = () => natadm.spawnConnect();
  const list: number[] = [];
  let failed = 0;
  await forEach({ ...ctx, systems: [natadm] }, 0, "connect spawn latency", async () => {
    await connectOnce(spawn); // the first start fills caches: not counted
    while (list.length < n) {
      try {
        list.push(await connectOnce(spawn));
      } catch (err) {
        if (++failed > n / 10) {
          throw new Error(`${failed} failed connects, the last: ${(err as Error).message}`);
        }
      }
    }
  });
  if (list.length === 0) return;
  const s = latencyStats(list);
  ctx.rec.set("connect_fb_p50", "natadm", s.p50);
  ctx.rec.detail("connect_spawn", "natadm", { ...s, failures: failed });
  ctx.log(`  connect  p50 ${fmt(s.p50, 1)} ms  p90 ${fmt(s.p90, 1)} ms  (n=${s.n})`);
}

// ---------------------------------------------------------------------------------------------
// 3. Interactive latency

/** `n` 1-byte round trips on `conn`; returns each one's milliseconds. */
export async function pingPong(conn: Deno.TcpConn, n: number): Promise<number[]> {
  const out: number[] = [];
  const back = new Uint8Array(1);
  await withDeadline(conn, 60_000, async () => {
    for (let i = 0; i < n; i++) {
      const start = performance.now();
      await conn.write(ONE);
      await readFull(conn, back);
      out.push(performance.now() - start);
    }
  });
  return out;
}

/** Case 3: 1-byte ping-pong on one established tunnel per system. */
export async function interactiveLatency(ctx: Context): Promise<void> {
  const { roundTrips: total, rounds } = ctx.params;
  ctx.log(`[3/6] interactive latency, ${total} round trips on one tunnel per system`);
  const conns = new Map<SysId, Deno.TcpConn>();
  const samples = new Map<SysId, number[]>();
  /** The system's established tunnel; opened (and warmed) on first use or after a failure. */
  const tunnel = async (sys: System) => {
    let conn = conns.get(sys.id);
    if (!conn) {
      conn = await connect(sys.front.echo);
      conns.set(sys.id, conn);
      await pingPong(conn, 200);
    }
    return conn;
  };
  try {
    await forEach(ctx, 0, "interactive latency (connect)", async (sys) => {
      await tunnel(sys);
    });
    const perRound = Math.ceil(total / rounds);
    for (let round = 0; round < rounds; round++) {
      await forEach(ctx, round, "interactive latency", async (sys) => {
        const conn = await tunnel(sys);
        const list = samples.get(sys.id) ?? [];
        samples.set(sys.id, list);
        try {
          list.push(...await pingPong(conn, Math.min(perRound, total - list.length)));
        } catch (err) {
          safeClose(conn);
          conns.delete(sys.id);
          throw err;
        }
      });
    }
  } finally {
    for (const conn of conns.values()) safeClose(conn);
  }
  for (const [id, list] of samples) {
    const s = latencyStats(list);
    ctx.rec.set("rtt_p50", id, s.p50);
    ctx.rec.set("rtt_p99", id, s.p99);
    ctx.rec.detail("interactive", id, s);
    ctx.log(`  ${id.padEnd(8)} p50 ${fmt(s.p50)} ms  p99 ${fmt(s.p99)} ms  (n=${s.n})`);
  }
}

// ---------------------------------------------------------------------------------------------
// 4. Connection rate

/** What one connection-rate run counted. */
interface RateRun {
  ok: number;
  failed: number;
  wrong: number;
  seconds: number;
  /** Why connections failed: each error message (digits as N) and how often. */
  errors: Record<string, number>;
}

/** `workers` loops of connect, write `request`, read it back, close, on `port` for `seconds`. */
async function rateRun(
  port: number,
  seconds: number,
  workers: number,
  request: Uint8Array,
): Promise<RateRun> {
  let ok = 0, failed = 0, wrong = 0;
  const errors: Record<string, number> = {};
  const start = performance.now();
  const end = start + seconds * 1000;
  await Promise.all(Array.from({ length: workers }, async () => {
    const reply = new Uint8Array(request.length);
    for (let i = 0; i < 1_000_000 && performance.now() < end; i++) {
      let conn: Deno.TcpConn | undefined;
      try {
        conn = await connect(port, 5000);
        const c = conn;
        await withDeadline(c, 5000, async () => {
          await writeAll(c, request);
          await readFull(c, reply);
        });
        if (sameBytes(request, reply)) ok++;
        else wrong++;
      } catch (err) {
        failed++;
        const why = String((err as Error)?.message ?? err).replace(/[0-9]+/g, "N").slice(0, 120);
        errors[why] = (errors[why] ?? 0) + 1;
        await sleep(5);
      } finally {
        safeClose(conn);
      }
    }
  }));
  return { ok, failed, wrong, seconds: (performance.now() - start) / 1000, errors };
}

/**
 * Case 4: workers doing connect, 1 KiB request, 1 KiB reply, close, for a fixed time; for
 * NATadm also through a user's `forward`, right after its public port.
 */
export async function connectionRate(ctx: Context): Promise<void> {
  const { rateSeconds: seconds, rateWorkers: workers } = ctx.params;
  ctx.log(`[4/6] connection rate, ${workers} workers for ${seconds} s per system`);
  const request = crypto.getRandomValues(new Uint8Array(1024));
  const record = (key: string, id: SysId, what: string, r: RateRun) => {
    const rate = r.ok / r.seconds;
    ctx.rec.set(key, id, rate);
    ctx.rec.set(`${key}_err`, id, r.failed + r.wrong);
    ctx.rec.detail(key === "rate" ? "connection_rate" : "connection_rate_forward", id, r);
    ctx.log(
      `  ${what.padEnd(8)} ${fmt(rate, 0)} conn/s  (${r.ok} ok, ${r.failed} failed, ${r.wrong} ` +
        "wrong)",
    );
    for (const [why, n] of Object.entries(r.errors)) ctx.log(`           ${n}× ${why}`);
  };
  await forEach(ctx, 0, "connection rate", async (sys) => {
    record("rate", sys.id, sys.id, await rateRun(sys.front.echo, seconds, workers, request));
    if (sys.forwardEcho) {
      await sleep(ctx.params.quick ? 100 : 300);
      record(
        "fwd_rate",
        sys.id,
        "forward",
        await rateRun(sys.forwardEcho, seconds, workers, request),
      );
    }
  });
}

// ---------------------------------------------------------------------------------------------
// 5. Concurrency

/** Samples the summed VmRSS of each role every few milliseconds and keeps the peak. */
class RssSampler {
  peakPub = 0;
  peakNat = 0;
  #timer: ReturnType<typeof setInterval>;

  constructor(readonly pub: number[], readonly nat: number[]) {
    this.sample();
    this.#timer = setInterval(() => this.sample(), 20);
  }

  sample(): void {
    this.peakPub = Math.max(this.peakPub, rssOf(this.pub));
    this.peakNat = Math.max(this.peakNat, rssOf(this.nat));
  }

  stop(): void {
    clearInterval(this.#timer);
    this.sample();
  }
}

/** Tunnels being opened at once in the concurrency case. */
const OPEN_WIDTH = 32;

/** Runs `fn` over 0..n-1 with at most `width` at a time. */
async function pool<T>(n: number, width: number, fn: (i: number) => Promise<T>): Promise<T[]> {
  const out: T[] = new Array(n);
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(width, n) }, async () => {
    while (next < n) {
      const i = next++;
      out[i] = await fn(i);
    }
  }));
  return out;
}

/** Case 5: N simultaneous tunnels, each echoing its own 64 KiB; RSS of both ends. */
export async function concurrency(ctx: Context): Promise<void> {
  const { tunnels: n, tunnelBytes } = ctx.params;
  ctx.log(`[5/6] concurrency: ${n} simultaneous tunnels, ${tunnelBytes / 1024} KiB echoed on each`);
  const payloads = Array.from({ length: n }, () => {
    const p = new Uint8Array(tunnelBytes);
    for (let i = 0; i < p.length; i += 65_536) crypto.getRandomValues(p.subarray(i, i + 65_536));
    return p;
  });
  await forEach(ctx, 0, "concurrency", async (sys) => {
    const roles = sys.roles();
    const idlePub = rssOf(roles.pub), idleNat = rssOf(roles.nat);
    const sampler = new RssSampler(roles.pub, roles.nat);
    const conns: (Deno.TcpConn | undefined)[] = new Array(n);
    const openProblems: string[] = [];
    const deadline = setTimeout(() => conns.forEach(safeClose), 180_000);
    try {
      // Open the tunnels OPEN_WIDTH at a time, each proven live by a 1-byte echo, so a burst
      // does not hit a server's limit on users waiting for their tunnel; then all echo at once.
      const opened = performance.now();
      await pool(n, OPEN_WIDTH, async (i) => {
        let conn: Deno.TcpConn | undefined;
        try {
          conn = await connect(sys.front.echo, 20_000);
          const c = conn;
          await withDeadline(c, 20_000, async () => {
            await c.write(ONE);
            await readFull(c, new Uint8Array(1));
          });
          conns[i] = conn;
        } catch (err) {
          safeClose(conn);
          openProblems.push((err as Error).message);
        }
      });
      const started = performance.now();
      const results = await Promise.all(conns.map(async (conn, i) => {
        if (!conn) return "could not open";
        try {
          const back = new Uint8Array(tunnelBytes);
          const reading = readFull(conn, back);
          await writeAll(conn, payloads[i]);
          await reading;
          return sameBytes(back, payloads[i]) ? "ok" : "bytes differ";
        } catch (err) {
          return (err as Error).message;
        }
      }));
      const echoMs = performance.now() - started;
      // Every tunnel is live here; hold them a moment so the sampler sees the plateau.
      await sleep(200);
      sampler.stop();
      const livePub = rssOf(roles.pub), liveNat = rssOf(roles.nat);
      const ok = results.filter((r) => r === "ok").length;
      const problems = [...new Set(results.filter((r) => r !== "ok"))].slice(0, 3);
      ctx.rec.set("conc_ok", sys.id, ok);
      ctx.rec.set("conc_open_ms", sys.id, started - opened);
      ctx.rec.set("conc_ms", sys.id, echoMs);
      const record: Record<string, unknown> = {
        tunnels: n,
        ok,
        openFailures: openProblems.length,
        openProblems: [...new Set(openProblems)].slice(0, 3),
        problems,
        openMs: started - opened,
        echoMs,
      };
      if (roles.pub.length + roles.nat.length > 0) {
        const hwm = (pids: number[]) => pids.reduce((s, pid) => s + memory(pid).hwm, 0);
        const pubPer = (sampler.peakPub - idlePub) / n, natPer = (sampler.peakNat - idleNat) / n;
        ctx.rec.set("pub_peak", sys.id, sampler.peakPub / 1024);
        ctx.rec.set("nat_peak", sys.id, sampler.peakNat / 1024);
        ctx.rec.set("pub_per", sys.id, pubPer);
        ctx.rec.set("nat_per", sys.id, natPer);
        Object.assign(record, {
          pubPids: roles.pub,
          natPids: roles.nat,
          idleRssKiB: { pub: idlePub, nat: idleNat },
          peakRssKiB: { pub: sampler.peakPub, nat: sampler.peakNat },
          liveRssKiB: { pub: livePub, nat: liveNat },
          hwmKiB: { pub: hwm(roles.pub), nat: hwm(roles.nat) },
        });
        ctx.log(
          `  ${sys.id.padEnd(8)} ${ok}/${n} exact in ${fmt(echoMs, 0)} ms; RSS peak ` +
            `${fmt(sampler.peakPub / 1024, 1)} / ${fmt(sampler.peakNat / 1024, 1)} MiB ` +
            `(public / NAT side), ${fmt(pubPer, 1)} / ${fmt(natPer, 1)} KiB per tunnel`,
        );
      } else {
        ctx.log(`  ${sys.id.padEnd(8)} ${ok}/${n} exact in ${fmt(echoMs, 0)} ms`);
      }
      if (problems.length) ctx.log(`    problems: ${problems.join("; ")}`);
      if (openProblems.length) {
        ctx.log(
          `    ${openProblems.length} failed to open: ${[...new Set(openProblems)].slice(0, 3)}`,
        );
      }
      ctx.rec.detail("concurrency", sys.id, record);
    } finally {
      clearTimeout(deadline);
      sampler.stop();
      conns.forEach(safeClose);
    }
    // Let both ends tear the tunnels down before the next system starts.
    await sleep(ctx.params.quick ? 300 : 1000);
  });
}

// ---------------------------------------------------------------------------------------------
// 6. Idle cost

/** Case 6: bytes per minute of an idle control connection, and of the seed's polling. */
export async function idleCost(ctx: Context, natadm: NatadmSystem): Promise<void> {
  const { idleSeconds } = ctx.params;
  ctx.log(`[6/6] idle cost: one idle client at interval 5, watched for ${idleSeconds} s`);
  if (natadm.skip) return;
  const relay = new CountingRelay(natadm.communicationPort);
  try {
    const idle = await natadm.idleClient(relay.port, true);
    try {
      await idle.waitFor(/connected to .* as/);
      // Start half an interval in, so the window holds exactly idleSeconds / 5 heartbeats.
      await sleep(2500);
      const before = relay.total();
      const start = performance.now();
      await sleep(idleSeconds * 1000);
      const bytes = relay.total() - before;
      const seconds = (performance.now() - start) / 1000;
      const perMinute = bytes * 60 / seconds;
      ctx.rec.set("idle_bpm", "natadm", perMinute);
      ctx.rec.set("connect_b", "natadm", before);
      ctx.rec.detail("idle", "natadm", { bytes, seconds, connectBytes: before, perMinute });
      ctx.log(
        `  idle control connection: ${bytes} B in ${fmt(seconds, 1)} s = ${
          fmt(perMinute, 0)
        } B/min`,
      );
    } finally {
      await stopTracked(idle);
    }
    // The seed's design: a fresh TCP+TLS connection and a short exchange per 5-second check.
    const checks: number[] = [];
    for (let i = 0; i < 3; i++) {
      const index = relay.conns.length;
      const once = await natadm.idleClient(relay.port, false);
      try {
        const result = await once.result(20_000);
        if (result.code !== 0) throw new Error(`one-shot client exited ${result.code}`);
        const end = Date.now() + 5000;
        while (!(relay.conns[index]?.closed) && Date.now() < end) await sleep(10);
        const c = relay.conns[index];
        if (c) checks.push(c.up + c.down);
      } finally {
        await stopTracked(once);
      }
    }
    const sorted = checks.sort((a, b) => a - b);
    const perCheck = percentile(sorted, 50);
    ctx.rec.set("seed_bpm", "natadm", perCheck * 12);
    ctx.rec.detail("seed_polling", "natadm", { perCheckBytes: sorted, checksPerMinute: 12 });
    ctx.log(`  seed polling: ${perCheck} B per check x 12/min = ${perCheck * 12} B/min`);
  } finally {
    relay.close();
  }
}

/** First line of `command args` output (stdout or stderr), for the machine record. */
export async function versionLine(command: string | undefined, args: string[]): Promise<string> {
  if (!command) return "not installed";
  try {
    const out = await new Deno.Command(command, {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(5000),
    }).output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    return text.split("\n").map((l) => l.trim()).find((l) => /\d/.test(l)) ?? "?";
  } catch {
    return "?";
  }
}
