import assert from "node:assert/strict";
import {
  decodeMessage,
  encodeFrame,
  MAX_FRAME_BYTES,
  type Message,
  ProtocolError,
} from "../src/protocol.ts";

const encode = (value: unknown) => new TextEncoder().encode(JSON.stringify(value));
const id = new Uint8Array(16).fill(7).toBase64();

Deno.test("every message survives an encode/decode round trip unchanged", () => {
  const messages: Message[] = [
    { type: "hello", version: 1, name: "foo bar", interval: 5, check: false },
    { type: "data", version: 1, id, session: id },
    { type: "challenge", nonce: new Uint8Array(32).toBase64() },
    { type: "auth", signature: new Uint8Array(64).toBase64() },
    {
      type: "welcome",
      services: [{ port: 10022, host: "localhost", target_port: 22 }],
      pending: 2,
      session: id,
    },
    { type: "standby", version: 1, session: id },
    { type: "refused", reason: "no", retry: true },
    { type: "connect", id, host: "localhost", port: 22, user: "203.0.113.9:5555" },
    { type: "reject", id, reason: "refused" },
    { type: "ping" },
  ];
  for (const message of messages) {
    assert.deepEqual(decodeMessage(encodeFrame(message).subarray(4)), message);
  }
});

Deno.test("the decoder rejects malformed frames with a ProtocolError that says why", () => {
  const cases: [Uint8Array, RegExp][] = [
    [new Uint8Array([0xff, 0xfe]), /UTF-8/],
    [new TextEncoder().encode("{"), /JSON/],
    [encode([1, 2]), /object/],
    [encode({ type: "nope" }), /unknown message type/],
    [encode({ type: "ping", extra: 1 }), /needs fields/],
    [encode({ type: "hello", version: 1, name: "x" }), /needs fields/],
    [encode({ type: "hello", version: "1", name: "x", interval: 5, check: false }), /"version"/],
    [encode({ type: "hello", version: 1, name: "", interval: 5, check: false }), /"name"/],
    [encode({ type: "hello", version: 1, name: "a\nb", interval: 5, check: false }), /control/],
    [encode({ type: "hello", version: 1, name: "x", interval: 0, check: false }), /"interval"/],
    [encode({ type: "data", version: 1, id: "AAAA", session: id }), /16 bytes/],
    [encode({ type: "data", version: 1, id: id.slice(0, -2) + "=", session: id }), /16 bytes/],
    [encode({ type: "connect", id, host: "h", port: 70000, user: "u" }), /"port"/],
    [
      encode({ type: "welcome", services: [{ port: 1 }], pending: 0, session: id }),
      /service entry/,
    ],
    [encode({ type: "standby", version: 1, session: "" }), /16 bytes/],
  ];
  for (const [payload, pattern] of cases) {
    assert.throws(() => decodeMessage(payload), (err: Error) => {
      assert.ok(err instanceof ProtocolError, `${err}`);
      assert.match(err.message, pattern);
      return true;
    });
  }
});

Deno.test("a message larger than the frame limit cannot be encoded", () => {
  assert.throws(
    () => encodeFrame({ type: "refused", reason: "x".repeat(MAX_FRAME_BYTES), retry: true }),
    ProtocolError,
  );
});
