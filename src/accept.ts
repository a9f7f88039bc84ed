/**
 * Accept loops that survive running out of descriptors: EMFILE, ENFILE and ENOBUFS are
 * temporary (logged once, then retried with a backoff), never the end of a listener.
 * @module
 */
import { log } from "./log.ts";

const logger = log("server");

/** First pause after an accept failed for lack of resources. */
const BACKOFF_FIRST_MS = 10;

/** Longest pause between accept attempts while resources are short. */
const BACKOFF_MAX_MS = 1000;

/** Whether an accept error means "out of descriptors or buffers for now". */
export function isTemporary(err: unknown): boolean {
  const message = err instanceof Error ? err.message : String(err);
  return /os error (24|23|105)\b|Too many open files|ENFILE|EMFILE|ENOBUFS|No buffer space/i
    .test(message);
}

/**
 * Accepts connections on `listener` for `onConn` until the listener is closed. `what` names
 * the listener in logs (say "service port 10022").
 */
export async function acceptLoop(
  listener: Deno.Listener,
  what: string,
  onConn: (conn: Deno.Conn) => void,
): Promise<void> {
  let backoff = 0;
  for (;;) {
    let conn: Deno.Conn;
    try {
      conn = await listener.accept();
    } catch (err) {
      if (err instanceof Deno.errors.BadResource || err instanceof Deno.errors.Interrupted) return;
      if (!isTemporary(err)) {
        logger.error("{what} stopped accepting: {error}", { what, error: (err as Error).message });
        return;
      }
      if (backoff === 0) {
        logger.warn("{what}: cannot accept for now ({error}); retrying", {
          what,
          error: (err as Error).message,
        });
      }
      backoff = Math.min(BACKOFF_MAX_MS, backoff === 0 ? BACKOFF_FIRST_MS : backoff * 2);
      await new Promise((resolve) => setTimeout(resolve, backoff));
      continue;
    }
    if (backoff > 0) {
      logger.info("{what} accepts again", { what });
      backoff = 0;
    }
    onConn(conn);
  }
}
