/**
 * Fuzzing: random and mutated input against the handshake decoder, the OPEN decoder and the mux
 * FrameParser (in process), against FramedStream and Mux over real sockets, and then against a
 * running server: hostile handshakes over hundreds of real TLS connections, and garbage and
 * mutated mux frames from clients that logged in properly, while a legitimate client keeps
 * tunnelling.
 *
 * Inputs come from a seeded generator; a failure names its seed, and `FUZZ_SEED=N` replays it.
 */
import assert from "node:assert/strict";
import * as tls from "node:tls";
import {
  decodeMessage,
  decodeOpen,
  decodePeerOpen,
  decodeSnapshot,
  encodeFrame,
  encodeMessage,
  encodeOpen,
  encodePeerOpen,
  encodeSnapshot,
  FramedStream,
  type FrameKind,
  FrameParser,
  FrameType,
  INITIAL_WINDOW,
  MAX_DATA_BYTES,
  MAX_FRAME_BYTES,
  MAX_OPEN_BYTES,
  MAX_REASON_BYTES,
  type Message,
  muxFrame,
  NONCE_BYTES,
  type OpenRequest,
  ProtocolError,
} from "../src/protocol.ts";
import { Mux, WindowBudget } from "../src/mux.ts";
import type { Stream } from "../src/transport.ts";
import {
  clientToml,
  connectUser,
  DEADLINE_MS,
  echoSetup,
  Fixture,
  freePort,
  type Identity,
  Scope,
  serverToml,
  startEcho,
  waitUntil,
  writeAll,
} from "./helpers.ts";
import { closedWithin, helloFor, login, tcpPair } from "./wire.ts";

const SEED = Number(Deno.env.get("FUZZ_SEED") ?? Date.now() % 2 ** 31);

/** A small seeded generator (mulberry32): the same seed gives the same inputs. */
class Random {
  #state: number;

  constructor(seed: number) {
    this.#state = seed >>> 0;
  }

  /** A float in [0, 1). */
  next(): number {
    let t = (this.#state = (this.#state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)];
  }

  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = this.int(256);
    return out;
  }

  base64(n: number): string {
    return this.bytes(n).toBase64();
  }
}

const encoder = new TextEncoder();

/** One valid message of each type, with random nonces and signatures. */
function validMessages(r: Random, name = "foo bar"): Message[] {
  return [
    helloFor(name, { interval: 5 }),
    { type: "challenge", nonce: r.base64(NONCE_BYTES) },
    { type: "auth", signature: r.base64(64) },
    {
      type: "welcome",
      services: [{ port: 10022, host: "localhost", target_port: 22 }],
      pending: 1,
    },
    { type: "refused", reason: "no", retry: true },
    { type: "ping" },
    { type: "goodbye", reason: "bye" },
    { type: "registry", revision: 12 },
  ];
}

/** The fields each type must have, `type` included: what a decoded message may hold. */
const FIELDS: Record<string, string> = Object.fromEntries(
  validMessages(new Random(1)).map((m) => [m.type, Object.keys(m).sort().join(",")]),
);

/** Odd JSON values that a field might be replaced with. */
function oddValue(r: Random): unknown {
  const values: unknown[] = [
    null,
    true,
    false,
    0,
    -1,
    1.5,
    2 ** 53,
    1e308,
    -0,
    65536,
    3601,
    "",
    " ",
    "x".repeat(300),
    "\u0000",
    "\ud800",
    "\u202e",
    "ping",
    "localhost",
    "127.0.0.1",
    [],
    {},
    [1, 2],
    { type: "ping" },
    r.base64(31),
    r.base64(33),
    r.base64(32).replace(/=*$/, ""),
    r.base64(64) + "=",
    "!!!!!!!!!!!!!!!!!!!!!!==",
    r.base64(r.int(80)),
  ];
  return r.pick(values);
}

const TYPES = [
  "hello",
  "data",
  "standby",
  "challenge",
  "auth",
  "welcome",
  "refused",
  "connect",
  "reject",
  "ping",
  "goodbye",
  "HELLO",
  "",
  "__proto__",
  "constructor",
  "toString",
];

