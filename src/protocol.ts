/**
 * The NATadm wire protocol: every message, every limit, and the framing of both phases.
 *
 * A connection starts with the **handshake**: frames of a 4-byte big-endian length and that
 * many bytes of UTF-8 JSON holding one object with a `type` (hello, challenge, auth, welcome,
 * refused). Each message has an exact set of fields, and the decoder rejects anything else.
 *
 * After `welcome` the same connection carries **mux frames**: a 9-byte header (type, stream
 * id, payload length) and a payload. Every tunnel is a stream of its own, opened with one
 * frame, with per-stream credit (window) flow control. See docs/protocol.md.
 * @module
 */
import type { Stream } from "./transport.ts";

/** Protocol version spoken by this build; sent in every hello. */
export const PROTOCOL_VERSION = 2;

/** Largest handshake frame payload or control message accepted, in bytes. */
export const MAX_FRAME_BYTES = 16 * 1024;

/**
 * Largest frame the server reads during a login: a hello (name and server at most 255 bytes
 * each) or an auth is well under this. The login is lockstep, so a peer never has more than
 * one such frame waiting unread.
 */
export const MAX_LOGIN_FRAME_BYTES = 4096;

/** Time allowed for each step of the hello/challenge/auth exchange. */
export const AUTH_STEP_TIMEOUT_MS = 10_000;

/** A connection is dead after this many heartbeat intervals without a frame. */
export const HEARTBEAT_MISSES = 3;

/** Random bytes in an authentication challenge. */
export const NONCE_BYTES = 32;

/** Longest client or user name accepted, in UTF-8 bytes. */
export const MAX_NAME_BYTES = 255;

/** Longest host name in `hello.server` or an open request. */
export const MAX_HOST_BYTES = 255;

/** Longest human-readable reason carried by a message or a reset. */
export const MAX_REASON_BYTES = 1024;

/** Bytes in a mux frame header: type (1), stream id (4), payload length (4). */
export const MUX_HEADER_BYTES = 9;

/** Largest payload of one DATA frame. */
export const MAX_DATA_BYTES = 64 * 1024;

/** Largest payload of an OPEN frame (a small JSON object). */
export const MAX_OPEN_BYTES = 1024;

/**
 * Credit each direction of a new stream starts with: bytes the sender may send before the
 * receiver grants more. Also the most a receiver holds for a stream whose far side is not
 * reading, unless the window grew while it was reading fast.
 */
export const INITIAL_WINDOW = 64 * 1024;

/**
 * A stream's receive window doubles (up to this) when its sender ran out of credit while the
 * receiver kept up: then the window, not the reader, limits the stream (a long, fast link).
 * Bounded so a bulk stream cannot queue much ahead of an interactive one.
 */
export const MAX_WINDOW = 2 * 1024 * 1024;

/** Kinds of mux frame. */
export const FrameType = {
  /** Stream 0: one JSON control message (`ping`, `goodbye` or `refused`). */
  CONTROL: 0,
  /** Opens a stream: JSON {@link OpenRequest}. The opener picks a new, higher id. */
  OPEN: 1,
  /** Tunnel bytes (1 to {@link MAX_DATA_BYTES}), within the sender's credit. */
  DATA: 2,
  /** Grants the sender more credit: a 4-byte big-endian increment. */
  WINDOW: 3,
  /** The sender's direction has ended (like a TCP FIN); empty. */
  FIN: 4,
  /** The stream is aborted both ways; the payload is a UTF-8 reason. */
  RESET: 5,
  /** The sender has bytes for this stream but no credit left; empty. */
  BLOCKED: 6,
} as const;

/** One of {@link FrameType}'s values. */
export type FrameKind = typeof FrameType[keyof typeof FrameType];

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
 * Client → server, first frame: who I am, how often I beat, and the server name I dialled
 * (the host in `remote`), which the signature covers. `check` asks only to authenticate and
 * hear the services, without serving anything or displacing the running client.
 */
export interface Hello {
  type: "hello";
  version: number;
  name: string;
  interval: number;
  check: boolean;
  server: string;
}

