/**
 * Turning recorded figures into the printed table, the JSON record and the SVG chart.
 * @module
 */
import { LABELS, type SysId, SYSTEM_IDS } from "./systems.ts";
import type { Params, Recorder } from "./cases.ts";
import { FLEET_INTERVAL } from "./fleet.ts";

/** One row of the table. */
export interface Metric {
  key: string;
  label: string;
  unit: string;
  /** Decimal places when printed. */
  digits: number;
  /** Whether NATadm ÷ peer means anything for this row. */
  ratio: boolean;
}

/** Rows, in table order. */
export function metrics(p: Params): Metric[] {
  const m = (key: string, label: string, unit: string, digits: number, ratio = true): Metric => ({
    key,
    label,
    unit,
    digits,
    ratio,
  });
  return [
    m("up1", "upload, 1 stream", "MB/s", 1),
    m("down1", "download, 1 stream", "MB/s", 1),
    m("up4", "upload, 4 streams", "MB/s", 1),
    m("down4", "download, 4 streams", "MB/s", 1),
    m("fb_p50", "first byte p50", "ms", 3),
    m("fb_p90", "first byte p90", "ms", 3),
    m("fb_p99", "first byte p99", "ms", 3),
    m("fwd_fb_p50", "  via forward p50", "ms", 3, false),
    m("fwd_fb_p90", "  via forward p90", "ms", 3, false),
    m("fwd_fb_p99", "  via forward p99", "ms", 3, false),
    m("connect_fb_p50", "  connect spawn→byte p50", "ms", 1, false),
    m("rtt_p50", "interactive RTT p50", "ms", 3),
    m("rtt_p99", "interactive RTT p99", "ms", 3),
    m("rate", `conn rate, ${p.rateWorkers} workers`, "conn/s", 0),
    m("rate_err", "  failed connections", "", 0, false),
    m("fwd_rate", "  via forward", "conn/s", 0, false),
    m("fwd_rate_err", "  failed via forward", "", 0, false),
    m("conc_ok", `${p.tunnels} tunnels byte-exact`, `/${p.tunnels}`, 0, false),
    m("conc_open_ms", "  open all (32 at a time)", "ms", 0),
    m("conc_ms", `  then echo ${p.tunnelBytes / 1024} KiB on all`, "ms", 0),
    m("pub_peak", "  public-side peak RSS", "MiB", 1),
    m("pub_per", "  public-side RSS/tunnel", "KiB", 1),
    m("nat_peak", "  NAT-side peak RSS", "MiB", 1),
    m("nat_per", "  NAT-side RSS/tunnel", "KiB", 1),
    m("idle_bpm", "idle control conn (int. 5)", "B/min", 0, false),
    m("connect_b", "  control connect + auth", "B", 0, false),
    m("seed_bpm", "seed polling (TLS per 5 s)", "B/min", 0, false),
    m("fleet_ok", `fleet: ${p.fleet} idle clients up`, `/${p.fleet}`, 0, false),
    m("fleet_srv_rss", "  server RSS/client", "KiB", 1, false),
    m("fleet_srv_fd", "  server fds/client", "", 2, false),
    m("fleet_cli_rss", "  client RSS/identity", "KiB", 1, false),
    m("fleet_back_s", "  all back after restart", "s", 1, false),
    m("fleet_connects", "  TCP connects/client then", "", 2, false),
    m("burst_ok", `burst: ${p.burst} users at once`, `/${p.burst}`, 0, false),
    m("burst_ms", "  then echo 64 KiB on all", "ms", 0),
    m("burst_pub_per", "  public-side RSS/tunnel", "KiB", 1),
    m("fair_up_p50", "RTT during bulk up p50", "ms", 3),
    m("fair_up_p99", "RTT during bulk up p99", "ms", 3),
    m("fair_down_p50", "RTT during bulk down p50", "ms", 3),
    m("fair_down_p99", "RTT during bulk down p99", "ms", 3),
    m("http_ka_rps", "HTTP 4 KiB keep-alive", "req/s", 0),
    m("http_ka_p50", "  latency p50", "ms", 3),
    m("http_ka_p99", "  latency p99", "ms", 3),
    m("http_close_rps", "HTTP 4 KiB conn: close", "req/s", 0),
    m("http_close_p50", "  latency p50", "ms", 3),
    m("http_close_p99", "  latency p99", "ms", 3),
    m("cl_fb_p50", "cluster first byte p50, direct", "ms", 3, false),
    m("cl_fwd_fb_p50", "  forwarded A→B", "ms", 3, false),
    m("cl_fb_p99", "cluster first byte p99, direct", "ms", 3, false),
    m("cl_fwd_fb_p99", "  forwarded A→B", "ms", 3, false),
    m("cl_up", "cluster upload, direct", "MB/s", 1, false),
    m("cl_fwd_up", "  forwarded A→B", "MB/s", 1, false),
    m("cl_down", "cluster download, direct", "MB/s", 1, false),
    m("cl_fwd_down", "  forwarded A→B", "MB/s", 1, false),
    m("wan_fb_p50", "WAN first byte p50", "ms", 1),
    m("wan_fb_p99", "WAN first byte p99", "ms", 1),
    m("wan_up", "WAN upload", "MB/s", 2),
    m("wan_down", "WAN download", "MB/s", 2),
    m("wan_fair_up_p99", "WAN RTT during bulk up p99", "ms", 1),
    m("wan_fair_down_p99", "WAN RTT during bulk down p99", "ms", 1),
  ];
}

