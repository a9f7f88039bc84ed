/**
 * Start-up failures: a busy port, a missing certificate or a config error stops the program
 * with a non-zero exit and one line naming the cause, and leaves nothing listening.
 */
import assert from "node:assert/strict";
import { clientToml, connectRefused, errorLine, freePort, runScript } from "./helpers.ts";
import { type Setup, setup } from "./reliability_helpers.ts";

/** Two services for client "a", so a failure on one shows whether the other was left open. */
function twoServices(env: Setup) {
  const { identity, target } = env.clients[0];
  return [
    { port: freePort(), name: identity.name, targetPort: target.port },
    { port: freePort(), name: identity.name, targetPort: target.port },
  ];
}

/** Runs the server on `env`'s config; returns its one error line after a non-zero exit. */
async function failedStart(env: Setup): Promise<string> {
  const { code, stderr } = await runScript("server.ts", ["--config", env.serverConfig]);
  assert.notEqual(code, 0, stderr);
  assert.doesNotMatch(stderr, /NATadm server ready/);
  return errorLine(stderr, "natadm-server");
}

/** Asserts that nothing accepts connections on any of `ports`. */
async function nothingListens(ports: number[]): Promise<void> {
  for (const port of ports) {
    assert.ok(await connectRefused(port), `port ${port} was left listening`);
  }
}

Deno.test("start-up: the communication port in use stops the server, naming it", async () => {
  const env = await setup();
  const busy = Deno.listen({ hostname: "127.0.0.1", port: env.communicationPort });
  try {
    const services = twoServices(env);
    await env.writeServer({ services });
    const line = await failedStart(env);
    assert.match(line, new RegExp(`${env.communicationPort}.*communication_port`));
    assert.match(line, /in use/i);
    await nothingListens(services.map((s) => s.port));
  } finally {
    busy.close();
    await env.scope.close();
  }
});

Deno.test("start-up: a service port in use stops the server, naming it; no other port stays open", async () => {
  const env = await setup();
  const services = twoServices(env);
  const busy = Deno.listen({ hostname: "127.0.0.1", port: services[1].port });
  try {
    await env.writeServer({ services });
    const line = await failedStart(env);
    assert.match(line, new RegExp(`services\\.${services[1].port}`));
    assert.match(line, /in use/i);
    await nothingListens([env.communicationPort, services[0].port]);
  } finally {
    busy.close();
    await env.scope.close();
  }
});

Deno.test("start-up: a missing certificate stops the server, naming the file and key", async () => {
  const env = await setup();
  try {
    const services = twoServices(env);
    await env.writeServer({ services });
    const text = await Deno.readTextFile(env.serverConfig);
    await Deno.writeTextFile(
      env.serverConfig,
      text.replace(
        /communication_server_certificate = \[[^\]]*\]/,
        () => `communication_server_certificate = ["missing.crt.pem", "communication.key.pem"]`,
      ),
    );
    const line = await failedStart(env);
    assert.match(line, /communication_server_certificate\[0\]: cannot read .*missing\.crt\.pem/);
    await nothingListens([env.communicationPort, ...services.map((s) => s.port)]);
  } finally {
    await env.scope.close();
  }
});

Deno.test("start-up: a config error stops the server, naming the key; nothing listens", async () => {
  const env = await setup();
  try {
    const services = twoServices(env);
    await env.writeServer({ services, extra: `pending_timeout = "soon"` });
    const line = await failedStart(env);
    assert.match(line, /server\.toml: pending_timeout: /);
    await nothingListens([env.communicationPort, ...services.map((s) => s.port)]);
  } finally {
    await env.scope.close();
  }
});

Deno.test("start-up: a client with a missing cafile stops with one line naming it", async () => {
  const env = await setup();
  try {
    const file = await env.fixture.write(
      "client-nocafile.toml",
      clientToml({
        identity: env.clients[0].identity,
        communicationPort: env.communicationPort,
        cafile: "missing-ca.pem",
      }),
    );
    const { code, stderr } = await runScript("client.ts", ["--config", file]);
    assert.notEqual(code, 0, stderr);
    assert.match(errorLine(stderr, "natadm-client"), /cafile: cannot read .*missing-ca\.pem/);
  } finally {
    await env.scope.close();
  }
});
