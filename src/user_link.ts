/**
 * The user's side of admin access by name, shared by `connect` and `forward`: dial the
 * server's communication port over TLS, log in as a `[users]` name, and open tunnels to
 * `CLIENT:PORT` as streams on that one connection.
 * @module
 */
import { parseArgs } from "node:util";
import type { LogLevel } from "@logtape/logtape";
import type { UserConfig } from "./config.ts";
import {
  AUTH_STEP_TIMEOUT_MS,
  authPayload,
  encodeMessage,
  encodeUserOpen,
  FramedStream,
  fromBase64,
  MAX_USER_WAIT_S,
  type Message,
  PROTOCOL_VERSION,
  ProtocolError,
  USER_INTERVAL_S,
  type UserHello,
} from "./protocol.ts";
import { sign } from "./keys.ts";
import { Mux, type MuxStream } from "./mux.ts";
import { connectTls } from "./transport.ts";
import { describeError } from "./client.ts";
import { die } from "./cli.ts";
import { isLogLevel, LOG_FORMATS, type LogFormat } from "./log.ts";
import { VERSION } from "./version.ts";

/** Exit code: the server could not be reached (network, TLS). */
export const EXIT_UNREACHABLE = 1;
/** Exit code: a bad option or config file. */
export const EXIT_USAGE = 2;
/** Exit code: the server refused the login (unknown user, wrong key, wrong server). */
export const EXIT_LOGIN_REFUSED = 3;
/** Exit code: the tunnel was refused (not allowed, client offline, client refused the port). */
export const EXIT_TUNNEL_REFUSED = 4;

/** The server refused to log this user in, or logged it out. */
export class UserRefusedError extends Error {
  override name = "UserRefusedError";
}

/** A logged-in user connection to the server. */
export class UserLink {
  /** Resolves with why the connection ended. */
  readonly ended: Promise<Error>;

  private constructor(readonly config: UserConfig, readonly mux: Mux) {
    this.ended = mux.run();
  }

  /**
   * Dials the server, logs in as `config.name` and returns the link. Throws a
   * {@link UserRefusedError} if the server refused the login, else an error whose message
   * says what to check.
   */
  static async open(config: UserConfig): Promise<UserLink> {
    const { remoteHost, remotePort, caPem, name, key } = config;
    const where = `${remoteHost}:${remotePort}`;
    let stream;
    try {
      stream = await connectTls({ hostname: remoteHost, port: remotePort, caCert: caPem });
    } catch (err) {
      throw new Error(describeError(err, remoteHost, remotePort));
    }
    const framed = new FramedStream(stream);
    let rttMs: number;
    try {
      const hello: UserHello = {
        type: "user",
        version: PROTOCOL_VERSION,
        name,
        server: remoteHost.toLowerCase(),
      };
      const sent = performance.now();
      await framed.send(hello);
      const challenge = expect(await framed.read(AUTH_STEP_TIMEOUT_MS), "challenge", where);
      rttMs = performance.now() - sent;
      const signature = await sign(
        key,
        authPayload(fromBase64(challenge.nonce)!, encodeMessage(hello)),
      );
      await framed.send({ type: "auth", signature: signature.toBase64() });
      expect(await framed.read(AUTH_STEP_TIMEOUT_MS), "welcome", where);
    } catch (err) {
      stream.close();
      if (err instanceof UserRefusedError) throw err;
      throw new Error(describeError(err, remoteHost, remotePort));
    }
    const mux: Mux = new Mux(stream, {
      onControl: (message: Message) => {
        if (message.type === "ping") return;
        if (message.type === "refused") {
          throw new UserRefusedError(
            `server ${where} logged user "${name}" out: ${message.reason}`,
          );
        }
        if (message.type === "goodbye") {
          mux.closeWhenIdle(new Error(`the server said: ${message.reason}`));
          return;
        }
        throw new ProtocolError(`unexpected "${message.type}" from the server`);
      },
    }, { maxStreams: 1, rttMs });
    mux.startHeartbeat(USER_INTERVAL_S * 1000);
    return new UserLink(config, mux);
  }

  /** Whether the connection is over (a new {@link open} is needed for more tunnels). */
  get closed(): boolean {
    return this.mux.closed;
  }

  /**
   * Opens a tunnel to port `port` of client `client`, waiting up to `wait` seconds for a
   * client that is not connected. A refusal arrives as the stream's reset, with the reason.
   */
  tunnel(client: string, port: number, wait: number): MuxStream {
    return this.mux.open(encodeUserOpen({ client, port, wait }));
  }

  /** Closes the connection and every tunnel on it. */
  close(): void {
    this.mux.close(new Error("closed"));
  }
}

function expect<T extends Message["type"]>(
  message: Message | null,
  type: T,
  where: string,
): Extract<Message, { type: T }> {
  if (message?.type === "refused") {
    throw new UserRefusedError(`server ${where} refused this user: ${message.reason}`);
  }
  if (message === null) throw new Error(`server closed the connection before "${type}"`);
  if (message.type !== type) throw new Error(`expected "${type}", got "${message.type}"`);
  return message as Extract<Message, { type: T }>;
}

/** The options of `connect` and `forward`. */
export interface UserCommandOptions {
  config: string;
  wait: number;
  logLevel?: LogLevel;
  logFormat: LogFormat;
  /** The positional arguments, exactly as many as asked for. */
  args: string[];
}

/**
 * Parses a user command's options (`--config`, `--wait`, `--log-level`, `--log-format`,
 * `--help`, `--version`) and exactly `names.length` positional arguments; exits 2 with one
 * line on anything else.
 */
export function parseUserCommand(
  program: string,
  argv: string[],
  help: string,
  names: string[],
): UserCommandOptions {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: true,
      options: {
        config: { type: "string", short: "c", default: "user.toml" },
        wait: { type: "string", default: "0" },
        "log-level": { type: "string" },
        "log-format": { type: "string", default: "text" },
        help: { type: "boolean", short: "h" },
        version: { type: "boolean", short: "V" },
      },
    });
  } catch (err) {
    die(program, `${(err as Error).message} (see --help)`, EXIT_USAGE);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(help.trim());
    Deno.exit(0);
  }
  if (values.version) {
    console.log(`${program} ${VERSION}`);
    Deno.exit(0);
  }
  if (positionals.length !== names.length) {
    die(
      program,
      `expected ${names.join(" ")}, got ${positionals.length} arguments (see --help)`,
      2,
    );
  }
  const wait = Number(values.wait);
  if (!/^[0-9]+$/.test(values.wait) || wait > MAX_USER_WAIT_S) {
    die(program, `--wait must be whole seconds from 0 to ${MAX_USER_WAIT_S}`, EXIT_USAGE);
  }
  const level = values["log-level"];
  if (level !== undefined && !isLogLevel(level)) {
    die(program, `--log-level must be trace, debug, info, warning, error or fatal`, EXIT_USAGE);
  }
  const format = values["log-format"];
  if (!(LOG_FORMATS as readonly string[]).includes(format)) {
    die(program, `--log-format must be text or json, got "${format}"`, EXIT_USAGE);
  }
  return {
    config: values.config,
    wait,
    logLevel: level,
    logFormat: format as LogFormat,
    args: positionals,
  };
}

/** Parses a port argument (1–65535) or exits 2 naming it. */
export function portArgument(program: string, what: string, text: string): number {
  const port = Number(text);
  if (!/^[0-9]{1,5}$/.test(text) || port < 1 || port > 65535) {
    die(program, `${what} must be a port number (1-65535), got "${text}"`, EXIT_USAGE);
  }
  return port;
}