/** Rows that have at least one figure (a run without --wan has no WAN rows, and so on). */
export function shownMetrics(rec: Recorder, p: Params): Metric[] {
  return metrics(p).filter((m) => Object.keys(rec.values[m.key] ?? {}).length > 0);
}

/** One informational target. */
export interface Target {
  metric: string;
  text: string;
  /** true PASS, false MISS, undefined n/a (a figure is missing). */
  pass: boolean | undefined;
}

/** Evaluates the targets against the recorded figures. */
export function targets(rec: Recorder, p: Params): Target[] {
  const v = (key: string, sys: SysId) => {
    const x = rec.get(key, sys);
    return x === undefined || !Number.isFinite(x) ? undefined : x;
  };
  const t = (metric: string, text: string, ok: () => boolean | undefined): Target => {
    let pass: boolean | undefined;
    try {
      pass = ok();
    } catch {
      pass = undefined;
    }
    return { metric, text, pass };
  };
  const cmp = (
    a: number | undefined,
    b: number | undefined,
    f: (a: number, b: number) => boolean,
  ) => a === undefined || b === undefined ? undefined : f(a, b);
  const out: Target[] = [];
  for (const key of ["up1", "down1", "up4", "down4"]) {
    out.push(
      t(key, "≥1.3× ssh", () => cmp(v(key, "natadm"), v(key, "ssh"), (a, b) => a >= 1.3 * b)),
    );
    out.push(
      t(key, "≥1.0× stunnel", () => cmp(v(key, "natadm"), v(key, "stunnel"), (a, b) => a >= b)),
    );
  }
  out.push(t("fb_p50", "≤2 ms", () => cmp(v("fb_p50", "natadm"), 2, (a, b) => a <= b)));
  out.push(
    t(
      "fb_p50",
      "≤0.5× ssh",
      () => cmp(v("fb_p50", "natadm"), v("fb_p50", "ssh"), (a, b) => a <= 0.5 * b),
    ),
  );
  out.push(t("fb_p99", "≤10 ms", () => cmp(v("fb_p99", "natadm"), 10, (a, b) => a <= b)));
  // Admin access by name costs what a public port costs (issue 12).
  out.push(
    t(
      "fwd_fb_p50",
      "≤public port + 1 ms",
      () => cmp(v("fwd_fb_p50", "natadm"), v("fb_p50", "natadm"), (a, b) => a <= b + 1),
    ),
  );
  out.push(
    t(
      "rtt_p50",
      "≤3× direct",
      () => cmp(v("rtt_p50", "natadm"), v("rtt_p50", "direct"), (a, b) => a <= 3 * b),
    ),
  );
  out.push(
    t(
      "rate",
      "≥1.5× ssh",
      () => cmp(v("rate", "natadm"), v("rate", "ssh"), (a, b) => a >= 1.5 * b),
    ),
  );
  out.push(
    t(
      "conc_ok",
      `all ${p.tunnels} exact`,
      () => cmp(v("conc_ok", "natadm"), p.tunnels, (a, b) => a === b),
    ),
  );
  out.push(t("pub_per", "server ≤64 KiB", () => cmp(v("pub_per", "natadm"), 64, (a, b) => a <= b)));
  out.push(t("idle_bpm", "≤2 KiB/min", () => cmp(v("idle_bpm", "natadm"), 2048, (a, b) => a <= b)));
  out.push(
    t(
      "idle_bpm",
      "≤1/10 seed",
      () => cmp(v("idle_bpm", "natadm"), v("seed_bpm", "natadm"), (a, b) => a <= b / 10),
    ),
  );
  const nat = (key: string) => v(key, "natadm");
  const atMost = (key: string, limit: number, text: string) =>
    out.push(t(key, text, () => cmp(nat(key), limit, (a, b) => a <= b)));
  out.push(
    t("fleet_ok", `all ${p.fleet} up`, () => cmp(nat("fleet_ok"), p.fleet, (a, b) => a === b)),
  );
  atMost("fleet_srv_rss", 48, "≤48 KiB");
  atMost("fleet_srv_fd", 1.5, "≤1.5");
  atMost("fleet_cli_rss", 64, "≤64 KiB");
  atMost("fleet_back_s", FLEET_INTERVAL + 5, `≤${FLEET_INTERVAL + 5} s (interval + 5)`);
  out.push(
    t("burst_ok", `all ${p.burst} exact`, () => cmp(nat("burst_ok"), p.burst, (a, b) => a === b)),
  );
  atMost("burst_pub_per", 32, "≤32 KiB");
  for (const key of ["fair_up_p99", "fair_down_p99"]) {
    atMost(key, 10, "≤10 ms");
    out.push(t(key, "≤2× ssh", () => cmp(nat(key), v(key, "ssh"), (a, b) => a <= 2 * b)));
  }
  out.push(
    t(
      "http_ka_rps",
      "≥0.4× direct",
      () => cmp(nat("http_ka_rps"), v("http_ka_rps", "direct"), (a, b) => a >= 0.4 * b),
    ),
  );
  out.push(
    t(
      "http_close_rps",
      "≥1.0× ssh",
      () => cmp(nat("http_close_rps"), v("http_close_rps", "ssh"), (a, b) => a >= b),
    ),
  );
  // A user whose client is held by another server of the cluster: the forwarding hop's cost.
  out.push(
    t(
      "cl_fwd_fb_p50",
      "≤direct + 1 ms",
      () => cmp(nat("cl_fwd_fb_p50"), nat("cl_fb_p50"), (a, b) => a <= b + 1),
    ),
  );
  for (const way of ["up", "down"]) {
    out.push(
      t(
        `cl_fwd_${way}`,
        "≥0.8× direct",
        () => cmp(nat(`cl_fwd_${way}`), nat(`cl_${way}`), (a, b) => a >= 0.8 * b),
      ),
    );
  }
  out.push(
    t(
      "wan_fb_p50",
      "≤direct + 5 ms",
      () => cmp(nat("wan_fb_p50"), v("wan_fb_p50", "direct"), (a, b) => a <= b + 5),
    ),
  );
  for (const key of ["wan_up", "wan_down"]) {
    out.push(t(key, "≥0.9× direct", () => cmp(nat(key), v(key, "direct"), (a, b) => a >= 0.9 * b)));
  }
  for (const key of ["wan_fair_up_p99", "wan_fair_down_p99"]) {
    out.push(
      t(key, "≤direct + 10 ms", () => cmp(nat(key), v(key, "direct"), (a, b) => a <= b + 10)),
    );
  }
  // A target whose figure was not measured in this run (say WAN rows without --wan) is left out.
  return out.filter((x) => Object.keys(rec.values[x.metric] ?? {}).length > 0);
}

