/**
 * Tunnels as streams over one connection: each stream has credit-based flow control in both
 * directions, and the sender takes turns among the streams that have bytes to send, so a bulk
 * transfer cannot starve an interactive session on the same connection (as SSH channels,
 * HTTP/2 and yamux do). The frames themselves are defined in `protocol.ts`.
 * @module
 */
import {
  decodeMessage,
  encodeMessage,
  type FrameKind,
  FrameParser,
  FrameType,
  HEARTBEAT_MISSES,
  INITIAL_WINDOW,
  MAX_DATA_BYTES,
  MAX_REASON_BYTES,
  MAX_WINDOW,
  type Message,
  MUX_HEADER_BYTES,
  muxFrame,
  ProtocolError,
  writeHeader,
} from "./protocol.ts";
import type { Stream } from "./transport.ts";

/** Bytes gathered into one write to the connection at most. */
const BATCH_BYTES = 128 * 1024;

/** Bytes a stream sends per turn while other streams also wait to send. */
const QUANTUM_BYTES = 16 * 1024;

/** Control frames (window updates, opens, resets, pings) queued unsent at most. */
const MAX_CONTROL_QUEUE_BYTES = 1024 * 1024;

/**
 * A receive window grows when its sender said it was blocked and the receiver then had
 * delivered everything within this long (or the round trip, if longer): the window, not the
 * reader, held the stream back.
 */
const GROW_DRAIN_MS = 5;

/**
 * Credit goes back in quarters of the window: the sender then always has most of its window to
 * use, so a window of one round trip's worth keeps a long link full.
 */
const GRANT_PARTS = 4;

/**
 * On a long link credit goes back in eighths: a window needs less beyond the link's round trip
 * to keep it full, and so queues less ahead of other streams. A grant costs 13 bytes.
 */
const LONG_LINK_GRANT_PARTS = 8;

/** The largest window on a connection with a short round trip (a LAN, loopback). */
const LAN_WINDOW = 256 * 1024;

/**
 * Window allowed per millisecond of the connection's round trip: about 130 Mbit/s worth.
 * Beyond what the link carries in a round trip, a window only queues bytes in the path ahead of
 * other streams (on a 100 Mbit/s, 40 ms link a 2 MiB window added 130 ms to their round trips).
 */
const WINDOW_PER_RTT_MS = 16 * 1024;

/**
 * On a long link, a window grows only while its stream's bytes wait in the path at most this
 * long beyond the connection's shortest round trip.
 */
const GROW_QUEUE_MS = 4;

/** On a long link, a window shrinks once its stream's bytes wait in the path longer than this. */
const SHRINK_QUEUE_MS = 10;

/**
 * On a long link a window steps by this fraction of itself once the path has shown a queue:
 * windows near the link's capacity move by a few milliseconds of queue at a time.
 */
const WINDOW_STEP_PARTS = 8;

/** Round trips a long link's window change waits for before the next. */
const EPOCH_SAMPLES = 4;

/** Grants remembered per stream for round-trip samples (older ones are dropped). */
const MAX_GRANT_LOG = 16;

/**
 * A receive window grows only once its stream has delivered this much: a user who never reads
 * stalls before (the kernel's socket buffers take less), so its stream keeps the initial window.
 */
const GROW_AFTER_BYTES = 512 * 1024;

/** Queued received payloads are written to the local socket in one go up to this size. */
const SINK_WRITE_BYTES = 256 * 1024;

/** Read buffer of a relay's first reads; a source that keeps filling it gets a bigger one. */
const RELAY_BUFFER_MIN = 4 * 1024;

/** First read buffer of a connection read without `readChunk`. */
const READ_BUFFER_MIN = 4 * 1024;

/** Largest read buffer of a connection. */
const READ_BUFFER_MAX = 64 * 1024;

/** Largest relay read buffer. */
const RELAY_BUFFER_MAX = MAX_DATA_BYTES;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * Bytes of receive window granted beyond {@link INITIAL_WINDOW} across all streams of a
 * process: a window grows only while this budget allows, so many fast streams that stop
 * reading at once cannot hold unbounded memory.
 */
export class WindowBudget {
  used = 0;
  /** @param max the most bytes of grown window at once */
  constructor(readonly max: number) {}

  /** Reserves `n` bytes; false when the budget is spent. */
  take(n: number): boolean {
    if (this.used + n > this.max) return false;
    this.used += n;
    return true;
  }

  /** Gives back `n` reserved bytes. */
  release(n: number): void {
    this.used -= n;
  }
}

/** The process-wide default budget: 64 MiB of grown windows (32 streams at the largest). */
export const DEFAULT_BUDGET = new WindowBudget(64 * 1024 * 1024);

