/**
 * A delaying TCP relay, the "distance" of the benchmark's WAN link: every chunk read from one
 * side is written to the other `--delay` milliseconds later, in order, each way. Buffering is
 * bounded per direction (reading pauses while {@link MAX_QUEUED} bytes wait), and a half-close
 * is passed on after the data before it.
 *
 *   deno run --allow-net bench/delay.ts --delay 20 LISTEN_HOST:LISTEN_PORT=TARGET_HOST:PORT...
 *
 * A listen port of 0 picks a free one. Prints one JSON line, the bound ports in argument
 * order, then relays until stdin closes or `--max-seconds` pass.
 * @module
 */
import { parseArgs } from "node:util";

const { values, positionals } = parseArgs({
  args: Deno.args,
  allowPositionals: true,
  options: {
    delay: { type: "string", default: "20" },
    "max-seconds": { type: "string", default: "3600" },
  },
});
const DELAY_MS = Number(values.delay);
if (!(DELAY_MS >= 0) || positionals.length === 0) {
  console.error("delay.ts: usage: --delay MS LISTEN_HOST:PORT=TARGET_HOST:PORT...");
  Deno.exit(2);
}

/**
 * Bytes held per direction of one connection before reading pauses: twice what 100 Mbit/s
 * brings in 20 ms, so the delay line never throttles the link, yet adds little queue of its own.
 */
const MAX_QUEUED = 512 * 1024;
/** Bytes read at once. */
const CHUNK = 64 * 1024;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function hostPort(text: string): { hostname: string; port: number } {
  const i = text.lastIndexOf(":");
  const port = Number(text.slice(i + 1));
  if (i < 1 || !Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`delay.ts: "${text}" is not HOST:PORT`);
    Deno.exit(2);
  }
  return { hostname: text.slice(0, i), port };
}

function close(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch {
    // already closed
  }
}

/** Carries `from` → `to`, each chunk held DELAY_MS; resolves when that direction ends. */
async function pump(from: Deno.Conn, to: Deno.TcpConn): Promise<void> {
  const queue: { at: number; data: Uint8Array | null }[] = [];
  let queued = 0;
  let wakeWriter: (() => void) | undefined;
  let wakeReader: (() => void) | undefined;
  let failed = false;
  const reader = (async () => {
    try {
      for (;;) {
        while (queued >= MAX_QUEUED && !failed) await new Promise<void>((r) => wakeReader = r);
        if (failed) return;
        const buf = new Uint8Array(CHUNK);
        const n = await from.read(buf);
        queue.push({
          at: performance.now() + DELAY_MS,
          data: n === null ? null : buf.subarray(0, n),
        });
        if (n !== null) queued += n;
        wakeWriter?.();
        if (n === null) return;
      }
    } catch {
      failed = true;
      queue.push({ at: 0, data: null });
      wakeWriter?.();
    }
  })();
  try {
    for (;;) {
      while (queue.length === 0) await new Promise<void>((r) => wakeWriter = r);
      const item = queue.shift()!;
      const wait = item.at - performance.now();
      if (wait > 0) await sleep(wait);
      if (item.data === null) {
        if (failed) close(to);
        else await to.closeWrite().catch(() => {});
        break;
      }
      let done = 0;
      while (done < item.data.length) done += await to.write(item.data.subarray(done));
      queued -= item.data.length;
      wakeReader?.();
    }
  } catch {
    failed = true;
    wakeReader?.();
    close(from);
    close(to);
  }
  await reader;
}

async function relay(
  down: Deno.TcpConn,
  target: { hostname: string; port: number },
): Promise<void> {
  let up: Deno.TcpConn | undefined;
  try {
    up = await Deno.connect({ ...target, signal: AbortSignal.timeout(10_000) });
    up.setNoDelay(true);
    down.setNoDelay(true);
    await Promise.all([pump(down, up), pump(up, down)]);
  } catch {
    // the other side went away
  } finally {
    close(down);
    if (up) close(up);
  }
}

const ports: number[] = [];
for (const mapping of positionals) {
  const [listen, target] = mapping.split("=");
  if (!target) {
    console.error(`delay.ts: "${mapping}" is not LISTEN=TARGET`);
    Deno.exit(2);
  }
  const listener = Deno.listen(hostPort(listen));
  ports.push((listener.addr as Deno.NetAddr).port);
  const to = hostPort(target);
  (async () => {
    for await (const conn of listener) relay(conn, to);
  })().catch(() => {});
}
console.log(JSON.stringify(ports));

setTimeout(() => Deno.exit(0), Number(values["max-seconds"]) * 1000);
for await (const _ of Deno.stdin.readable) {
  // Nothing comes on stdin; its end means the benchmark went away.
}
Deno.exit(0);