/**
 * User → server, first frame: a user (an admin with `connect` or `forward`) logs in by name;
 * its key is looked up in the server's `[users]`, never `[clients]`. Signed like a hello,
 * so the signature covers the type too: a user's login is worthless as a client's.
 */
export interface UserHello {
  type: "user";
  version: number;
  name: string;
  server: string;
}

/** Server → client: sign this nonce, with the hello as you sent it, with your key. */
export interface Challenge {
  type: "challenge";
  nonce: string;
}

/** Client → server: Ed25519 signature over {@link authPayload}. */
export interface Auth {
  type: "auth";
  signature: string;
}

/** Server → client: authenticated; mux frames follow. `pending` users wait already. */
export interface Welcome {
  type: "welcome";
  services: ServiceInfo[];
  pending: number;
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

/** Either side, as a control message: I am alive. Sent every heartbeat interval. */
export interface Ping {
  type: "ping";
}

/**
 * Either side, as a control message: I am going away, so open no new streams; the live ones
 * finish on this connection, which closes when they have.
 */
export interface Goodbye {
  type: "goodbye";
  reason: string;
}

/** Payload of an OPEN frame from the server: connect this stream to `host:port`. */
export interface OpenRequest {
  /** Host the client connects to. */
  host: string;
  /** Port on that host. */
  port: number;
  /** Who the tunnel is for (the user's address), for the client's logs. */
  user: string;
}

/**
 * Payload of an OPEN frame from a user: reach port `port` of client `client`, waiting up to
 * `wait` seconds for it if it is not connected.
 */
export interface UserOpen {
  client: string;
  port: number;
  /** Seconds to wait for a client that is not connected (0: refuse at once). */
  wait: number;
}

/**
 * Payload of an OPEN frame on a peer link (server A to server B): connect this stream to
 * `host:port` of client `client`, which B holds; `by` is who the tunnel is for (the user's
 * address, or its name), for B's and the client's logs.
 */
export interface PeerOpen {
  client: string;
  port: number;
  host: string;
  by: string;
}

/**
 * A peer link's control message from the server that accepted the link: the etcd revision its
 * registry reflects. Sent when the link comes up, when the registry changes, and every
 * heartbeat, so a server cut off from etcd learns that its registry is behind.
 */
export interface RegistryRevision {
  type: "registry";
  revision: number;
}

/**
 * Payload of an OPEN frame on a peer link asking for the other server's registry: it answers
 * on the stream with one {@link RegistrySnapshot} as JSON, then ends it.
 */
export interface RegistryRequest {
  registry: true;
}

/** A server's registry as etcd keys and values at one revision, sent between peers. */
export interface RegistrySnapshot {
  revision: number;
  /** Every registry key (clients, services, users) under the prefix → its JSON value. */
  entries: Record<string, string>;
}

/** Largest registry snapshot a peer may send. */
export const MAX_SNAPSHOT_BYTES = 32 * 1024 * 1024;

/** Largest etcd revision a peer may announce (etcd's are 64-bit; JSON keeps 2^53 exact). */
const MAX_REVISION = Number.MAX_SAFE_INTEGER;

/** Longest a user's open request may wait for its client, in seconds. */
export const MAX_USER_WAIT_S = 3600;

/** Heartbeat interval of a user's connection, both ways, in seconds. */
export const USER_INTERVAL_S = 30;

/** Every message of the handshake and control phase. */
export type Message =
  | Hello
  | UserHello
  | Challenge
  | Auth
  | Welcome
  | Refused
  | Ping
  | Goodbye
  | RegistryRevision;

/** Raised for any frame that breaks the protocol; the message says what was wrong. */
export class ProtocolError extends Error {
  override name = "ProtocolError";
}

/**
 * Raised for an opening frame of another protocol version (including version 1's `data` and
 * `standby` openings), so the server can answer with a clear refusal instead of closing.
 */
export class VersionError extends ProtocolError {
  override name = "VersionError";
  /** @param version the version the peer speaks */
  constructor(readonly version: number) {
    super(
      `protocol version ${version} is not supported (this side speaks ${PROTOCOL_VERSION}): ` +
        `upgrade NATadm`,
    );
  }
}

/** Raised when a read or exchange step does not finish in time. */
export class TimeoutError extends Error {
  override name = "TimeoutError";
}

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/**
 * Bytes a client signs to prove its key: a domain tag, the server's nonce, then the hello
 * frame's payload exactly as sent. The hello names the server the client dialled, so a
 * signature made for one server is worthless at another, and every hello field is covered.
 */
export function authPayload(nonce: Uint8Array, hello: Uint8Array): Uint8Array<ArrayBuffer> {
  const tag = encoder.encode("NATadm auth v2\0");
  const out = new Uint8Array(tag.length + nonce.length + hello.length);
  out.set(tag, 0);
  out.set(nonce, tag.length);
  out.set(hello, tag.length + nonce.length);
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

/** Serialises one message as JSON bytes (a handshake frame's or control frame's payload). */
export function encodeMessage(message: Message): Uint8Array {
  const body = encoder.encode(JSON.stringify(message));
  if (body.length > MAX_FRAME_BYTES) {
    throw new ProtocolError(`message of ${body.length} bytes exceeds ${MAX_FRAME_BYTES}`);
  }
  return body;
}

/** Serialises one message into a handshake frame. */
export function encodeFrame(message: Message): Uint8Array {
  const body = encodeMessage(message);
  const frame = new Uint8Array(4 + body.length);
  new DataView(frame.buffer).setUint32(0, body.length);
  frame.set(body, 4);
  return frame;
}

type Fields = Record<string, unknown>;

function fail(what: string): never {
  throw new ProtocolError(what);
}

function parseObject(payload: Uint8Array, what: string): Fields {
  let text: string;
  try {
    text = decoder.decode(payload);
  } catch {
    fail(`${what} is not valid UTF-8`);
  }
  let obj: unknown;
  try {
    obj = JSON.parse(text);
  } catch {
    fail(`${what} is not valid JSON`);
  }
  if (typeof obj !== "object" || obj === null || Array.isArray(obj)) {
    fail(`${what} must hold a JSON object`);
  }
  return obj as Fields;
}

function expectKeys(obj: Fields, type: string, keys: string[]): void {
  const actual = Object.keys(obj).sort();
  const wanted = (type ? ["type", ...keys] : keys).sort();
  if (actual.length !== wanted.length || actual.some((k, i) => k !== wanted[i])) {
    fail(
      `${type ? `"${type}" message` : "open request"} needs fields {${wanted.join(", ")}}, ` +
        `got {${actual.join(", ")}}`,
    );
  }
}

function str(obj: Fields, key: string, maxBytes: number): string {
  const v = obj[key];
  if (typeof v !== "string") fail(`field "${key}" must be a string`);
  if (v.length > maxBytes || encoder.encode(v).length > maxBytes) {
    fail(`field "${key}" is longer than ${maxBytes} bytes`);
  }
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

/** Validates a client or user name: 1–255 UTF-8 bytes, no control characters. */
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

function host(obj: Fields, key: string): string {
  const v = str(obj, key, MAX_HOST_BYTES);
  // deno-lint-ignore no-control-regex
  if (v.length === 0 || /[\u0000-\u0020\u007f]/.test(v)) {
    fail(`field "${key}" must be a host name`);
  }
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
      host: str(o, "host", MAX_HOST_BYTES),
      target_port: int(o, "target_port", 1, 65535),
    };
  });
}

