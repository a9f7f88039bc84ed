/**
 * Accepting connections without ever stopping for good: accept loops that wait out running out
 * of file descriptors, a cap on connections that have not finished their handshake (in total
 * and per source address), and what a listener needs to notice that it has stalled.
 * @module
 */
import { log } from "./log.ts";

const logger = log("accept");

/** First pause after a failed accept; it doubles on each failure in a row. */
export const ACCEPT_BACKOFF_MIN_MS = 10;
/** Longest pause between accept attempts while they keep failing. */
export const ACCEPT_BACKOFF_MAX_MS = 1_000;

/** errno names (and Linux numbers) that mean "out of descriptors or buffers, for now". */
const EXHAUSTION: Record<string, number> = { EMFILE: 24, ENFILE: 23, ENOBUFS: 105, ENOMEM: 12 };

/** Whether `err` says the process or system ran out of descriptors or buffers (temporary). */
export function isExhaustion(err: unknown): boolean {
  const { code, message } = (err ?? {}) as { code?: unknown; message?: unknown };
  if (typeof code === "string" && code in EXHAUSTION) return true;
  const errno = typeof message === "string" ? message.match(/\(os error (\d+)\)/)?.[1] : undefined;
  return errno !== undefined && Object.values(EXHAUSTION).includes(Number(errno));
}

/** Called when an accept loop recovers from running out of descriptors. */
const recoveryListeners = new Set<() => void>();

/**
 * Calls `fn` whenever an {@link acceptLoop} in this process accepts again after running out of
 * descriptors: a sign that other listeners may have stalled meanwhile. Returns the unsubscribe.
 */
export function onDescriptorsFreed(fn: () => void): () => void {
  recoveryListeners.add(fn);
  return () => recoveryListeners.delete(fn);
}

/** Whether `err` means the listener was closed, so accepting is over. */
function isClosed(err: unknown): boolean {
  return err instanceof Deno.errors.BadResource || err instanceof Deno.errors.Interrupted;
}

/**
 * Accepts connections on `listener` until it is closed, handing each to `onConn`. A failed
 * accept (out of descriptors, or anything else) is logged once, waited out with a backoff
 * ({@link ACCEPT_BACKOFF_MIN_MS} doubling to {@link ACCEPT_BACKOFF_MAX_MS}) and retried; the
 * first success after it is logged too. `what` names the port in logs, e.g. "service port 10022".
 */
export async function acceptLoop(
  listener: Deno.Listener,
  onConn: (conn: Deno.Conn) => void,
  what: string,
): Promise<void> {
  let delay = 0;
  let failing: string | undefined;
  let exhausted = false;
  for (;;) {
    let conn: Deno.Conn;
    try {
      conn = await listener.accept();
    } catch (err) {
      if (isClosed(err)) return;
      if (failing === undefined) {
        failing = (err as Error).message;
        exhausted = isExhaustion(err);
        if (exhausted) {
          logger.warn(
            "{what} cannot accept connections: {error}; retrying until descriptors are freed " +
              "(raise the open-file limit if this recurs)",
            { what, error: failing },
          );
        } else {
          logger.error("{what} failed to accept a connection: {error}; retrying", {
            what,
            error: failing,
          });
        }
      }
      delay = Math.min(Math.max(delay * 2, ACCEPT_BACKOFF_MIN_MS), ACCEPT_BACKOFF_MAX_MS);
      await new Promise((resolve) => setTimeout(resolve, delay));
      continue;
    }
    if (failing !== undefined) {
      logger.info("{what} accepts connections again", { what });
      failing = undefined;
      delay = 0;
      if (exhausted) { for (const fn of recoveryListeners) fn(); }
    }
    try {
      onConn(conn);
    } catch (err) {
      logger.error("{what}: a new connection failed: {error}", {
        what,
        error: (err as Error).message,
      });
      try {
        conn.close();
      } catch {
        // Already closed by the handler.
      }
    }
  }
}

/** Default cap on connections still in their TLS handshake, in total (`max_handshaking`). */
export const DEFAULT_MAX_HANDSHAKING = 256;
/** Default cap per source address (`max_handshaking_per_address`). */
export const DEFAULT_MAX_HANDSHAKING_PER_ADDRESS = 64;

/** Counts connections still in their handshake, in total and per source address. */
export class HandshakeCap {
  #total = 0;
  #byAddress = new Map<string, number>();

  constructor(readonly max: number, readonly maxPerAddress: number) {}

  /** Connections counted now. */
  get count(): number {
    return this.#total;
  }

  /**
   * Counts a connection from `address`; returns the function that uncounts it (safe to call
   * more than once), or undefined if either cap is reached (the caller closes it).
   */
  admit(address: string): (() => void) | undefined {
    const mine = this.#byAddress.get(address) ?? 0;
    if (this.#total >= this.max || mine >= this.maxPerAddress) return undefined;
    this.#total++;
    this.#byAddress.set(address, mine + 1);
    let counted = true;
    return () => {
      if (!counted) return;
      counted = false;
      this.#total--;
      const left = this.#byAddress.get(address)! - 1;
      if (left > 0) this.#byAddress.set(address, left);
      else this.#byAddress.delete(address);
    };
  }
}

/** Logs connections closed for being past a cap, at most once per second per listener. */
export class ShedLog {
  #last = -Infinity;
  #since = 0;

  constructor(readonly what: string) {}

  /** Notes one shed connection; logs (with the count since the last line) if a second passed. */
  note(why: string): void {
    this.#since++;
    const now = performance.now();
    if (now - this.#last < 1_000) return;
    logger.warn("{what} is shedding connections: {count} closed at once, {why}", {
      what: this.what,
      count: this.#since,
      why,
    });
    this.#last = now;
    this.#since = 0;
  }
}

/** The soft open-file limit of this process (RLIMIT_NOFILE), or undefined if unknown. */
export function openFileLimit(): number | undefined {
  try {
    const line = Deno.readTextFileSync("/proc/self/limits").split("\n")
      .find((l) => l.startsWith("Max open files"));
    const soft = Number(line?.split(/\s{2,}/)[1]);
    return Number.isInteger(soft) && soft > 0 ? soft : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Connections waiting in the kernel's accept queue of the TCP listening socket(s) on `port`
 * (Linux, from /proc/net/tcp and tcp6), or undefined if that cannot be read right now. A queue
 * that stays full while the listener reports nothing means it no longer accepts.
 */
export async function acceptQueueLength(port: number): Promise<number | undefined> {
  let queued = 0;
  let read = false;
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text: string;
    try {
      text = await Deno.readTextFile(file);
    } catch {
      continue;
    }
    read = true;
    for (const line of text.split("\n").slice(1)) {
      const fields = line.trim().split(/\s+/);
      // local_address is HEXIP:HEXPORT; st 0A is LISTEN; for it, rx_queue is the accept queue.
      if (fields.length < 5 || fields[3] !== "0A") continue;
      if (parseInt(fields[1].split(":").at(-1)!, 16) !== port) continue;
      queued += parseInt(fields[4].split(":")[1], 16) || 0;
    }
  }
  return read ? queued : undefined;
}
