/**
 * Case: a fleet of N idle client identities (soak/host.ts runs many `Client`s per process)
 * against a server of its own. Measures the server's RSS and descriptors per connected client
 * (after − before, ÷ N), the hosts' RSS per identity, and — after a server restart — how long
 * until every client is connected again and how many TCP connects each made meanwhile.
 *
 * "Connected" comes from the server's /status.json (clients with connected = true), polled by
 * bench/watch.ts. Where network namespaces can be made, the server, hosts and watcher run in a
 * namespace of their own, so that its TCP counters (ActiveOpens) count exactly the fleet's
 * connects; elsewhere everything runs on loopback and the connect count is not reported.
 * @module
 */
import { join } from "node:path";
import {
  clientToml,
  type Fixture,
  freePort,
  type Identity,
  ROOT,
  serverToml,
} from "../tests/helpers.ts";
import { CERT_FILES } from "../src/certs.ts";
import type { Context } from "./cases.ts";
import { activeOpens, NetNs, netnsUnavailable, removeStale } from "./netns.ts";
import { memory, Proc, raiseFileLimit, rssOf, stopTracked, track } from "./proc.ts";

/** Heartbeat interval and reconnect-backoff cap of the fleet's clients, in seconds. */
export const FLEET_INTERVAL = 5;
/** Identities per host process at most. */
const PER_HOST = 2500;

const DENO = Deno.execPath();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Open descriptors of `pid` (0 if it is gone). */
export function fdCount(pid: number): number {
  try {
    let n = 0;
    for (const _ of Deno.readDirSync(`/proc/${pid}/fd`)) n++;
    return n;
  } catch {
    return 0;
  }
}

interface WatchLine {
  t: number;
  connected?: number;
  clients?: number;
  error?: string;
  polls: number;
}

/** The watcher's latest report. */
function latest(watch: Proc): WatchLine | undefined {
  for (let i = watch.lines.length - 1; i >= 0; i--) {
    const line = watch.lines[i];
    if (line.startsWith("{")) {
      try {
        return JSON.parse(line) as WatchLine;
      } catch {
        // a line cut short: look further back
      }
    }
  }
  return undefined;
}

/** Waits until `check` passes on the watcher's latest report; returns that report. */
async function until(
  watch: Proc,
  what: string,
  timeoutMs: number,
  check: (w: WatchLine) => boolean,
  also: () => string | undefined = () => undefined,
): Promise<WatchLine> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const w = latest(watch);
    if (w && check(w)) return w;
    const broken = also();
    if (broken) throw new Error(`${what}: ${broken}`);
    if (watch.exited) throw new Error(`${what}: the status watcher exited: ${watch.tail(3)}`);
    if (Date.now() > end) {
      throw new Error(
        `timed out after ${timeoutMs} ms waiting for ${what}` +
          (w ? ` (last: ${w.error ?? `${w.connected}/${w.clients} connected`})` : ""),
      );
    }
    await sleep(50);
  }
}

/** Waits until `pid`'s descriptor count stays the same for a second (at most `maxMs`). */
async function settled(pid: number, maxMs: number): Promise<void> {
  const end = Date.now() + maxMs;
  let last = fdCount(pid);
  while (Date.now() < end) {
    await sleep(1000);
    const now = fdCount(pid);
    if (now === last) return;
    last = now;
  }
}