/** Parses and strictly validates one handshake or control payload into a message. */
export function decodeMessage(payload: Uint8Array): Message {
  const o = parseObject(payload, "frame");
  const type = o.type;
  switch (type) {
    case "hello": {
      const version = int(o, "version", 0, 0xffff);
      if (version !== PROTOCOL_VERSION) throw new VersionError(version);
      expectKeys(o, type, ["version", "name", "interval", "check", "server"]);
      if (typeof o.check !== "boolean") fail(`field "check" must be true or false`);
      return {
        type,
        version,
        name: name(o),
        interval: int(o, "interval", 1, 3600),
        check: o.check,
        server: host(o, "server"),
      };
    }
    case "user": {
      const version = int(o, "version", 0, 0xffff);
      if (version !== PROTOCOL_VERSION) throw new VersionError(version);
      expectKeys(o, type, ["version", "name", "server"]);
      return { type, version, name: name(o), server: host(o, "server") };
    }
    case "data":
    case "standby":
      // Version 1's data connections: answered with a refusal that says to upgrade.
      throw new VersionError(typeof o.version === "number" ? o.version : 1);
    case "challenge":
      expectKeys(o, type, ["nonce"]);
      return { type, nonce: b64(o, "nonce", NONCE_BYTES) };
    case "auth":
      expectKeys(o, type, ["signature"]);
      return { type, signature: b64(o, "signature", 64) };
    case "welcome":
      expectKeys(o, type, ["services", "pending"]);
      return { type, services: services(o), pending: int(o, "pending", 0, 1_000_000) };
    case "refused":
      expectKeys(o, type, ["reason", "retry"]);
      if (typeof o.retry !== "boolean") fail(`field "retry" must be true or false`);
      return { type, reason: str(o, "reason", MAX_REASON_BYTES), retry: o.retry };
    case "ping":
      expectKeys(o, type, []);
      return { type };
    case "goodbye":
      expectKeys(o, type, ["reason"]);
      return { type, reason: str(o, "reason", MAX_REASON_BYTES) };
    case "registry":
      expectKeys(o, type, ["revision"]);
      return { type, revision: int(o, "revision", 0, MAX_REVISION) };
    default:
      fail(`unknown message type ${JSON.stringify(type)?.slice(0, 40)}`);
  }
}

