import assert from "node:assert/strict";
import { connectUser, echoSetup, readExactly, startClient, startServer } from "./helpers.ts";
import { renderValue } from "../src/log.ts";

Deno.test("--log-format json writes one JSON object per line, with each tunnel's fields", async () => {
  const env = await echoSetup();
  const server = await startServer(env.serverConfig, ["--log-format", "json"]);
  const client = await startClient(env.clientConfig, ["--log-format", "json"]);
  try {
    const user = await connectUser(env.servicePort);
    await user.write(new TextEncoder().encode("json"));
    await readExactly(user, 4);
    user.close();
    const line = await server.waitFor(/tunnel closed/);
    const record = JSON.parse(line);
    assert.equal(record.level, "INFO");
    assert.match(record.message, /^tunnel closed: user /);
    assert.equal(record.properties.up, 4);
    assert.equal(record.properties.down, 4);
    assert.equal(record.properties.port, env.servicePort);
    assert.equal(record.properties.client, env.identity.name);
    for (const program of [server, client]) {
      for (const text of program.lines.filter((l) => l.trim() !== "")) {
        assert.doesNotThrow(() => JSON.parse(text), `not JSON: ${text}`);
      }
    }
  } finally {
    await client.stop();
    await server.stop();
    await env.cleanup();
  }
});

Deno.test("log values render exactly as Deno.inspect would, fast path or not", () => {
  const values = [
    "bench",
    "127.0.0.1:45678",
    "[::1]:22",
    "",
    'say "hi"',
    "it's",
    "back\\slash",
    "tab\there",
    "new\nline",
    "\u001b[31mred",
    "é→",
    40001,
    0,
    -0,
    1.5,
    -7,
    NaN,
    2 ** 60,
    true,
    null,
    undefined,
    { a: 1 },
    ["x"],
    new Error("boom"),
  ];
  for (const value of values) {
    assert.equal(renderValue(value, (v) => Deno.inspect(v)), Deno.inspect(value), String(value));
  }
});
