/**
 * The WAN profile (`--wan`): the server↔client hop crosses a slow, distant link made of real
 * kernel parts — two network namespaces joined by a veth pair, each end rate-shaped by tbf to
 * 100 Mbit/s — plus bench/delay.ts holding every chunk 20 ms each way (40 ms round trip).
 *
 * The server, the delaying relay and the user (bench/wanuser.ts) live in namespace `a`
 * (10.203.0.1); the client and the target services in namespace `b` (10.203.0.2). "direct" is
 * the user reaching the targets across the same link and relay:
 *
 *   natadm: user → server ─(TLS)→ relay(20 ms) ⇄ veth ⇄ client → target
 *   direct: user → relay(20 ms) ⇄ veth ⇄ target
 * @module
 */
import { clientToml, type Fixture, freePort, ROOT, serverToml } from "../tests/helpers.ts";
import type { Context } from "./cases.ts";
import { fmt } from "./cases.ts";
import { linkedPair, type NetNs, netnsUnavailable, PAIR_ADDR, removeStale } from "./netns.ts";
import { Proc, stopTracked, track } from "./proc.ts";
import type { SysId, TargetPorts } from "./systems.ts";

/** One-way delay added by the relay, ms. */
export const WAN_DELAY_MS = 20;
/** Rate of the link each way. */
export const WAN_RATE = "100mbit";

const DENO = Deno.execPath();
const here = (file: string) => new URL(file, import.meta.url).pathname;

/** Runs the WAN profile's cases; records wan_* figures for direct and natadm. */
export async function wan(ctx: Context, fixture: Fixture): Promise<void> {
  ctx.log(
    `[wan] link: ${WAN_RATE} each way (tbf on a veth pair), ${2 * WAN_DELAY_MS} ms round trip`,
  );
  const why = await netnsUnavailable();
  if (why) {
    ctx.rec.notes.push(`WAN profile skipped: ${why}`);
    ctx.log(`  skipped: ${why}`);
    return;
  }
  await removeStale();
  const procs: Proc[] = [];
  let pair: { a: NetNs; b: NetNs } | undefined;
  const start = (name: string, ns: NetNs, args: string[], keepStdin = false) => {
    const [c, a] = ns.wrap(DENO, args);
    const p = track(new Proc(name, c, a, { keepStdin }));
    procs.push(p);
    return p;
  };
  try {
    pair = await linkedPair({ rate: WAN_RATE });
    const { a, b } = pair;
    const targets = start(
      "wan targets",
      b,
      ["run", "--allow-net", here("./target.ts"), "--host", "0.0.0.0"],
      true,
    );
    const tp = JSON.parse(await targets.waitFor(/^\{"echo"/)) as TargetPorts;
    const communicationPort = freePort();
    const names = ["echo", "sink", "source"] as const;
    const relay = start("wan delay relay", a, [
      "run",
      "--allow-net",
      here("./delay.ts"),
      "--delay",
      String(WAN_DELAY_MS),
      ...names.map((n) => `127.0.0.1:0=${PAIR_ADDR.b}:${tp[n]}`),
      `${PAIR_ADDR.a}:0=127.0.0.1:${communicationPort}`,
    ], true);
    const relayPorts = JSON.parse(await relay.waitFor(/^\[/)) as number[];
    const direct: TargetPorts = { echo: relayPorts[0], sink: relayPorts[1], source: relayPorts[2] };
    const natadm: TargetPorts = { echo: freePort(), sink: freePort(), source: freePort() };

    const identity = await fixture.identity("wan");
    const serverConfig = await fixture.write(
      "wan-server.toml",
      serverToml({
        communicationPort,
        clients: [identity],
        services: names.map((n) => ({ port: natadm[n], name: "wan", targetPort: tp[n] })),
      }),
    );
    const clientConfig = await fixture.write(
      "wan-client.toml",
      clientToml({
        identity,
        communicationPort: relayPorts[3],
        host: PAIR_ADDR.a,
        interval: 5,
      }),
    );
    const perms = ["run", "--allow-net", "--allow-read"];
    const server = start("wan server", a, [...perms, `${ROOT}server.ts`, "--config", serverConfig]);
    await server.waitFor(/NATadm server ready/);
    const client = start("wan client", b, [...perms, `${ROOT}client.ts`, "--config", clientConfig]);
    await client.waitFor(/connected to .* as/, 30_000);

    const user = async (task: string, front: TargetPorts, extra: string[] = []) => {
      const p = start(`wan user ${task}`, a, [
        "run",
        "-A",
        here("./wanuser.ts"),
        "--task",
        task,
        "--front",
        JSON.stringify(front),
        ...extra,
      ]);
      try {
        const status = await p.status;
        const line = p.lines.find((l) => l.startsWith("{"));
        if (!status.success || !line) throw new Error(`wanuser ${task} failed: ${p.tail(3)}`);
        return JSON.parse(line) as Record<string, number>;
      } finally {
        await stopTracked(p);
      }
    };
    await user("wait", natadm);
    await user("wait", direct);

    const q = ctx.params.quick;
    const seconds = q ? 3 : 8;
    const systems: [SysId, TargetPorts][] = [["direct", direct], ["natadm", natadm]];
    for (const [id, front] of systems) {
      try {
        const fb = await user("firstbyte", front, ["--count", q ? "20" : "100"]);
        ctx.rec.set("wan_fb_p50", id, fb.p50);
        ctx.rec.set("wan_fb_p99", id, fb.p99);
        ctx.rec.detail("wan_first_byte", id, fb);
        ctx.log(`  first byte   ${id.padEnd(8)} p50 ${fmt(fb.p50)} ms  p99 ${fmt(fb.p99)} ms`);
        for (const [key, reverse] of [["up", false], ["down", true]] as const) {
          const extra = ["--seconds", String(seconds), ...(reverse ? ["--reverse"] : [])];
          const b = await user("bulk", front, extra);
          ctx.rec.set(`wan_${key}`, id, b.mbps);
          ctx.log(`  bulk ${key.padEnd(4)}    ${id.padEnd(8)} ${fmt(b.mbps, 2)} MB/s`);
          const f = await user("fair", front, extra);
          ctx.rec.set(`wan_fair_${key}_p99`, id, f.p99);
          ctx.rec.detail(`wan_fair_${key}`, id, f);
          ctx.log(
            `  RTT during bulk ${key.padEnd(4)} ${id.padEnd(8)} p50 ${fmt(f.p50)} ms  p99 ${
              fmt(f.p99)
            } ms  (bulk ${fmt(f.mbps, 2)} MB/s)`,
          );
        }
      } catch (err) {
        ctx.rec.errors.push(`wan, ${id}: ${(err as Error).message.split("\n")[0]}`);
        ctx.log(`  ERROR wan, ${id}: ${(err as Error).message}`);
      }
      if (server.exited || client.exited) {
        throw new Error(`NATadm died: ${server.exited ? server.tail(4) : client.tail(4)}`);
      }
    }
    ctx.rec.detail("wan_link", "natadm", {
      rate: WAN_RATE,
      delayEachWayMs: WAN_DELAY_MS,
      addresses: PAIR_ADDR,
    });
  } catch (err) {
    ctx.rec.errors.push(`wan: ${(err as Error).message.split("\n")[0]}`);
    ctx.log(`  ERROR wan: ${(err as Error).message}`);
  } finally {
    for (const p of procs.reverse()) await stopTracked(p);
    await stopTracked(pair?.a);
    await stopTracked(pair?.b);
  }
}