/** Serialises an open request into an OPEN frame's payload. */
export function encodeOpen(request: OpenRequest): Uint8Array {
  return encoder.encode(JSON.stringify(request));
}

/** Parses and strictly validates an OPEN frame's payload. */
export function decodeOpen(payload: Uint8Array): OpenRequest {
  const o = parseObject(payload, "open request");
  expectKeys(o, "", ["host", "port", "user"]);
  return {
    host: host(o, "host"),
    port: int(o, "port", 1, 65535),
    user: str(o, "user", MAX_NAME_BYTES),
  };
}

/** Serialises a user's open request into an OPEN frame's payload. */
export function encodeUserOpen(request: UserOpen): Uint8Array {
  return encoder.encode(JSON.stringify(request));
}

/** Parses and strictly validates the payload of an OPEN frame from a user. */
export function decodeUserOpen(payload: Uint8Array): UserOpen {
  const o = parseObject(payload, "open request");
  expectKeys(o, "", ["client", "port", "wait"]);
  const client = str(o, "client", MAX_NAME_BYTES);
  const problem = checkName(client);
  if (problem) fail(`field "client" ${problem}`);
  return { client, port: int(o, "port", 1, 65535), wait: int(o, "wait", 0, MAX_USER_WAIT_S) };
}

/** Serialises a peer link's open request into an OPEN frame's payload. */
export function encodePeerOpen(request: PeerOpen): Uint8Array {
  return encoder.encode(JSON.stringify(request));
}

/** Serialises a peer link's request for the registry into an OPEN frame's payload. */
export function encodeRegistryRequest(): Uint8Array {
  return encoder.encode(JSON.stringify({ registry: true } satisfies RegistryRequest));
}

/**
 * Parses and strictly validates the payload of an OPEN frame on a peer link: a tunnel to a
 * client, or a request for the registry.
 */
export function decodePeerOpen(payload: Uint8Array): PeerOpen | RegistryRequest {
  const o = parseObject(payload, "peer open request");
  if ("registry" in o) {
    expectKeys(o, "", ["registry"]);
    if (o.registry !== true) fail(`field "registry" must be true`);
    return { registry: true };
  }
  expectKeys(o, "", ["client", "port", "host", "by"]);
  const client = str(o, "client", MAX_NAME_BYTES);
  const problem = checkName(client);
  if (problem) fail(`field "client" ${problem}`);
  return {
    client,
    port: int(o, "port", 1, 65535),
    host: host(o, "host"),
    by: str(o, "by", MAX_NAME_BYTES),
  };
}

