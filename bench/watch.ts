/**
 * Watches a NATadm server's `/status.json` from wherever the server's port is reachable (e.g.
 * inside the namespace the fleet runs in) and prints one JSON line per poll:
 * `{"t": epoch ms, "connected": N, "clients": M, "polls": P}` or `{"t", "error", "polls"}`.
 * Each poll is one fresh TCP connection (HTTP/1.0), so `polls` is exactly the connects it made.
 * Stops when stdin closes or `--max-seconds` pass.
 * `deno run --allow-net bench/watch.ts --port PORT [--every MS]`
 * @module
 */
import { parseArgs } from "node:util";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    port: { type: "string" },
    every: { type: "string", default: "200" },
    "max-seconds": { type: "string", default: "3600" },
  },
});
const port = Number(values.port);
const every = Number(values.every);
if (!Number.isInteger(port) || port < 1 || port > 65535) {
  console.error("watch.ts: --port must be a TCP port");
  Deno.exit(2);
}

/** Longest answer read (10,000 clients take ~3 MB of JSON). */
const MAX_BYTES = 64 << 20;

async function poll(): Promise<{ connected: number; clients: number }> {
  const conn = await Deno.connect({
    hostname: "127.0.0.1",
    port,
    signal: AbortSignal.timeout(5000),
  });
  const timer = setTimeout(() => conn.close(), 10_000);
  try {
    await conn.write(
      new TextEncoder().encode("GET /status.json HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"),
    );
    const chunks: Uint8Array[] = [];
    let size = 0;
    const buf = new Uint8Array(256 * 1024);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      chunks.push(buf.slice(0, n));
      size += n;
      if (size > MAX_BYTES) throw new Error(`status.json larger than ${MAX_BYTES} bytes`);
    }
    const all = new Uint8Array(size);
    let at = 0;
    for (const c of chunks) {
      all.set(c, at);
      at += c.length;
    }
    const text = new TextDecoder().decode(all);
    const body = text.slice(text.indexOf("\r\n\r\n") + 4);
    if (!/^HTTP\/1\.\d 200/.test(text)) throw new Error(text.split("\r\n")[0] || "no answer");
    const doc = JSON.parse(body) as { clients: { connected: boolean }[] };
    return {
      connected: doc.clients.filter((c) => c.connected).length,
      clients: doc.clients.length,
    };
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch {
      // already closed
    }
  }
}

let polls = 0;
let running = true;
setTimeout(() => Deno.exit(0), Number(values["max-seconds"]) * 1000);
(async () => {
  for await (const _ of Deno.stdin.readable) {
    // Nothing comes on stdin; its end means the benchmark went away.
  }
  running = false;
  Deno.exit(0);
})();
while (running) {
  const started = Date.now();
  polls++;
  try {
    const r = await poll();
    console.log(JSON.stringify({ t: Date.now(), ...r, polls }));
  } catch (err) {
    console.log(JSON.stringify({ t: Date.now(), error: (err as Error).message, polls }));
  }
  await new Promise((r) => setTimeout(r, Math.max(0, every - (Date.now() - started))));
}
