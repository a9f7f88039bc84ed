/**
 * Case: small HTTP requests through each system. The target is nginx serving a 4 KiB file
 * (started here with its own temp config on a loopback port) or, without nginx, the target
 * process's built-in HTTP server; the load is `wrk -t2 -c32 --latency`, or without wrk the
 * built-in HTTP/1.1 client below. Once with keep-alive, once with `Connection: close`.
 * @module
 */
import { join } from "node:path";
import { freePort } from "../tests/helpers.ts";
import { type Context, fmt, latencyStats } from "./cases.ts";
import { connect, safeClose, writeAll } from "./net.ts";
import { Proc, stopTracked, track } from "./proc.ts";

/** Bytes of the file served. */
export const HTTP_BODY_BYTES = 4096;
/** The file's path on the HTTP target. */
export const HTTP_PATH = "/4k.bin";
/** Connections of the load. */
const CONNECTIONS = 32;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One GET of {@link HTTP_PATH}; true if a 200 with the whole body came back. */
async function probe(port: number): Promise<boolean> {
  let conn: Deno.TcpConn | undefined;
  try {
    conn = await connect(port, 2000);
    const got = await request(conn, false);
    return got === HTTP_BODY_BYTES;
  } catch {
    return false;
  } finally {
    safeClose(conn);
  }
}

/** nginx on 127.0.0.1 with a config of its own in `dir`, serving {@link HTTP_PATH}. */
export class Nginx {
  port = 0;
  #proc: Proc | undefined;

  constructor(readonly path: string, readonly dir: string) {}

