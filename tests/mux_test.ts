/**
 * Mux frames and streams: the FrameParser finds the same frames however the bytes are split and
 * rejects every malformed header; a Mux over a real TCP connection carries each stream's bytes
 * exactly both ways, holds a non-reading receiver to one window of credit, half-closes with FIN,
 * aborts with RESET, and keeps an interactive stream's round trips short while another stream
 * moves 200 MiB.
 */
import assert from "node:assert/strict";
import {
  encodeMessage,
  encodeOpen,
  type FrameKind,
  FrameParser,
  FrameType,
  INITIAL_WINDOW,
  MAX_DATA_BYTES,
  MAX_FRAME_BYTES,
  MAX_OPEN_BYTES,
  MAX_REASON_BYTES,
  MAX_WINDOW,
  MUX_HEADER_BYTES,
  muxFrame,
  ProtocolError,
  writeHeader,
} from "../src/protocol.ts";
import { Mux, type MuxStream, WindowBudget } from "../src/mux.ts";
import { ConnStream } from "../src/transport.ts";
import { firstDifference, randomBytes, waitUntil } from "./helpers.ts";
import { tcpPair } from "./wire.ts";

const encoder = new TextEncoder();

interface Frame {
  type: FrameKind;
  stream: number;
  payload: Uint8Array;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A window increment as a WINDOW payload. */
function increment(n: number): Uint8Array {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, n);
  return out;
}

/** One frame of every kind, with payloads of the edge sizes. */
function sampleFrames(dataSizes: number[]): Frame[] {
  const frames: Frame[] = [
    { type: FrameType.CONTROL, stream: 0, payload: encodeMessage({ type: "ping" }) },
    {
      type: FrameType.OPEN,
      stream: 1,
      payload: encodeOpen({ host: "localhost", port: 22, user: "127.0.0.1:5" }),
    },
  ];
  for (const size of dataSizes) {
    frames.push({ type: FrameType.DATA, stream: 1, payload: randomBytes(size) });
  }
  frames.push(
    { type: FrameType.WINDOW, stream: 1, payload: increment(INITIAL_WINDOW) },
    { type: FrameType.FIN, stream: 1, payload: new Uint8Array(0) },
    { type: FrameType.RESET, stream: 3, payload: encoder.encode("cannot connect") },
    { type: FrameType.RESET, stream: 3, payload: new Uint8Array(0) },
    {
      type: FrameType.CONTROL,
      stream: 0,
      payload: encodeMessage({ type: "goodbye", reason: "bye" }),
    },
    { type: FrameType.DATA, stream: 0xffff_ffff, payload: randomBytes(17) },
  );
  return frames;
}

/**
 * Parses `bytes` pushed as the chunks that end at `cuts`. With `owned` false, every chunk is
 * overwritten after its push, so a payload that still points into it shows.
 */
function parse(bytes: Uint8Array, cuts: number[], owned: boolean): Frame[] {
  const frames: Frame[] = [];
  const parser = new FrameParser((type, stream, payload) => {
    frames.push({ type, stream, payload: owned ? payload.slice() : payload });
  });
  let at = 0;
  for (const cut of [...cuts, bytes.length]) {
    const chunk = bytes.slice(at, cut);
    parser.push(chunk, owned);
    if (!owned) chunk.fill(0xaa);
    at = cut;
  }
  return frames;
}

function assertFrames(actual: Frame[], expected: Frame[], what: string): void {
  assert.equal(actual.length, expected.length, `${what}: frame count`);
  for (let i = 0; i < expected.length; i++) {
    assert.equal(actual[i].type, expected[i].type, `${what}: type of frame ${i}`);
    assert.equal(actual[i].stream, expected[i].stream, `${what}: stream of frame ${i}`);
    const at = firstDifference(actual[i].payload, expected[i].payload);
    assert.equal(at, -1, `${what}: payload of frame ${i} differs at byte ${at}`);
  }
}

Deno.test("FrameParser: frames encode as a 9-byte header of type, stream id and length", () => {
  const frame = muxFrame(FrameType.DATA, 0x01020304, new Uint8Array([9, 8, 7]));
  assert.deepEqual([...frame], [2, 1, 2, 3, 4, 0, 0, 0, 3, 9, 8, 7]);
  assert.equal(MUX_HEADER_BYTES, 9);
});

