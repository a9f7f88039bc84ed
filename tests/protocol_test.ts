/**
 * The handshake and control messages, and OPEN payloads: every valid message survives a round
 * trip, every malformed one is refused with a ProtocolError that says why, and every opening of
 * another protocol version (including version 1's `data` and `standby`) with a VersionError.
 */
import assert from "node:assert/strict";
import {
  decodeMessage,
  decodeOpen,
  decodePeerOpen,
  decodeSnapshot,
  encodeFrame,
  encodeMessage,
  encodeOpen,
  encodePeerOpen,
  encodeRegistryRequest,
  encodeSnapshot,
  MAX_FRAME_BYTES,
  MAX_HOST_BYTES,
  MAX_NAME_BYTES,
  type Message,
  type OpenRequest,
  PROTOCOL_VERSION,
  ProtocolError,
  VersionError,
} from "../src/protocol.ts";

const encoder = new TextEncoder();
const encode = (value: unknown) => encoder.encode(JSON.stringify(value));
const hello = {
  type: "hello",
  version: PROTOCOL_VERSION,
  name: "foo bar",
  interval: 5,
  check: false,
  server: "localhost",
};

/** Asserts `run` throws a ProtocolError (and not a VersionError) whose message matches. */
function refuses(run: () => unknown, pattern: RegExp, what: string): void {
  assert.throws(run, (err: Error) => {
    assert.ok(err instanceof ProtocolError, `${what}: ${err}`);
    assert.ok(!(err instanceof VersionError), `${what}: a VersionError: ${err.message}`);
    assert.match(err.message, pattern, what);
    return true;
  });
}

Deno.test("every message survives an encode/decode round trip unchanged", () => {
  const messages: Message[] = [
    {
      type: "hello",
      version: PROTOCOL_VERSION,
      name: "foo bar",
      interval: 5,
      check: false,
      server: "localhost",
    },
    {
      type: "hello",
      version: PROTOCOL_VERSION,
      name: "é",
      interval: 3600,
      check: true,
      server: "::1",
    },
    { type: "challenge", nonce: new Uint8Array(32).toBase64() },
    { type: "auth", signature: new Uint8Array(64).toBase64() },
    {
      type: "welcome",
      services: [{ port: 10022, host: "localhost", target_port: 22 }],
      pending: 2,
    },
    { type: "welcome", services: [], pending: 0 },
    { type: "refused", reason: "no", retry: true },
    { type: "refused", reason: "", retry: false },
    { type: "ping" },
    { type: "goodbye", reason: "the server is shutting down" },
    { type: "registry", revision: 0 },
    { type: "registry", revision: Number.MAX_SAFE_INTEGER },
  ];
  for (const message of messages) {
    assert.deepEqual(decodeMessage(encodeFrame(message).subarray(4)), message);
    assert.deepEqual(decodeMessage(encodeMessage(message)), message);
  }
});

Deno.test("the handshake frame is a 4-byte big-endian length and the JSON payload", () => {
  const frame = encodeFrame({ type: "ping" });
  const length = new DataView(frame.buffer, frame.byteOffset).getUint32(0);
  assert.equal(length, frame.length - 4);
  assert.equal(new TextDecoder().decode(frame.subarray(4)), '{"type":"ping"}');
});

Deno.test("a hello of another version, and version 1's data and standby openings, raise VersionError", () => {
  const cases: [unknown, number][] = [
    [{ ...hello, version: 1 }, 1],
    [{ ...hello, version: 3 }, 3],
    [{ ...hello, version: 0 }, 0],
    // Version 1's hello had no `server`: the version is checked before the fields.
    [{ type: "hello", version: 1, name: "foo bar", interval: 5, check: false }, 1],
    [{ type: "data", version: 1, id: "AAAAAAAAAAAAAAAAAAAAAA==", session: "x" }, 1],
    [{ type: "standby", version: 1, session: "AAAAAAAAAAAAAAAAAAAAAA==" }, 1],
    [{ type: "standby" }, 1],
  ];
  for (const [message, version] of cases) {
    assert.throws(() => decodeMessage(encode(message)), (err: Error) => {
      assert.ok(err instanceof VersionError, `${JSON.stringify(message)}: ${err}`);
      assert.ok(err instanceof ProtocolError, "a VersionError is a ProtocolError");
      assert.equal(err.version, version);
      assert.match(err.message, new RegExp(`version ${version}\\b.*speaks ${PROTOCOL_VERSION}`));
      assert.match(err.message, /upgrade/);
      return true;
    });
  }
});