/** An object with its fields changed: removed, added, retyped, or its type swapped. */
function mutateObject(r: Random, value: object): Record<string, unknown> {
  const obj = structuredClone(value) as Record<string, unknown>;
  const rounds = 1 + r.int(3);
  for (let i = 0; i < rounds; i++) {
    const keys = Object.keys(obj);
    switch (r.int(6)) {
      case 0:
        delete obj[r.pick(keys)];
        break;
      case 1:
        obj[r.pick(["extra", "Type", "server", "check", "__proto__", "services", "session"])] =
          oddValue(r);
        break;
      case 2:
        obj[r.pick(keys)] = oddValue(r);
        break;
      case 3:
        obj.type = r.next() < 0.8 ? r.pick(TYPES) : oddValue(r);
        break;
      case 4:
        if (Array.isArray(obj.services)) {
          obj.services = [r.pick([{}, null, [], { port: 1, host: 2, target_port: 3 }, "x"])];
        } else obj[r.pick(keys)] = { nested: oddValue(r) };
        break;
      default:
        obj.version = r.pick([0, 1, 2, 3, -1, 65536, "2", 2.0000001]);
    }
  }
  return obj;
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

/** Bit flips, random bytes, insertions, deletions, truncation, invalid UTF-8, duplication. */
function mutateBytes(r: Random, input: Uint8Array): Uint8Array {
  let out: Uint8Array = input.slice();
  const rounds = 1 + r.int(4);
  for (let i = 0; i < rounds; i++) {
    const at = r.int(out.length + 1);
    switch (r.int(7)) {
      case 0:
        if (out.length) out[at % out.length] ^= 1 << r.int(8);
        break;
      case 1:
        if (out.length) out[at % out.length] = r.int(256);
        break;
      case 2:
        out = concat([out.subarray(0, at), r.bytes(1 + r.int(8)), out.subarray(at)]);
        break;
      case 3:
        out = concat([out.subarray(0, at), out.subarray(at + 1 + r.int(8))]);
        break;
      case 4:
        out = out.subarray(0, at);
        break;
      case 5: {
        const bad = r.pick([[0xff], [0xc0, 0x80], [0xed, 0xa0, 0x80], [0xf8, 0x88], [0xe2, 0x82]]);
        out = concat([out.subarray(0, at), new Uint8Array(bad), out.subarray(at)]);
        break;
      }
      default:
        out = concat([out, out.subarray(0, at)]);
    }
  }
  return out;
}

const ODD_TEXTS = [
  "",
  " ",
  "null",
  "[]",
  "1",
  '"hello"',
  "{",
  "}",
  "{}",
  '{"type":null}',
  '{"type":"ping","type":"ping"}',
  '{"type":"ping","__proto__":{}}',
  '{"type":"ping",}',
  "{'type':'ping'}",
  '{"type":"\\u0070ing"}',
  '{"type":"ping"}\u0000',
  "[".repeat(5000) + "]".repeat(5000),
  '{"a":'.repeat(3000) + "1" + "}".repeat(3000),
  '{"type":"hello","version":2,"name":"' + "é".repeat(200) +
  '","interval":1,"check":false,"server":"localhost"}',
  '{"type":"hello","version":2,"name":"a\\u0007","interval":1,"check":false,"server":"x"}',
  '{"type":"hello","version":1,"name":"a","interval":1,"check":false}',
  '{"type":"standby","version":1,"session":"AAAAAAAAAAAAAAAAAAAAAA=="}',
  '{"type":"welcome","services":' + JSON.stringify(Array(70000).fill(0)) + ',"pending":0}',
  '{"host":"localhost","port":22,"user":"u"}',
];

/** Payloads that are not JSON objects, or are objects of a shape no message has. */
function oddPayload(r: Random): Uint8Array {
  return r.next() < 0.7 ? encoder.encode(r.pick(ODD_TEXTS)) : r.bytes(r.int(300));
}

/** A handshake payload: valid, mutated as an object, mutated as bytes, or odd. */
function payload(r: Random): Uint8Array {
  const message = r.pick(validMessages(r));
  switch (r.int(4)) {
    case 0:
      return encoder.encode(JSON.stringify(mutateObject(r, message)));
    case 1:
      return mutateBytes(r, encoder.encode(JSON.stringify(message)));
    case 2:
      return mutateBytes(r, encoder.encode(JSON.stringify(mutateObject(r, message))));
    default:
      return oddPayload(r);
  }
}

function header(length: number): Uint8Array {
  const h = new Uint8Array(4);
  new DataView(h.buffer).setUint32(0, length);
  return h;
}

/** A byte stream of handshake frames: honest, lying and huge lengths, truncation. */
function frameStream(r: Random): Uint8Array {
  const parts: Uint8Array[] = [];
  const frames = 1 + r.int(4);
  for (let i = 0; i < frames; i++) {
    const body = r.next() < 0.3 ? encodeFrame(r.pick(validMessages(r))).subarray(4) : payload(r);
    const length = r.pick([
      body.length,
      body.length,
      body.length + 1 + r.int(10),
      Math.max(0, body.length - 1 - r.int(10)),
      MAX_FRAME_BYTES + 1 + r.int(1000),
      0xffff_ffff,
      0,
    ]);
    parts.push(header(length), body);
  }
  const all = concat(parts);
  return r.next() < 0.3 ? all.subarray(0, r.int(all.length + 1)) : all;
}

function describe(input: Uint8Array): string {
  return JSON.stringify(new TextDecoder().decode(input.subarray(0, 200)));
}

/** Runs `decode`; anything thrown must be a ProtocolError (VersionError is one). */
function decodes<T>(decode: () => T, input: Uint8Array, seed: number): T | undefined {
  try {
    return decode();
  } catch (err) {
    if (!(err instanceof ProtocolError)) {
      throw new Error(`seed ${seed}: ${(err as Error)?.name} for ${describe(input)}: ${err}`);
    }
    return undefined;
  }
}

Deno.test("the handshake decoder only ever throws ProtocolError, on 20,000 random and mutated payloads", () => {
  const r = new Random(SEED);
  let accepted = 0;
  const count = 20_000;
  for (let i = 0; i < count; i++) {
    const input = payload(r);
    const message = decodes(() => decodeMessage(input), input, SEED);
    if (!message) continue;
    accepted++;
    assert.equal(
      Object.keys(message).sort().join(","),
      FIELDS[message.type],
      `seed ${SEED}: decoded ${JSON.stringify(message)} from ${describe(input)}`,
    );
    // What the decoder accepts survives its own round trip unchanged.
    assert.deepEqual(decodeMessage(encodeMessage(message)), message, `seed ${SEED}`);
  }
  // The mutations are near misses, not noise: some still decode, most do not.
  assert.ok(accepted > 0 && accepted < count / 2, `seed ${SEED}: ${accepted} of ${count} decoded`);
});

Deno.test("the OPEN decoder only ever throws ProtocolError, on 10,000 mutated requests", () => {
  const r = new Random(SEED + 10);
  const valid: OpenRequest = { host: "localhost", port: 22, user: "127.0.0.1:5555" };
  let accepted = 0;
  for (let i = 0; i < 10_000; i++) {
    const input = r.pick([
      () => encoder.encode(JSON.stringify(mutateObject(r, valid))),
      () => mutateBytes(r, encodeOpen(valid)),
      () => oddPayload(r),
    ])();
    const request = decodes(() => decodeOpen(input), input, SEED + 10);
    if (!request) continue;
    accepted++;
    assert.deepEqual(Object.keys(request).sort(), ["host", "port", "user"]);
    assert.deepEqual(decodeOpen(encodeOpen(request)), request, `seed ${SEED + 10}`);
  }
  assert.ok(accepted > 0, `seed ${SEED + 10}: nothing decoded`);
});

Deno.test("the peer link's decoders only ever throw ProtocolError, on 10,000 mutated payloads", () => {
  const r = new Random(SEED + 20);
  const open = { client: "web", port: 22, host: "localhost", by: "admin" };
  const snapshot = { revision: 9, entries: { "/natadm/clients/web": '{"key":"AAAA"}' } };
  let accepted = 0;
  for (let i = 0; i < 10_000; i++) {
    const input = r.pick([
      () => encoder.encode(JSON.stringify(mutateObject(r, open))),
      () => encoder.encode(JSON.stringify(mutateObject(r, { registry: true }))),
      () => encoder.encode(JSON.stringify(mutateObject(r, snapshot))),
      () => mutateBytes(r, encodePeerOpen(open)),
      () => mutateBytes(r, encodeSnapshot(snapshot)),
      () => oddPayload(r),
    ])();
    const request = decodes(() => decodePeerOpen(input), input, SEED + 20);
    const copy = decodes(() => decodeSnapshot(input), input, SEED + 20);
    if (request) accepted++;
    if (copy) {
      accepted++;
      assert.deepEqual(decodeSnapshot(encodeSnapshot(copy)), copy, `seed ${SEED + 20}`);
    }
  }
  assert.ok(accepted > 0, `seed ${SEED + 20}: nothing decoded`);
});

// ---------------------------------------------------------------------------------------------
// Mux frames

/** Largest payload of each frame type, as the protocol defines it. */
const MAX_PAYLOAD: Record<number, number> = {
  [FrameType.CONTROL]: MAX_FRAME_BYTES,
  [FrameType.OPEN]: MAX_OPEN_BYTES,
  [FrameType.DATA]: MAX_DATA_BYTES,
  [FrameType.WINDOW]: 4,
  [FrameType.FIN]: 0,
  [FrameType.RESET]: MAX_REASON_BYTES,
  [FrameType.BLOCKED]: 0,
};

/** A valid mux frame for stream `id` (or stream 0 for a control frame). */
function validMuxFrame(r: Random, id: number, openAllowed = true): Uint8Array {
  const kinds = openAllowed ? 7 : 6;
  switch (r.int(kinds)) {
    case 0:
      return muxFrame(FrameType.CONTROL, 0, encodeMessage({ type: "ping" }));
    case 1:
      return muxFrame(FrameType.DATA, id, r.bytes(1 + r.int(r.next() < 0.9 ? 100 : 20_000)));
    case 2: {
      const n = new Uint8Array(4);
      new DataView(n.buffer).setUint32(0, 1 + r.int(INITIAL_WINDOW));
      return muxFrame(FrameType.WINDOW, id, n);
    }
    case 3:
      return muxFrame(FrameType.FIN, id);
    case 4:
      return muxFrame(FrameType.RESET, id, encoder.encode(r.pick(["", "closed", "é\u0000"])));
    case 5:
      return muxFrame(
        FrameType.CONTROL,
        0,
        encodeMessage(r.pick(validMessages(r).slice(4))),
      );
    default:
      return muxFrame(FrameType.OPEN, id, encodeOpen({ host: "127.0.0.1", port: 1, user: "u" }));
  }
}

/** A header with any type, id and length, for frames the mutations do not reach. */
function rawMuxHeader(r: Random): Uint8Array {
  const out = new Uint8Array(9);
  out[0] = r.pick([0, 1, 2, 3, 4, 5, 6, 7, 0x7f, 0xff]);
  new DataView(out.buffer).setUint32(1, r.pick([0, 1, 2, 3, 0x7fff_ffff, 0xffff_ffff]));
  new DataView(out.buffer).setUint32(
    5,
    r.pick([0, 1, 3, 4, 5, 1024, 1025, 16_384, 16_385, 65_536, 65_537, 0xffff_ffff]),
  );
  return out;
}

/** A mux byte stream: valid frames for a few streams, mutated, with odd headers mixed in. */
function muxStream(r: Random, ids: number[] = [1, 2, 3], openAllowed = true): Uint8Array {
  const parts: Uint8Array[] = [];
  for (let i = 0, n = 1 + r.int(8); i < n; i++) {
    if (r.next() < 0.1) parts.push(rawMuxHeader(r), r.bytes(r.int(20)));
    else parts.push(validMuxFrame(r, r.pick(ids), openAllowed));
  }
  const all = concat(parts);
  return r.next() < 0.7 ? mutateBytes(r, all) : all;
}

interface Parsed {
  frames: string[];
  error?: string;
}

/** Parses `bytes` in chunks ending at `cuts`; checks every frame delivered is well formed. */
function parseMux(bytes: Uint8Array, cuts: number[], owned: boolean, seed: number): Parsed {
  const frames: string[] = [];
  const parser = new FrameParser((type: FrameKind, stream, payload) => {
    const what = `seed ${seed}: frame type ${type} stream ${stream} of ${payload.length} bytes`;
    assert.ok(type in MAX_PAYLOAD, what);
    assert.ok(payload.length <= MAX_PAYLOAD[type], what);
    assert.equal(type === FrameType.CONTROL, stream === 0, what);
    if (type === FrameType.WINDOW) assert.equal(payload.length, 4, what);
    if (type === FrameType.DATA || type === FrameType.CONTROL) assert.ok(payload.length > 0, what);
    frames.push(`${type}/${stream}/${payload.toBase64()}`);
  });
  let at = 0;
  try {
    for (const cut of [...cuts, bytes.length]) {
      parser.push(bytes.slice(at, cut), owned);
      at = cut;
    }
  } catch (err) {
    if (!(err instanceof ProtocolError)) {
      throw new Error(`seed ${seed}: ${(err as Error)?.name} from FrameParser: ${err}`);
    }
    return { frames, error: err.message };
  }
  return { frames };
}

Deno.test("the FrameParser only ever throws ProtocolError, and finds the same frames however the bytes are cut, on 5,000 mutated streams", () => {
  const r = new Random(SEED + 20);
  let failed = 0;
  for (let i = 0; i < 5000; i++) {
    const bytes = r.next() < 0.2 ? r.bytes(r.int(200)) : muxStream(r);
    const whole = parseMux(bytes, [], true, SEED + 20);
    if (whole.error) failed++;
    const cuts: number[] = [];
    for (let at = r.int(10); at < bytes.length; at += 1 + r.int(r.next() < 0.5 ? 4 : 3000)) {
      cuts.push(at);
    }
    const cut = parseMux(bytes, cuts, r.next() < 0.5, SEED + 20);
    assert.deepEqual(cut, whole, `seed ${SEED + 20}, stream ${i}: cut at ${cuts.slice(0, 30)}`);
  }
  assert.ok(failed > 500 && failed < 4900, `seed ${SEED + 20}: ${failed} of 5000 failed`);
});

/** Reads until `read` resolves null or throws; returns what ended it. */
async function drain(read: () => Promise<unknown>): Promise<unknown> {
  for (let i = 0; i < 10_000; i++) {
    try {
      if (await read() === null) return null;
    } catch (err) {
      return err;
    }
  }
  return new Error("more than 10,000 reads from one short stream");
}

/** Writes `bytes` to a raw socket, then ends it; a peer that hung up first is fine. */
async function feed(conn: Stream, bytes: Uint8Array): Promise<void> {
  try {
    await conn.write(bytes);
    await conn.closeWrite();
  } catch {
    // The reader gave up first.
  }
}

Deno.test("FramedStream over real sockets ends only with ProtocolError or a clean end, on 500 mutated streams", async () => {
  const r = new Random(SEED + 1);
  for (let i = 0; i < 500; i++) {
    const bytes = frameStream(r);
    const pair = await tcpPair();
    try {
      const writing = feed(pair.a, bytes);
      const framed = new FramedStream(pair.b);
      const ended = await drain(() => framed.read(DEADLINE_MS));
      pair.b.close();
      await writing;
      if (ended !== null && !(ended instanceof ProtocolError)) {
        throw new Error(`seed ${SEED + 1}, stream ${i}: ended with ${ended} on ${describe(bytes)}`);
      }
    } finally {
      pair.close();
    }
  }
});

Deno.test("a Mux fed 300 mutated frame streams over real sockets ends only with ProtocolError or the peer's end", async () => {
  const r = new Random(SEED + 3);
  const reasons = new Map<string, number>();
  for (let i = 0; i < 300; i++) {
    const bytes = muxStream(r);
    const pair = await tcpPair();
    const mux: Mux = new Mux(pair.b, {
      onOpen: (stream, request) => {
        try {
          decodeOpen(request);
        } catch (err) {
          return stream.reset((err as Error).message);
        }
        (async () => {
          const buf = new Uint8Array(4096);
          while (await stream.read(buf) !== null) {
            // Consumed, so that credit flows back.
          }
          await stream.closeWrite();
        })().catch(() => {});
      },
      onControl: (message) => {
        if (message.type !== "ping") throw new ProtocolError(`unexpected "${message.type}"`);
      },
    }, { maxStreams: 2, rttMs: 1, budget: new WindowBudget(1 << 20) });
    try {
      // What the mux sends back (window updates, resets) is read and dropped.
      const reading = drain(() => pair.a.read(new Uint8Array(4096)));
      const writing = feed(pair.a, bytes);
      const reason = await mux.run();
      await writing;
      pair.a.close();
      await reading;
      const expected = reason instanceof ProtocolError ||
        reason.message === "connection closed by the peer";
      if (!expected) {
        throw new Error(
          `seed ${SEED + 3}, stream ${i}: ended with ${reason.name}: ${reason.message}`,
        );
      }
      const kind = reason.message.replace(/\d+/g, "N");
      reasons.set(kind, (reasons.get(kind) ?? 0) + 1);
    } finally {
      mux.close();
      pair.close();
    }
  }
  // The mutations reach the stream rules, not only the header checks.
  const text = [...reasons.keys()].join("\n");
  assert.match(text, /never opened|credit|after FIN|second FIN|not above/, text);
});

// ---------------------------------------------------------------------------------------------
// The running server: hostile handshakes

/** The server's resident memory in KiB, from /proc. */
async function rssKiB(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(/^VmRSS:\s+(\d+) kB$/m.exec(status)![1]);
}

/** Sends `payload` through `conn` and checks the same bytes come back, within the deadline. */
async function echoesThrough(conn: Deno.Conn, payload: Uint8Array): Promise<boolean> {
  const back = new Uint8Array(payload.length);
  let got = 0;
  const timer = setTimeout(() => conn.close(), DEADLINE_MS);
  try {
    const reading = (async () => {
      while (got < back.length) {
        const n = await conn.read(back.subarray(got));
        if (n === null) return;
        got += n;
      }
    })();
    await writeAll(conn, payload);
    await reading;
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
  }
  return got === payload.length && back.every((b, i) => b === payload[i]);
}

/** Round trips through `port` one after another while `going()`; returns their times. */
async function keepTunnelling(port: number, going: () => boolean): Promise<number[]> {
  const times: number[] = [];
  while (going() && times.length < 1000) {
    const user = await connectUser(port);
    try {
      const started = performance.now();
      const label = encoder.encode(`round trip ${times.length}`);
      assert.ok(await echoesThrough(user, label), `no echo for round trip ${times.length}`);
      times.push(performance.now() - started);
    } finally {
      try {
        user.close();
      } catch {
        // Closed by the deadline.
      }
    }
  }
  return times;
}

/** A `going` for {@link keepTunnelling} that lets exactly one round trip run. */
function once(): () => boolean {
  let left = 1;
  return () => left-- > 0;
}

/** How one hostile connection is to behave. */
interface Case {
  /** Byte strings written one after another once connected. */
  parts: Uint8Array[];
  /**
   * The input is complete and wrong: the server must hang up by itself, long before any
   * timeout. Otherwise the case ends its side and waits for the server to close.
   */
  decisive: boolean;
  what: string;
}

/** One of the kinds of hostile handshake a client-facing port sees, generated at random. */
function hostileCase(r: Random, name: string): Case {
  const frame = (m: Message) => encodeFrame(m);
  const valid = validMessages(r, name);
  const hello = helloFor(name, { interval: 5 });
  switch (r.int(13)) {
    case 0: {
      const f = frame(r.pick(valid));
      return {
        parts: [f.subarray(0, 1 + r.int(f.length - 1))],
        decisive: false,
        what: "truncated",
      };
    }
    case 1:
      return {
        parts: [header(MAX_FRAME_BYTES + 1 + r.int(2 ** 31)), r.bytes(r.int(100))],
        decisive: true,
        what: "huge length",
      };
    case 2: {
      // Valid frames the server never expects first.
      const m = r.pick(valid.slice(1));
      return { parts: [frame(m)], decisive: true, what: `${m.type} first` };
    }
    case 3:
      return {
        parts: [frame({ ...hello, name: `nobody-${r.int(1e9)}` })],
        decisive: true,
        what: "unknown name",
      };
    case 4: {
      // The right name, then anything but a signature.
      const next = r.pick(valid.filter((m) => m.type !== "auth"));
      return { parts: [frame(hello), frame(next)], decisive: true, what: `hello, ${next.type}` };
    }
    case 5:
      return {
        parts: [frame(hello), frame({ type: "auth", signature: r.base64(64) })],
        decisive: true,
        what: "wrong signature",
      };
    case 6: {
      const body = mutateBytes(r, encoder.encode(JSON.stringify(hello)));
      const bad = concat([body, new Uint8Array([0xff, 0xfe])]);
      return { parts: [header(bad.length), bad], decisive: true, what: "invalid UTF-8" };
    }
    case 7: {
      const body = encoder.encode(JSON.stringify(mutateObject(r, r.pick(valid))));
      return { parts: [header(body.length), body], decisive: false, what: "mutated object" };
    }
    case 8: {
      // Version 1's data and standby openings: refused with a word about the version.
      const opening = r.pick([
        { type: "data", version: 1, id: r.base64(16), session: r.base64(16) },
        { type: "standby", version: 1, session: r.base64(16) },
      ]);
      const body = encoder.encode(JSON.stringify(opening));
      return {
        parts: [header(body.length), body, r.bytes(1 + r.int(2000))],
        decisive: true,
        what: `version 1 ${opening.type}, then bytes`,
      };
    }
    case 9: {
      // A valid hello dribbled one byte per write.
      const f = frame(hello);
      return { parts: [...f].map((b) => new Uint8Array([b])), decisive: false, what: "dribble" };
    }
    case 10:
      return {
        parts: [frame({ ...hello, version: r.pick([1, 3, 4, 255, 65535]) })],
        decisive: true,
        what: "other version",
      };
    case 11:
      return {
        parts: [frame({ ...hello, server: r.pick(["evil.example", "10.0.0.1", "LOCALHOST."]) })],
        decisive: true,
        what: "another server's name",
      };
    default:
      return { parts: [frameStream(r)], decisive: false, what: "frame stream" };
  }
}

/** What happened to one hostile TLS connection. */
interface Outcome {
  what: string;
  /** Our source address, which the server's log lines name. */
  source: string;
  decisive: boolean;
  /** Milliseconds until the server closed; undefined if it never did. */
  closedAfter?: number;
  error?: string;
}

/**
 * Runs one case over TLS from `localAddress` (so that each source starts with a clean failed-
 * login record and the test does not measure the login penalty).
 */
function runCase(port: number, ca: string, localAddress: string, c: Case): Promise<Outcome> {
  return new Promise((resolve) => {
    const socket = tls.connect(
      { host: "127.0.0.1", port, ca, servername: "localhost", localAddress } as
        & tls.ConnectionOptions
        & { localAddress: string },
    );
    let started = 0;
    const about = { what: c.what, source: localAddress, decisive: c.decisive };
    // The server's timers (10 s per step) start once the handshake is done, and a handshake can
    // take seconds on a loaded machine: give up 15 s after each phase starts, not after connect.
    const giveUp = () => {
      socket.destroy();
      resolve({ ...about });
    };
    let timer = setTimeout(giveUp, 15_000);
    socket.on("error", () => {}); // a reset after our last write is one way to be closed
    socket.on("data", () => {});
    socket.once("secureConnect", () => {
      clearTimeout(timer);
      timer = setTimeout(giveUp, 15_000);
      started = performance.now();
      for (const part of c.parts) socket.write(part);
      if (!c.decisive) socket.end();
    });
    socket.once("close", () => {
      clearTimeout(timer);
      resolve(
        started
          ? { ...about, closedAfter: performance.now() - started }
          : { ...about, error: "closed before the TLS handshake finished" },
      );
    });
  });
}

/** Raw TCP that is not TLS at all: the TLS layer must turn it away. */
async function rawGarbage(r: Random, port: number): Promise<boolean> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const bytes = r.pick([
    () => r.bytes(1 + r.int(3000)),
    () => encoder.encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    () => encoder.encode("SSH-2.0-OpenSSH_9.2\r\n"),
    () => new Uint8Array([0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00]),
    () => new Uint8Array([0x16, 0x03, 0x03, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00]),
    () => frameStream(r),
    () => muxStream(r),
  ])();
  try {
    await writeAll(conn, bytes);
    await conn.closeWrite();
    return await closedWithin(conn, 15_000, 1 << 20);
  } catch {
    return true; // reset: closed
  } finally {
    try {
      conn.close();
    } catch {
      // Already closed.
    }
  }
}