Deno.test("FrameParser: the same bytes split at every one or two boundaries yield the same frames", () => {
  const frames = sampleFrames([1, 2, 200]);
  const bytes = concat(frames.map((f) => muxFrame(f.type, f.stream, f.payload)));
  for (const owned of [true, false]) {
    assertFrames(parse(bytes, [], owned), frames, `whole, owned ${owned}`);
    for (let i = 0; i <= bytes.length; i++) {
      assertFrames(parse(bytes, [i], owned), frames, `split at ${i}, owned ${owned}`);
      for (let j = i; j <= bytes.length; j += 7) {
        assertFrames(parse(bytes, [i, j], owned), frames, `split at ${i}, ${j}, owned ${owned}`);
      }
    }
    const everyByte = Array.from({ length: bytes.length }, (_, i) => i);
    assertFrames(parse(bytes, everyByte, owned), frames, `byte by byte, owned ${owned}`);
  }
});

Deno.test("FrameParser: full-size DATA frames survive random chunking, owned or not", () => {
  const frames = sampleFrames([MAX_DATA_BYTES, 1, MAX_DATA_BYTES - 1, 4096]);
  const bytes = concat(frames.map((f) => muxFrame(f.type, f.stream, f.payload)));
  for (let round = 0; round < 60; round++) {
    const cuts: number[] = [];
    for (let at = 0; at < bytes.length;) {
      at += 1 + Math.floor(Math.random() * (round % 2 ? 20 : 70_000));
      if (at < bytes.length) cuts.push(at);
    }
    for (const owned of [true, false]) {
      assertFrames(parse(bytes, cuts, owned), frames, `cuts ${cuts.slice(0, 20)}…`);
    }
  }
});

Deno.test("FrameParser: each malformed header throws ProtocolError as soon as it is complete", () => {
  const header = (type: number, stream: number, length: number) => {
    const out = new Uint8Array(MUX_HEADER_BYTES);
    writeHeader(out, 0, type as FrameKind, stream, length);
    return out;
  };
  const cases: [Uint8Array, RegExp][] = [
    [header(7, 1, 1), /unknown mux frame type 7/],
    [header(FrameType.BLOCKED, 1, 1), /exceeds 0/],
    [header(255, 0, 0), /unknown mux frame type 255/],
    [header(FrameType.CONTROL, 0, MAX_FRAME_BYTES + 1), /exceeds/],
    [header(FrameType.OPEN, 1, MAX_OPEN_BYTES + 1), /exceeds/],
    [header(FrameType.DATA, 1, MAX_DATA_BYTES + 1), /exceeds/],
    [header(FrameType.DATA, 1, 0xffff_ffff), /exceeds/],
    [header(FrameType.WINDOW, 1, 5), /exceeds/],
    [header(FrameType.FIN, 1, 1), /exceeds/],
    [header(FrameType.RESET, 1, MAX_REASON_BYTES + 1), /exceeds/],
    [header(FrameType.CONTROL, 1, 10), /control frame off stream 0/],
    [header(FrameType.DATA, 0, 10), /stream frame on stream 0/],
    [header(FrameType.OPEN, 0, 10), /stream frame on stream 0/],
    [header(FrameType.WINDOW, 0, 4), /stream frame on stream 0/],
    [header(FrameType.FIN, 0, 0), /stream frame on stream 0/],
    [header(FrameType.RESET, 0, 0), /stream frame on stream 0/],
    [header(FrameType.WINDOW, 1, 3), /WINDOW frame must carry 4 bytes/],
    [header(FrameType.WINDOW, 1, 0), /WINDOW frame must carry 4 bytes/],
    [header(FrameType.DATA, 1, 0), /empty DATA/],
    [header(FrameType.CONTROL, 0, 0), /empty control/],
  ];
  const good = muxFrame(FrameType.DATA, 1, new Uint8Array([1]));
  for (const [bad, pattern] of cases) {
    const what = `header ${[...bad]}`;
    for (const split of ["whole", "byte by byte", "after a good frame"]) {
      const delivered: number[] = [];
      const parser = new FrameParser((type) => delivered.push(type));
      const run = () => {
        if (split === "whole") parser.push(bad.slice(), true);
        else if (split === "byte by byte") {
          for (const b of bad) parser.push(new Uint8Array([b]), false);
        } else parser.push(concat([good, bad]), true);
      };
      assert.throws(run, (err: Error) => {
        assert.ok(err instanceof ProtocolError, `${what} (${split}): ${err}`);
        assert.match(err.message, pattern, `${what} (${split})`);
        return true;
      });
      assert.deepEqual(delivered, split === "after a good frame" ? [FrameType.DATA] : [], what);
    }
  }
});