/** What a stream carried and how it ended. */
export interface StreamResult {
  /** Bytes sent to the peer. */
  sent: number;
  /** Bytes received from the peer. */
  received: number;
  /** Why it was cut short, if it was. */
  error?: Error;
  /** Whether the peer cut it short (a RESET frame), rather than this side or the connection. */
  resetByPeer?: boolean;
}

interface Outgoing {
  bytes: Uint8Array;
  at: number;
  resolve: () => void;
  reject: (err: Error) => void;
}

/**
 * One tunnel on a {@link Mux}. As a {@link Stream} it can be read and written like a socket;
 * {@link relay} instead pushes what arrives straight into another stream.
 */
export class MuxStream implements Stream {
  readonly remote: string;
  readonly remoteIp: string;
  /** Bytes sent and received so far, and how it ended; final once {@link done} resolves. */
  readonly result: StreamResult = { sent: 0, received: 0 };
  /** Resolves when both directions have ended or the stream was reset. */
  readonly done: Promise<StreamResult>;
  #resolveDone!: (result: StreamResult) => void;
  #mux: Mux;
  #finished = false;

  // Sending.
  #credit = INITIAL_WINDOW;
  #out: Outgoing[] = [];
  #finQueued = false;
  #finResolve: (() => void) | undefined;
  #finSent = false;
  /** A BLOCKED frame went out since the last credit came in. */
  #blockedSent = false;
  /** Whether the stream is in its mux's round of senders. */
  inRound = false;

  // Receiving.
  #in: Uint8Array[] = [];
  #inBytes = 0;
  #remoteEnded = false;
  #window = INITIAL_WINDOW;
  /** Credit the peer still holds: granted and not yet used. */
  #available = INITIAL_WINDOW;
  /** Bytes consumed and not yet granted back. */
  #unacked = 0;
  /** When the peer last said it was blocked, if that is not settled yet. */
  #blockedAt: number | undefined;
  /**
   * Grants not yet answered: the limit before each, and when it went out. The first byte past
   * `before` can only have been sent once that grant arrived, so its arrival closes a round trip
   * plus whatever waited in the path ahead of it (other bytes of the connection).
   */
  #grants: { before: number; at: number }[] = [];
  /** Such round trips since the window last changed (the most recent {@link MAX_GRANT_LOG}). */
  #epochRtts: number[] = [];
  /** When the window last changed; grants before it say nothing of the new window. */
  #epochAt = 0;
  /** Bytes consumed when the window last changed. */
  #epochDelivered = 0;
  /** The fastest delivery seen over a judged epoch, bytes per ms. */
  #bestRate = 0;
  /** On a long link: the window still doubles, as no queue has been seen yet. */
  #slowStart = true;
  /** Credit still to be withheld from grants after the window shrank. */
  #debt = 0;
  /** Bytes consumed over the stream's life. */
  #delivered = 0;
  #sink: Stream | undefined;
  #sinkBusy = false;
  #wake: (() => void) | undefined;