Deno.test("a server under 400 hostile handshakes stays up, bounded in memory, and keeps tunnelling", async () => {
  const scope = new Scope();
  const r = new Random(SEED + 2);
  try {
    const env = await echoSetup();
    scope.defer(env.cleanup);
    const server = await scope.server(env.serverConfig);
    const client = await scope.client(env.clientConfig);
    const ca = await Deno.readTextFile(env.fixture.caPath);
    await keepTunnelling(env.servicePort, once()); // before
    const total = 400;
    const outcomes: Outcome[] = [];
    let next = 0;
    let baseline = 0;
    const worker = async () => {
      while (next < total) {
        const i = next++;
        // One source address per connection, across 127.0.1.0/24 and up.
        const source = `127.0.${1 + (i >> 8)}.${i & 255}`;
        outcomes.push(await runCase(env.communicationPort, ca, source, hostileCase(r, "foo bar")));
        if (outcomes.length === 100) baseline = await rssKiB(server.pid);
      }
    };
    let fuzzing = true;
    const tunnelling = keepTunnelling(env.servicePort, () => fuzzing);
    const garbage = (async () => {
      let closed = 0;
      for (let i = 0; i < 100; i++) if (await rawGarbage(r, env.communicationPort)) closed++;
      return closed;
    })();
    await Promise.all(Array.from({ length: 16 }, worker));
    fuzzing = false;
    const during = await tunnelling;
    assert.equal(await garbage, 100, "a non-TLS connection was left open");
    await keepTunnelling(env.servicePort, once()); // after

    assert.equal(server.exited, false, "the server exited");
    assert.equal(client.count(/connected to .* as/), 1, "the legitimate client had to reconnect");
    assert.ok(during.length >= 3, `only ${during.length} round trips ran during the fuzzing`);
    assert.equal(outcomes.length, total);
    assert.deepEqual(outcomes.filter((o) => o.error), [], `seed ${SEED}: failed handshakes`);
    const lingering = outcomes.filter((o) => o.closedAfter === undefined);
    assert.deepEqual(lingering, [], `seed ${SEED + 2}: the server left these open`);
    const slow = outcomes.filter((o) => o.decisive && o.closedAfter! > 5_000);
    assert.deepEqual(slow, [], `seed ${SEED + 2}: the server took its time to drop these`);

    // Memory: once the first 100 connections have warmed it up, 300 more add little.
    const grown = (await rssKiB(server.pid)) - baseline;
    assert.ok(grown < 64 * 1024, `the server's RSS grew by ${grown} KiB over 300 connections`);
    // Each connection that broke the protocol outright is logged with its address.
    const logged = outcomes.filter((o) => o.decisive);
    assert.ok(logged.length > total / 3, `${logged.length}`);
    await waitUntil(
      () =>
        logged.every((o) => server.count(new RegExp(`"${o.source.replaceAll(".", "\\.")}:\\d+"`))),
      () =>
        `a log line for every connection the server refused; missing: ${
          JSON.stringify(
            logged.filter((o) =>
              !server.count(new RegExp(`"${o.source.replaceAll(".", "\\.")}:\\d+"`))
            ).slice(0, 5),
          )
        }`,
    );
    const crashes = server.lines.filter((l) =>
      /TypeError|RangeError|ReferenceError|Uncaught/.test(l)
    );
    assert.deepEqual(crashes, [], "the server hit a programming error");
    // Version 1's openings hear which versions are in play.
    if (outcomes.some((o) => o.what.startsWith("version 1"))) {
      assert.ok(server.count(/protocol version 1 is not supported/) > 0);
    }
  } finally {
    await scope.close();
  }
});

