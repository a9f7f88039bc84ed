/**
 * Processes the benchmark starts (sshd, ssh, stunnel, iperf3, the target services), a registry
 * so that everything started is stopped at the end, and /proc readers for RSS and pids.
 * @module
 */
import { waitUntil } from "../tests/helpers.ts";

/** Anything the benchmark started and must stop. */
export interface Stoppable {
  stop(): Promise<void>;
}

const live = new Set<Stoppable>();

/** Registers `s` to be stopped by {@link stopAll}. */
export function track<T extends Stoppable>(s: T): T {
  live.add(s);
  return s;
}

/** Stops `s` now and forgets it. */
export async function stopTracked(s: Stoppable | undefined): Promise<void> {
  if (!s) return;
  live.delete(s);
  await s.stop();
}

/** Stops everything still registered. */
export async function stopAll(): Promise<void> {
  const all = [...live];
  live.clear();
  await Promise.allSettled(all.map((s) => s.stop()));
}

/** Lines of output kept per process (the oldest are dropped). */
const KEEP_LINES = 2000;

/** A spawned external program with its stdout and stderr collected as lines. */
export class Proc implements Stoppable {
  readonly lines: string[] = [];
  readonly pid: number;
  readonly status: Promise<Deno.CommandStatus>;
  exited = false;
  #child: Deno.ChildProcess;
  #readers: Promise<void>;
  #stdin: WritableStreamDefaultWriter<Uint8Array> | undefined;

  constructor(
    readonly name: string,
    command: string,
    args: string[],
    options: { keepStdin?: boolean } = {},
  ) {
    this.#child = new Deno.Command(command, {
      args,
      stdin: options.keepStdin ? "piped" : "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.pid = this.#child.pid;
    if (options.keepStdin) this.#stdin = this.#child.stdin.getWriter();
    this.status = this.#child.status.then((s) => {
      this.exited = true;
      return s;
    });
    this.#readers = Promise.all([
      this.#collect(this.#child.stdout),
      this.#collect(this.#child.stderr),
    ])
      .then(() => {});
  }

  async #collect(stream: ReadableStream<Uint8Array>): Promise<void> {
    let rest = "";
    try {
      for await (const text of stream.pipeThrough(new TextDecoderStream())) {
        const parts = (rest + text).split("\n");
        rest = parts.pop()!;
        this.lines.push(...parts);
        if (this.lines.length > KEEP_LINES) this.lines.splice(0, this.lines.length - KEEP_LINES);
      }
    } catch {
      // the process went away
    }
    if (rest) this.lines.push(rest);
  }

  /** The last lines of output, for error messages. */
  tail(n = 15): string {
    return this.lines.slice(-n).join("\n");
  }

  /** Waits for an output line matching `pattern`; fails at once if the process exits. */
  waitFor(pattern: RegExp, timeoutMs = 20_000): Promise<string> {
    return waitUntil(
      () => {
        const line = this.lines.find((l) => pattern.test(l));
        if (line) return line;
        if (this.exited) throw new Error(`${this.name} exited early:\n${this.tail()}`);
        return undefined;
      },
      `${pattern} from ${this.name}`,
      timeoutMs,
    );
  }

  /** SIGTERM, then SIGKILL after `graceMs`; waits for the exit either way. */
  async stop(graceMs = 2000): Promise<void> {
    await this.#stdin?.close().catch(() => {});
    this.#stdin = undefined;
    if (!this.exited) {
      try {
        this.#child.kill("SIGTERM");
      } catch {
        // already gone
      }
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        this.status,
        new Promise<void>((resolve) => timer = setTimeout(resolve, graceMs)),
      ]);
      clearTimeout(timer);
      if (!this.exited) {
        try {
          this.#child.kill("SIGKILL");
        } catch {
          // already gone
        }
      }
    }
    await this.status;
    await this.#readers;
  }
}

