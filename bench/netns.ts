/**
 * Network namespaces the benchmark makes and removes: a lone one (loopback only, for counting
 * one group of processes' TCP connects) or a pair joined by a rate-shaped veth link. Every
 * namespace is named `natadm-bench-PID-ROLE`, so leftovers of a killed run are recognised and
 * removed at the next start. Traffic only ever flows inside and between these namespaces.
 * @module
 */
import { run, type Stoppable, track, which } from "./proc.ts";

const PREFIX = "natadm-bench-";

/** Why namespaces cannot be made here, or undefined if they can. */
export async function netnsUnavailable(): Promise<string | undefined> {
  if (Deno.uid() !== 0) return "not root: network namespaces need root";
  const ip = which("ip");
  if (!ip) return "no `ip` command (apt-get install iproute2)";
  const probe = `${PREFIX}${Deno.pid}-probe`;
  try {
    await run(ip, ["netns", "add", probe]);
  } catch (err) {
    return `ip netns add failed: ${(err as Error).message.split("\n")[0]}`;
  } finally {
    await run(ip, ["netns", "del", probe]).catch(() => {});
  }
  return undefined;
}

/** Removes namespaces left by earlier runs whose process is gone. */
export async function removeStale(): Promise<void> {
  const ip = which("ip");
  if (!ip) return;
  const list = await run(ip, ["netns", "list"]).catch(() => "");
  for (const line of list.split("\n")) {
    const name = line.split(" ")[0];
    const m = name.match(/^natadm-bench-(\d+)-/);
    if (!m) continue;
    let alive = true;
    try {
      Deno.statSync(`/proc/${m[1]}`);
    } catch {
      alive = false;
    }
    if (!alive) await run(ip, ["netns", "del", name]).catch(() => {});
  }
}

/** One namespace: commands run inside it through `ip netns exec`. */
export class NetNs implements Stoppable {
  readonly name: string;
  #made = false;

  constructor(role: string) {
    this.name = `${PREFIX}${Deno.pid}-${role}`;
  }

  /** Makes the namespace with its loopback up. */
  async create(): Promise<void> {
    await run("ip", ["netns", "add", this.name]);
    this.#made = true;
    track(this);
    await this.ip(["link", "set", "lo", "up"]);
  }

  /** Runs `ip ARGS` inside the namespace. */
  ip(args: string[]): Promise<string> {
    return run("ip", ["-n", this.name, ...args]);
  }

  /** Runs any short command inside the namespace. */
  exec(command: string, args: string[]): Promise<string> {
    return run("ip", ["netns", "exec", this.name, command, ...args]);
  }

  /** The command and arguments that start `command args` inside the namespace. */
  wrap(command: string, args: string[]): [string, string[]] {
    return ["ip", ["netns", "exec", this.name, command, ...args]];
  }

  /** Deletes the namespace (its veth end goes with it). */
  async stop(): Promise<void> {
    if (!this.#made) return;
    this.#made = false;
    await run("ip", ["netns", "del", this.name]).catch(() => {});
  }
}

/** The shape of the link between two namespaces. */
export interface LinkShape {
  /** Rate each way, e.g. "100mbit". */
  rate: string;
}

/**
 * Two namespaces joined by a veth pair: `a` gets 10.203.0.1/30, `b` 10.203.0.2/30; each end
 * is rate-shaped with a token bucket (tbf), so the link carries `rate` each way.
 */
export async function linkedPair(shape: LinkShape): Promise<{ a: NetNs; b: NetNs }> {
  const a = new NetNs("a"), b = new NetNs("b");
  try {
    await a.create();
    await b.create();
    const va = `nbv${Deno.pid % 100000}a`, vb = `nbv${Deno.pid % 100000}b`;
    await run("ip", [
      "link",
      "add",
      va,
      "netns",
      a.name,
      "type",
      "veth",
      "peer",
      "name",
      vb,
      "netns",
      b.name,
    ]);
    for (const [ns, dev, addr] of [[a, va, "10.203.0.1/30"], [b, vb, "10.203.0.2/30"]] as const) {
      await ns.ip(["addr", "add", addr, "dev", dev]);
      await ns.ip(["link", "set", dev, "up"]);
      // burst: enough for one timer tick at this rate; latency bounds the queue at ~50 ms.
      await ns.exec("tc", [
        "qdisc",
        "add",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        shape.rate,
        "burst",
        "64kb",
        "latency",
        "50ms",
      ]);
    }
  } catch (err) {
    await a.stop();
    await b.stop();
    throw err;
  }
  return { a, b };
}

/** Address of namespace `a` and `b` of a {@link linkedPair}. */
export const PAIR_ADDR = { a: "10.203.0.1", b: "10.203.0.2" } as const;

/** TCP connects (ActiveOpens) made so far in the network namespace of `pid`. */
export function activeOpens(pid: number): number | undefined {
  try {
    const snmp = Deno.readTextFileSync(`/proc/${pid}/net/snmp`);
    const lines = snmp.split("\n").filter((l) => l.startsWith("Tcp:"));
    const names = lines[0].split(/\s+/), values = lines[1].split(/\s+/);
    const i = names.indexOf("ActiveOpens");
    return i < 0 ? undefined : Number(values[i]);
  } catch {
    return undefined;
  }
}