// ---------------------------------------------------------------------------------------------
// The running server: garbage and mutated mux frames from clients that logged in properly

/** Bytes that end any frame in progress and then break the framing for certain. */
const TERMINATOR = new Uint8Array(MAX_DATA_BYTES + 9 + 1024).fill(0xee);

/** What happened to one logged-in connection that sent hostile mux frames. */
interface MuxOutcome {
  what: string;
  /** Milliseconds from our last write until the server closed; undefined if it never did. */
  closedAfter?: number;
  /** Whether the user whose stream the server had opened on it was disconnected too. */
  userClosed: boolean;
}

/**
 * Logs in as `identity`, has a user arrive on its service so that the server opens a stream,
 * then sends hostile frames for that stream (and others) and waits for the server to hang up.
 */
async function hostileMuxCase(
  r: Random,
  port: number,
  ca: string,
  identity: Identity,
  servicePort: number,
): Promise<MuxOutcome> {
  const dialed = await login(port, ca, identity, { interval: 5 });
  const stream = dialed.stream;
  let user: Deno.TcpConn | undefined;
  try {
    // Read what the server sends, find the stream it opens, and see when it hangs up.
    let opened: number | undefined;
    let closedAt: number | undefined;
    const parser = new FrameParser((type, id) => {
      if (type === FrameType.OPEN) opened ??= id;
    });
    const reading = (async () => {
      const buf = new Uint8Array(64 * 1024);
      try {
        for (;;) {
          const n = await stream.read(buf);
          if (n === null) break;
          if (opened === undefined) parser.push(buf.subarray(0, n), false);
        }
      } catch {
        // A reset is a close too.
      }
      closedAt = performance.now();
    })();
    user = await connectUser(servicePort);
    await writeAll(user, encoder.encode("hi"));
    await waitUntil(() => opened !== undefined || closedAt !== undefined, "an OPEN", 10_000);
    assert.ok(opened !== undefined, "the server hung up before opening a stream");
    const id = opened;
    const kind = r.int(4);
    const input = kind === 0
      ? r.bytes(1 + r.int(3000))
      : muxStream(r, [id, id, id, id + 1, id + 100, 0xffff_ffff], kind === 1);
    const what = ["random bytes", "mutated frames with OPENs"][kind] ?? "mutated frames";
    let wrote = performance.now();
    try {
      await stream.write(input);
      await stream.write(TERMINATOR);
      wrote = performance.now();
    } catch {
      // The server hung up while we wrote: that is the point.
    }
    await Promise.race([reading, new Promise((resolve) => setTimeout(resolve, 10_000))]);
    const userClosed = await closedWithin(user, 10_000);
    return {
      what: `${what}: ${describe(input.subarray(0, 60))}`,
      closedAfter: closedAt === undefined ? undefined : Math.max(0, closedAt - wrote),
      userClosed,
    };
  } finally {
    stream.close();
    try {
      user?.close();
    } catch {
      // Already closed.
    }
  }
}

