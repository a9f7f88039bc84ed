/**
 * A cluster for tests: a real etcd, three real server.ts on loopback (127.0.0.1, .2, .3, each
 * with its own ports and the same service ports), peer links with certificates of one CA, and
 * real client.ts attached to one or several of them.
 * @module
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  DEADLINE_MS,
  firstDifference,
  Fixture,
  freePort,
  type Identity,
  type Program,
  readExactly,
  runScript,
  Scope,
  serverToml,
  startEcho,
  waitUntil,
  writeAll,
} from "./helpers.ts";
import { ETCD, Etcd } from "./etcd_server.ts";
import { generateCertificates } from "../src/certs.ts";

/** Why cluster tests skip here, or undefined when they can run. */
export const SKIP: string | undefined = ETCD === undefined
  ? "no `etcd` binary (apt-get install etcd-server)"
  : undefined;

/** The clients' heartbeat and reconnect interval, in seconds. */
export const INTERVAL_S = 1;

export interface Member {
  id: string;
  host: string;
  communicationPort: number;
  statusPort: number;
  config: string;
  program?: Program;
}

export interface ClusterStatus {
  self: string;
  members: string[];
  held: Record<string, string[]>;
  forwarded: number;
  forwarded_total: number;
}

/** A cluster member's server.toml: its own ports, the etcd registry, and its peer settings. */
export function clusterServerToml(m: {
  id: string;
  host: string;
  communicationPort: number;
  statusPort: number;
  etcdUrl: string;
  /** [certificate, key] files, for clients and peers alike. */
  certificate: [string, string];
  /** The cluster CA's certificate file. */
  ca: string;
}): string {
  return serverToml({
    communicationPort: m.communicationPort,
    clients: [],
    services: [],
    listenHost: m.host,
    certificate: m.certificate,
    extra: [
      `registry = "etcd"`,
      `etcd_endpoints = [${JSON.stringify(m.etcdUrl)}]`,
      `status_port = ${m.statusPort}`,
      `server_id = ${JSON.stringify(m.id)}`,
      `peer_port = ${freePort()}`,
      `peer_certificate = ${JSON.stringify(m.certificate)}`,
      `peer_cafile = ${JSON.stringify(m.ca)}`,
    ].join("\n"),
  });
}

/** How {@link setup} builds the cluster. */
export interface SetupOptions {
  /** The etcd URL member `i` (1–3) is given; by default etcd's own. */
  etcdUrl?: (i: number, etcd: Etcd) => string;
}

