/**
 * Fuzzing: random and mutated input against the frame decoder (in process, and through
 * FramedStream and ChunkStream over real sockets), then against a running server over
 * hundreds of real TLS connections, while a legitimate client keeps tunnelling.
 *
 * Inputs come from a seeded generator; a failure names its seed, and `FUZZ_SEED=N` replays it.
 */
import assert from "node:assert/strict";
import * as tls from "node:tls";
import {
  ChunkStream,
  decodeMessage,
  encodeFrame,
  FramedStream,
  type Hello,
  MAX_CHUNK_BYTES,
  MAX_FRAME_BYTES,
  type Message,
  NONCE_BYTES,
  PROTOCOL_VERSION,
  ProtocolError,
  SESSION_TOKEN_BYTES,
  TUNNEL_ID_BYTES,
} from "../src/protocol.ts";
import { ConnStream, type Stream } from "../src/transport.ts";
import { connectUser, DEADLINE_MS, echoSetup, Scope, waitUntil } from "./helpers.ts";
import { echoesThrough } from "./hostile.ts";

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

/** One valid message of each type, with random ids, tokens, nonces and signatures. */
function validMessages(r: Random, name = "foo bar"): Message[] {
  const id = r.base64(TUNNEL_ID_BYTES);
  const session = r.base64(SESSION_TOKEN_BYTES);
  return [
    { type: "hello", version: PROTOCOL_VERSION, name, interval: 5, check: false },
    { type: "data", version: PROTOCOL_VERSION, id, session },
    { type: "standby", version: PROTOCOL_VERSION, session },
    { type: "challenge", nonce: r.base64(NONCE_BYTES) },
    { type: "auth", signature: r.base64(64) },
    {
      type: "welcome",
      services: [{ port: 10022, host: "localhost", target_port: 22 }],
      pending: 1,
      session,
    },
    { type: "refused", reason: "no", retry: true },
    { type: "connect", id, host: "localhost", port: 22, user: "127.0.0.1:5" },
    { type: "reject", id, reason: "refused" },
    { type: "ping" },
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
    "x".repeat(300),
    "\u0000",
    "\ud800",
    "\u202e",
    "ping",
    [],
    {},
    [1, 2],
    { type: "ping" },
    r.base64(15),
    r.base64(17),
    r.base64(16).replace(/=*$/, ""),
    r.base64(16) + "=",
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
  "HELLO",
  "",
  "__proto__",
  "constructor",
  "toString",
];

/** A message with its fields changed: removed, added, retyped, or its type swapped. */
function mutateObject(r: Random, message: Message): Record<string, unknown> {
  const obj = structuredClone(message) as unknown as Record<string, unknown>;
  const rounds = 1 + r.int(3);
  for (let i = 0; i < rounds; i++) {
    const keys = Object.keys(obj);
    switch (r.int(6)) {
      case 0:
        delete obj[r.pick(keys)];
        break;
      case 1:
        obj[r.pick(["extra", "Type", "id", "check", "__proto__", "services"])] = oddValue(r);
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
        obj.version = r.pick([0, 2, -1, 65536, "1", 1.0000001]);
    }
  }
  return obj;
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
  '{"type":"hello","version":1,"name":"' + "é".repeat(200) + '","interval":1,"check":false}',
  '{"type":"hello","version":1,"name":"a\\u0007","interval":1,"check":false}',
  '{"type":"welcome","services":' + JSON.stringify(Array(70000).fill(0)) +
  ',"pending":0,"session":"AAAAAAAAAAAAAAAAAAAAAA=="}',
];

/** Payloads that are not JSON objects, or are objects of a shape no message has. */
function oddPayload(r: Random): Uint8Array {
  return r.next() < 0.7 ? encoder.encode(r.pick(ODD_TEXTS)) : r.bytes(r.int(300));
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

/** A frame payload: valid, mutated as an object, mutated as bytes, or odd. */
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

/** A byte stream of frames: honest lengths, lying lengths, huge lengths, truncation. */
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

/** Decodes `input`; anything thrown must be a ProtocolError, anything returned well formed. */
function checkDecode(input: Uint8Array, seed: number): void {
  let message: Message;
  try {
    message = decodeMessage(input);
  } catch (err) {
    if (!(err instanceof ProtocolError)) {
      throw new Error(`seed ${seed}: ${(err as Error)?.name} for ${describe(input)}: ${err}`);
    }
    return;
  }
  assert.equal(
    Object.keys(message).sort().join(","),
    FIELDS[message.type],
    `seed ${seed}: decoded ${JSON.stringify(message)} from ${describe(input)}`,
  );
  // What the decoder accepts survives its own round trip unchanged.
  assert.deepEqual(decodeMessage(encodeFrame(message).subarray(4)), message, `seed ${seed}`);
}

function describe(input: Uint8Array): string {
  return JSON.stringify(new TextDecoder().decode(input.subarray(0, 200)));
}

Deno.test("the frame decoder only ever throws ProtocolError, on 20,000 random and mutated payloads", () => {
  const r = new Random(SEED);
  let accepted = 0;
  const count = 20_000;
  for (let i = 0; i < count; i++) {
    const input = payload(r);
    checkDecode(input, SEED);
    try {
      decodeMessage(input);
      accepted++;
    } catch {
      // Counted above.
    }
  }
  // The mutations are near misses, not noise: some still decode, most do not.
  assert.ok(accepted > 0 && accepted < count / 2, `seed ${SEED}: ${accepted} of ${count} decoded`);
});

/** Reads messages (or chunks) from `stream` until its end; returns what ended it. */
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

Deno.test("FramedStream and ChunkStream over real sockets fail only with ProtocolError on 1,000 mutated streams", async () => {
  const r = new Random(SEED + 1);
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  try {
    for (let i = 0; i < 1000; i++) {
      const chunks = i % 2 === 1;
      const bytes = chunks ? chunkStream(r) : frameStream(r);
      const [writer, accepted] = await Promise.all([
        Deno.connect({ hostname: "127.0.0.1", port }),
        listener.accept(),
      ]);
      const reader: Stream = new ConnStream(accepted);
      const writing = (async () => {
        try {
          let at = 0;
          while (at < bytes.length) at += await writer.write(bytes.subarray(at));
          await writer.closeWrite();
        } catch {
          // The reader gave up first: fine.
        }
      })();
      let ended: unknown;
      if (chunks) {
        const tunnel = new ChunkStream(reader);
        const buf = new Uint8Array(64 * 1024);
        ended = await drain(() => tunnel.read(buf));
      } else {
        const framed = new FramedStream(reader);
        ended = await drain(() => framed.read(DEADLINE_MS));
      }
      reader.close();
      await writing;
      writer.close();
      if (ended !== null && !(ended instanceof ProtocolError)) {
        throw new Error(`seed ${SEED}, stream ${i}: ended with ${ended} on ${describe(bytes)}`);
      }
    }
  } finally {
    listener.close();
  }
});

/** A tunnel-mode byte stream: chunks with honest, lying, huge and zero lengths. */
function chunkStream(r: Random): Uint8Array {
  const parts: Uint8Array[] = [];
  for (let i = 0, n = 1 + r.int(5); i < n; i++) {
    const body = r.bytes(r.int(2000));
    const length = r.pick([
      body.length,
      body.length,
      body.length + 1 + r.int(100),
      MAX_CHUNK_BYTES + 1,
      0xffff_ffff,
      0,
    ]);
    parts.push(header(length), body);
  }
  const all = concat(parts);
  return r.next() < 0.3 ? all.subarray(0, r.int(all.length + 1)) : all;
}

// ---------------------------------------------------------------------------------------------
// The running server

/** The server's resident memory in KiB, from /proc. */
async function rssKiB(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(/^VmRSS:\s+(\d+) kB$/m.exec(status)![1]);
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
  /** Closed without a line at the default log level (a standby with a made-up token). */
  quiet?: boolean;
  what: string;
}

/** One of the kinds of hostile input a client-facing port sees, generated at random. */
function hostileCase(r: Random, name: string): Case {
  const frame = (m: Message) => encodeFrame(m);
  const valid = validMessages(r, name);
  const hello: Hello = {
    type: "hello",
    version: PROTOCOL_VERSION,
    name,
    interval: 5,
    check: false,
  };
  const kind = r.int(12);
  switch (kind) {
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
      const m = r.pick(valid.slice(3));
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
      const next = r.pick([...valid.slice(0, 3), ...valid.slice(5)]);
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
      const standby = r.next() < 0.5;
      return {
        parts: [frame(valid[standby ? 2 : 1]), r.bytes(1 + r.int(2000))],
        decisive: true,
        quiet: standby,
        what: `${standby ? "standby" : "data"} with a made-up token or id, then bytes`,
      };
    }
    case 9: {
      // A valid hello dribbled one byte per write.
      const f = frame(hello);
      return { parts: [...f].map((b) => new Uint8Array([b])), decisive: false, what: "dribble" };
    }
    case 10:
      return {
        parts: [frame({ ...hello, version: 2 + r.int(100) })],
        decisive: true,
        what: "other version",
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
  /** Whether the server must say why it closed the connection. */
  logged: boolean;
  /** Milliseconds until the server closed; undefined if it never did. */
  closedAfter?: number;
  error?: string;
}

/**
 * Runs one case over TLS from `localAddress` (so that each source starts with a clean failed-
 * login record and the test does not measure the login penalty).
 */
function runCase(
  port: number,
  ca: string,
  localAddress: string,
  c: Case,
): Promise<Outcome> {
  return new Promise((resolve) => {
    const socket = tls.connect(
      { host: "127.0.0.1", port, ca, servername: "localhost", localAddress } as
        & tls.ConnectionOptions
        & { localAddress: string },
    );
    let started = 0;
    const about = { what: c.what, source: localAddress, logged: c.decisive && !c.quiet };
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
  ])();
  try {
    await conn.write(bytes);
    await conn.closeWrite();
    const buf = new Uint8Array(4096);
    const timer = setTimeout(() => conn.close(), 15_000);
    try {
      for (let i = 0; i < 100; i++) if (await conn.read(buf) === null) return true;
    } finally {
      clearTimeout(timer);
    }
    return false;
  } catch {
    return true; // reset: closed
  } finally {
    try {
      conn.close();
    } catch {
      // Closed by the timer.
    }
  }
}

Deno.test("a server under 700 hostile connections stays up, bounded in memory, and keeps tunnelling", async () => {
  const scope = new Scope();
  const r = new Random(SEED + 2);
  try {
    const env = await echoSetup();
    scope.defer(env.cleanup);
    const server = await scope.server(env.serverConfig);
    const client = await scope.client(env.clientConfig);
    const ca = await Deno.readTextFile(env.fixture.caPath);
    const echo = async (label: string) => {
      const user = await connectUser(env.servicePort);
      try {
        const started = performance.now();
        assert.ok(await echoesThrough(user, encoder.encode(label)), `no echo ${label}`);
        return performance.now() - started;
      } finally {
        user.close();
      }
    };
    await echo("before");

    const total = 600;
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
    const during: number[] = [];
    const tunnelling = (async () => {
      while (fuzzing && during.length < 100) during.push(await echo(`during ${during.length}`));
    })();
    const garbage = (async () => {
      let closed = 0;
      for (let i = 0; i < 100; i++) if (await rawGarbage(r, env.communicationPort)) closed++;
      return closed;
    })();
    await Promise.all(Array.from({ length: 16 }, worker));
    fuzzing = false;
    await tunnelling;
    assert.equal(await garbage, 100, "a non-TLS connection was left open");
    await echo("after");

    assert.equal(server.exited, false, "the server exited");
    assert.equal(client.count(/connected to .* as/), 1, "the legitimate client had to reconnect");
    assert.ok(during.length >= 3, `only ${during.length} echoes ran during the fuzzing`);
    assert.equal(outcomes.length, total);
    assert.deepEqual(outcomes.filter((o) => o.error), [], `seed ${SEED}: failed handshakes`);
    const lingering = outcomes.filter((o) => o.closedAfter === undefined);
    assert.deepEqual(lingering, [], `seed ${SEED}: the server left these open`);
    const slow = outcomes.filter((o) => o.error === undefined && o.closedAfter! > 5_000);
    assert.deepEqual(slow, [], `seed ${SEED}: the server took its time to drop these`);

    // Memory: once the first 100 connections have warmed it up, 500 more add little.
    const grown = (await rssKiB(server.pid)) - baseline;
    assert.ok(grown < 64 * 1024, `the server's RSS grew by ${grown} KiB over 500 connections`);
    // Each connection that broke the protocol outright is logged with its address.
    const logged = outcomes.filter((o) => o.logged);
    assert.ok(logged.length > total / 3, `${logged.length}`);
    await waitUntil(
      () =>
        logged.every((o) => server.count(new RegExp(`"${o.source.replaceAll(".", "\\.")}:\\d+"`))),
      "a log line for every connection the server refused",
    );
  } finally {
    await scope.close();
  }
});
