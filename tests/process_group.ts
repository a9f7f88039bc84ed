/**
 * Programs run in a process group of their own, as a terminal runs a job, so that a test can
 * signal the whole group (Ctrl-C, a closed terminal) and check that nothing of it is left.
 * Linux: reads /proc.
 * @module
 */
import { Process, waitUntil } from "./helpers.ts";

/** The process group of `pid` (field 5 of /proc/PID/stat), or undefined once it is gone. */
export function processGroup(pid: number): number | undefined {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[2]);
  } catch {
    return undefined;
  }
}

/** Processes in group `pgid` other than its leader. */
export function followers(pgid: number): number[] {
  const pids: number[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    const pid = Number(entry.name);
    if (Number.isInteger(pid) && pid !== pgid && processGroup(pid) === pgid) pids.push(pid);
  }
  return pids;
}

/** Whether any process, a zombie included, is left in group `pgid`. */
export function groupAlive(pgid: number): boolean {
  try {
    Deno.kill(-pgid, "SIGCONT"); // harmless to a running process; fails if none is left
    return true;
  } catch {
    return false;
  }
}

/** A {@link Process} that leads a new session and process group, and the group's id. */
export interface GroupProcess {
  process: Process;
  pgid: number;
  /** SIGKILLs whatever is left in the group (for a test's clean-up). */
  killGroup(): void;
}

/** Runs `command args` under setsid, as the leader of a group of its own. */
export async function spawnInGroup(command: string, args: string[]): Promise<GroupProcess> {
  const process = new Process("setsid", [command, ...args]);
  // setsid makes its own process the leader of a new group, then execs the command in it.
  await waitUntil(() => processGroup(process.pid) === process.pid, "setsid to start", 5000);
  const pgid = process.pid;
  return {
    process,
    pgid,
    killGroup() {
      if (groupAlive(pgid)) Deno.kill(-pgid, "SIGKILL");
    },
  };
}