/** One etcd, an echo target, and three cluster members' configs (not started). */
export async function setup(scope: Scope, options: SetupOptions = {}) {
  const fixture = await Fixture.create();
  scope.defer(() => fixture.cleanup());
  const etcd = new Etcd(join(fixture.dir, "etcd-data"));
  await etcd.start();
  scope.defer(() => etcd.kill());
  const echo = startEcho();
  scope.defer(() => echo.close());
  // One CA for the cluster; one certificate (server and client use) names every member.
  const pem = await generateCertificates(
    ["localhost", "127.0.0.1", "127.0.0.2", "127.0.0.3"],
    { peer: true },
  );
  const ca = await fixture.write("cluster.ca.pem", pem.caCert);
  const cert = await fixture.write("cluster.crt.pem", pem.cert);
  const key = await fixture.write("cluster.key.pem", pem.key, 0o600);
  const members: Member[] = [];
  for (const i of [1, 2, 3]) {
    const host = `127.0.0.${i}`;
    const communicationPort = freePort();
    const statusPort = freePort();
    const config = await fixture.write(
      `server-${i}.toml`,
      clusterServerToml({
        id: `s${i}`,
        host,
        communicationPort,
        statusPort,
        etcdUrl: options.etcdUrl?.(i, etcd) ?? etcd.url,
        certificate: [cert, key],
        ca,
      }),
    );
    members.push({ id: `s${i}`, host, communicationPort, statusPort, config });
  }
  const admin = async (...args: string[]) => {
    const result = await runScript("cmd/admin.ts", ["--etcd", etcd.url, ...args]);
    assert.equal(result.code, 0, `admin ${args.join(" ")} failed:\n${result.stderr}`);
  };
  return {
    fixture,
    /** The cluster CA's certificate file (what clients and users check servers against). */
    ca,
    etcd,
    echo,
    members,
    admin,
    /** Adds client `identity` and a service on a free port to its echo; returns the port. */
    async service(identity: Identity): Promise<number> {
      const port = freePort();
      await admin("add-client", identity.name, "--key", identity.publicKey);
      await admin(
        "add-service",
        String(port),
        "--client",
        identity.name,
        "--port",
        String(echo.port),
      );
      return port;
    },
    /** Makes a client identity per name and, for each in turn, a service as {@link service}. */
    async clients(...names: string[]): Promise<{ identity: Identity; port: number }[]> {
      const made = [];
      for (const name of names) {
        const identity = await fixture.identity(name);
        made.push({ identity, port: await this.service(identity) });
      }
      return made;
    },
    async start(): Promise<void> {
      for (const m of members) m.program = await scope.server(m.config);
    },
    /** Starts a client attached to `on` (one or several members). */
    async client(identity: Identity, on: Member[]): Promise<Program> {
      const remote = on.length === 1
        ? `["${on[0].host}", ${on[0].communicationPort}]`
        : JSON.stringify(on.map((m) => [m.host, m.communicationPort]));
      const config = await fixture.write(
        `client-${identity.name}.toml`,
        [
          `name = ${JSON.stringify(identity.name)}`,
          `remote = ${remote}`,
          `cafile = ${JSON.stringify(ca)}`,
          `key = ${JSON.stringify(identity.keyPath)}`,
          `interval = ${INTERVAL_S}`,
          `infinite = true`,
        ].join("\n") + "\n",
      );
      return await scope.client(config);
    },
    async cluster(m: Member): Promise<ClusterStatus> {
      const response = await fetch(`http://127.0.0.1:${m.statusPort}/status.json`, {
        signal: AbortSignal.timeout(2000),
      });
      return (await response.json()).cluster;
    },
  };
}

/** A cluster made by {@link setup}. */
export type TestCluster = Awaited<ReturnType<typeof setup>>;

/** Waits until member `m`'s status says `client` is held by exactly `ids`. */
export async function heldBy(
  env: TestCluster,
  m: Member,
  client: string,
  ids: string[],
  timeoutMs = DEADLINE_MS,
): Promise<void> {
  let last: ClusterStatus | undefined;
  await waitUntil(
    async () => {
      last = await env.cluster(m);
      return JSON.stringify(last.held[client] ?? []) === JSON.stringify(ids);
    },
    () => `${m.id} to see ${client} held by ${ids}: ${JSON.stringify(last)}`,
    timeoutMs,
  );
}

/** A user on `host:port` that sends `bytes` and checks it gets exactly them back. */
export async function echoes(host: string, port: number, bytes: Uint8Array): Promise<void> {
  const conn = await Deno.connect({ hostname: host, port });
  try {
    conn.setNoDelay(true);
    const [, back] = await Promise.all([
      writeAll(conn, bytes),
      readExactly(conn, bytes.length),
    ]);
    assert.equal(firstDifference(back, bytes), -1, `bytes through ${host}:${port} differ`);
  } finally {
    try {
      conn.close();
    } catch {
      // Closed by readExactly's deadline.
    }
  }
}

/** A user that stays connected, for checking a tunnel survives. */
export async function longUser(host: string, port: number) {
  const conn = await Deno.connect({ hostname: host, port });
  conn.setNoDelay(true);
  return {
    conn,
    async check(text: string): Promise<void> {
      const bytes = new TextEncoder().encode(text);
      await writeAll(conn, bytes);
      assert.equal(new TextDecoder().decode(await readExactly(conn, bytes.length)), text);
    },
  };
}