Deno.test("garbage and mutated mux frames after a valid login close only that connection, while a good client is served", async () => {
  const scope = new Scope();
  const r = new Random(SEED + 4);
  try {
    const fixture = await Fixture.create();
    scope.defer(() => fixture.cleanup());
    const echo = startEcho();
    scope.defer(echo.close);
    const good = await fixture.identity("good");
    const fuzzers = await Promise.all([0, 1, 2, 3].map((k) => fixture.identity(`fuzz-${k}`)));
    const communicationPort = freePort();
    const goodPort = freePort();
    const fuzzPorts = fuzzers.map(() => freePort());
    const server = await scope.server(
      await fixture.write(
        "server.toml",
        serverToml({
          communicationPort,
          clients: [good, ...fuzzers],
          services: [
            { port: goodPort, name: good.name, targetPort: echo.port },
            ...fuzzers.map((f, k) => ({ port: fuzzPorts[k], name: f.name, targetPort: echo.port })),
          ],
        }),
      ),
    );
    const client = await scope.client(
      await fixture.write("good.toml", clientToml({ identity: good, communicationPort })),
    );
    const ca = await Deno.readTextFile(fixture.caPath);
    await keepTunnelling(goodPort, once());

    const perFuzzer = 40;
    let fuzzing = true;
    const tunnelling = keepTunnelling(goodPort, () => fuzzing);
    const outcomes = (await Promise.all(fuzzers.map(async (identity, k) => {
      const mine: MuxOutcome[] = [];
      for (let i = 0; i < perFuzzer; i++) {
        mine.push(await hostileMuxCase(r, communicationPort, ca, identity, fuzzPorts[k]));
      }
      return mine;
    }))).flat();
    fuzzing = false;
    const during = await tunnelling;
    await keepTunnelling(goodPort, once());

    assert.equal(server.exited, false, "the server exited");
    assert.equal(client.count(/connected to .* as/), 1, "the good client had to reconnect");
    assert.ok(during.length >= 3, `only ${during.length} round trips ran during the fuzzing`);
    const lingering = outcomes.filter((o) => o.closedAfter === undefined);
    assert.deepEqual(lingering, [], `seed ${SEED + 4}: the server left these open`);
    const slow = outcomes.filter((o) => o.closedAfter! > 5_000);
    assert.deepEqual(slow, [], `seed ${SEED + 4}: the server took its time to drop these`);
    const stranded = outcomes.filter((o) => !o.userClosed);
    assert.deepEqual(stranded, [], `seed ${SEED + 4}: users left connected to a dead stream`);
    // Each connection's end is logged with the fuzzer's name and the reason.
    await waitUntil(
      () => server.count(/client "?fuzz-\d"? disconnected/) >= outcomes.length,
      () => `${outcomes.length} disconnect lines, got ${server.count(/fuzz-\d"? disconnected/)}`,
    );
    const crashes = server.lines.filter((l) =>
      /TypeError|RangeError|ReferenceError|Uncaught/.test(l)
    );
    assert.deepEqual(crashes, [], "the server hit a programming error");
  } finally {
    await scope.close();
  }
});