// ---------------------------------------------------------------------------------------------
// Mux over a real TCP connection

/** Two muxes over one TCP connection: `opener` opens streams, `acceptor` takes them. */
async function muxPair(options: { maxStreams?: number; rttMs?: number } = {}) {
  const pair = await tcpPair();
  const budget = new WindowBudget(64 * 1024 * 1024);
  const opened: MuxStream[] = [];
  const requests: string[] = [];
  const rttMs = options.rttMs ?? 1;
  const opener = new Mux(pair.a, { onControl: () => {} }, { maxStreams: 1000, rttMs, budget });
  const acceptor = new Mux(pair.b, {
    onOpen: (stream, request) => {
      opened.push(stream);
      requests.push(new TextDecoder().decode(request));
    },
    onControl: () => {},
  }, { maxStreams: options.maxStreams ?? 1000, rttMs, budget });
  const runs = [opener.run(), acceptor.run()];
  let opens = 0;
  return {
    opener,
    acceptor,
    requests,
    /** Opens a stream and returns both of its ends. */
    async open(request = "{}"): Promise<[MuxStream, MuxStream]> {
      const index = opens++;
      const mine = opener.open(encoder.encode(request));
      await waitUntil(() => opened.length > index, "the acceptor to see the OPEN", 5000);
      return [mine, opened[index]];
    },
    async close() {
      opener.close();
      acceptor.close();
      await Promise.all(runs);
      pair.close();
    },
  };
}

/** Reads `n` bytes from `stream` (or until its end); returns what came. */
async function readN(stream: MuxStream, n: number): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  let got = 0;
  while (got < n) {
    const r = await stream.read(out.subarray(got));
    if (r === null) break;
    got += r;
  }
  return out.subarray(0, got);
}

/** Writes `bytes` in pieces of random size, then ends our direction. */
async function writeAllThenFin(stream: MuxStream, bytes: Uint8Array): Promise<void> {
  for (let at = 0; at < bytes.length;) {
    const n = 1 + Math.floor(Math.random() * 200_000);
    await stream.write(bytes.subarray(at, at + n));
    at += n;
  }
  await stream.closeWrite();
}

/** Resolves with how `promise` settled, or "pending" if it has not yet. */
async function state(promise: Promise<unknown>): Promise<string> {
  const marker = {};
  const result = await Promise.race([
    promise.then(() => "resolved", () => "rejected"),
    Promise.resolve().then(() => Promise.resolve(marker)),
  ]);
  return result === marker ? "pending" : result as string;
}

/** A one-byte round trip on a stream whose far end echoes: returns its time in ms. */
async function roundTrip(mine: MuxStream, byte: number): Promise<number> {
  const started = performance.now();
  await mine.write(new Uint8Array([byte]));
  const back = await readN(mine, 1);
  assert.deepEqual([...back], [byte]);
  return performance.now() - started;
}

/** Reads `stream` to its end, counting what came; `done` settles at the end (awaited by the caller). */
function drain(stream: MuxStream): { received: number; done: Promise<void> } {
  const sink = { received: 0, done: Promise.resolve() };
  sink.done = (async () => {
    const buf = new Uint8Array(256 * 1024);
    for (;;) {
      const n = await stream.read(buf);
      if (n === null) break;
      sink.received += n;
    }
  })();
  sink.done.catch(() => {}); // awaited by the test; cut short if an assertion fails first
  return sink;
}