Deno.test("the decoder rejects malformed frames with a ProtocolError that says why", () => {
  const cases: [Uint8Array, RegExp][] = [
    [new Uint8Array([0xff, 0xfe]), /UTF-8/],
    [encoder.encode("{"), /JSON/],
    [encoder.encode(""), /JSON/],
    [encode([1, 2]), /object/],
    [encode(null), /object/],
    [encode("ping"), /object/],
    [encode({ type: "nope" }), /unknown message type/],
    [encode({ type: "connect" }), /unknown message type/],
    [encode({}), /unknown message type/],
    [encode({ type: "ping", extra: 1 }), /needs fields/],
    [encode({ type: "hello", version: PROTOCOL_VERSION, name: "x" }), /needs fields/],
    [encode({ ...hello, server: undefined }), /needs fields/],
    [encode({ ...hello, session: "x" }), /needs fields/],
    [encode({ ...hello, version: "2" }), /"version"/],
    [encode({ ...hello, version: 2.5 }), /"version"/],
    [encode({ ...hello, name: "" }), /"name"/],
    [encode({ ...hello, name: "a\nb" }), /control/],
    [encode({ ...hello, name: "x".repeat(MAX_NAME_BYTES + 1) }), /"name"/],
    [encode({ ...hello, interval: 0 }), /"interval"/],
    [encode({ ...hello, interval: 3601 }), /"interval"/],
    [encode({ ...hello, check: "no" }), /"check"/],
    [encode({ ...hello, server: "" }), /"server"/],
    [encode({ ...hello, server: "local host" }), /"server"/],
    [encode({ ...hello, server: "a\u0000" }), /"server"/],
    [encode({ ...hello, server: "h".repeat(MAX_HOST_BYTES + 1) }), /"server"/],
    [encode({ ...hello, server: 1 }), /"server"/],
    [encode({ type: "challenge", nonce: "AAAA" }), /32 bytes/],
    [encode({ type: "challenge", nonce: new Uint8Array(32).toBase64().slice(0, -1) }), /32 bytes/],
    [encode({ type: "auth", signature: new Uint8Array(63).toBase64() }), /64 bytes/],
    [encode({ type: "welcome", services: [{ port: 1 }], pending: 0 }), /service entry/],
    [encode({ type: "welcome", services: {}, pending: 0 }), /"services"/],
    [
      encode({ type: "welcome", services: [{ port: 0, host: "h", target_port: 1 }], pending: 0 }),
      /"port"/,
    ],
    [encode({ type: "welcome", services: [], pending: -1 }), /"pending"/],
    [encode({ type: "welcome", services: [], pending: 0, session: "x" }), /needs fields/],
    [encode({ type: "refused", reason: "x", retry: 1 }), /"retry"/],
    [encode({ type: "refused", reason: "x".repeat(1025), retry: true }), /"reason"/],
    [encode({ type: "goodbye" }), /needs fields/],
    [encode({ type: "goodbye", reason: 5 }), /"reason"/],
  ];
  for (const [payload, pattern] of cases) {
    refuses(() => decodeMessage(payload), pattern, new TextDecoder().decode(payload));
  }
});

Deno.test("a message larger than the frame limit cannot be encoded", () => {
  assert.throws(
    () => encodeFrame({ type: "refused", reason: "x".repeat(MAX_FRAME_BYTES), retry: true }),
    ProtocolError,
  );
});

Deno.test("an open request survives a round trip, and a malformed one is refused", () => {
  const requests: OpenRequest[] = [
    { host: "localhost", port: 22, user: "203.0.113.9:5555" },
    { host: "::1", port: 65535, user: "[2001:db8::1]:1" },
    { host: "h".repeat(MAX_HOST_BYTES), port: 1, user: "" },
  ];
  for (const request of requests) assert.deepEqual(decodeOpen(encodeOpen(request)), request);
  const open = { host: "localhost", port: 22, user: "u" };
  const cases: [Uint8Array, RegExp][] = [
    [new Uint8Array([0xc0, 0x80]), /UTF-8/],
    [encoder.encode("{"), /JSON/],
    [encode([]), /object/],
    [encode({ host: "localhost", port: 22 }), /needs fields/],
    [encode({ ...open, type: "open" }), /needs fields/],
    [encode({ ...open, port: 0 }), /"port"/],
    [encode({ ...open, port: 65536 }), /"port"/],
    [encode({ ...open, port: "22" }), /"port"/],
    [encode({ ...open, host: "" }), /"host"/],
    [encode({ ...open, host: "a b" }), /"host"/],
    [encode({ ...open, host: "h".repeat(MAX_HOST_BYTES + 1) }), /"host"/],
    [encode({ ...open, user: 5 }), /"user"/],
    [encode({ ...open, user: "u".repeat(MAX_NAME_BYTES + 1) }), /"user"/],
  ];
  for (const [payload, pattern] of cases) {
    refuses(() => decodeOpen(payload), pattern, new TextDecoder().decode(payload));
  }
});

Deno.test("a peer's registry announcement, request and snapshot are parsed strictly", () => {
  assert.deepEqual(decodePeerOpen(encodeRegistryRequest()), { registry: true });
  const open = { client: "web", port: 22, host: "localhost", by: "admin" };
  assert.deepEqual(decodePeerOpen(encodePeerOpen(open)), open);
  const snapshot = { revision: 7, entries: { "/natadm/clients/web": '{"key":"AAAA"}' } };
  assert.deepEqual(decodeSnapshot(encodeSnapshot(snapshot)), snapshot);
  const cases: [() => unknown, RegExp][] = [
    [() => decodePeerOpen(encode({ registry: false })), /"registry" must be true/],
    [() => decodePeerOpen(encode({ registry: true, client: "web" })), /needs fields/],
    [() => decodeMessage(encode({ type: "registry", revision: -1 })), /"revision"/],
    [() => decodeMessage(encode({ type: "registry", revision: 1.5 })), /"revision"/],
    [() => decodeMessage(encode({ type: "registry" })), /needs fields|"revision"/],
    [() => decodeSnapshot(encode({ revision: 1 })), /needs fields/],
    [() => decodeSnapshot(encode({ revision: 1, entries: [] })), /"entries"/],
    [() => decodeSnapshot(encode({ revision: 1, entries: { k: 1 } })), /not a string/],
    [() => decodeSnapshot(encode({ revision: "1", entries: {} })), /"revision"/],
  ];
  for (const [run, pattern] of cases) refuses(run, pattern, String(run));
});
