/**
 * Command-line handling shared by the entrypoints: options, help, version, and the one-line
 * error that a failed start prints before exiting non-zero.
 * @module
 */
import { parseArgs } from "node:util";
import type { LogLevel } from "@logtape/logtape";
import { isLogLevel, LOG_FORMATS, type LogFormat } from "./log.ts";
import { VERSION } from "./version.ts";

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
 * Calls `stop` on the first SIGINT or SIGTERM (a graceful shutdown); a second one exits at
 * once.
 */
export function onShutdown(stop: () => void): void {
  let signalled = false;
  const handler = () => {
    if (signalled) Deno.exit(130);
    signalled = true;
    stop();
  };
  Deno.addSignalListener("SIGINT", handler);
  Deno.addSignalListener("SIGTERM", handler);
}