/** Echoes everything `stream` receives back on it, until its end. */
async function echo(stream: MuxStream): Promise<void> {
  const buf = new Uint8Array(64 * 1024);
  for (;;) {
    const n = await stream.read(buf);
    if (n === null) break;
    await stream.write(buf.slice(0, n));
  }
  await stream.closeWrite();
}

Deno.test("mux: streams carry bytes both ways exactly, each on its own", async () => {
  const mux = await muxPair();
  try {
    const sizes = [[3 << 20, 1 << 20], [1, 5 << 20], [100_000, 0]];
    await Promise.all(sizes.map(async ([up, down], i) => {
      const [mine, theirs] = await mux.open(`{"n":${i}}`);
      const [upBytes, downBytes] = [randomBytes(up), randomBytes(down)];
      const [, , gotUp, gotDown] = await Promise.all([
        writeAllThenFin(mine, upBytes),
        writeAllThenFin(theirs, downBytes),
        readN(theirs, up + 1),
        readN(mine, down + 1),
      ]);
      assert.equal(firstDifference(gotUp, upBytes), -1, `stream ${i} up`);
      assert.equal(firstDifference(gotDown, downBytes), -1, `stream ${i} down`);
      const [a, b] = await Promise.all([mine.done, theirs.done]);
      assert.deepEqual(a, { sent: up, received: down });
      assert.deepEqual(b, { sent: down, received: up });
    }));
    assert.deepEqual(mux.requests.sort(), ['{"n":0}', '{"n":1}', '{"n":2}']);
    assert.equal(mux.opener.streams.size, 0, "finished streams are forgotten");
    assert.equal(mux.acceptor.streams.size, 0, "finished streams are forgotten");
  } finally {
    await mux.close();
  }
});

/**
 * Writes 1 MiB on a stream whose receiver does not read (after `prepare` ran on the receiving
 * end) and checks that exactly `window` bytes arrive, the write waits, and once the receiver
 * reads everything arrives exactly.
 */
async function holdsExactly(
  window: number,
  prepare: (theirs: MuxStream) => void = () => {},
): Promise<void> {
  const mux = await muxPair();
  try {
    const [mine, theirs] = await mux.open();
    prepare(theirs);
    const bytes = randomBytes(1 << 20);
    const write = mine.write(bytes);
    await waitUntil(() => theirs.buffered >= window, "the window to arrive", 5000);
    // A round trip on another stream: whatever the sender could have sent has arrived by now.
    const [other, otherFar] = await mux.open();
    const echoing = echo(otherFar);
    await roundTrip(other, 7);
    assert.equal(theirs.buffered, window, "the receiver holds exactly the window");
    assert.equal(mine.result.sent, window, "the sender sent exactly its credit");
    assert.equal(await state(write), "pending", "the write resolved without credit");
    // Once the receiver reads, everything arrives, exactly, and the write completes.
    const got = await readN(theirs, bytes.length);
    assert.equal(firstDifference(got, bytes), -1);
    await write;
    await other.closeWrite();
    await echoing;
  } finally {
    await mux.close();
  }
}

Deno.test("mux credit: a receiver that does not read holds one window, and the sender waits", async () => {
  await holdsExactly(INITIAL_WINDOW);
});

Deno.test("mux credit: a widened window lets the sender run ahead by that much, no more", async () => {
  await holdsExactly(4 * INITIAL_WINDOW, (theirs) => theirs.widen(4 * INITIAL_WINDOW));
});

Deno.test("mux credit: a peer that sends past its credit loses the connection", async () => {
  const pair = await tcpPair();
  const acceptor = new Mux(pair.b, { onOpen: () => {}, onControl: () => {} }, {
    maxStreams: 10,
    rttMs: 1,
    budget: new WindowBudget(1 << 20),
  });
  const ended = acceptor.run();
  try {
    const parts = [muxFrame(FrameType.OPEN, 1, encoder.encode("{}"))];
    for (let sent = 0; sent <= INITIAL_WINDOW; sent += 16 * 1024) {
      parts.push(muxFrame(FrameType.DATA, 1, new Uint8Array(16 * 1024)));
    }
    await pair.a.write(concat(parts));
    const reason = await ended;
    assert.ok(reason instanceof ProtocolError, `${reason}`);
    assert.match(reason.message, /past its credit/);
  } finally {
    acceptor.close();
    await ended;
    pair.close();
  }
});

