/**
 * Logging setup shared by every NATadm program: LogTape, one line per event, on stderr so that
 * stdout stays free for what a command prints on purpose (keygen's public key, demo's help).
 * @module
 */
import {
  configure,
  getJsonLinesFormatter,
  getLogger,
  getTextFormatter,
  type Logger,
  type LogLevel,
  type Sink,
  type TextFormatter,
} from "@logtape/logtape";

/** Log levels accepted by `--log-level` and the `log_level` config key. */
export const LOG_LEVELS = ["trace", "debug", "info", "warning", "error", "fatal"] as const;

/** Output formats accepted by `--log-format`. */
export const LOG_FORMATS = ["text", "json"] as const;

/** One of {@link LOG_FORMATS}. */
export type LogFormat = typeof LOG_FORMATS[number];

/** Returns whether `value` names a LogTape level that NATadm accepts. */
export function isLogLevel(value: string): value is LogLevel {
  return (LOG_LEVELS as readonly string[]).includes(value);
}

/** Routes every `natadm` logger to stderr at `level` and above. Call once per process. */
export async function setupLogging(level: LogLevel, format: LogFormat = "text"): Promise<void> {
  const formatter = format === "json"
    ? getJsonLinesFormatter()
    : getTextFormatter({ timestamp: "date-time-timezone", level: "ABBR", value: renderValue });
  await configure({
    reset: true,
    sinks: { stderr: stderrSink(formatter) },
    loggers: [
      { category: ["natadm"], lowestLevel: level, sinks: ["stderr"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["stderr"] },
    ],
  });
}

/** Printable ASCII without quotes or backslashes: what `Deno.inspect` prints as `"text"`. */
const PLAIN_TEXT = /^[\x20\x21\x23-\x26\x28-\x5b\x5d-\x5f\x61-\x7e]*$/;

/**
 * Renders a value in a log line exactly as LogTape's default (`Deno.inspect`) would, but takes
 * the common cases, addresses, names and ports, without it: inspect made up half the cost of a
 * line, and every tunnel logs two on each side.
 */
export function renderValue(value: unknown, inspect: (value: unknown) => string): string {
  if (typeof value === "string" && PLAIN_TEXT.test(value)) return `"${value}"`;
  if (typeof value === "number" && Number.isInteger(value) && !Object.is(value, -0)) {
    return String(value);
  }
  return inspect(value);
}

/**
 * Writes each formatted record straight to stderr, synchronously: a program that exits right
 * after logging loses no line, and a busy server pays no console formatting per line (the
 * console sink cost it about 5% of its CPU at a thousand tunnels a second).
 */
function stderrSink(formatter: TextFormatter): Sink {
  const encoder = new TextEncoder();
  return (record) => {
    const bytes = encoder.encode(formatter(record));
    try {
      for (let at = 0; at < bytes.length;) at += Deno.stderr.writeSync(bytes.subarray(at));
    } catch {
      // stderr is gone (a closed pipe): there is nowhere left to report to.
    }
  };
}

/** The logger for one part of NATadm, e.g. `log("server")`. */
export function log(part: string): Logger {
  return getLogger(["natadm", part]);
}
