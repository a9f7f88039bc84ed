/**
 * Users who arrive before their client: they wait (up to `pending_timeout`), and a client
 * that starts later, or checks once with `infinite = false`, serves them.
 */
import assert from "node:assert/strict";
import {
  clientToml,
  connectUser,
  echoSetup,
  freePort,
  Program,
  readExactly,
  readToEnd,
  runScript,
  Scope,
} from "./helpers.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

Deno.test("a user who connects before the client exists is served once it starts", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  try {
    const server = await scope.server(env.serverConfig);
    const user = scope.closing(await connectUser(env.servicePort));
    await user.write(encoder.encode("early bird"));
    await server.waitFor(/user .* on service \d+ waits for client "foo bar"/);
    await scope.client(env.clientConfig);
    assert.equal(decoder.decode(await readExactly(user, 10)), "early bird");
    await server.waitFor(/tunnel open: user .* → service \d+ → client "foo bar"/);
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("pending_timeout closes a user nobody serves, and the server says so", async () => {
  const env = await echoSetup({ extra: "pending_timeout = 1" });
  const scope = new Scope();
  try {
    const server = await scope.server(env.serverConfig);
    const user = scope.closing(await connectUser(env.servicePort));
    const started = performance.now();
    // The server closes the user: its read ends (EOF, or a reset) long before our deadline.
    const got = await readToEnd(user, 10_000).catch(() => new Uint8Array());
    const elapsed = performance.now() - started;
    assert.equal(got.length, 0);
    assert.ok(elapsed >= 900, `closed after ${elapsed} ms, before pending_timeout = 1 s`);
    assert.ok(elapsed < 8_000, `closed only after ${elapsed} ms`);
    await server.waitFor(
      new RegExp(
        `user .* on service ${env.servicePort} closed: client "foo bar" did not connect within 1 s`,
      ),
    );
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("infinite = false: with nothing pending the client checks once and exits 0", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  try {
    const server = await scope.server(env.serverConfig);
    const config = await env.fixture.write(
      "once.toml",
      clientToml({
        identity: env.identity,
        communicationPort: env.communicationPort,
        infinite: false,
      }),
    );
    const { code, stderr } = await runScript("client.ts", ["--config", config]);
    assert.equal(code, 0, stderr);
    assert.match(stderr, /connected to .* as "foo bar"/);
    await server.waitFor(/client "foo bar" connected from/);
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("infinite = false: a pending user is served, then the client exits 0", async () => {
  const env = await echoSetup();
  const scope = new Scope();
  try {
    const server = await scope.server(env.serverConfig);
    const user = scope.closing(await connectUser(env.servicePort));
    await user.write(encoder.encode("served by a one-shot client"));
    await server.waitFor(/waits for client "foo bar"/);
    const config = await env.fixture.write(
      "once.toml",
      clientToml({
        identity: env.identity,
        communicationPort: env.communicationPort,
        infinite: false,
      }),
    );
    const client = scope.track(new Program("client.ts", ["--config", config]));
    assert.equal(decoder.decode(await readExactly(user, 27)), "served by a one-shot client");
    await user.closeWrite();
    assert.equal((await readToEnd(user)).length, 0);
    const { code, stderr } = await client.result();
    assert.equal(code, 0, stderr);
    assert.match(stderr, /tunnel closed: user .*; 27 bytes up, 27 bytes down/);
  } finally {
    await scope.close();
    await env.cleanup();
  }
});

Deno.test("infinite = false: an unreachable server makes the client exit non-zero", async () => {
  const env = await echoSetup();
  try {
    const port = freePort(); // nothing listens here
    const config = await env.fixture.write(
      "once.toml",
      clientToml({ identity: env.identity, communicationPort: port, infinite: false }),
    );
    const { code, stderr } = await runScript("client.ts", ["--config", config]);
    assert.notEqual(code, 0, stderr);
    assert.match(stderr, new RegExp(`cannot connect to localhost:${port}: connection refused`));
    assert.doesNotMatch(stderr, /connected to/);
  } finally {
    await env.cleanup();
  }
});