Deno.test("mux: FIN ends one direction and the other keeps flowing", async () => {
  const mux = await muxPair();
  try {
    const [mine, theirs] = await mux.open();
    await mine.write(encoder.encode("hello"));
    await mine.closeWrite();
    assert.deepEqual(await readN(theirs, 6), encoder.encode("hello"), "then the end");
    assert.equal(await theirs.read(new Uint8Array(10)), null);
    assert.equal(await state(theirs.done), "pending", "half-closed is not done");
    // The far side still talks after our FIN, and we still hear it.
    const reply = randomBytes(300_000);
    const writing = theirs.write(reply);
    assert.equal(firstDifference(await readN(mine, reply.length), reply), -1);
    await writing;
    await assert.rejects(mine.write(new Uint8Array(1)), /after end of stream/);
    await theirs.closeWrite();
    assert.equal(await mine.read(new Uint8Array(10)), null);
    const [a, b] = await Promise.all([mine.done, theirs.done]);
    assert.equal(a.error, undefined);
    assert.equal(b.error, undefined);
    assert.deepEqual(a, { sent: 5, received: reply.length });
  } finally {
    await mux.close();
  }
});

Deno.test("mux: RESET aborts a stream both ways with its reason, and only that stream", async () => {
  const mux = await muxPair();
  try {
    const [mine, theirs] = await mux.open();
    const [other, otherFar] = await mux.open();
    const echoing = echo(otherFar);
    const reading = mine.read(new Uint8Array(10));
    const blocked = mine.write(randomBytes(4 * INITIAL_WINDOW)); // waits for credit
    theirs.reset("no thanks");
    await assert.rejects(reading, /no thanks/);
    await assert.rejects(blocked, /no thanks/);
    const result = await mine.done;
    assert.equal(result.error?.message, "no thanks");
    await assert.rejects(mine.write(new Uint8Array(1)), /no thanks/);
    await assert.rejects(theirs.write(new Uint8Array(1)));
    assert.ok(mine.isClosed() && theirs.isClosed());
    // The connection and its other stream go on.
    await roundTrip(other, 42);
    await other.closeWrite();
    await echoing;
    assert.equal(mux.opener.closed, false);
  } finally {
    await mux.close();
  }
});

Deno.test("mux: an OPEN beyond maxStreams is reset with the reason", async () => {
  const mux = await muxPair({ maxStreams: 2 });
  try {
    await mux.open();
    await mux.open();
    const third = mux.opener.open(encoder.encode("{}"));
    const result = await third.done;
    assert.match(result.error?.message ?? "", /too many tunnels open at once \(2\)/);
    assert.equal(mux.acceptor.streams.size, 2);
  } finally {
    await mux.close();
  }
});