/** Case: N idle identities, server and client cost per identity, reconnect after a restart. */
export async function fleet(ctx: Context, fixture: Fixture, n: number): Promise<void> {
  const procs = Math.max(1, Math.ceil(n / PER_HOST));
  ctx.log(
    `[fleet] ${n} idle client identities in ${procs} host process(es), interval ${FLEET_INTERVAL} s`,
  );
  const noNs = await netnsUnavailable();
  if (noNs) {
    ctx.rec.notes.push(`fleet: no namespace (${noNs}): connects per client not counted`);
  }
  const files = await raiseFileLimit(20_000);
  const ns = noNs ? undefined : new NetNs("fleet");
  const wrap = (cmd: string, args: string[]): [string, string[]] =>
    ns ? ns.wrap(cmd, args) : [cmd, args];
  const started: Proc[] = [];
  const start = (name: string, cmd: string, args: string[], keepStdin = false) => {
    const [c, a] = wrap(cmd, args);
    const p = track(new Proc(name, c, a, { keepStdin }));
    started.push(p);
    return p;
  };
  const record: Record<string, unknown> = {
    clients: n,
    hostProcesses: procs,
    openFileLimit: files,
  };
  try {
    if (ns) {
      await removeStale();
      await ns.create();
    }
    const dir = fixture.path("fleet");
    await Deno.mkdir(dir, { recursive: true });
    const made = Date.now();
    const identities: Identity[] = [];
    for (let i = 0; i < n; i++) identities.push(await fixture.identity(`fleet-${i}`));
    const communicationPort = freePort(), statusPort = freePort();
    const serverConfig = join(dir, "server.toml");
    await Deno.writeTextFile(
      serverConfig,
      serverToml({
        communicationPort,
        clients: identities,
        services: [],
        certificate: [fixture.path(CERT_FILES.cert), fixture.path(CERT_FILES.key)],
        extra: `status_port = ${statusPort}\nlog_level = "warning"`,
      }),
    );
    const configs: string[] = [];
    for (const [i, identity] of identities.entries()) {
      const path = join(dir, `client-${i}.toml`);
      await Deno.writeTextFile(
        path,
        clientToml({
          identity,
          communicationPort,
          host: "127.0.0.1",
          cafile: fixture.caPath,
          interval: FLEET_INTERVAL,
        }),
      );
      configs.push(path);
    }
    ctx.log(`  ${n} keys and configs made in ${((Date.now() - made) / 1000).toFixed(1)} s`);
    const serverArgs = [
      "run",
      "--allow-net",
      "--allow-read",
      join(ROOT, "server.ts"),
      "--config",
      serverConfig,
    ];
    let server = start("fleet server", DENO, serverArgs);
    const watch = start(
      "status watcher",
      DENO,
      [
        "run",
        "--allow-net",
        new URL("./watch.ts", import.meta.url).pathname,
        "--port",
        String(statusPort),
        // status.json grows with the fleet: poll a large one less often, to spare the server.
        "--every",
        String(Math.min(1000, Math.max(200, Math.round(n / 20)))),
      ],
      true,
    );
    const serverDied = () => server.exited ? `the server exited: ${server.tail(4)}` : undefined;
    await until(
      watch,
      "the fleet server's status page",
      60_000,
      (w) => w.clients === n,
      serverDied,
    );
    await settled(server.pid, 3000);
    const before = { rss: memory(server.pid).rss, fds: fdCount(server.pid) };

    const hosts: Proc[] = [];
    for (let p = 0; p < procs; p++) {
      const mine = configs.filter((_, i) => i % procs === p);
      hosts.push(
        start(`fleet host ${p}`, DENO, [
          "run",
          "--allow-net",
          "--allow-read",
          join(ROOT, "soak/host.ts"),
          ...mine,
        ]),
      );
    }
    const hostDied = () => {
      const h = hosts.find((h) => h.exited);
      return h ? `${h.name} exited: ${h.tail(4)}` : serverDied();
    };
    const connectStart = performance.now();
    const connectTimeout = 60_000 + n * 10;
    let connected = 0;
    try {
      await until(watch, `all ${n} clients connected`, connectTimeout, (w) => {
        connected = w.connected ?? connected;
        return w.connected === n;
      }, hostDied);
    } catch (err) {
      record.connectProblem = (err as Error).message;
      ctx.rec.errors.push(`fleet: ${(err as Error).message}`);
      ctx.log(`  ERROR ${(err as Error).message}`);
    }
    const connectMs = performance.now() - connectStart;
    ctx.rec.set("fleet_ok", "natadm", connected);
    await settled(server.pid, 10_000);
    const after = { rss: memory(server.pid).rss, fds: fdCount(server.pid) };
    const hostPids = hosts.map((h) => h.pid);
    const hostRss = rssOf(hostPids);
    const hostFds = hostPids.reduce((s, pid) => s + fdCount(pid), 0);
    const count = Math.max(1, connected);
    const rssPer = (after.rss - before.rss) / count, fdPer = (after.fds - before.fds) / count;
    ctx.rec.set("fleet_srv_rss", "natadm", rssPer);
    ctx.rec.set("fleet_srv_fd", "natadm", fdPer);
    ctx.rec.set("fleet_cli_rss", "natadm", hostRss / n);
    Object.assign(record, {
      connected,
      connectSeconds: connectMs / 1000,
      server: { before, after, rssKiBPerClient: rssPer, fdsPerClient: fdPer },
      hosts: { rssKiB: hostRss, fds: hostFds, rssKiBPerIdentity: hostRss / n },
    });
    ctx.log(
      `  ${connected}/${n} connected in ${(connectMs / 1000).toFixed(1)} s; server ` +
        `${rssPer.toFixed(1)} KiB and ${fdPer.toFixed(2)} fds per client; hosts ` +
        `${(hostRss / n).toFixed(1)} KiB per identity`,
    );

    if (connected === n) {
      // Restart: stop the server, start it again with the same config, time the reconnect.
      const opensBefore = activeOpens(hosts[0].pid);
      const pollsBefore = latest(watch)?.polls ?? 0;
      await stopTracked(server);
      const restarted = Date.now();
      server = start("fleet server (restarted)", DENO, serverArgs);
      let ready: WatchLine | undefined;
      let back: WatchLine | undefined;
      try {
        back = await until(
          watch,
          `all ${n} clients back after the restart`,
          (FLEET_INTERVAL + 60) * 1000 + n * 10,
          (w) => {
            if (w.t <= restarted || w.clients !== n) return false;
            ready ??= w;
            return w.connected === n;
          },
          hostDied,
        );
      } catch (err) {
        record.reconnectProblem = (err as Error).message;
        ctx.rec.errors.push(`fleet restart: ${(err as Error).message}`);
        ctx.log(`  ERROR ${(err as Error).message}`);
      }
      const backMs = back ? back.t - restarted : undefined;
      const readyMs = ready ? ready.t - restarted : undefined;
      const opensAfter = activeOpens(hosts[0].pid);
      if (backMs !== undefined) ctx.rec.set("fleet_back_s", "natadm", backMs / 1000);
      const polls = (latest(watch)?.polls ?? pollsBefore) - pollsBefore;
      if (ns && opensBefore !== undefined && opensAfter !== undefined) {
        const perClient = (opensAfter - opensBefore - polls) / n;
        ctx.rec.set("fleet_connects", "natadm", perClient);
        record.connectsPerClient = perClient;
      }
      Object.assign(record, {
        reconnectSeconds: backMs === undefined ? null : backMs / 1000,
        serverReadySeconds: readyMs === undefined ? null : readyMs / 1000,
      });
      ctx.log(
        `  after a restart: ${
          backMs === undefined ? "not all back" : `all back in ${(backMs / 1000).toFixed(1)} s`
        }` +
          (readyMs === undefined
            ? ""
            : ` (server answering after ${(readyMs / 1000).toFixed(1)} s)`) +
          (record.connectsPerClient === undefined
            ? ""
            : `, ${(record.connectsPerClient as number).toFixed(2)} TCP connects per client`),
      );
    }
    ctx.rec.detail("fleet", "natadm", record);
  } catch (err) {
    ctx.rec.errors.push(`fleet: ${(err as Error).message.split("\n")[0]}`);
    ctx.log(`  ERROR fleet: ${(err as Error).message}`);
    ctx.rec.detail("fleet", "natadm", record);
  } finally {
    for (const p of started.reverse()) await stopTracked(p);
    await stopTracked(ns);
    await Deno.remove(fixture.path("fleet"), { recursive: true }).catch(() => {});
  }
}
