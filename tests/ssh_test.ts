/**
 * NATadm's main job end to end: `ssh` to a service port on the server reaches a real `sshd`
 * behind the client, and runs a command there.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  clientToml,
  DEADLINE_MS,
  findExecutable,
  Fixture,
  freePort,
  Scope,
  serverToml,
  sh,
  startSshd,
} from "./helpers.ts";

const ssh = findExecutable("ssh");
const missing = ["sshd", "ssh", "ssh-keygen"].filter((name) => !findExecutable(name));
if (missing.length) {
  console.log(`ssh test skipped: ${missing.join(", ")} not installed (openssh-server/-client)`);
}

Deno.test({
  name: "ssh through the server's service port runs a command on the sshd behind the client",
  ignore: missing.length > 0,
  async fn() {
    const fixture = await Fixture.create();
    const scope = new Scope();
    try {
      const sshdPort = freePort();
      const daemon = await startSshd(scope, fixture.dir, sshdPort);
      const identity = await fixture.identity("ssh box");
      const communicationPort = freePort();
      const servicePort = freePort();
      const server = await scope.server(
        await fixture.write(
          "server.toml",
          serverToml({
            communicationPort,
            clients: [identity],
            services: [{ port: servicePort, name: identity.name, targetPort: sshdPort }],
          }),
        ),
      );
      await scope.client(
        await fixture.write("client.toml", clientToml({ identity, communicationPort })),
      );
      const user = (await sh("whoami", [])).trim();
      const out = await new Deno.Command(ssh!, {
        args: [
          "-F",
          "/dev/null",
          "-p",
          String(servicePort),
          "-i",
          join(fixture.dir, "user_ed25519"),
          "-o",
          "BatchMode=yes",
          "-o",
          "IdentitiesOnly=yes",
          "-o",
          "StrictHostKeyChecking=no",
          "-o",
          "UserKnownHostsFile=/dev/null",
          "-o",
          "LogLevel=ERROR",
          `${user}@127.0.0.1`,
          "echo",
          "natadm-ok",
        ],
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
        signal: AbortSignal.timeout(DEADLINE_MS),
      }).output();
      const stderr = new TextDecoder().decode(out.stderr);
      assert.equal(
        out.code,
        0,
        `ssh failed: ${stderr}\nsshd:\n${daemon.lines.join("\n")}\nserver:\n${
          server.lines.join("\n")
        }`,
      );
      assert.equal(new TextDecoder().decode(out.stdout), "natadm-ok\n");
      // It really went through the tunnel: sshd saw the client's local connection, and the
      // server logged the user on the service port.
      await server.waitFor(new RegExp(`tunnel open: user .* → service ${servicePort} →`));
      await daemon.waitFor(/Accepted publickey for /);
    } finally {
      await scope.close();
      await fixture.cleanup();
    }
  },
});
