/**
 * The NATadm wire protocol: every message, every limit, and the one framed reader/writer.
 *
 * A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON holding one
 * object with a `type`. Each message has an exact set of fields, and the decoder rejects
 * anything else: unknown types, missing or extra fields, wrong types, out-of-range values,
 * invalid UTF-8. See docs/protocol.md.
 * @module
 */
import { HEADROOM, type Stream } from "./transport.ts";

/** Protocol version spoken by this build; sent in every hello. */
export const PROTOCOL_VERSION = 1;

/** Largest frame payload accepted, in bytes. Control messages are far smaller. */
export const MAX_FRAME_BYTES = 16 * 1024;

/** Time allowed for each step of the hello/challenge/auth exchange. */
export const AUTH_STEP_TIMEOUT_MS = 10_000;

/** A control connection is dead after this many heartbeat intervals without a frame. */
export const HEARTBEAT_MISSES = 3;

/** Random bytes in an authentication challenge. */
export const NONCE_BYTES = 32;

/** Random bytes in a data-connection id (128 bits). */
export const TUNNEL_ID_BYTES = 16;

/** Random bytes in a session token, which standby connections present (128 bits). */
export const SESSION_TOKEN_BYTES = 16;

/** Standby data connections a client keeps open, so a user's tunnel needs no handshake. */
export const STANDBY_CONNECTIONS = 4;

/** Standby data connections the server holds per client at most; more are closed. */
export const MAX_STANDBY_PER_CLIENT = 64;

/**
 * The server pings each idle standby connection this often; a client that hears nothing on
 * one for {@link HEARTBEAT_MISSES} periods replaces it. Rare, to keep idle traffic low.
 */
export const STANDBY_PING_MS = 60_000;

/** Largest chunk of tunnel bytes in one data-connection frame. */
export const MAX_CHUNK_BYTES = 1024 * 1024;

/** Longest client name accepted, in UTF-8 bytes. */
export const MAX_NAME_BYTES = 255;

/** Longest human-readable reason carried by a message. */
const MAX_REASON_CHARS = 1024;

/** A service as the server describes it to a client. */
export interface ServiceInfo {
  /** The public port on the server. */
  port: number;
  /** Host the client connects to on its side. */
  host: string;
  /** Port on that host. */
  target_port: number;
}

/**
 * Client → server, first frame of a control connection: who I am and how often I beat.
 * `check` asks only to authenticate and hear the services, without serving anything or
 * displacing the client's running connection.
 */
export interface Hello {
  type: "hello";
  version: number;
  name: string;
  interval: number;
  check: boolean;
}

/**
 * Client → server, first and only frame of a data connection: which user I carry, and the
 * token of the session that was asked for it (an id is only good with that session's token).
 */
export interface DataHello {
  type: "data";
  version: number;
  id: string;
  session: string;
}

/**
 * Client → server, first frame of a standby data connection: hold me for the next user of
 * the session whose token I carry.
 */
export interface Standby {
  type: "standby";
  version: number;
  session: string;
}

/** Server → client: sign this nonce with your key. */
export interface Challenge {
  type: "challenge";
  nonce: string;
}

/** Client → server: Ed25519 signature over {@link authPayload}. */
export interface Auth {
  type: "auth";
  signature: string;
}

/**
 * Server → client: authenticated; `pending` connect messages follow at once. `session` is the
 * token that standby connections present.
 */
export interface Welcome {
  type: "welcome";
  services: ServiceInfo[];
  pending: number;
  session: string;
}

/**
 * Server → client: refused or dropped, with a reason meant for the admin. `retry` is false
 * only when another live client has taken over this name: retrying would push it out in
 * turn, and the two would swap places for ever.
 */
export interface Refused {
  type: "refused";
  reason: string;
  retry: boolean;
}

/**
 * Server → client: a user is waiting. On the control connection: open a data connection
 * carrying `id`. On a standby connection: this connection is the user's, raw bytes follow.
 */
export interface Connect {
  type: "connect";
  id: string;
  host: string;
  port: number;
  user: string;
}

/** Client → server: the tunnel for `id` cannot be opened, and why. */
export interface Reject {
  type: "reject";
  id: string;
  reason: string;
}

/** Either side: I am alive. Sent every heartbeat interval. */
export interface Ping {
  type: "ping";
}