function num(x: number | undefined, digits: number): string {
  if (x === undefined) return "-";
  if (!Number.isFinite(x)) return String(x);
  return x.toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

function ratio(a: number | undefined, b: number | undefined): string {
  if (a === undefined || b === undefined || b === 0 || !Number.isFinite(a / b)) return "-";
  return `${(a / b).toFixed(2)}×`;
}

/** The printed table. */
export function renderTable(
  rec: Recorder,
  p: Params,
  skipped: Partial<Record<SysId, string>>,
): string {
  const ts = targets(rec, p);
  const header = [
    "metric",
    "unit",
    ...SYSTEM_IDS.map((id) => LABELS[id]),
    "nat÷direct",
    "nat÷ssh",
    "nat÷stunnel",
    "target (natadm)",
    "result",
  ];
  const rows: string[][] = [];
  for (const m of shownMetrics(rec, p)) {
    const vals = rec.values[m.key] ?? {};
    const nat = vals.natadm;
    const mine = ts.filter((t) => t.metric === m.key);
    rows.push([
      m.label,
      m.unit,
      ...SYSTEM_IDS.map((id) => skipped[id] ? "skip" : num(vals[id], m.digits)),
      ...(["direct", "ssh", "stunnel"] as const).map((id) => m.ratio ? ratio(nat, vals[id]) : ""),
      mine.map((t) => t.text).join(", "),
      mine.map((t) => t.pass === undefined ? "n/a" : t.pass ? "PASS" : "MISS").join(" "),
    ]);
  }
  const numeric = new Set([2, 3, 4, 5, 6, 7, 8]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => numeric.has(i) ? c.padStart(widths[i]) : c.padEnd(widths[i])).join("  ")
      .trimEnd();
  const rule = widths.map((w) => "-".repeat(w)).join("  ");
  const passed = ts.filter((t) => t.pass === true).length;
  const missed = ts.filter((t) => t.pass === false).length;
  const na = ts.length - passed - missed;
  return [
    line(header),
    rule,
    ...rows.map(line),
    rule,
    `targets (informational): ${passed} PASS, ${missed} MISS, ${na} n/a` +
    "; ratios are natadm ÷ peer (for latency and RSS lower is better)",
  ].join("\n");
}

/** Machine facts for the JSON record. */
export interface Machine {
  nproc: number;
  cpu: string;
  memTotalMiB: number;
  kernel: string;
  deno: string;
  v8: string;
  typescript: string;
  date: string;
  /** The NATadm code measured: commit, and whether src/ or the entrypoints had local changes. */
  natadm: string;
  /** /proc/loadavg when the run began and when it ended: other load skews every figure. */
  loadavg: { start: string; end?: string };
  tools: Record<string, string>;
}

/** The JSON record. */
export function toJson(
  rec: Recorder,
  p: Params,
  machine: Machine,
  skipped: Partial<Record<SysId, string>>,
  seconds: number,
  throughputTool: string,
): unknown {
  return {
    benchmark: "natadm",
    mode: p.quick ? "quick" : "full",
    machine,
    params: p,
    throughputTool,
    durationSeconds: Math.round(seconds),
    systems: Object.fromEntries(
      SYSTEM_IDS.map((
        id,
      ) => [id, skipped[id] ? { measured: false, skipped: skipped[id] } : { measured: true }]),
    ),
    metrics: shownMetrics(rec, p).map((m) => ({
      key: m.key,
      label: m.label.trim(),
      unit: m.unit,
      values: rec.values[m.key] ?? {},
    })),
    targets: targets(rec, p).map((t) => ({
      metric: t.metric,
      target: t.text,
      result: t.pass === undefined ? "n/a" : t.pass ? "PASS" : "MISS",
    })),
    details: rec.details,
    notes: rec.notes,
    errors: rec.errors,
  };
}

const COLORS: Record<SysId, string> = {
  direct: "#9e9e9e",
  natadm: "#1f77b4",
  ssh: "#ff7f0e",
  stunnel: "#2ca02c",
};

function esc(s: string): string {
  return s.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;");
}

/** A bar chart: one panel per figure family, bars per system, each group scaled to its max. */
export function renderSvg(rec: Recorder, p: Params, machine: Machine): string {
  const panels: { title: string; groups: { key: string; label: string; digits: number }[] }[] = [
    {
      title: "Throughput, MB/s (higher is better)",
      groups: [
        { key: "up1", label: "upload ×1", digits: 0 },
        { key: "down1", label: "download ×1", digits: 0 },
        { key: "up4", label: "upload ×4", digits: 0 },
        { key: "down4", label: "download ×4", digits: 0 },
      ],
    },
    {
      title: "Latency, ms (lower is better)",
      groups: [
        { key: "fb_p50", label: "first byte p50", digits: 3 },
        { key: "fb_p99", label: "first byte p99", digits: 3 },
        { key: "rtt_p50", label: "RTT p50", digits: 3 },
        { key: "rtt_p99", label: "RTT p99", digits: 3 },
      ],
    },
    {
      title: `Connection rate, conn/s, ${p.rateWorkers} workers (higher is better)`,
      groups: [{ key: "rate", label: "connect + 1 KiB + close", digits: 0 }],
    },
  ];
  const width = 900, panelHeight = 230, top = 70, barW = 34, gap = 4, groupGap = 40;
  const height = top + panels.length * panelHeight + 20;
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" ` +
    `viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="11">`,
    `<rect width="100%" height="100%" fill="#fff"/>`,
    `<text x="20" y="24" font-size="16" font-weight="bold">NATadm benchmark (${
      p.quick ? "quick" : "full"
    } run)</text>`,
    `<text x="20" y="42" fill="#555">${
      esc(
        `${machine.date} · NATadm ${machine.natadm} · ${machine.nproc} CPUs · ${machine.cpu} · ` +
          `Linux ${machine.kernel} · Deno ${machine.deno} · bars scaled per group`,
      )
    }</text>`,
  ];
  SYSTEM_IDS.forEach((id, i) => {
    const x = 20 + i * 110;
    parts.push(`<rect x="${x}" y="52" width="12" height="12" fill="${COLORS[id]}"/>`);
    parts.push(`<text x="${x + 16}" y="62">${esc(LABELS[id])}</text>`);
  });
  panels.forEach((panel, pi) => {
    const y0 = top + pi * panelHeight;
    const plotTop = y0 + 30, plotBottom = y0 + panelHeight - 40, plotH = plotBottom - plotTop;
    parts.push(
      `<text x="20" y="${y0 + 18}" font-size="13" font-weight="bold">${esc(panel.title)}</text>`,
    );
    parts.push(
      `<line x1="20" y1="${plotBottom}" x2="${width - 20}" y2="${plotBottom}" stroke="#888"/>`,
    );
    let x = 30;
    for (const g of panel.groups) {
      const vals = SYSTEM_IDS.map((id) => rec.get(g.key, id));
      const max = Math.max(...vals.map((v) => v !== undefined && Number.isFinite(v) ? v : 0), 1e-9);
      const groupWidth = SYSTEM_IDS.length * (barW + gap);
      SYSTEM_IDS.forEach((id, i) => {
        const v = vals[i];
        const bx = x + i * (barW + gap);
        if (v === undefined || !Number.isFinite(v)) {
          parts.push(
            `<text x="${bx + barW / 2}" y="${
              plotBottom - 4
            }" text-anchor="middle" fill="#999">–</text>`,
          );
          return;
        }
        const h = Math.max(1, (v / max) * (plotH - 14));
        parts.push(
          `<rect x="${bx}" y="${(plotBottom - h).toFixed(1)}" width="${barW}" height="${
            h.toFixed(1)
          }" ` +
            `fill="${COLORS[id]}"><title>${esc(`${LABELS[id]} ${g.label}: ${v}`)}</title></rect>`,
        );
        parts.push(
          `<text x="${bx + barW / 2}" y="${
            (plotBottom - h - 3).toFixed(1)
          }" text-anchor="middle" ` +
            `font-size="9">${esc(num(v, g.digits))}</text>`,
        );
      });
      parts.push(
        `<text x="${x + groupWidth / 2}" y="${plotBottom + 16}" text-anchor="middle">${
          esc(g.label)
        }</text>`,
      );
      x += groupWidth + groupGap;
    }
  });
  parts.push("</svg>");
  return parts.join("\n") + "\n";
}
