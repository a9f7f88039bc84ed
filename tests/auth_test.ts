/**
 * Who may connect: the client checks the server's certificate against its cafile and name,
 * the server checks the client's name and Ed25519 key, and a newer connection under a name
 * replaces the older one.
 */
import assert from "node:assert/strict";
import {
  clientToml,
  echoSetup,
  Fixture,
  freePort,
  type Identity,
  Program,
  roundTrip,
  runScript,
  Scope,
  serverToml,
  startEcho,
  waitUntil,
} from "./helpers.ts";

/**
 * Runs a one-shot client (`infinite = false`) against a running server and returns its
 * outcome; a refused client must exit non-zero.
 */
async function oneShot(
  fixture: Fixture,
  options: Parameters<typeof clientToml>[0],
  env?: Record<string, string>,
): Promise<{ code: number; stderr: string }> {
  const config = await fixture.write(
    `client-${crypto.randomUUID()}.toml`,
    clientToml({ ...options, infinite: false }),
  );
  return await runScript("client.ts", ["--config", config], undefined, env);
}

/**
 * Runs a one-shot client whose cafile did not sign the server's certificate and proves it
 * refused the server with the cafile line. With `runtimeTrustsServer`, the client's environment
 * makes the runtime itself trust the server's CA (`DENO_CERT`, `NODE_EXTRA_CA_CERTS`).
 */
async function refusedByCafile(runtimeTrustsServer = false): Promise<void> {
  const setup = await echoSetup();
  const other = await Fixture.create();
  const scope = new Scope();
  try {
    const server = await scope.server(setup.serverConfig);
    const ca = setup.fixture.caPath;
    const env = runtimeTrustsServer ? { DENO_CERT: ca, NODE_EXTRA_CA_CERTS: ca } : undefined;
    const { code, stderr } = await oneShot(setup.fixture, {
      identity: setup.identity,
      communicationPort: setup.communicationPort,
      cafile: other.caPath,
    }, env);
    assert.equal(code, 1, stderr);
    assert.match(
      stderr,
      new RegExp(
        `server localhost:${setup.communicationPort} presented a certificate not signed by cafile`,
      ),
    );
    assert.doesNotMatch(stderr, /connected to/);
    await server.waitFor(/TLS handshake with .* failed/);
    assert.equal(server.count(/client .* connected from/), 0);
  } finally {
    await scope.close();
    await other.cleanup();
    await setup.cleanup();
  }
}

Deno.test("a client refuses a server whose certificate is not signed by its cafile", async () => {
  await refusedByCafile();
});

Deno.test("a client trusts its cafile alone, not the CAs the runtime adds from its environment", async () => {
  // As the runtime trusts Mozilla's roots or the system's: a certificate from such a CA must
  // not pass for the server either.
  await refusedByCafile(true);
});

Deno.test("a client refuses a server whose certificate is for another name", async () => {
  const fixture = await Fixture.create(["example.invalid"]);
  const scope = new Scope();
  try {
    const identity = await fixture.identity("foo bar");
    const communicationPort = freePort();
    const echo = startEcho();
    scope.defer(echo.close);
    const server = await scope.server(
      await fixture.write(
        "server.toml",
        serverToml({
          communicationPort,
          clients: [identity],
          services: [{ port: freePort(), name: identity.name, targetPort: echo.port }],
        }),
      ),
    );
    const { code, stderr } = await oneShot(fixture, { identity, communicationPort });
    assert.equal(code, 1, stderr);
    assert.match(
      stderr,
      new RegExp(
        `server localhost:${communicationPort}'s certificate is not valid for the name "localhost"`,
      ),
    );
    assert.equal(server.count(/client .* connected from/), 0);
  } finally {
    await scope.close();
    await fixture.cleanup();
  }
});