/** Every message a client may send first on a connection. */
export type Opening = Hello | DataHello | Standby;
/** Every message the server may send on a control connection. */
export type ServerMessage = Challenge | Welcome | Refused | Connect | Ping;
/** Every message a client may send on an authenticated control connection. */
export type ClientMessage = Auth | Reject | Ping;
/** Every message of the protocol. */
export type Message = Opening | ServerMessage | ClientMessage;

/** Raised for any frame that breaks the protocol; the message says what was wrong. */
export class ProtocolError extends Error {
  override name = "ProtocolError";
}

/** Raised when a read or exchange step does not finish in time. */
export class TimeoutError extends Error {
  override name = "TimeoutError";
}

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/** Bytes a client signs to prove its key: domain tag, the nonce, then its name. */
export function authPayload(nonce: Uint8Array, name: string): Uint8Array<ArrayBuffer> {
  const tag = encoder.encode("NATadm auth v1\0");
  const nameBytes = encoder.encode(name);
  const out = new Uint8Array(tag.length + nonce.length + nameBytes.length);
  out.set(tag, 0);
  out.set(nonce, tag.length);
  out.set(nameBytes, tag.length + nonce.length);
  return out;
}

/** Decodes standard padded base64, or returns null if it is not exactly that. */
export function fromBase64(text: string): Uint8Array<ArrayBuffer> | null {
  try {
    return Uint8Array.fromBase64(text, { lastChunkHandling: "strict" });
  } catch {
    return null;
  }
}

/** Serialises one message into a frame. */
export function encodeFrame(message: Message): Uint8Array {
  const body = encoder.encode(JSON.stringify(message));
  if (body.length > MAX_FRAME_BYTES) {
    throw new ProtocolError(`frame of ${body.length} bytes exceeds ${MAX_FRAME_BYTES}`);
  }
  const frame = new Uint8Array(4 + body.length);
  new DataView(frame.buffer).setUint32(0, body.length);
  frame.set(body, 4);
  return frame;
}

type Fields = Record<string, unknown>;

function fail(what: string): never {
  throw new ProtocolError(what);
}

function expectKeys(obj: Fields, type: string, keys: string[]): void {
  const actual = Object.keys(obj).sort();
  const wanted = ["type", ...keys].sort();
  if (actual.length !== wanted.length || actual.some((k, i) => k !== wanted[i])) {
    fail(`"${type}" message needs fields {${wanted.join(", ")}}, got {${actual.join(", ")}}`);
  }
}

function str(obj: Fields, key: string, maxChars: number): string {
  const v = obj[key];
  if (typeof v !== "string") fail(`field "${key}" must be a string`);
  if (v.length > maxChars) fail(`field "${key}" is longer than ${maxChars} characters`);
  return v;
}

function int(obj: Fields, key: string, min: number, max: number): number {
  const v = obj[key];
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
    fail(`field "${key}" must be an integer from ${min} to ${max}`);
  }
  return v;
}

function b64(obj: Fields, key: string, bytes: number): string {
  const v = str(obj, key, 4 * Math.ceil(bytes / 3));
  const raw = fromBase64(v);
  if (!raw || raw.length !== bytes) fail(`field "${key}" must be ${bytes} bytes of base64`);
  return v;
}

/** Validates a client name: 1–255 UTF-8 bytes, no control characters. */
export function checkName(name: string): string | null {
  if (name.length === 0) return "must not be empty";
  if (encoder.encode(name).length > MAX_NAME_BYTES) {
    return `must be at most ${MAX_NAME_BYTES} bytes`;
  }
  // deno-lint-ignore no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(name)) return "must not contain control characters";
  return null;
}

function name(obj: Fields): string {
  const v = str(obj, "name", MAX_NAME_BYTES);
  const problem = checkName(v);
  if (problem) fail(`field "name" ${problem}`);
  return v;
}

function services(obj: Fields): ServiceInfo[] {
  const v = obj.services;
  if (!Array.isArray(v) || v.length > 65535) fail(`field "services" must be a list`);
  return v.map((s: unknown) => {
    if (typeof s !== "object" || s === null || Array.isArray(s)) {
      fail(`each entry of "services" must be an object`);
    }
    const o = s as Fields;
    const keys = Object.keys(o).sort().join(",");
    if (keys !== "host,port,target_port") fail(`service entry needs {host, port, target_port}`);
    return {
      port: int(o, "port", 1, 65535),
      host: str(o, "host", 255),
      target_port: int(o, "target_port", 1, 65535),
    };
  });
}

