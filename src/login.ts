/**
 * Logging a client in: the hello, the challenge and the signature, checked against the
 * server's config, with a penalty for an address and name that keep failing.
 * @module
 */
import { X509Certificate } from "node:crypto";
import { isIP } from "node:net";
import type { ServerConfig } from "./config.ts";
import {
  AUTH_STEP_TIMEOUT_MS,
  authPayload,
  type FramedStream,
  fromBase64,
  type Hello,
  NONCE_BYTES,
  type UserHello,
} from "./protocol.ts";
import { verify } from "./keys.ts";
import { AuthPenalty } from "./guard.ts";
import { log } from "./log.ts";

const logger = log("server");

/** A client (hello) or a user (user hello) that proved its name. */
export interface LoggedIn {
  hello: Hello | UserHello;
  /** Round trip from challenge to signature, a first estimate of the link's delay. */
  rttMs: number;
}

/** Checks hellos and signatures against the current config. */
export class Login {
  /** Failed logins so far, for the status page. */
  failures = 0;
  /** Failed user logins by reason (unknown_user, wrong_key, wrong_server), for the status page. */
  readonly userFailures = new Map<string, number>();
  #penalty = new AuthPenalty();
  #certificate: { pem: string; x509: X509Certificate } | undefined;

  constructor(readonly config: () => ServerConfig) {}

  /**
   * Whether a client that dialled us as `name` reached this server: one of `server_names`,
   * or else a name or address on our certificate.
   */
  knowsName(name: string): boolean {
    const config = this.config();
    const wanted = name.toLowerCase();
    if (config.serverNames) return config.serverNames.includes(wanted);
    if (this.#certificate?.pem !== config.certPem) {
      this.#certificate = { pem: config.certPem, x509: new X509Certificate(config.certPem) };
    }
    const cert = this.#certificate.x509;
    // checkIP throws for anything that is not an address.
    return isIP(wanted) ? cert.checkIP(wanted) !== undefined : cert.checkHost(wanted) !== undefined;
  }

  /**
   * Runs the challenge for `hello` (whose frame payload was `helloBytes`). Returns the logged
   * in client or user, or null after telling a refused one why. A correct signature is
   * answered at once; a failure waits out the penalty of its address and name first, while
   * nothing more is read from it. A client's hello is checked against `[clients]` only, a
   * user's against `[users]` only.
   */
  async run(
    framed: FramedStream,
    hello: Hello | UserHello,
    helloBytes: Uint8Array,
  ): Promise<LoggedIn | null> {
    const stream = framed.stream;
    const config = this.config();
    const isUser = hello.type === "user";
    const who = isUser ? "user" : "client";
    // Names hold no control characters: a user and a client of one name never share a key.
    const penaltyKey = isUser
      ? `${stream.remoteIp}\0user\0${hello.name}`
      : `${stream.remoteIp} ${hello.name}`;
    const refuse = async (why: string, reason: string, kind: string) => {
      this.#penalty.fail(penaltyKey);
      this.failures++;
      if (isUser) this.userFailures.set(kind, (this.userFailures.get(kind) ?? 0) + 1);
      logger.warn(`${who} from {remote} refused: ${why}`, {
        remote: stream.remote,
        name: hello.name,
        server: hello.server,
      });
      const delay = this.#penalty.delay(penaltyKey);
      if (delay > 0) {
        // Made to wait: a peer that sends anything meanwhile is dropped, so nothing of it is
        // held here.
        stream.holdSilent?.();
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
      await framed.send({ type: "refused", retry: true, reason }).catch(() => {});
      stream.close();
      return null;
    };
    if (!this.knowsName(hello.server)) {
      return await refuse(
        "it dialled {server}, which is not this server (see server_names)",
        `this server is not "${hello.server}": a ${who} must dial the server it is configured ` +
          `for (server_names lists the names it answers to)`,
        "wrong_server",
      );
    }
    const key = isUser ? config.users.get(hello.name)?.key : config.clients.get(hello.name);
    if (!key) {
      return await refuse(
        "unknown name {name}",
        `unknown ${who} name "${hello.name}": the server has no [${who}s] entry for it`,
        isUser ? "unknown_user" : "unknown_client",
      );
    }
    const nonce = crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
    const asked = performance.now();
    await framed.send({ type: "challenge", nonce: nonce.toBase64() });
    const auth = await framed.read(AUTH_STEP_TIMEOUT_MS);
    if (auth === null) {
      stream.close();
      return null;
    }
    if (auth.type !== "auth") throw new Error(`expected "auth", got "${auth.type}"`);
    const rttMs = performance.now() - asked;
    const signature = fromBase64(auth.signature)!;
    if (!await verify(key, signature, authPayload(nonce, helloBytes))) {
      return await refuse(
        "wrong key for {name}",
        `authentication failed: the key does not match the one configured for ${who} ` +
          `"${hello.name}"`,
        "wrong_key",
      );
    }
    this.#penalty.succeed(penaltyKey);
    return { hello, rttMs };
  }
}
