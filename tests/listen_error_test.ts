/**
 * One wording for a port that cannot be opened: Deno's listeners and node's (the TLS
 * communication port) fail the same way for the same cause.
 */
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { listenError } from "../src/listen_error.ts";

/** The error node's listen() gives for `port` on 127.0.0.1. */
function nodeListenError(port: number): Promise<Error> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", resolve);
    server.listen(port, "127.0.0.1", () => {
      server.close();
      reject(new Error(`node listened on ${port}, which should be in use`));
    });
  });
}

Deno.test("a port in use reads the same from Deno.listen and node's listen, naming the key", async () => {
  const busy = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = (busy.addr as Deno.NetAddr).port;
    let denoError: unknown;
    try {
      Deno.listen({ hostname: "127.0.0.1", port }).close();
    } catch (err) {
      denoError = err;
    }
    assert.ok(denoError, "Deno listened on a port in use");
    const fromDeno = listenError("127.0.0.1", port, "services.22", denoError).message;
    const fromNode = listenError("127.0.0.1", port, "services.22", await nodeListenError(port));
    assert.equal(
      fromDeno,
      `cannot listen on 127.0.0.1:${port} (services.22): the port is in use by another program`,
    );
    assert.equal(fromNode.message, fromDeno);
  } finally {
    busy.close();
  }
});

Deno.test("listenError brackets an IPv6 host and keeps an unknown reason, without node's prefix", () => {
  const err = Object.assign(new Error("listen EINVAL: invalid argument ::1:1"), { code: "EINVAL" });
  assert.equal(
    listenError("::1", 1, "status_port", err).message,
    "cannot listen on [::1]:1 (status_port): invalid argument",
  );
});