/** Parses and strictly validates one frame payload into a message. */
export function decodeMessage(payload: Uint8Array): Message {
  let text: string;
  try {
    text = decoder.decode(payload);
  } catch {
    fail("frame is not valid UTF-8");
  }
  let obj: unknown;
  try {
    obj = JSON.parse(text);
  } catch {
    fail("frame is not valid JSON");
  }
  if (typeof obj !== "object" || obj === null || Array.isArray(obj)) {
    fail("frame must hold a JSON object");
  }
  const o = obj as Fields;
  const type = o.type;
  switch (type) {
    case "hello":
      expectKeys(o, type, ["version", "name", "interval", "check"]);
      if (typeof o.check !== "boolean") fail(`field "check" must be true or false`);
      return {
        type,
        version: int(o, "version", 0, 0xffff),
        name: name(o),
        interval: int(o, "interval", 1, 3600),
        check: o.check,
      };
    case "data":
      expectKeys(o, type, ["version", "id", "session"]);
      return {
        type,
        version: int(o, "version", 0, 0xffff),
        id: b64(o, "id", TUNNEL_ID_BYTES),
        session: b64(o, "session", SESSION_TOKEN_BYTES),
      };
    case "standby":
      expectKeys(o, type, ["version", "session"]);
      return {
        type,
        version: int(o, "version", 0, 0xffff),
        session: b64(o, "session", SESSION_TOKEN_BYTES),
      };
    case "challenge":
      expectKeys(o, type, ["nonce"]);
      return { type, nonce: b64(o, "nonce", NONCE_BYTES) };
    case "auth":
      expectKeys(o, type, ["signature"]);
      return { type, signature: b64(o, "signature", 64) };
    case "welcome":
      expectKeys(o, type, ["services", "pending", "session"]);
      return {
        type,
        services: services(o),
        pending: int(o, "pending", 0, 1_000_000),
        session: b64(o, "session", SESSION_TOKEN_BYTES),
      };
    case "refused":
      expectKeys(o, type, ["reason", "retry"]);
      if (typeof o.retry !== "boolean") fail(`field "retry" must be true or false`);
      return { type, reason: str(o, "reason", MAX_REASON_CHARS), retry: o.retry };
    case "connect":
      expectKeys(o, type, ["id", "host", "port", "user"]);
      return {
        type,
        id: b64(o, "id", TUNNEL_ID_BYTES),
        host: str(o, "host", 255),
        port: int(o, "port", 1, 65535),
        user: str(o, "user", 64),
      };
    case "reject":
      expectKeys(o, type, ["id", "reason"]);
      return {
        type,
        id: b64(o, "id", TUNNEL_ID_BYTES),
        reason: str(o, "reason", MAX_REASON_CHARS),
      };
    case "ping":
      expectKeys(o, type, []);
      return { type };
    default:
      fail(`unknown message type ${JSON.stringify(type)?.slice(0, 40)}`);
  }
}

/** Reads exactly `p.length` bytes, or returns false on a clean end before the first byte. */
async function readExact(stream: Stream, p: Uint8Array): Promise<boolean> {
  let got = 0;
  while (got < p.length) {
    const n = await stream.read(p.subarray(got));
    if (n === null) {
      if (got === 0) return false;
      fail(`connection ended inside a frame`);
    }
    got += n;
  }
  return true;
}

/**
 * Frames on one stream. Reads never consume bytes past the frame, so a data connection can
 * switch to raw bytes right after its hello.
 */
export class FramedStream {
  /** The underlying stream. */
  readonly stream: Stream;
  #header = new Uint8Array(4);
  #writing: Promise<void> = Promise.resolve();
  /** Frames handed to {@link send} whose write has not finished yet. */
  #queued = 0;

  constructor(stream: Stream) {
    this.stream = stream;
  }

