/**
 * The transport layer on its own, over real loopback sockets.
 * @module
 */
import assert from "node:assert/strict";
import { ConnStream, READ_AHEAD_BYTES } from "../src/transport.ts";
import { randomBytes } from "./helpers.ts";

/** A connected pair of TCP sockets on loopback. */
async function tcpPair(): Promise<[Deno.TcpConn, Deno.TcpConn]> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const accepted = listener.accept();
    const dialed = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
    return [dialed, await accepted];
  } finally {
    listener.close();
  }
}

Deno.test("read-ahead returns exactly the bytes sent, in order, for any mix of read sizes", async () => {
  const [a, b] = await tcpPair();
  const reader = new ConnStream(b, undefined, { readAhead: true });
  try {
    const sent = randomBytes(1024 * 1024);
    const writing = (async () => {
      // Writes of uneven sizes, so reads straddle what each write delivered.
      for (let at = 0, i = 0; at < sent.length; i++) {
        const n = [1, 3, 4, 700, 5000, 65536][i % 6];
        at += await a.write(sent.subarray(at, at + n));
      }
      await a.closeWrite();
    })();
    const got = new Uint8Array(sent.length + 1);
    let at = 0;
    // Small reads (served from the read-ahead buffer), exact-size ones, and large ones that
    // bypass it once it is empty.
    const sizes = [4, 1, 2, 17, READ_AHEAD_BYTES - 1, READ_AHEAD_BYTES, 100_000];
    for (let i = 0;; i++) {
      const n = await reader.read(got.subarray(at, at + sizes[i % sizes.length]));
      if (n === null) break;
      assert.ok(n > 0, "a read returned no bytes before the end");
      at += n;
    }
    await writing;
    assert.equal(at, sent.length);
    assert.deepEqual(got.subarray(0, at), sent);
  } finally {
    reader.close();
    a.close();
  }
});
