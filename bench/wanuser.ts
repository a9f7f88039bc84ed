/**
 * The user side of the WAN profile, run inside the server's namespace by bench/wan.ts: one task
 * against the given ports, one JSON line of results on stdout.
 *
 *   deno run -A bench/wanuser.ts --task wait|firstbyte|bulk|fair --front JSON
 *       [--count N] [--seconds S] [--reverse]
 * @module
 */
import { parseArgs } from "node:util";
import { firstByte, latencyStats } from "./cases.ts";
import { bulk, duringBulk } from "./fairness.ts";
import { waitEcho } from "./net.ts";
import type { TargetPorts } from "./systems.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    task: { type: "string" },
    front: { type: "string" },
    count: { type: "string", default: "50" },
    seconds: { type: "string", default: "3" },
    reverse: { type: "boolean", default: false },
  },
});
const front = JSON.parse(values.front ?? "{}") as TargetPorts;
const seconds = Number(values.seconds);
let result: unknown;
switch (values.task) {
  case "wait":
    await waitEcho(front.echo, "wan", 30_000);
    result = { ok: true };
    break;
  case "firstbyte": {
    const samples: number[] = [];
    for (let i = 0; i < Number(values.count); i++) samples.push(await firstByte(front.echo));
    result = latencyStats(samples);
    break;
  }
  case "bulk":
    result = { mbps: await bulk(front, seconds, values.reverse, undefined) };
    break;
  case "fair": {
    const { samples, mbps } = await duringBulk(front, seconds, values.reverse, undefined);
    result = { ...latencyStats(samples), mbps };
    break;
  }
  default:
    console.error(`wanuser.ts: unknown --task ${values.task}`);
    Deno.exit(2);
}
console.log(JSON.stringify(result));
Deno.exit(0);