/** Serialises a registry snapshot for a peer. */
export function encodeSnapshot(snapshot: RegistrySnapshot): Uint8Array {
  return encoder.encode(JSON.stringify(snapshot));
}

/** Parses and strictly validates a peer's registry snapshot (keys and values are strings). */
export function decodeSnapshot(bytes: Uint8Array): RegistrySnapshot {
  if (bytes.length > MAX_SNAPSHOT_BYTES) fail(`registry snapshot over ${MAX_SNAPSHOT_BYTES} bytes`);
  const o = parseObject(bytes, "registry snapshot");
  expectKeys(o, "", ["revision", "entries"]);
  const entries = o.entries;
  if (typeof entries !== "object" || entries === null || Array.isArray(entries)) {
    fail(`field "entries" must be an object`);
  }
  const out: Record<string, string> = {};
  for (const [key, value] of Object.entries(entries as Record<string, unknown>)) {
    if (typeof value !== "string") {
      fail(`entry ${JSON.stringify(key).slice(0, 80)} is not a string`);
    }
    out[key] = value;
  }
  return { revision: int(o, "revision", 0, MAX_REVISION), entries: out };
}

/** Writes a mux frame header into `out` at `at`. */
export function writeHeader(
  out: Uint8Array,
  at: number,
  type: FrameKind,
  stream: number,
  length: number,
): void {
  out[at] = type;
  out[at + 1] = stream >>> 24;
  out[at + 2] = (stream >>> 16) & 0xff;
  out[at + 3] = (stream >>> 8) & 0xff;
  out[at + 4] = stream & 0xff;
  out[at + 5] = length >>> 24;
  out[at + 6] = (length >>> 16) & 0xff;
  out[at + 7] = (length >>> 8) & 0xff;
  out[at + 8] = length & 0xff;
}

/** One whole mux frame (header and payload) as bytes. */
export function muxFrame(type: FrameKind, stream: number, payload?: Uint8Array): Uint8Array {
  const length = payload?.length ?? 0;
  const out = new Uint8Array(MUX_HEADER_BYTES + length);
  writeHeader(out, 0, type, stream, length);
  if (payload) out.set(payload, MUX_HEADER_BYTES);
  return out;
}

/** Receives the frames a {@link FrameParser} finds. */
export type FrameHandler = (type: FrameKind, stream: number, payload: Uint8Array) => void;

/** Largest payload each frame type may carry. */
function maxPayload(type: number): number {
  switch (type) {
    case FrameType.CONTROL:
      return MAX_FRAME_BYTES;
    case FrameType.OPEN:
      return MAX_OPEN_BYTES;
    case FrameType.DATA:
      return MAX_DATA_BYTES;
    case FrameType.WINDOW:
      return 4;
    case FrameType.FIN:
      return 0;
    case FrameType.RESET:
      return MAX_REASON_BYTES;
    case FrameType.BLOCKED:
      return 0;
    default:
      fail(`unknown mux frame type ${type}`);
  }
}

/**
 * Splits a byte stream into mux frames, strictly: unknown types, oversized payloads, control
 * frames off stream 0 and stream frames on it, malformed WINDOW, FIN and DATA frames all
 * throw. Fed chunk by chunk; a payload that is not split across chunks is handed over as a
 * view of the chunk when `owned` (no copy), else copied.
 */
export class FrameParser {
  #header = new Uint8Array(MUX_HEADER_BYTES);
  #headerGot = 0;
  #type = 0;
  #stream = 0;
  #payload: Uint8Array | undefined;
  #payloadGot = 0;

  constructor(readonly onFrame: FrameHandler) {}

