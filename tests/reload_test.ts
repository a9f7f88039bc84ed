/**
 * Live reload of the server's config, by SIGHUP and by --watch-config: added services listen,
 * removed ones stop listening while their live tunnels run on, unchanged ones are untouched, a
 * changed client key applies to the next authentication, and an invalid file changes nothing.
 */
import assert from "node:assert/strict";
import {
  clientToml,
  connectRefused,
  connectUser,
  freePort,
  type Identity,
  Program,
  readExactly,
  waitUntil,
} from "./helpers.ts";
import {
  exchange,
  randomBytes,
  type ServiceLine,
  type Setup,
  setup,
  startTarget,
} from "./reliability_helpers.ts";

/** Three services of client "a", each with a target that greets with its own name. */
function threeServices(env: Setup) {
  const name = env.clients[0].identity.name;
  const make = (greeting: string) => {
    const target = startTarget("echo", `${greeting}\n`);
    env.scope.defer(() => target.close());
    return { port: freePort(), name, targetPort: target.port, greeting };
  };
  return { one: make("one"), two: make("two"), three: make("three"), four: make("four") };
}

type Service = ServiceLine & { greeting: string };

/** A user on `service` that has read its greeting and done one round trip. */
async function openUser(service: Service): Promise<Deno.TcpConn> {
  const user = await connectUser(service.port);
  const greeting = new TextDecoder().decode(await readExactly(user, service.greeting.length + 1));
  assert.equal(greeting, `${service.greeting}\n`, `service ${service.port} reached another target`);
  await roundTrip(user);
  return user;
}

/** Checks a live tunnel still carries bytes both ways. */
async function roundTrip(user: Deno.Conn): Promise<void> {
  const payload = randomBytes(3000);
  const { received, ended } = await exchange(user, payload, { timeoutMs: 10_000 });
  assert.equal(ended, "complete", `a live tunnel stopped working (${ended})`);
  assert.deepEqual(received, payload);
}

/** A new user on `service` is served by the right target. */
async function served(service: Service): Promise<void> {
  (await openUser(service)).close();
}

const RELOADED = /configuration reloaded/;
const REJECTED = /configuration not reloaded, the old one stays in force/;

/** A server config that is valid TOML and adds `extra` service, but has one bad value. */
function invalid(env: Setup, services: Service[], extra: Service): string {
  return [
    `communication_port = ${env.communicationPort}`,
    `communication_server_certificate = ["communication.crt.pem", "communication.key.pem"]`,
    `listen_host = "127.0.0.1"`,
    `pending_timeout = 0`,
    `[clients.a]`,
    `key = "${env.clients[0].identity.publicKey}"`,
    ...[...services, extra].flatMap((s) => [
      `[services.${s.port}]`,
      `name = "a"`,
      `port = ${s.targetPort}`,
    ]),
  ].join("\n") + "\n";
}

Deno.test("reload by SIGHUP: services added and removed, live tunnels kept, bad file ignored, new key", async () => {
  const env = await setup();
  try {
    const { one, two, three, four } = threeServices(env);
    await env.writeServer({ services: [one, two] });
    const server = await env.startServer();
    const client = await env.startClient();
    const userOne = await openUser(one);
    const userTwo = await openUser(two);

    // two removed, three added, one unchanged.
    await env.writeServer({ services: [one, three] });
    server.kill("SIGHUP");
    await server.waitFor(/configuration reloaded: 1 services added, 1 removed, 0 changed/);
    assert.ok(await connectRefused(two.port), "a removed service still accepts users");
    await roundTrip(userTwo); // its live tunnel continues
    await roundTrip(userOne);
    await served(three);
    await served(one);

    // An invalid file (adding four, with one bad value) changes nothing at all.
    await Deno.writeTextFile(env.serverConfig, invalid(env, [one, three], four));
    server.kill("SIGHUP");
    const error = await server.waitFor(REJECTED);
    assert.match(error, /pending_timeout/);
    assert.ok(await connectRefused(four.port), "a service of the rejected file listens");
    assert.ok(await connectRefused(two.port));
    await served(one);
    await served(three);
    await roundTrip(userOne);
    await roundTrip(userTwo);
    assert.ok(!server.exited && !client.exited);

    // A new key for "a": from the next authentication on, only the new key gets in. (Whether
    // the session that logged in with the old key may stay is the server's policy; this one
    // logs it out at once, as the old key may be stolen.)
    const renewed: Identity = await env.fixture.identity("a");
    await env.writeServer({ clients: [renewed], services: [one, three] });
    server.kill("SIGHUP");
    await waitForCount(server, RELOADED, 2);
    const oldKey = env.scope.track(new Program("client.ts", ["--config", env.clients[0].config]));
    await oldKey.waitFor(/refused this client: authentication failed/);
    oldKey.kill("SIGKILL");
    const newConfig = await env.fixture.write(
      "client-new.toml",
      clientToml({ identity: renewed, communicationPort: env.communicationPort }),
    );
    const newKey = env.scope.track(new Program("client.ts", ["--config", newConfig]));
    await newKey.waitFor(/connected to .* as/);
    await served(three);
    await served(one);
    userOne.close();
    userTwo.close();
  } finally {
    await env.scope.close();
  }
});

Deno.test("reload by --watch-config: in-place writes and editor-style replacements are followed", async () => {
  const env = await setup();
  try {
    const { one, two, three, four } = threeServices(env);
    await env.writeServer({ services: [one, two] });
    const server = await env.startServer(["--watch-config"]);
    await env.startClient();
    const userTwo = await openUser(two);

    // Written in place.
    await env.writeServer({ services: [one, three] });
    await waitForCount(server, RELOADED, 1);
    assert.ok(await connectRefused(two.port), "a removed service still accepts users");
    await roundTrip(userTwo);
    await served(three);

    // An invalid file is rejected whole.
    await Deno.writeTextFile(env.serverConfig, invalid(env, [one, three], four));
    await server.waitFor(REJECTED);
    assert.ok(await connectRefused(four.port), "a service of the rejected file listens");
    await served(one);
    await served(three);

    // Replaced the way editors and config tools save: a new file renamed over the old one,
    // twice, so the watch must survive a replacement.
    const replace = async (services: Service[]) => {
      const tmp = `${env.serverConfig}.tmp`;
      await env.writeServer({ services, file: tmp });
      await Deno.rename(tmp, env.serverConfig);
    };
    await replace([one, three, four]);
    await waitForCount(server, RELOADED, 2);
    await served(four);
    await replace([one, four]);
    await waitForCount(server, RELOADED, 3, 10_000);
    assert.ok(await connectRefused(three.port), "the second replacement was not applied");
    await served(one);
    await roundTrip(userTwo);
    userTwo.close();
  } finally {
    await env.scope.close();
  }
});

/** Waits until `program` has printed `n` lines matching `pattern`. */
async function waitForCount(
  program: Program,
  pattern: RegExp,
  n: number,
  timeoutMs = 15_000,
): Promise<void> {
  await waitUntil(
    () => program.count(pattern) >= n,
    () => `${n} lines matching ${pattern}:\n${program.lines.join("\n")}`,
    timeoutMs,
  );
}
