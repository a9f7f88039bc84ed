/**
 * A blind relay cannot log a client in elsewhere: a TLS-terminating relay with a certificate
 * for "localhost" (signed by the CA the client trusts) re-originates TLS to the real server,
 * whose certificate is only for 127.0.0.1. The client signs the name it dialled, so the server
 * refuses the relayed login unless its operator lists that name in `server_names` (a proxy
 * they run on purpose).
 */
import assert from "node:assert/strict";
import {
  clientToml,
  Fixture,
  freePort,
  type Identity,
  roundTrip,
  runScript,
  Scope,
  serverToml,
  startEcho,
} from "./helpers.ts";
import { OpensslCa } from "./openssl_ca.ts";

/**
 * A TLS relay on 127.0.0.1 presenting `certificate`, that opens a TLS connection of its own to
 * 127.0.0.1:`upstream` (verified with `caPem`) for each connection and copies bytes both ways.
 */
async function tlsRelay(
  scope: Scope,
  certificate: [string, string],
  upstream: number,
  caPem: string,
) {
  const listener = Deno.listenTls({
    hostname: "127.0.0.1",
    port: 0,
    cert: await Deno.readTextFile(certificate[0]),
    key: await Deno.readTextFile(certificate[1]),
  });
  const conns = new Set<Deno.Conn>();
  let relayed = 0;
  const pipe = (from: Deno.Conn, to: Deno.Conn) =>
    from.readable.pipeTo(to.writable).catch(() => {}).finally(() => {
      for (const c of [from, to]) {
        try {
          c.close();
        } catch {
          // Closed by the other direction.
        }
      }
    });
  (async () => {
    for await (const conn of listener) {
      conns.add(conn);
      try {
        const tcp = await Deno.connect({ hostname: "127.0.0.1", port: upstream });
        const tls = await Deno.startTls(tcp, { hostname: "127.0.0.1", caCerts: [caPem] });
        conns.add(tls);
        relayed++;
        pipe(conn, tls);
        pipe(tls, conn);
      } catch {
        conn.close();
      }
    }
  })().catch(() => {});
  scope.defer(() => {
    listener.close();
    for (const c of conns) {
      try {
        c.close();
      } catch {
        // Already closed.
      }
    }
  });
  return {
    port: (listener.addr as Deno.NetAddr).port,
    get relayed() {
      return relayed;
    },
  };
}

/**
 * A server whose certificate is only for 127.0.0.1 (with `extra` config lines), one client
 * "foo bar" with an echo service, and a relay for "localhost" in front of it; every
 * certificate from one CA.
 */
async function relayWorld(scope: Scope, extra = "") {
  const fixture = await Fixture.create();
  scope.defer(() => fixture.cleanup());
  const ca = await OpensslCa.create(fixture, "pki");
  const caPem = await Deno.readTextFile(ca.caPath);
  const identity = await fixture.identity("foo bar");
  const echo = startEcho();
  scope.defer(echo.close);
  const communicationPort = freePort();
  const servicePort = freePort();
  const serverFile = await fixture.write(
    "server.toml",
    serverToml({
      communicationPort,
      clients: [identity],
      services: [{ port: servicePort, name: identity.name, targetPort: echo.port }],
      certificate: await ca.issue("server", "IP:127.0.0.1"),
      extra,
    }),
  );
  const server = await scope.server(serverFile);
  const relay = await tlsRelay(
    scope,
    await ca.issue("relay", "DNS:localhost"),
    communicationPort,
    caPem,
  );
  /** Client config for `identity` dialling `host:port`. */
  const clientConfig = (host: string, port: number, infinite: boolean, who: Identity = identity) =>
    fixture.write(
      `client-${crypto.randomUUID()}.toml`,
      clientToml({ identity: who, communicationPort: port, host, cafile: ca.caPath, infinite }),
    );
  return { server, relay, communicationPort, servicePort, clientConfig };
}

Deno.test({
  name:
    "a client logging in through a TLS relay under another name is refused: the server says which name it was dialled by",
}, async () => {
  const scope = new Scope();
  try {
    const w = await relayWorld(scope);
    // The same client, dialling the server by its own name, logs in: the key is right.
    const direct = await runScript("client.ts", [
      "--config",
      await w.clientConfig("127.0.0.1", w.communicationPort, false),
    ]);
    assert.equal(direct.code, 0, direct.stderr);

    const relayed = await runScript("client.ts", [
      "--config",
      await w.clientConfig("localhost", w.relay.port, false),
    ]);
    assert.ok(w.relay.relayed >= 1, "the client never went through the relay");
    assert.notEqual(relayed.code, 0, `the relayed login was accepted:\n${relayed.stderr}`);
    assert.match(
      relayed.stderr,
      /server localhost:\d+ refused this client: this server is not "localhost"/,
    );
    assert.doesNotMatch(relayed.stderr, /connected to .* as/);
    await w.server.waitFor(
      /client from "?127\.0\.0\.1:\d+"? refused: .*it dialled "localhost", which is not this server/,
    );
    assert.equal(w.server.count(/client "?foo bar"? connected from/), 1, w.server.lines.join("\n"));
  } finally {
    await scope.close();
  }
});

Deno.test('server_names = ["localhost"] makes the same relay an accepted proxy: its client logs in and tunnels', async () => {
  const scope = new Scope();
  try {
    const w = await relayWorld(scope, 'server_names = ["localhost"]');
    const client = await scope.client(await w.clientConfig("localhost", w.relay.port, true));
    assert.ok(w.relay.relayed >= 1, "the client never went through the relay");
    await w.server.waitFor(/client "?foo bar"? connected from/);
    assert.equal(await roundTrip(w.servicePort, "through the proxy"), "through the proxy");
    assert.equal(client.count(/refused/), 0, client.lines.join("\n"));
  } finally {
    await scope.close();
  }
});
