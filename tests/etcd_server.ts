/**
 * A real etcd for tests (Debian's etcd-server): a single member on loopback ports, started and
 * killed as a process.
 * @module
 */
import { findExecutable, freePort, Process, waitUntil } from "./helpers.ts";

/** The `etcd` binary, or undefined when it is not installed (tests then skip, saying why). */
export const ETCD: string | undefined = findExecutable("etcd");

/** A single-member etcd on loopback, with its data in `dataDir`. */
export class Etcd {
  process: Process | undefined;
  readonly clientPort = freePort();
  readonly peerPort = freePort();

  constructor(readonly dataDir: string) {}

  get url(): string {
    return `http://127.0.0.1:${this.clientPort}`;
  }

  /** Starts etcd (on the same ports and data as before, if it ran) and waits until healthy. */
  async start(): Promise<void> {
    const peer = `http://127.0.0.1:${this.peerPort}`;
    this.process = new Process(ETCD!, [
      "--name=test",
      `--data-dir=${this.dataDir}`,
      `--listen-client-urls=${this.url}`,
      `--advertise-client-urls=${this.url}`,
      `--listen-peer-urls=${peer}`,
      `--initial-advertise-peer-urls=${peer}`,
      `--initial-cluster=test=${peer}`,
    ]);
    await waitUntil(async () => {
      if (this.process!.exited) {
        throw new Error(`etcd exited:\n${this.process!.lines.slice(-20).join("\n")}`);
      }
      try {
        const response = await fetch(`${this.url}/health`, { signal: AbortSignal.timeout(1000) });
        return response.ok && (await response.json()).health === "true";
      } catch {
        return false;
      }
    }, "etcd to be healthy");
  }

  /** Kills etcd at once, as a crash would. */
  async kill(): Promise<void> {
    await this.process?.stop();
  }
}
