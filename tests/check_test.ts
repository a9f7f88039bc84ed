import assert from "node:assert/strict";
import {
  connectUser,
  echoSetup,
  Program,
  readExactly,
  startClient,
  startServer,
} from "./helpers.ts";

Deno.test("client --check lists its services and exits 0, leaving the running client in place", async () => {
  const env = await echoSetup();
  const server = await startServer(env.serverConfig);
  const client = await startClient(env.clientConfig);
  try {
    const check = new Program("client.ts", ["--config", env.clientConfig, "--check"]);
    const { code, stdout } = await check.result();
    assert.equal(code, 0);
    assert.match(stdout, new RegExp(`Authenticated to localhost:${env.communicationPort}`));
    assert.match(stdout, new RegExp(`server port ${env.servicePort} → localhost:${env.echo.port}`));
    await server.waitFor(/checked in from .* \(--check\)/);
    assert.equal(server.count(/replaces/), 0, "the check displaced the running client");
    // The running client still serves users.
    const user = await connectUser(env.servicePort);
    await user.write(new TextEncoder().encode("still"));
    assert.deepEqual(await readExactly(user, 5), new TextEncoder().encode("still"));
    user.close();
    assert.equal(client.count(/refused|replaced/), 0);
  } finally {
    await client.stop();
    await server.stop();
    await env.cleanup();
  }
});

Deno.test("client --check exits non-zero with one clear line when the key is wrong", async () => {
  const env = await echoSetup();
  const other = await env.fixture.identity("foo bar");
  const config = await env.fixture.write(
    "wrong.toml",
    (await Deno.readTextFile(env.clientConfig)).replace(env.identity.keyPath, other.keyPath),
  );
  const server = await startServer(env.serverConfig);
  try {
    const { code, stderr } = await new Program("client.ts", ["--config", config, "--check"])
      .result();
    assert.notEqual(code, 0);
    assert.match(stderr, /natadm-client: error: .*authentication failed/);
  } finally {
    await server.stop();
    await env.cleanup();
  }
});
