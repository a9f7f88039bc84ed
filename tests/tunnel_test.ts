import assert from "node:assert/strict";
import {
  connectUser,
  echoSetup,
  readExactly,
  readToEnd,
  startClient,
  startServer,
} from "./helpers.ts";

Deno.test("a user's bytes come back through the tunnel from an echo service", async () => {
  const env = await echoSetup();
  const server = await startServer(env.serverConfig);
  const client = await startClient(env.clientConfig);
  try {
    const user = await connectUser(env.servicePort);
    const message = new TextEncoder().encode("hello through NAT\n");
    await user.write(message);
    assert.deepEqual(await readExactly(user, message.length), message);
    user.close();
    await server.waitFor(/tunnel closed: user .* service \d+ .*18 bytes up, 18 bytes down/);
  } finally {
    await client.stop();
    await server.stop();
    await env.cleanup();
  }
});

Deno.test("a user that half-closes still receives every byte of the reply", async () => {
  const env = await echoSetup();
  const server = await startServer(env.serverConfig);
  const client = await startClient(env.clientConfig);
  try {
    const user = await connectUser(env.servicePort);
    const payload = crypto.getRandomValues(new Uint8Array(60_000));
    await user.write(payload);
    await user.closeWrite();
    const back = await readToEnd(user);
    assert.deepEqual(back.length, payload.length);
    assert(back.every((b, i) => b === payload[i]));
  } finally {
    await client.stop();
    await server.stop();
    await env.cleanup();
  }
});