  /**
   * Reads one message, or null at a clean end of stream; closes the stream on timeout. Only a
   * standby connection waits without a timeout: its session closes it when it ends.
   */
  async read(timeoutMs: number): Promise<Message | null> {
    if (timeoutMs === Infinity) return await this.#readFrame();
    let timer: ReturnType<typeof setTimeout> | undefined;
    let timedOut = false;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        timedOut = true;
        this.stream.close();
        reject(new TimeoutError(`no message from ${this.stream.remote} within ${timeoutMs} ms`));
      }, timeoutMs);
    });
    const frame = this.#readFrame();
    frame.catch(() => {}); // After a timeout nobody awaits it; its rejection is expected.
    try {
      return await Promise.race([frame, deadline]);
    } catch (err) {
      if (timedOut) {
        throw new TimeoutError(`no message from ${this.stream.remote} within ${timeoutMs} ms`);
      }
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  async #readFrame(): Promise<Message | null> {
    if (!await readExact(this.stream, this.#header)) return null;
    const length = new DataView(this.#header.buffer).getUint32(0);
    if (length > MAX_FRAME_BYTES) fail(`frame of ${length} bytes exceeds ${MAX_FRAME_BYTES}`);
    const payload = new Uint8Array(length);
    if (!await readExact(this.stream, payload)) fail("connection ended inside a frame");
    return decodeMessage(payload);
  }

  /**
   * Sends one message; writes are queued so that frames never interleave. With none queued the
   * write starts at once, before the caller's next statement: a `connect` then leaves ahead of
   * whatever the caller does next, such as logging the tunnel.
   */
  send(message: Message): Promise<void> {
    const frame = encodeFrame(message);
    const next = this.#queued === 0
      ? this.stream.write(frame)
      : this.#writing.then(() => this.stream.write(frame));
    this.#queued++;
    this.#writing = next.catch(() => {}).finally(() => this.#queued--);
    return next;
  }
}

/**
 * A data connection in tunnel mode, as a {@link Stream}: every write becomes a chunk (4-byte
 * big-endian length, then the bytes) and a zero-length chunk is end of stream, so a tunnel can
 * end in both directions and leave the connection usable for the next one. Any error or
 * abort closes the connection instead.
 */
export class ChunkStream implements Stream {
  readonly remote: string;
  readonly remoteIp: string;
  #inner: Stream;
  #header = new Uint8Array(4);
  /** Bytes of the current incoming chunk not read yet. */
  #remaining = 0;
  #ended = false;

  constructor(inner: Stream) {
    this.#inner = inner;
    this.remote = inner.remote;
    this.remoteIp = inner.remoteIp;
  }

  async read(p: Uint8Array): Promise<number | null> {
    if (this.#ended) return null;
    while (this.#remaining === 0) {
      if (!await readExact(this.#inner, this.#header)) fail("connection ended inside a tunnel");
      const length = new DataView(this.#header.buffer).getUint32(0);
      if (length === 0) {
        this.#ended = true;
        return null;
      }
      if (length > MAX_CHUNK_BYTES) fail(`chunk of ${length} bytes exceeds ${MAX_CHUNK_BYTES}`);
      this.#remaining = length;
    }
    const n = await this.#inner.read(p.subarray(0, Math.min(p.length, this.#remaining)));
    if (n === null) fail("connection ended inside a chunk");
    this.#remaining -= n;
    return n;
  }

  async write(chunk: Uint8Array): Promise<void> {
    for (let at = 0; at < chunk.length; at += MAX_CHUNK_BYTES) {
      const part = chunk.subarray(at, at + MAX_CHUNK_BYTES);
      const framed = new Uint8Array(HEADROOM + part.length);
      framed.set(part, HEADROOM);
      await this.writeWithHeadroom(framed, part.length);
    }
  }

  writeWithHeadroom(buf: Uint8Array, n: number): Promise<void> {
    if (n === 0) return Promise.resolve(); // a zero-length chunk would mean end of stream
    if (n > MAX_CHUNK_BYTES) return this.write(buf.subarray(HEADROOM, HEADROOM + n));
    new DataView(buf.buffer, buf.byteOffset, HEADROOM).setUint32(0, n);
    return this.#inner.write(buf.subarray(0, HEADROOM + n));
  }

  /** Sends end of stream; the connection stays open for the other direction. */
  closeWrite(): Promise<void> {
    return this.#inner.write(new Uint8Array(4));
  }

  isClosed(): boolean {
    return this.#inner.isClosed();
  }

  close(): void {
    this.#inner.close();
  }
}