Deno.test("mux: a bulk stream moving 200 MiB does not starve another stream's round trips", async () => {
  const mux = await muxPair();
  try {
    const [bulk, bulkFar] = await mux.open();
    const [chat, chatFar] = await mux.open();
    const total = 200 * 1024 * 1024;
    const sink = drain(bulkFar);
    // Bulk bytes the receiver consumed between each chat byte's write and its arrival: what
    // was queued ahead of it. Unlike time, this does not depend on the machine's load.
    let mark = 0;
    const ahead: number[] = [];
    const echoing = (async () => {
      const buf = new Uint8Array(16);
      for (;;) {
        const n = await chatFar.read(buf);
        if (n === null) break;
        ahead.push(sink.received - mark);
        await chatFar.write(buf.slice(0, n));
      }
      await chatFar.closeWrite();
    })();
    echoing.catch(() => {});
    // 8 MiB queued at all times: a sender that did not take turns among its streams would put
    // every round trip behind it.
    const chunk = randomBytes(1 << 20);
    const sending = (async () => {
      const queued: Promise<void>[] = [];
      for (let sent = 0; sent < total; sent += chunk.length) {
        queued.push(bulk.write(chunk));
        if (queued.length >= 8) await queued.shift();
      }
      await Promise.all(queued);
      await bulk.closeWrite();
    })();
    sending.catch(() => {});
    await waitUntil(() => sink.received > 0, "the bulk stream to flow", 5000);
    const times: number[] = [];
    while (sink.received < total * 0.9 && times.length < 2000) {
      mark = sink.received;
      times.push(await roundTrip(chat, times.length & 0xff));
    }
    const duringBulk = sink.received;
    await sending;
    await sink.done;
    assert.equal(sink.received, total);
    assert.ok(times.length >= 50, `only ${times.length} round trips while the bulk ran`);
    assert.ok(duringBulk < total, "the round trips ran while the bulk stream flowed");
    // Ahead of a chat byte: at most the bulk stream's window in flight, and one batch.
    const most = Math.max(...ahead);
    assert.ok(
      most <= MAX_WINDOW + 512 * 1024,
      `${(most / 1048576).toFixed(1)} MiB of bulk data went ahead of a chat byte`,
    );
    // Both ends run in this one process, on a 2-core machine shared with other work, where a
    // scheduling hiccup can stall any one round trip: a generous guard on time (what users
    // feel), beside the exact one on bytes above. Fewer than 3 in 100 over 50 ms, none over 1 s.
    times.sort((a, b) => a - b);
    const slow = times.filter((t) => t > 50).length;
    const report = `${slow} of ${times.length} round trips over 50 ms (median ` +
      `${times[times.length >> 1].toFixed(2)} ms, p99 ` +
      `${times[Math.floor(times.length * 0.99)].toFixed(1)} ms, max ${
        times.at(-1)!.toFixed(1)
      } ms)`;
    assert.ok(slow < times.length * 0.03, report);
    assert.ok(times.at(-1)! < 1000, report);
    await chat.closeWrite();
    await echoing;
  } finally {
    await mux.close();
  }
});

/**
 * A slow, distant link between two TCP connections, in this process: each direction carries
 * `bytesPerSecond`, and every byte arrives `delayMs` after it left. While `bufferBytes` wait to
 * leave, it stops reading, so more waits in the kernel's socket buffers, as before a real
 * bottleneck.
 */
async function slowLink(bytesPerSecond: number, delayMs: number, bufferBytes: number) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const [inner, outer] = await Promise.all([
    Deno.connect({ hostname: "127.0.0.1", port }),
    listener.accept(),
  ]);
  const [farInner, farOuter] = await Promise.all([
    Deno.connect({ hostname: "127.0.0.1", port }),
    listener.accept(),
  ]);
  listener.close();
  for (const c of [inner, outer, farInner, farOuter]) (c as Deno.TcpConn).setNoDelay(true);
  const carry = async (from: Deno.Conn, to: Deno.Conn) => {
    const queue: { bytes: Uint8Array; at: number }[] = [];
    let departs = 0, ended = false;
    let wake: (() => void) | undefined;
    const sending = (async () => {
      for (;;) {
        const next = queue[0];
        if (!next) {
          if (ended) return;
          await new Promise<void>((r) => wake = r);
          continue;
        }
        const wait = next.at - performance.now();
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
        queue.shift();
        await to.write(next.bytes);
      }
    })();
    const buf = new Uint8Array(16 * 1024);
    try {
      for (;;) {
        const backlog = (departs - performance.now()) / 1000 * bytesPerSecond;
        if (backlog >= bufferBytes) {
          await new Promise((r) =>
            setTimeout(r, (backlog - bufferBytes / 2) / bytesPerSecond * 1000)
          );
          continue;
        }
        const n = await from.read(buf);
        if (n === null) break;
        departs = Math.max(departs, performance.now()) + n / bytesPerSecond * 1000;
        queue.push({ bytes: buf.slice(0, n), at: departs + delayMs });
        wake?.();
      }
    } catch { /* closed */ }
    ended = true;
    wake?.();
    await sending.catch(() => {});
  };
  const carrying = Promise.all([carry(outer, farInner), carry(farInner, outer)]);
  return {
    a: new ConnStream(inner),
    b: new ConnStream(farOuter),
    async close() {
      for (const c of [inner, outer, farInner, farOuter]) {
        try {
          c.close();
        } catch { /* closed */ }
      }
      await carrying;
    },
  };
}

