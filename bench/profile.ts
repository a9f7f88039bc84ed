/**
 * `--profile`: the NATadm server and client run with V8's sampling CPU profiler, and their
 * `.cpuprofile` files are boiled down to the functions that spent the most time themselves.
 * @module
 */

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
}

/** One function's share of the samples. */
export interface HotSpot {
  name: string;
  ms: number;
  /** Percent of the non-idle samples. */
  percent: number;
}

function short(url: string): string {
  if (!url) return "";
  const m = url.match(/(?:\/work\/[^/]+\/|ext:|node:|npm\/)(.*)$/);
  const tail = (m?.[1] ?? url).split("/").slice(-2).join("/");
  return tail;
}

/** Self time by function over every profile in `dir`, busiest first. */
export async function hotSpots(
  dir: string,
  top = 15,
): Promise<{ busyMs: number; spots: HotSpot[] }> {
  const self = new Map<string, number>();
  let totalSamples = 0, totalUs = 0, idle = 0;
  let entries: Deno.DirEntry[] = [];
  try {
    entries = await Array.fromAsync(Deno.readDir(dir));
  } catch {
    return { busyMs: 0, spots: [] };
  }
  for (const entry of entries) {
    if (!entry.name.endsWith(".cpuprofile")) continue;
    const profile = JSON.parse(await Deno.readTextFile(`${dir}/${entry.name}`)) as CpuProfile;
    const samples = profile.nodes.reduce((s, n) => s + (n.hitCount ?? 0), 0);
    totalSamples += samples;
    totalUs += profile.endTime - profile.startTime;
    for (const node of profile.nodes) {
      const hits = node.hitCount ?? 0;
      if (!hits) continue;
      const { functionName, url, lineNumber } = node.callFrame;
      if (functionName === "(idle)") {
        idle += hits;
        continue;
      }
      const key = url
        ? `${functionName || "(anonymous)"} ${short(url)}:${lineNumber + 1}`
        : functionName || "(anonymous)";
      self.set(key, (self.get(key) ?? 0) + hits);
    }
  }
  const usPerSample = totalSamples ? totalUs / totalSamples : 0;
  const busy = totalSamples - idle;
  const spots = [...self.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, top)
    .map(([name, hits]) => ({
      name,
      ms: Math.round(hits * usPerSample / 1000),
      percent: busy ? Math.round(hits / busy * 1000) / 10 : 0,
    }));
  return { busyMs: Math.round(busy * usPerSample / 1000), spots };
}

/** The hot spots as text lines. */
export function renderHotSpots(
  title: string,
  result: { busyMs: number; spots: HotSpot[] },
): string {
  return [
    `${title}: ${result.busyMs} ms on CPU (JS thread), by self time:`,
    ...result.spots.map((s) =>
      `  ${s.percent.toFixed(1).padStart(5)}%  ${String(s.ms).padStart(6)} ms  ${s.name}`
    ),
  ].join("\n");
}
