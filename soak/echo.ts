/**
 * Soak helper: a TCP echo service on 127.0.0.1 that passes the user's half-close back, in a
 * process of its own. Prints its port on stdout. `deno run --allow-net soak/echo.ts`
 * @module
 */
const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
console.log((listener.addr as Deno.NetAddr).port);

async function echo(conn: Deno.Conn): Promise<void> {
  const buf = new Uint8Array(64 * 1024);
  try {
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      let done = 0;
      while (done < n) done += await conn.write(buf.subarray(done, n));
    }
    await conn.closeWrite();
  } catch {
    // The user went away mid-tunnel: nothing to echo to.
  } finally {
    try {
      conn.close();
    } catch {
      // Already closed.
    }
  }
}

for await (const conn of listener) {
  (conn as Deno.TcpConn).setNoDelay(true);
  echo(conn);
}