Deno.test("the server refuses a client name it has no [clients] entry for", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  try {
    const server = await scope.server(env.serverConfig);
    const stranger = await env.fixture.identity("stranger");
    const { code, stderr } = await oneShot(env.fixture, {
      identity: stranger,
      communicationPort: env.communicationPort,
    });
    assert.equal(code, 1, stderr);
    assert.match(
      stderr,
      /refused this client: unknown client name \\?"stranger\\?": the server has no \[clients\]/,
    );
    await server.waitFor(/client from .* refused: unknown name "stranger"/);
    assert.equal(server.count(/client .* connected from/), 0);
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("the server refuses a client whose key is not the one configured", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  try {
    const server = await scope.server(env.serverConfig);
    const impostor: Identity = { ...await env.fixture.identity("x"), name: env.identity.name };
    const { code, stderr } = await oneShot(env.fixture, {
      identity: impostor,
      communicationPort: env.communicationPort,
    });
    assert.equal(code, 1, stderr);
    assert.match(
      stderr,
      /refused this client: authentication failed: the key does not match the one configured/,
    );
    await server.waitFor(/client from .* refused: wrong key for "foo bar"/);
    assert.equal(server.count(/client .* connected from/), 0);
    // The right key still gets in: the refusal was about the key, not the server.
    const { code: ok, stderr: okErr } = await oneShot(env.fixture, {
      identity: env.identity,
      communicationPort: env.communicationPort,
    });
    assert.equal(ok, 0, okErr);
    assert.match(okErr, /connected to .* as "foo bar"/);
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("a second client with the same name replaces the first and serves users", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  try {
    const server = await scope.server(env.serverConfig);
    const first = await scope.client(env.clientConfig);
    const second = await scope.client(env.clientConfig);
    await server.waitFor(/client "foo bar": new connection from .* replaces the one from/);
    await first.waitFor(/refused this client: replaced by a newer connection/);
    assert.equal(await roundTrip(env.servicePort, "who serves me?"), "who serves me?");
    await second.waitFor(/tunnel open: user/);
    assert.equal(first.count(/tunnel open/), 0, first.lines.join("\n"));
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("a replaced client does not take its name back from the one that replaced it", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  try {
    const server = await scope.server(env.serverConfig);
    const first = await scope.client(env.clientConfig);
    await scope.client(env.clientConfig);
    const replaced = await first.waitFor(/replaced by a newer connection/);
    // Whatever the first client does next (exit, or try again and be told no), it must not
    // push the second one out: two live processes with one name must not take turns.
    const at = first.lines.indexOf(replaced);
    await waitUntil(
      () => first.exited || first.lines.slice(at + 1).some((l) => /connected to|refused/.test(l)),
      () => `the replaced client's next move:\n${first.lines.join("\n")}`,
    );
    const retaken = first.lines.slice(at + 1).find((l) => /connected to/.test(l));
    assert.equal(
      retaken,
      undefined,
      `the replaced client connected again, pushing out the one that replaced it:\n${
        server.lines.join("\n")
      }`,
    );
    assert.equal(server.count(/replaces the one from/), 1, server.lines.join("\n"));
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("a client that is refused keeps retrying and says why each time", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  try {
    const server = await scope.server(env.serverConfig);
    const stranger = await env.fixture.identity("stranger");
    const config = await env.fixture.write(
      "stranger.toml",
      clientToml({ identity: stranger, communicationPort: env.communicationPort }),
    );
    const client = scope.track(new Program("client.ts", ["--config", config]));
    const refusal = new RegExp(
      `server localhost:${env.communicationPort} refused this client: unknown client name .*; ` +
        `retrying in "?[0-9.]+"? s`,
    );
    await client.waitFor(refusal);
    await waitUntil(
      () => client.count(refusal) >= 2,
      () => `a second attempt:\n${client.lines.join("\n")}`,
    );
    await server.waitFor(/refused: unknown name "stranger"/);
    assert.ok(!client.exited, "an infinite client must not give up");
  } finally {
    await scope.close();
    await env.cleanup();
  }
});