  constructor(mux: Mux, readonly id: number) {
    this.#mux = mux;
    this.remote = mux.link.remote;
    this.remoteIp = mux.link.remoteIp;
    this.done = new Promise((resolve) => this.#resolveDone = resolve);
  }

  // ---- Sending side -------------------------------------------------------------------------

  /** Queues `bytes`; resolves once they are copied out (the caller may then reuse them). */
  write(bytes: Uint8Array): Promise<void> {
    if (this.#finished) return Promise.reject(this.result.error ?? new Error("stream closed"));
    if (this.#finQueued) return Promise.reject(new Error("write after end of stream"));
    if (bytes.length === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.#out.push({ bytes, at: 0, resolve, reject });
      this.#mux.ready(this);
    });
  }

  /** Ends our direction after what is queued (a FIN frame); the other keeps flowing. */
  closeWrite(): Promise<void> {
    if (this.#finished || this.#finQueued) return Promise.resolve();
    this.#finQueued = true;
    return new Promise((resolve) => {
      this.#finResolve = resolve;
      this.#mux.ready(this);
    });
  }

  /** Whether the mux should give this stream a turn now. */
  get sendable(): boolean {
    if (this.#finished) return false;
    if (this.#out.length > 0) return this.#credit > 0;
    return this.#finQueued && !this.#finSent;
  }

  /**
   * Appends this stream's next frames to `parts` (at most `quantum` payload bytes), and the
   * callbacks of writes now wholly copied to `done`. Returns the bytes appended.
   */
  emit(parts: Uint8Array[], done: (() => void)[], quantum: number): number {
    let size = 0;
    while (this.#out.length > 0 && this.#credit > 0 && size < quantum) {
      const head = this.#out[0];
      const n = Math.min(head.bytes.length - head.at, this.#credit, quantum - size, MAX_DATA_BYTES);
      const header = new Uint8Array(MUX_HEADER_BYTES);
      writeHeader(header, 0, FrameType.DATA, this.id, n);
      parts.push(header, head.bytes.subarray(head.at, head.at + n));
      head.at += n;
      this.#credit -= n;
      this.result.sent += n;
      size += MUX_HEADER_BYTES + n;
      if (head.at === head.bytes.length) {
        this.#out.shift();
        done.push(head.resolve);
      }
    }
    if (this.#out.length > 0 && this.#credit === 0 && !this.#blockedSent) {
      // Tell the receiver the window is what holds us back; it may grow it.
      this.#blockedSent = true;
      parts.push(muxFrame(FrameType.BLOCKED, this.id));
      size += MUX_HEADER_BYTES;
    }
    if (this.#out.length === 0 && this.#finQueued && !this.#finSent) {
      this.#finSent = true;
      parts.push(muxFrame(FrameType.FIN, this.id));
      size += MUX_HEADER_BYTES;
      if (this.#finResolve) done.push(this.#finResolve);
      this.#finResolve = undefined;
      this.#maybeFinish();
    }
    return size;
  }

  /** The peer granted `n` more bytes of credit. */
  granted(n: number): void {
    if (this.#credit + n > MAX_WINDOW * 2) throw new ProtocolError("window grew past its limit");
    this.#credit += n;
    this.#blockedSent = false;
    if (this.#out.length > 0) this.#mux.ready(this);
  }

  // ---- Receiving side -----------------------------------------------------------------------

  /** A DATA frame arrived. */
  received(payload: Uint8Array): void {
    if (this.#remoteEnded) throw new ProtocolError(`DATA after FIN on stream ${this.id}`);
    if (payload.length > this.#available) {
      throw new ProtocolError(`stream ${this.id} sent ${payload.length} bytes past its credit`);
    }
    this.#available -= payload.length;
    this.result.received += payload.length;
    const end = this.result.received;
    while (this.#grants.length > 0 && end > this.#grants[0].before) {
      const grant = this.#grants.shift()!;
      const rtt = performance.now() - grant.at;
      this.#mux.sampleRtt(rtt);
      if (grant.at >= this.#epochAt) {
        this.#epochRtts.push(rtt);
        if (this.#epochRtts.length > MAX_GRANT_LOG) this.#epochRtts.shift();
      }
    }
    if (this.#finished) return; // reset here already; the peer will hear of it
    this.#in.push(payload);
    this.#inBytes += payload.length;
    this.#deliver();
  }

  /** A FIN frame arrived: the peer sends no more. */
  ended(): void {
    if (this.#remoteEnded) throw new ProtocolError(`second FIN on stream ${this.id}`);
    this.#remoteEnded = true;
    this.#deliver();
  }

  /**
   * Sends what arrives into `sink` from now on (and what arrived already), granting credit as
   * the sink takes it, and half-closes the sink after the peer's FIN.
   */
  attach(sink: Stream): void {
    this.#sink = sink;
    this.#deliver();
  }

  #deliver(): void {
    if (this.#finished) return;
    if (!this.#sink) {
      this.#wake?.();
      return;
    }
    if (this.#sinkBusy) return;
    if (this.#in.length > 0) {
      this.#sinkBusy = true;
      const joined = this.#in.length > 1 && this.#in[0].length < SINK_WRITE_BYTES;
      const chunk = this.#take(SINK_WRITE_BYTES);
      this.#sink.write(chunk).then(() => {
        if (joined) release(chunk);
        this.#sinkBusy = false;
        this.#consumed(chunk.length);
        this.#deliver();
      }, (err) => this.reset(`local write failed: ${(err as Error).message}`));
    } else if (this.#remoteEnded) {
      this.#sinkBusy = true;
      this.#sink.closeWrite().catch(() => {}).finally(() => {
        this.#sinkBusy = false;
        this.#sink = undefined; // delivered all; nothing more will come
        this.#maybeFinish();
      });
    }
  }

  /** Takes up to `max` queued bytes as one array (joined when there are several). */
  #take(max: number): Uint8Array {
    const first = this.#in[0];
    if (first.length >= max || this.#in.length === 1) {
      const part = first.length > max ? first.subarray(0, max) : first;
      if (part === first) this.#in.shift();
      else this.#in[0] = first.subarray(max);
      this.#inBytes -= part.length;
      return part;
    }
    let size = 0, count = 0;
    while (count < this.#in.length && size + this.#in[count].length <= max) {
      size += this.#in[count++].length;
    }
    const out = concat(this.#in.splice(0, count), size);
    this.#inBytes -= size;
    return out;
  }

  /** Reads what arrived into `p` (for a stream used directly, without {@link attach}). */
  async read(p: Uint8Array): Promise<number | null> {
    while (this.#in.length === 0) {
      if (this.#finished) {
        if (this.result.error) throw this.result.error;
        return null;
      }
      if (this.#remoteEnded) {
        this.#maybeFinish();
        return null;
      }
      await new Promise<void>((resolve) => this.#wake = resolve);
      this.#wake = undefined;
    }
    let n = 0;
    while (n < p.length && this.#in.length > 0) {
      const head = this.#in[0];
      const take = Math.min(head.length, p.length - n);
      p.set(head.subarray(0, take), n);
      n += take;
      if (take === head.length) this.#in.shift();
      else this.#in[0] = head.subarray(take);
    }
    this.#inBytes -= n;
    this.#consumed(n);
    return n;
  }

  /**
   * Grows the receive window to `bytes` at once (within the mux's `maxWindow` and its budget)
   * and grants the peer the difference, without waiting for it to prove a fast path. For a
   * stream whose reader is itself a stream with its own credit (a server relaying a peer's
   * tunnel to its client), which the usual growth would judge a slow reader. The window still
   * halves if the path fills.
   */
  widen(bytes: number): void {
    const target = Math.min(bytes, this.#mux.maxWindow);
    if (this.#finished || this.#remoteEnded || target <= this.#window) return;
    const grow = target - this.#window;
    if (!this.#mux.budget.take(grow)) return;
    this.#window = target;
    this.#sendGrant(grow);
  }

  /** Grants the peer `n` more bytes, remembering when, for round-trip samples. */
  #sendGrant(n: number): void {
    const at = performance.now();
    // What the peer may send up to before this grant: what it sent, and the credit it holds.
    const before = this.result.received + this.#available;
    this.#available += n;
    this.#grants.push({ before, at });
    if (this.#grants.length > MAX_GRANT_LOG) this.#grants.shift();
    const frame = new Uint8Array(MUX_HEADER_BYTES + 4);
    writeHeader(frame, 0, FrameType.WINDOW, this.id, 4);
    new DataView(frame.buffer).setUint32(MUX_HEADER_BYTES, n);
    this.#mux.queueControl(frame);
  }

  /** The peer has bytes for this stream but no credit: grow the window if we keep up. */
  blocked(): void {
    this.#blockedAt = performance.now();
    if (this.#in.length === 0 && !this.#sinkBusy) this.#consumed(0);
  }

  /**
   * `n` received bytes have left our hands: grant them back once a quarter window is due (an
   * eighth on a long link).
   *
   * The window adapts to the path. When the peer says it was blocked and everything it sent
   * was delivered at once, the window may be what holds it back, and it grows (within the mux's
   * `maxWindow` and the budget). On a short link (see `Mux.longLink`) it doubles up to the
   * mux's `shortLinkWindow`, small enough that a full window never waits long. On a long link
   * it grows only while its bytes arrive within {@link GROW_QUEUE_MS} of the connection's
   * shortest round trip, and it shrinks once
   * they wait more than {@link SHRINK_QUEUE_MS}: beyond what the link carries in a round trip,
   * a window only queues bytes ahead of other streams' bytes. It doubles up to the mux's
   * `slowStartWindow` until the path shows a queue, then steps by an eighth, and never shrinks
   * below what its fastest delivery needs, so it settles where the link is full and little waits.
   */
  #consumed(n: number): void {
    this.#unacked += n;
    this.#delivered += n;
    if (this.#finished || this.#remoteEnded) return;
    let grow = 0;
    if (this.#blockedAt !== undefined && this.#in.length === 0) {
      const now = performance.now();
      const quick = now - this.#blockedAt < Math.max(GROW_DRAIN_MS, this.#mux.rttMs);
      this.#blockedAt = undefined;
      grow = this.#mux.longLink ? this.#adapt(quick, now) : this.#double(quick);
    }
    if (grow === 0 && this.#unacked < this.#window / this.#mux.grantParts) return;
    const repaid = Math.min(this.#debt, this.#unacked);
    this.#debt -= repaid;
    const grant = this.#unacked - repaid + grow;
    this.#unacked = 0;
    if (grant > 0) this.#sendGrant(grant);
  }

  /**
   * Grows the window by `step`, short of `cap`, if the reader keeps up (`quick`), the stream has
   * proved a fast path and the budget allows. Returns the bytes grown (0: it did not grow).
   */
  #grow(quick: boolean, step: number, cap: number): number {
    if (!quick || this.#delivered < GROW_AFTER_BYTES || this.#window >= cap) return 0;
    const grow = Math.min(step, cap - this.#window);
    if (!this.#mux.budget.take(grow)) return 0;
    this.#window += grow;
    return grow;
  }

  /** A short link's growth: the window doubles, up to the mux's `shortLinkWindow`. */
  #double(quick: boolean): number {
    return this.#grow(quick, this.#window, this.#mux.shortLinkWindow);
  }

  /** A long link's growth and shrinking, by the queue its round trips show. Returns the growth. */
  #adapt(quick: boolean, now: number): number {
    // Judge a window by the median of several round trips over two round trips' time at least: a
    // queue the window built shows in most of them, a passing stall elsewhere in a few.
    const judged = this.#epochRtts.length >= EPOCH_SAMPLES && now > this.#epochAt &&
      now - this.#epochAt >= 2 * this.#mux.minRttMs;
    const queued = judged ? median(this.#epochRtts) - this.#mux.minRttMs : 0;
    if (judged) {
      const rate = (this.#delivered - this.#epochDelivered) / (now - this.#epochAt);
      this.#bestRate = Math.max(this.#bestRate, rate);
    }
    // Never below what carried the fastest delivery seen over the shortest round trip, with
    // the credit still on its way back: a queue of the link's own making (a burst, another
    // connection's bytes) must not starve the stream.
    const floor = Math.max(
      INITIAL_WINDOW,
      this.#bestRate * this.#mux.minRttMs * (1 + 2 / this.#mux.grantParts),
    );
    if (judged && queued > SHRINK_QUEUE_MS && this.#window > floor) {
      this.#slowStart = false;
      const shrink = Math.ceil(Math.min(this.#window - floor, this.#window / WINDOW_STEP_PARTS));
      this.#window -= shrink;
      this.#debt += shrink;
      this.#mux.budget.release(shrink);
      this.#newEpoch(now);
      return 0;
    }
    let step: number;
    if (this.#slowStart && this.#window < this.#mux.slowStartWindow) step = this.#window;
    else if (judged && queued <= GROW_QUEUE_MS) step = Math.ceil(this.#window / WINDOW_STEP_PARTS);
    else return 0;
    const grow = this.#grow(quick, step, this.#mux.maxWindow);
    if (grow > 0) this.#newEpoch(now);
    return grow;
  }

  /** The window changed: round trips measured from now on tell what the new one does. */
  #newEpoch(now: number): void {
    this.#epochAt = now;
    this.#epochDelivered = this.#delivered;
    this.#epochRtts = [];
  }

  // ---- Both ---------------------------------------------------------------------------------

  /** Bytes received and not yet consumed. */
  get buffered(): number {
    return this.#inBytes;
  }

  #maybeFinish(): void {
    const drained = this.#in.length === 0 && !this.#sinkBusy && this.#sink === undefined;
    if (this.#finSent && this.#remoteEnded && drained) this.#finish();
  }

  /** Aborts both directions and tells the peer why (a RESET frame). */
  reset(reason: string): void {
    if (this.#finished) return;
    const bytes = encoder.encode(reason);
    this.#mux.queueControl(
      muxFrame(FrameType.RESET, this.id, bytes.subarray(0, MAX_REASON_BYTES)),
    );
    this.#finish(new Error(reason));
  }

  /** The peer reset the stream. */
  resetByPeer(reason: string): void {
    if (!this.#finished) this.result.resetByPeer = true;
    this.#finish(new Error(reason || "reset by peer"));
  }

  /** Ends the stream here: pending writes fail, the sink is closed on error. */
  #finish(error?: Error): void {
    if (this.#finished) return;
    this.#finished = true;
    if (error) this.result.error = error;
    const failure = error ?? new Error("stream closed");
    for (const out of this.#out.splice(0)) out.reject(failure);
    this.#finResolve?.();
    this.#in = [];
    this.#inBytes = 0;
    if (error) this.#sink?.close();
    this.#wake?.();
    this.#mux.forget(this, this.#window - INITIAL_WINDOW);
    this.#resolveDone(this.result);
  }

  /** Closes the stream: a reset, unless it had already ended. */
  close(): void {
    this.reset("closed");
  }

  isClosed(): boolean {
    return this.#finished;
  }

  /** The mux died: fail without telling the peer. */
  lost(error: Error): void {
    this.#finish(error);
  }
}

/** What the owner of a {@link Mux} hears. */
export interface MuxEvents {
  /** The peer opened stream `stream` with this OPEN payload; absent where peers may not open. */
  onOpen?: (stream: MuxStream, request: Uint8Array) => void;
  /** A control message arrived (already decoded; the owner checks its type). */
  onControl: (message: Message) => void;
}

/** Options of a {@link Mux}. */
export interface MuxOptions {
  /** Streams open at once at most; an OPEN beyond it is reset. */
  maxStreams: number;
  /** Round-trip time seen during the handshake, for window growth. */
  rttMs: number;
  /** Where grown windows are counted; {@link DEFAULT_BUDGET} if absent. */
  budget?: WindowBudget;
}

/**
 * Streams over one connection: reads frames and dispatches them, and writes frames in
 * batches, control frames first, then data in turns among the streams with something to send.
 */
export class Mux {
  readonly link: Stream;
  readonly budget: WindowBudget;
  readonly rttMs: number;
  /** The shortest round trip seen on this connection: the handshake's, or a stream's since. */
  minRttMs: number;
  /**
   * The largest a receive window grows on this connection. A short link (a LAN, loopback) keeps
   * {@link LAN_WINDOW}: every byte of a window in flight can stand in the path ahead of another
   * stream's byte. A long one (where {@link WINDOW_PER_RTT_MS} per millisecond of round trip is
   * more) allows twice that, at most {@link MAX_WINDOW}: there the round trips a window brings
   * decide how far it grows.
   */
  readonly maxWindow: number;
  /**
   * On a long link, a window doubles up to this ({@link WINDOW_PER_RTT_MS} per millisecond of
   * round trip, to a power of two) while no queue shows, and steps by an eighth beyond.
   */
  readonly slowStartWindow: number;
  /**
   * On a short link, windows double up to this: {@link LAN_WINDOW}, or the long-link doubling
   * limit if the handshake's round trip read longer (as every version before long links had).
   */
  readonly shortLinkWindow: number;
  readonly streams = new Map<number, MuxStream>();
  /** Time of the last frame from the peer (performance.now()). */
  lastHeard = performance.now();
  #events: MuxEvents;
  #maxStreams: number;
  #nextId = 1;
  #highestPeerId = 0;
  #control: { bytes: Uint8Array; resolve?: () => void }[] = [];
  #controlBytes = 0;
  #round: MuxStream[] = [];
  #flushing = false;
  #closed = false;
  #closeReason: Error | undefined;
  #heartbeat: ReturnType<typeof setInterval> | undefined;
  #closeWhenIdle: Error | undefined;
  #closeAfterFlush: Error | undefined;

  constructor(link: Stream, events: MuxEvents, options: MuxOptions) {
    this.link = link;
    this.#events = events;
    this.#maxStreams = options.maxStreams;
    this.rttMs = options.rttMs;
    this.minRttMs = options.rttMs;
    const perRtt = options.rttMs * WINDOW_PER_RTT_MS;
    this.slowStartWindow = Math.min(MAX_WINDOW, 2 ** Math.floor(Math.log2(Math.max(1, perRtt))));
    this.shortLinkWindow = Math.max(LAN_WINDOW, this.slowStartWindow);
    this.maxWindow = perRtt > LAN_WINDOW
      ? Math.min(MAX_WINDOW, Math.ceil(2 * perRtt / 4096) * 4096)
      : LAN_WINDOW;
    this.budget = options.budget ?? DEFAULT_BUDGET;
  }

  /**
   * Whether this is a long link: one whose shortest round trip holds more than
   * {@link LAN_WINDOW} at {@link WINDOW_PER_RTT_MS}. The handshake's round trip can only be too
   * long (it includes the peer's work), so a link judged long at first turns short once a stream
   * measures a short round trip, never the other way.
   */
  get longLink(): boolean {
    return this.minRttMs * WINDOW_PER_RTT_MS > LAN_WINDOW;
  }

  /** Credit goes back once this fraction of a window is consumed. */
  get grantParts(): number {
    return this.longLink ? LONG_LINK_GRANT_PARTS : GRANT_PARTS;
  }

  /** A stream measured a round trip of `ms` (a grant and the bytes it let through). */
  sampleRtt(ms: number): void {
    if (ms < this.minRttMs) this.minRttMs = ms;
  }

  /** Whether the connection is over. */
  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Reads and dispatches frames until the connection ends, then closes it (every stream is
   * over afterwards). Resolves with why it ended: a protocol or connection error, a local
   * {@link close}, or the peer's end of stream.
   */
  async run(): Promise<Error> {
    const parser = new FrameParser((type, id, payload) => this.#frame(type, id, payload));
    // Without readChunk: one buffer, small while the connection is idle (a fleet of idle
    // clients holds one each), doubled whenever a read fills it.
    let buf = this.link.readChunk ? undefined : new Uint8Array(READ_BUFFER_MIN);
    let reason = new Error("connection closed by the peer");
    try {
      while (!this.#closed) {
        let chunk: Uint8Array | null;
        if (buf) {
          const n = await this.link.read(buf);
          chunk = n === null ? null : buf.subarray(0, n);
          if (n === buf.length && n < READ_BUFFER_MAX) {
            if (chunk) parser.push(chunk, false);
            this.lastHeard = performance.now();
            buf = new Uint8Array(n * 2);
            continue;
          }
        } else {
          chunk = await this.link.readChunk!();
        }
        if (chunk === null) break;
        this.lastHeard = performance.now();
        parser.push(chunk, buf === undefined);
      }
    } catch (err) {
      reason = err as Error;
    }
    this.close(reason);
    return this.#closeReason!;
  }

  #frame(type: FrameKind, id: number, payload: Uint8Array): void {
    if (this.#closed) return;
    switch (type) {
      case FrameType.CONTROL:
        return this.#events.onControl(decodeMessage(payload));
      case FrameType.OPEN:
        return this.#opened(id, payload);
    }
    const stream = this.streams.get(id);
    if (!stream) {
      // Frames may still be in flight for a stream that ended here; none may name a stream
      // that was never opened.
      if (id > Math.max(this.#highestPeerId, this.#nextId - 1)) {
        throw new ProtocolError(`frame for stream ${id}, which was never opened`);
      }
      return;
    }
    switch (type) {
      case FrameType.DATA:
        return stream.received(payload);
      case FrameType.WINDOW: {
        const n = new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0);
        if (n === 0) throw new ProtocolError("WINDOW frame of 0 bytes");
        return stream.granted(n);
      }
      case FrameType.FIN:
        return stream.ended();
      case FrameType.RESET:
        return stream.resetByPeer(decoder.decode(payload));
      case FrameType.BLOCKED:
        return stream.blocked();
    }
  }

  #opened(id: number, payload: Uint8Array): void {
    if (!this.#events.onOpen) throw new ProtocolError("OPEN frame from a peer that may not open");
    if (id <= this.#highestPeerId) {
      throw new ProtocolError(`OPEN for stream ${id}, not above the last one opened`);
    }
    this.#highestPeerId = id;
    const stream = new MuxStream(this, id);
    this.streams.set(id, stream);
    if (this.streams.size > this.#maxStreams) {
      return stream.reset(`too many tunnels open at once (${this.#maxStreams})`);
    }
    this.#events.onOpen(stream, payload);
  }

  /** Opens a stream with this OPEN payload; data may follow at once, within the credit. */
  open(request: Uint8Array): MuxStream {
    if (this.#closed) throw this.#closeReason ?? new Error("connection closed");
    const stream = new MuxStream(this, this.#nextId++);
    this.streams.set(stream.id, stream);
    this.queueControl(muxFrame(FrameType.OPEN, stream.id, request));
    return stream;
  }

  /** Sends a control message; resolves once it is written. */
  sendControl(message: Message): Promise<void> {
    if (this.#closed) return Promise.reject(this.#closeReason ?? new Error("connection closed"));
    return new Promise((resolve) => {
      this.queueControl(muxFrame(FrameType.CONTROL, 0, encodeMessage(message)), resolve);
    });
  }

  /** Queues a frame ahead of all stream data. */
  queueControl(bytes: Uint8Array, resolve?: () => void): void {
    if (this.#closed) return resolve?.();
    this.#control.push({ bytes, resolve });
    this.#controlBytes += bytes.length;
    if (this.#controlBytes > MAX_CONTROL_QUEUE_BYTES) {
      this.close(new Error("the peer does not read what we send"));
      return;
    }
    this.#kick();
  }

  /** `stream` has something to send: give it a turn. */
  ready(stream: MuxStream): void {
    if (stream.inRound || !stream.sendable) return;
    stream.inRound = true;
    this.#round.push(stream);
    this.#kick();
  }

  /** Drops a finished stream and returns its grown window to the budget. */
  forget(stream: MuxStream, grown: number): void {
    this.streams.delete(stream.id);
    if (grown > 0) this.budget.release(grown);
    if (this.#closeWhenIdle && this.streams.size === 0) this.#closeSoon(this.#closeWhenIdle);
  }

  /** Closes the connection once no stream is open (at once if none is). */
  closeWhenIdle(reason: Error): void {
    this.#closeWhenIdle = reason;
    if (this.streams.size === 0) this.#closeSoon(reason);
  }

  /** Closes after what is queued has been written (a FIN or RESET may still be on its way). */
  #closeSoon(reason: Error): void {
    if (this.#closed) return;
    if (!this.#flushing && this.#control.length === 0) return this.close(reason);
    this.#closeAfterFlush = reason;
  }

  #kick(): void {
    if (this.#flushing || this.#closed) return;
    this.#flushing = true;
    queueMicrotask(() => this.#flush());
  }

  async #flush(): Promise<void> {
    try {
      while (!this.#closed) {
        const parts: Uint8Array[] = [];
        const done: (() => void)[] = [];
        let size = 0;
        while (this.#control.length > 0 && size < BATCH_BYTES) {
          const item = this.#control.shift()!;
          this.#controlBytes -= item.bytes.length;
          parts.push(item.bytes);
          size += item.bytes.length;
          if (item.resolve) done.push(item.resolve);
        }
        while (this.#round.length > 0 && size < BATCH_BYTES) {
          const stream = this.#round.shift()!;
          stream.inRound = false;
          if (!stream.sendable) continue;
          // Alone, a stream may fill the batch; with others waiting, it gets a quantum.
          const quantum = this.#round.length === 0 ? BATCH_BYTES - size : QUANTUM_BYTES;
          size += stream.emit(parts, done, quantum);
          this.ready(stream);
        }
        if (parts.length === 0) break;
        const joined = parts.length > 1;
        const batch = joined ? concat(parts, size) : parts[0];
        for (const resolve of done) resolve();
        await this.link.write(batch);
        if (joined) release(batch);
      }
    } catch (err) {
      this.close(err as Error);
    } finally {
      this.#flushing = false;
    }
    if (this.#closed) return;
    if (this.#control.length > 0 || this.#round.length > 0) this.#kick();
    else if (this.#closeAfterFlush) this.close(this.#closeAfterFlush);
  }

  /**
   * Sends a ping every `intervalMs` and closes the connection once nothing has been heard for
   * {@link HEARTBEAT_MISSES} intervals.
   */
  startHeartbeat(intervalMs: number): void {
    this.#heartbeat = setInterval(() => {
      if (performance.now() - this.lastHeard > HEARTBEAT_MISSES * intervalMs) {
        this.close(new Error(`nothing heard for ${HEARTBEAT_MISSES * intervalMs / 1000} s`));
        return;
      }
      this.sendControl({ type: "ping" }).catch(() => {});
    }, intervalMs);
  }

  /**
   * Sends a last control message (best effort: written, or given up after `timeoutMs`), then
   * closes.
   */
  async goodbye(message: Message, reason: Error, timeoutMs = 1000): Promise<void> {
    if (this.#closed) return;
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      this.sendControl(message).catch(() => {}),
      new Promise<void>((resolve) => timer = setTimeout(resolve, timeoutMs)),
    ]);
    clearTimeout(timer);
    this.close(reason);
  }

  /** Closes the connection; every stream fails with `reason`. */
  close(reason: Error = new Error("connection closed")): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#closeReason = reason;
    clearInterval(this.#heartbeat);
    for (const item of this.#control.splice(0)) item.resolve?.();
    this.#round = [];
    for (const stream of [...this.streams.values()]) stream.lost(reason);
    this.link.close();
  }

  /** Why the connection closed, once it has. */
  get closeReason(): Error | undefined {
    return this.#closeReason;
  }
}

/** Size of the pooled buffers that batches and joined chunks are assembled in. */
const POOL_BUFFER_BYTES = Math.max(BATCH_BYTES, SINK_WRITE_BYTES);

/** Pooled buffers kept for reuse at most (4 MiB). */
const POOL_MAX = 16;

/**
 * Large buffers for one write each, reused once that write is done: a bulk transfer then
 * allocates (and the garbage collector reclaims) almost nothing per batch.
 */
const pool: Uint8Array[] = [];

/** A buffer of at least `size` bytes (pooled above 16 KiB); {@link release} it after use. */
function borrow(size: number): Uint8Array {
  if (size <= 16 * 1024) return new Uint8Array(size);
  return (pool.pop() ?? new Uint8Array(POOL_BUFFER_BYTES)).subarray(0, size);
}

/** Returns a buffer from {@link borrow} once nothing refers to it any more. */
function release(buf: Uint8Array): void {
  if (buf.buffer.byteLength === POOL_BUFFER_BYTES && pool.length < POOL_MAX) {
    pool.push(new Uint8Array(buf.buffer));
  }
}

function concat(parts: Uint8Array[], size: number): Uint8Array {
  const out = borrow(size);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/**
 * Relays a local socket and a stream until both directions end: what the stream receives goes
 * into `local`, what `local` sends goes out on the stream. Closes `local` at the end; resolves
 * with the stream's result (`sent` = bytes from `local`).
 */
export async function relay(local: Stream, stream: MuxStream): Promise<StreamResult> {
  stream.attach(local);
  const pump = async () => {
    let size = RELAY_BUFFER_MIN;
    let buf = new Uint8Array(size);
    let full = 0;
    for (;;) {
      const n = await local.read(buf);
      if (n === null) break;
      await stream.write(buf.subarray(0, n));
      // Only a sustained stream earns a bigger buffer: short exchanges stay small and cheap.
      full = n === size ? full + 1 : 0;
      if (full >= 4 && size < RELAY_BUFFER_MAX) {
        buf = new Uint8Array(size *= 2);
        full = 0;
      }
    }
    await stream.closeWrite();
  };
  pump().catch((err) => {
    if (!stream.isClosed()) stream.reset(`local read failed: ${(err as Error).message}`);
  });
  const result = await stream.done;
  local.close();
  return result;
}

/** The middle value of `values` (not empty); the mean of the two middle ones for an even count. */
function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}
