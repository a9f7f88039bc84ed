/**
 * Command-line handling shared by the entrypoints: options, help, version, and the one-line
 * error that a failed start prints before exiting non-zero.
 * @module
 */
import { parseArgs } from "node:util";
import type { LogLevel } from "@logtape/logtape";
import { isLogLevel, log, LOG_FORMATS, type LogFormat } from "./log.ts";
import { VERSION } from "./version.ts";

const logger = log("signal");

/** Options every NATadm program accepts. */
export interface CommonOptions {
  config: string;
  logLevel?: LogLevel;
  logFormat: LogFormat;
  /** The program's own boolean flags that were given. */
  flags: Set<string>;
}

/** Prints `message` as the program's one-line failure and exits with `code`. */
export function die(program: string, message: string, code = 1): never {
  console.error(`${program}: error: ${message}`);
  Deno.exit(code);
}

/**
 * Parses `--config`, `--log-level`, `--log-format`, `--help` and `--version`; prints help or
 * version and exits when asked, and exits 2 with one line on any bad option.
 */
export function parseCommon(
  program: string,
  args: string[],
  defaultConfig: string,
  help: string,
  flags: string[] = [],
): CommonOptions {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      strict: true,
      allowPositionals: false,
      options: {
        config: { type: "string", short: "c", default: defaultConfig },
        "log-level": { type: "string" },
        "log-format": { type: "string", default: "text" },
        help: { type: "boolean", short: "h" },
        version: { type: "boolean", short: "V" },
        ...Object.fromEntries(flags.map((f) => [f, { type: "boolean" as const }])),
      },
    }));
  } catch (err) {
    die(program, `${(err as Error).message} (see --help)`, 2);
  }
  if (values.help) {
    console.log(help.trim());
    Deno.exit(0);
  }
  if (values.version) {
    console.log(`${program} ${VERSION}`);
    Deno.exit(0);
  }
  const level = values["log-level"];
  if (level !== undefined && !isLogLevel(level)) {
    die(
      program,
      `--log-level must be trace, debug, info, warning, error or fatal, got "${level}"`,
      2,
    );
  }
  const format = values["log-format"];
  if (!(LOG_FORMATS as readonly string[]).includes(format)) {
    die(program, `--log-format must be text or json, got "${format}"`, 2);
  }
  const given = new Set(flags.filter((f) => (values as Record<string, unknown>)[f] === true));
  return { config: values.config, logLevel: level, logFormat: format as LogFormat, flags: given };
}

/**
 * Signals closer together than this are one Ctrl-C: a terminal sends SIGINT to its whole
 * foreground group, so a program under `deno task` gets one from the terminal and one that
 * `deno task` forwards (and systemd's stop may reach it twice the same way).
 */
export const SAME_SIGNAL_MS = 1000;

/**
 * Calls `stop` on the first SIGINT or SIGTERM (a graceful shutdown). Another signal within
 * {@link SAME_SIGNAL_MS} of it counts as the same one; a signal after that exits at once
 * (code 130), with a warning naming how many live tunnels `liveTunnels` says it cuts.
 */
export function onShutdown(stop: () => void, liveTunnels?: () => number): void {
  let first: number | undefined;
  const handler = (signal: Deno.Signal) => {
    const now = performance.now();
    if (first === undefined) {
      first = now;
      stop();
    } else if (now - first < SAME_SIGNAL_MS) {
      logger.debug("{signal} {ms} ms after the first signal: the same request to stop", {
        signal,
        ms: Math.round(now - first),
      });
    } else {
      const live = liveTunnels?.();
      logger.warn(
        live === undefined
          ? "second signal ({signal}): exiting at once, cutting any live tunnels"
          : "second signal ({signal}): exiting at once, cutting {live} live tunnels",
        { signal, live },
      );
      Deno.exit(130);
    }
  };
  Deno.addSignalListener("SIGINT", () => handler("SIGINT"));
  Deno.addSignalListener("SIGTERM", () => handler("SIGTERM"));
}