/** Full path of an executable found in PATH or the sbin directories, or undefined. */
export function which(name: string): string | undefined {
  const dirs = [
    ...(Deno.env.get("PATH") ?? "").split(":"),
    "/usr/local/sbin",
    "/usr/sbin",
    "/sbin",
  ].filter((d) => d);
  for (const dir of dirs) {
    const path = `${dir}/${name}`;
    try {
      const info = Deno.statSync(path);
      if (info.isFile && ((info.mode ?? 0) & 0o111)) return path;
    } catch {
      // not here
    }
  }
  return undefined;
}

/** Runs a short command to completion (with a deadline) and returns its stdout. */
export async function run(command: string, args: string[], timeoutMs = 20_000): Promise<string> {
  const out = await new Deno.Command(command, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(timeoutMs),
  }).output();
  const stderr = new TextDecoder().decode(out.stderr).trim();
  if (!out.success) throw new Error(`${command} ${args.join(" ")} failed: ${stderr}`);
  return new TextDecoder().decode(out.stdout);
}

/** Pids of the processes whose command line contains every one of `parts`. */
export function findPids(parts: string[]): number[] {
  const pids: number[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name) || Number(entry.name) === Deno.pid) continue;
    try {
      const cmdline = Deno.readTextFileSync(`/proc/${entry.name}/cmdline`).replaceAll("\0", " ");
      if (parts.every((p) => cmdline.includes(p))) pids.push(Number(entry.name));
    } catch {
      // exited meanwhile
    }
  }
  return pids;
}

/** Pids of every descendant of `root` (not `root` itself). */
export function descendants(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      const list = children.get(ppid) ?? [];
      list.push(Number(entry.name));
      children.set(ppid, list);
    } catch {
      // exited meanwhile
    }
  }
  const out: number[] = [];
  const queue = [root];
  while (queue.length > 0 && out.length < 10_000) {
    for (const child of children.get(queue.shift()!) ?? []) {
      out.push(child);
      queue.push(child);
    }
  }
  return out;
}

/** VmRSS and VmHWM of `pid` in KiB (0 if it is gone). */
export function memory(pid: number): { rss: number; hwm: number } {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    const field = (name: string) =>
      Number(status.match(new RegExp(`^${name}:\\s+(\\d+)`, "m"))?.[1] ?? 0);
    return { rss: field("VmRSS"), hwm: field("VmHWM") };
  } catch {
    return { rss: 0, hwm: 0 };
  }
}

/** CPU time (user + system) `pid` has used so far, in ms (0 if it is gone). */
export function cpuMs(pid: number): number {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    // Fields after the command's ")": state is the 3rd field of stat, utime the 14th, stime the
    // 15th; /proc counts them in USER_HZ ticks, 100 a second on Linux.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) * 10;
  } catch {
    return 0;
  }
}

/** Sum of VmRSS over `pids`, in KiB. */
export function rssOf(pids: number[]): number {
  return pids.reduce((sum, pid) => sum + memory(pid).rss, 0);
}

/** Open-file limits of this process. */
export function fileLimit(): { soft: number; hard: number } {
  const limits = Deno.readTextFileSync("/proc/self/limits");
  const m = limits.match(/^Max open files\s+(\S+)\s+(\S+)/m);
  const num = (s: string | undefined) => s === "unlimited" ? Infinity : Number(s ?? 1024);
  return { soft: num(m?.[1]), hard: num(m?.[2]) };
}

/**
 * Raises this process's soft open-file limit (inherited by everything it spawns later) to at
 * least `need` if the hard limit allows; returns the limit in effect.
 */
export async function raiseFileLimit(need: number): Promise<number> {
  const { soft, hard } = fileLimit();
  if (soft >= need) return soft;
  const target = Math.min(hard, Math.max(need, 65_536));
  const prlimit = which("prlimit");
  if (prlimit) {
    await run(prlimit, [
      `--pid=${Deno.pid}`,
      `--nofile=${target}:${hard === Infinity ? target : hard}`,
    ])
      .catch(() => {});
  }
  return fileLimit().soft;
}