Deno.test("mux on a long link: a bulk stream's window stops where the link is full, so another stream's round trips stay near the link's own", async () => {
  // 4 MB/s and 40 ms: the link carries 160 KB in a round trip. A window that grew to the
  // largest a 40 ms handshake allows would put 350 KB (90 ms) ahead of every chat byte.
  const rate = 4_000_000, delayMs = 20;
  const link = await slowLink(rate, delayMs, 64 * 1024);
  const budget = new WindowBudget(64 * 1024 * 1024);
  const opened: MuxStream[] = [];
  const sender = new Mux(link.a, { onControl: () => {} }, { maxStreams: 10, rttMs: 40, budget });
  const receiver = new Mux(link.b, {
    onOpen: (stream) => opened.push(stream),
    onControl: () => {},
  }, { maxStreams: 10, rttMs: 40, budget });
  const runs = [sender.run(), receiver.run()];
  try {
    const bulk = sender.open(encoder.encode("{}"));
    const chat = sender.open(encoder.encode("{}"));
    await waitUntil(() => opened.length === 2, "both streams to open", 5000);
    const [bulkFar, chatFar] = opened;
    const sink = drain(bulkFar);
    const echoing = echo(chatFar);
    echoing.catch(() => {});
    const total = 16 * 1024 * 1024;
    const chunk = randomBytes(256 * 1024);
    const sending = (async () => {
      for (let sent = 0; sent < total; sent += chunk.length) await bulk.write(chunk);
      await bulk.closeWrite();
    })();
    sending.catch(() => {});
    // Past the first second the window has found its size; measure from there.
    await waitUntil(() => sink.received >= rate, "the first second of bulk", 10_000);
    const from = { at: performance.now(), bytes: sink.received };
    const times: number[] = [];
    while (sink.received < total * 0.9) times.push(await roundTrip(chat, times.length & 0xff));
    const mbps = (sink.received - from.bytes) / (performance.now() - from.at) / 1000;
    await sending;
    await sink.done;
    assert.equal(sink.received, total);
    times.sort((a, b) => a - b);
    const median = times[times.length >> 1];
    const report = `${times.length} round trips: median ${median.toFixed(1)} ms, p90 ${
      times[Math.floor(times.length * 0.9)].toFixed(1)
    } ms; bulk ${mbps.toFixed(2)} MB/s of the link's ${rate / 1e6}`;
    assert.ok(times.length >= 20, report);
    // The link's own round trip is 40 ms; what the bulk stream queues ahead adds to it.
    assert.ok(median < 2 * 2 * delayMs, report);
    assert.ok(mbps > 0.7 * rate / 1e6, report);
    await chat.closeWrite();
    await echoing;
  } finally {
    sender.close();
    receiver.close();
    await Promise.all(runs);
    await link.close();
  }
});

Deno.test("mux: a LAN whose handshake round trip read long (a slow peer) is found short by its first streams", async () => {
  // A slow signer can make the handshake take 40 ms on loopback. Judged long, the link would
  // size windows by queues that are only the machine's scheduling.
  const mux = await muxPair({ rttMs: 40 });
  try {
    assert.ok(mux.acceptor.longLink, "a 40 ms handshake first counts as a long link");
    const [bulk, bulkFar] = await mux.open();
    const sink = drain(bulkFar);
    const chunk = randomBytes(1 << 20);
    for (let i = 0; i < 8; i++) await bulk.write(chunk);
    await bulk.closeWrite();
    await sink.done;
    assert.equal(sink.received, 8 * chunk.length);
    assert.ok(
      !mux.acceptor.longLink,
      `still long after 8 MiB: shortest round trip ${mux.acceptor.minRttMs.toFixed(2)} ms`,
    );
    assert.equal(mux.acceptor.grantParts, 4);
  } finally {
    await mux.close();
  }
});