  /** Consumes one chunk; frames are delivered in order before it returns. */
  push(chunk: Uint8Array, owned: boolean): void {
    let at = 0;
    while (at < chunk.length) {
      if (this.#payload) {
        const take = Math.min(chunk.length - at, this.#payload.length - this.#payloadGot);
        this.#payload.set(chunk.subarray(at, at + take), this.#payloadGot);
        this.#payloadGot += take;
        at += take;
        if (this.#payloadGot === this.#payload.length) {
          const payload = this.#payload;
          this.#payload = undefined;
          this.onFrame(this.#type as FrameKind, this.#stream, payload);
        }
        continue;
      }
      if (this.#headerGot === 0 && chunk.length - at >= MUX_HEADER_BYTES) {
        // The usual case: a whole header in the chunk.
        at = this.#begin(chunk, at, chunk, owned);
        continue;
      }
      const take = Math.min(chunk.length - at, MUX_HEADER_BYTES - this.#headerGot);
      this.#header.set(chunk.subarray(at, at + take), this.#headerGot);
      this.#headerGot += take;
      at += take;
      if (this.#headerGot === MUX_HEADER_BYTES) {
        this.#headerGot = 0;
        this.#begin(this.#header, 0, chunk.subarray(at), owned);
        // #begin consumed no payload from the rest of the chunk: the loop copies it.
        if (!this.#payload) continue;
      }
    }
  }

  /**
   * Validates the header at `h[i..]`; delivers an empty frame at once, or one whose payload is
   * whole in `rest` (when the header came from `rest` itself). Returns the new read position
   * in `rest`.
   */
  #begin(h: Uint8Array, i: number, rest: Uint8Array, owned: boolean): number {
    const type = h[i];
    const stream = ((h[i + 1] << 24) | (h[i + 2] << 16) | (h[i + 3] << 8) | h[i + 4]) >>> 0;
    const length = ((h[i + 5] << 24) | (h[i + 6] << 16) | (h[i + 7] << 8) | h[i + 8]) >>> 0;
    const max = maxPayload(type);
    if (length > max) fail(`mux frame type ${type} of ${length} bytes exceeds ${max}`);
    if ((type === FrameType.CONTROL) !== (stream === 0)) {
      fail(type === FrameType.CONTROL ? "control frame off stream 0" : "stream frame on stream 0");
    }
    if (type === FrameType.WINDOW && length !== 4) fail("WINDOW frame must carry 4 bytes");
    if (type === FrameType.DATA && length === 0) fail("empty DATA frame");
    if (type === FrameType.CONTROL && length === 0) fail("empty control frame");
    this.#type = type;
    this.#stream = stream;
    const start = h === rest ? i + MUX_HEADER_BYTES : 0;
    if (h === rest && rest.length - start >= length) {
      const payload = owned
        ? rest.subarray(start, start + length)
        : rest.slice(start, start + length);
      this.onFrame(type as FrameKind, stream, payload);
      return start + length;
    }
    if (length === 0) {
      this.onFrame(type as FrameKind, stream, new Uint8Array(0));
      return start;
    }
    this.#payload = new Uint8Array(length);
    this.#payloadGot = 0;
    return start;
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
 * Handshake frames on one stream. Reads never consume bytes past the frame, so the connection
 * can switch to mux frames right after `welcome`.
 */
export class FramedStream {
  /** The underlying stream. */
  readonly stream: Stream;
  #header = new Uint8Array(4);
  #writing: Promise<void> = Promise.resolve();
  /** Frames handed to {@link send} whose write has not finished yet. */
  #queued = 0;
  /** The payload of the frame read last, as received (a hello is signed as sent). */
  lastPayload: Uint8Array<ArrayBuffer> = new Uint8Array(0);
  readonly #maxFrame: number;

  /** @param maxFrame the largest payload read; longer frames are refused */
  constructor(stream: Stream, maxFrame = MAX_FRAME_BYTES) {
    this.stream = stream;
    this.#maxFrame = maxFrame;
  }

  /**
   * Reads one message, or null at a clean end of stream; closes the stream on timeout.
   */
  async read(timeoutMs: number): Promise<Message | null> {
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
    if (length > this.#maxFrame) fail(`frame of ${length} bytes exceeds ${this.#maxFrame}`);
    const payload = new Uint8Array(length);
    if (!await readExact(this.stream, payload)) fail("connection ended inside a frame");
    this.lastPayload = payload;
    return decodeMessage(payload);
  }

  /**
   * Sends one message; writes are queued so that frames never interleave. With none queued the
   * write starts at once, before the caller's next statement.
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
