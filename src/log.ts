/**
 * Logging setup shared by every NATadm program: LogTape, one line per event, on stderr so that
 * stdout stays free for what a command prints on purpose (keygen's public key, demo's help).
 * Lines are plain text, never coloured, so a log redirected to a file stays clean (Deno's own
 * lines, such as `deno task`'s banner, follow NO_COLOR).
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

/** Longest an info, debug or trace line waits in the buffer before it is written. */
export const LOG_FLUSH_MS = 10;

/** Buffered bytes that make the sink write at once. */
const LOG_BUFFER_BYTES = 64 * 1024;

/** Levels written at once, with anything buffered before them. */
const URGENT = new Set(["warning", "error", "fatal"]);

/**
 * Writes formatted records to stderr. Info and lower wait up to {@link LOG_FLUSH_MS} so that a
 * busy server writes its tunnel lines in one system call per batch rather than one per line
 * (one per line cost it 12% of its CPU at a thousand tunnels a second). Warnings and errors
 * go out at once, and the buffer is written when the program exits or dies of an error, so
 * no line is lost but to SIGKILL.
 */
function stderrSink(formatter: TextFormatter): Sink {
  const encoder = new TextEncoder();
  let lines: Uint8Array[] = [];
  let size = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const flush = () => {
    clearTimeout(timer);
    timer = undefined;
    if (size === 0) return;
    const bytes = new Uint8Array(size);
    let at = 0;
    for (const line of lines) {
      bytes.set(line, at);
      at += line.length;
    }
    lines = [];
    size = 0;
    try {
      for (let done = 0; done < bytes.length;) done += Deno.stderr.writeSync(bytes.subarray(done));
    } catch {
      // stderr is gone (a closed pipe): there is nowhere left to report to.
    }
  };
  for (const event of ["unload", "error", "unhandledrejection"]) addEventListener(event, flush);
  return (record) => {
    const bytes = encoder.encode(formatter(record));
    lines.push(bytes);
    size += bytes.length;
    if (URGENT.has(record.level) || size >= LOG_BUFFER_BYTES) return flush();
    if (timer === undefined) {
      timer = setTimeout(flush, LOG_FLUSH_MS);
      Deno.unrefTimer(timer); // a pending line must not keep a finished program alive
    }
  };
}

/** The logger for one part of NATadm, e.g. `log("server")`. */
export function log(part: string): Logger {
  return getLogger(["natadm", part]);
}
