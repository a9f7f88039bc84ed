/**
 * The services behind the tunnels, in their own process so that they do not share an event
 * loop with the load generator: an echo server, a sink (reads and discards until end of
 * stream), a source (writes until the peer goes away) and a small HTTP server. Prints one JSON line with the ports,
 * then serves until stdin closes (the benchmark ended or died) or `--max-seconds` pass.
 * @module
 */
import { parseArgs } from "node:util";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    "max-seconds": { type: "string", default: "3600" },
    host: { type: "string", default: "127.0.0.1" },
  },
});
const hostname = values.host;
const maxMs = Number(values["max-seconds"]) * 1000;

/** Longest life of one sink or source connection. */
const CONN_MAX_MS = 600_000;

function listen(handle: (conn: Deno.TcpConn) => Promise<void>): number {
  const listener = Deno.listen({ hostname, port: 0 });
  (async () => {
    for await (const conn of listener) {
      conn.setNoDelay(true);
      handle(conn).catch(() => {}).finally(() => {
        try {
          conn.close();
        } catch {
          // already closed
        }
      });
    }
  })().catch(() => {});
  return (listener.addr as Deno.NetAddr).port;
}

async function echo(conn: Deno.TcpConn): Promise<void> {
  const buf = new Uint8Array(64 * 1024);
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) return;
    let done = 0;
    while (done < n) done += await conn.write(buf.subarray(done, n));
  }
}

async function sink(conn: Deno.TcpConn): Promise<void> {
  const buf = new Uint8Array(256 * 1024);
  const end = Date.now() + CONN_MAX_MS;
  while (Date.now() < end) {
    if (await conn.read(buf) === null) return;
  }
}

async function source(conn: Deno.TcpConn): Promise<void> {
  const buf = crypto.getRandomValues(new Uint8Array(64 * 1024));
  const chunk = new Uint8Array(256 * 1024);
  for (let i = 0; i < 4; i++) chunk.set(buf, i * buf.length);
  const end = Date.now() + CONN_MAX_MS;
  while (Date.now() < end) {
    let done = 0;
    while (done < chunk.length) done += await conn.write(chunk.subarray(done));
  }
}

/** The HTTP target's file: 4 KiB, served at any path. */
const PAGE = new Uint8Array(4096).fill(0x61);

/** A small HTTP server (the fallback when nginx is not installed). */
function http(): number {
  const server = Deno.serve(
    { hostname, port: 0, onListen: () => {} },
    () => new Response(PAGE, { headers: { "content-type": "application/octet-stream" } }),
  );
  return server.addr.port;
}

const ports = { echo: listen(echo), sink: listen(sink), source: listen(source), http: http() };
console.log(JSON.stringify(ports));

setTimeout(() => Deno.exit(0), maxMs);
for await (const _ of Deno.stdin.readable) {
  // Nothing is sent on stdin; it only tells us when the parent goes away.
}
Deno.exit(0);
