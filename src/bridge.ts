/**
 * Bridging two streams: bytes both ways with backpressure, half-close passed through, and
 * both sides closed once both directions have ended (or at once on an error).
 * @module
 */
import { HEADROOM, type Stream } from "./transport.ts";

/** First read buffer of each direction; small, so idle and interactive tunnels stay cheap. */
export const BRIDGE_BUFFER_MIN = 16 * 1024;

/** Largest read buffer; a direction that keeps filling its buffer doubles it up to this. */
export const BRIDGE_BUFFER_MAX = 256 * 1024;

/** Full reads in a row that make a direction bulk, worth a bigger buffer. */
const FULL_READS_TO_GROW = 4;

/** What a finished bridge carried. */
export interface BridgeResult {
  /** Bytes copied from the first stream to the second. */
  forward: number;
  /** Bytes copied from the second stream to the first. */
  backward: number;
  /** The first error that cut the bridge short, if any. */
  error?: Error;
}

/**
 * Copies `from` into `to` until end of stream, then half-closes `to`. Reading waits for each
 * write, so a slow reader on one side slows the writer on the other: memory stays bounded by
 * one buffer per direction. Reads land after {@link HEADROOM} free bytes, so a framing `to`
 * can write its header and the payload in one go.
 */
async function pump(from: Stream, to: Stream, count: (n: number) => void): Promise<void> {
  let size = BRIDGE_BUFFER_MIN;
  let buf = new Uint8Array(HEADROOM + size);
  let full = 0;
  for (;;) {
    const n = await from.read(buf.subarray(HEADROOM));
    if (n === null) break;
    if (to.writeWithHeadroom) await to.writeWithHeadroom(buf, n);
    else await to.write(buf.subarray(HEADROOM, HEADROOM + n));
    count(n);
    // Only a sustained stream earns a bigger buffer: short exchanges stay small and cheap.
    full = n === size ? full + 1 : 0;
    if (full >= FULL_READS_TO_GROW && size < BRIDGE_BUFFER_MAX) {
      buf = new Uint8Array(HEADROOM + (size *= 2));
      full = 0;
    }
  }
  await to.closeWrite();
}

/**
 * Bridges `a` and `b` until both directions end, then closes `a`, and `b` too unless `keepB`
 * and both directions ended cleanly (a reusable data connection). Any error closes both at
 * once. `result` is updated as bytes flow, so a status page can read a live tunnel's counts.
 */
export async function bridge(
  a: Stream,
  b: Stream,
  result: BridgeResult = { forward: 0, backward: 0 },
  keepB = false,
): Promise<BridgeResult> {
  const fail = (err: unknown) => {
    result.error ??= err instanceof Error ? err : new Error(String(err));
    a.close();
    b.close();
  };
  await Promise.all([
    pump(a, b, (n) => result.forward += n).catch(fail),
    pump(b, a, (n) => result.backward += n).catch(fail),
  ]);
  a.close();
  if (!keepB || result.error) b.close();
  return result;
}