  async start(): Promise<void> {
    const www = join(this.dir, "www"), tmp = join(this.dir, "tmp");
    await Deno.mkdir(www, { recursive: true });
    await Deno.mkdir(tmp, { recursive: true });
    await Deno.writeFile(join(www, HTTP_PATH.slice(1)), new Uint8Array(HTTP_BODY_BYTES).fill(0x61));
    this.port = freePort();
    const conf = join(this.dir, "nginx.conf");
    await Deno.writeTextFile(
      conf,
      [
        "daemon off;",
        "worker_processes 1;",
        ...(Deno.uid() === 0 ? ["user root;"] : []),
        `pid ${join(this.dir, "nginx.pid")};`,
        "error_log stderr warn;",
        "events { worker_connections 4096; }",
        "http {",
        "  access_log off;",
        "  keepalive_requests 1000000;",
        "  default_type application/octet-stream;",
        ...["client_body", "proxy", "fastcgi", "uwsgi", "scgi"].map((t) =>
          `  ${t}_temp_path ${join(tmp, t)};`
        ),
        `  server { listen 127.0.0.1:${this.port}; root ${www}; }`,
        "}",
      ].join("\n") + "\n",
    );
    this.#proc = track(new Proc("nginx", this.path, ["-e", "stderr", "-p", this.dir, "-c", conf]));
    const end = Date.now() + 20_000;
    while (!(await probe(this.port))) {
      if (this.#proc.exited) throw new Error(`nginx exited: ${this.#proc.tail(4)}`);
      if (Date.now() > end) throw new Error(`nginx did not answer on port ${this.port} in 20 s`);
      await sleep(50);
    }
  }

  async stop(): Promise<void> {
    await stopTracked(this.#proc);
    this.#proc = undefined;
  }
}

const REQUEST = (close: boolean) =>
  new TextEncoder().encode(
    `GET ${HTTP_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n${close ? "Connection: close\r\n" : ""}\r\n`,
  );

/** Longest response header block accepted. */
const MAX_HEADER = 16 * 1024;

/**
 * Sends one GET on `conn` and reads the response (headers, then Content-Length bytes, or to the
 * end with `close`); returns the body's length. Throws on a non-200 answer.
 */
async function request(
  conn: Deno.TcpConn,
  close: boolean,
  leftover?: { buf: Uint8Array },
): Promise<number> {
  await writeAll(conn, REQUEST(close));
  const buf = new Uint8Array(MAX_HEADER + HTTP_BODY_BYTES * 2);
  let have = 0;
  if (leftover?.buf.length) {
    buf.set(leftover.buf);
    have = leftover.buf.length;
  }
  let headerEnd = -1;
  const text = () => new TextDecoder().decode(buf.subarray(0, have));
  while (headerEnd < 0) {
    const n = await conn.read(buf.subarray(have));
    if (n === null) throw new Error("connection closed before the response headers");
    have += n;
    headerEnd = text().indexOf("\r\n\r\n");
    if (headerEnd < 0 && have > MAX_HEADER) throw new Error("response headers too long");
  }
  const head = text().slice(0, headerEnd);
  if (!/^HTTP\/1\.[01] 200/.test(head)) throw new Error(`HTTP answer: ${head.split("\r\n")[0]}`);
  const length = Number(head.match(/\r\ncontent-length:\s*(\d+)/i)?.[1] ?? NaN);
  const bodyStart = headerEnd + 4;
  if (Number.isFinite(length)) {
    while (have < bodyStart + length) {
      const n = await conn.read(buf.subarray(have));
      if (n === null) throw new Error("connection closed inside the body");
      have += n;
    }
    if (leftover) leftover.buf = buf.slice(bodyStart + length, have);
    return length;
  }
  if (!close) throw new Error("keep-alive response without Content-Length");
  for (;;) {
    if (have === buf.length) throw new Error("body longer than expected");
    const n = await conn.read(buf.subarray(have));
    if (n === null) return have - bodyStart;
    have += n;
  }
}

/** Result of one load run. */
export interface HttpLoad {
  rps: number;
  p50: number;
  p99: number;
  errors: number;
}

/** The built-in load: CONNECTIONS workers for `seconds`, keep-alive or a connection each. */
export async function builtinLoad(
  port: number,
  seconds: number,
  close: boolean,
): Promise<HttpLoad> {
  const samples: number[] = [];
  let errors = 0;
  const start = performance.now();
  const end = start + seconds * 1000;
  await Promise.all(Array.from({ length: CONNECTIONS }, async () => {
    let conn: Deno.TcpConn | undefined;
    const leftover = { buf: new Uint8Array(0) };
    while (performance.now() < end && samples.length < 10_000_000) {
      const t = performance.now();
      try {
        conn ??= await connect(port, 5000);
        const got = await request(conn, close, leftover);
        if (got !== HTTP_BODY_BYTES) throw new Error(`body of ${got} bytes`);
        samples.push(performance.now() - t);
      } catch {
        errors++;
        safeClose(conn);
        conn = undefined;
        leftover.buf = new Uint8Array(0);
        await sleep(5);
        continue;
      }
      if (close) {
        safeClose(conn);
        conn = undefined;
      }
    }
    safeClose(conn);
  }));
  const s = latencyStats(samples);
  return {
    rps: samples.length / ((performance.now() - start) / 1000),
    p50: s.p50,
    p99: s.p99,
    errors,
  };
}

/** Milliseconds from a wrk duration such as "812.00us", "1.23ms" or "1.02s". */
function wrkMs(text: string): number {
  const m = text.match(/^([\d.]+)(us|ms|s|m)$/);
  if (!m) return NaN;
  const scale = { us: 0.001, ms: 1, s: 1000, m: 60_000 }[m[2] as "us" | "ms" | "s" | "m"];
  return Number(m[1]) * scale;
}

/** `wrk -t2 -c32 -dSECONDS --latency` against `port`; parses req/s and p50/p99. */
export async function wrkLoad(
  wrk: string,
  port: number,
  seconds: number,
  close: boolean,
): Promise<HttpLoad> {
  const args = ["-t2", `-c${CONNECTIONS}`, `-d${seconds}s`, "--latency", "--timeout", "5s"];
  if (close) args.push("-H", "Connection: close");
  args.push(`http://127.0.0.1:${port}${HTTP_PATH}`);
  const out = await new Deno.Command(wrk, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout((seconds + 30) * 1000),
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success) throw new Error(`wrk failed: ${new TextDecoder().decode(out.stderr).trim()}`);
  const rps = Number(text.match(/Requests\/sec:\s+([\d.]+)/)?.[1] ?? NaN);
  const p50 = wrkMs(text.match(/^\s+50%\s+(\S+)/m)?.[1] ?? "");
  const p99 = wrkMs(text.match(/^\s+99%\s+(\S+)/m)?.[1] ?? "");
  const errs = text.match(/Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/);
  const non2xx = Number(text.match(/Non-2xx or 3xx responses: (\d+)/)?.[1] ?? 0);
  const errors = (errs ? errs.slice(1).reduce((a, b) => a + Number(b), 0) : 0) + non2xx;
  if (!Number.isFinite(rps)) {
    throw new Error(`no Requests/sec in wrk's output: ${text.slice(0, 200)}`);
  }
  return { rps, p50, p99, errors };
}

/** The two runs: keep-alive, and a fresh connection per request. */
export const HTTP_RUNS = [
  { key: "http_ka", close: false, what: "keep-alive" },
  { key: "http_close", close: true, what: "Connection: close" },
] as const;

/** Case: req/s and p50/p99 latency of 4 KiB GETs through every system. */
export async function smallRequests(
  ctx: Context,
  seconds: number,
  wrk: string | undefined,
): Promise<void> {
  ctx.log(
    `[http] 4 KiB GETs, ${CONNECTIONS} connections, ${seconds} s per run (${
      wrk ? "wrk" : "built-in client"
    })`,
  );
  for (const run of HTTP_RUNS) {
    for (const sys of ctx.systems.filter((s) => !s.skip)) {
      const port = sys.front.http;
      if (!port) continue;
      try {
        const r = wrk
          ? await wrkLoad(wrk, port, seconds, run.close)
          : await builtinLoad(port, seconds, run.close);
        ctx.rec.set(`${run.key}_rps`, sys.id, r.rps);
        ctx.rec.set(`${run.key}_p50`, sys.id, r.p50);
        ctx.rec.set(`${run.key}_p99`, sys.id, r.p99);
        ctx.rec.detail(run.key, sys.id, r);
        ctx.log(
          `  ${run.what.padEnd(17)} ${sys.id.padEnd(8)} ${fmt(r.rps, 0)} req/s  p50 ${
            fmt(r.p50)
          } ms` +
            `  p99 ${fmt(r.p99)} ms${r.errors ? `  (${r.errors} errors)` : ""}`,
        );
      } catch (err) {
        ctx.rec.errors.push(
          `http ${run.what}, ${sys.id}: ${(err as Error).message.split("\n")[0]}`,
        );
        ctx.log(`  ERROR http ${run.what}, ${sys.id}: ${(err as Error).message}`);
      }
      ctx.tidy();
      await sleep(ctx.params.quick ? 200 : 1000); // let closed connections leave TIME_WAIT pressure
    }
  }
}
