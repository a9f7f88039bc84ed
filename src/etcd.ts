/**
 * A small etcd v3 client over etcd's JSON gateway (`/v3/...` over HTTP/1.1 with `fetch`).
 *
 * Why not an npm etcd client: every maintained one (etcd3 and its forks) speaks gRPC, which
 * needs HTTP/2 with trailers through @grpc/grpc-js on Deno's node compatibility layer; that
 * is the least proven part of it, and a registry that silently stops watching is worse than
 * none. The JSON gateway is part of every etcd v3 server (3.4 and later serve it at `/v3/`),
 * needs only `fetch`, and streams watches as newline-delimited JSON.
 *
 * Keys and values travel base64-encoded; 64-bit numbers come as strings. Every request has a
 * deadline, every response is checked field by field, and with several endpoints a failed
 * request is tried on the next one.
 * @module
 */

/** Raised for any failed etcd request; `unreachable` tells a network failure from a refusal. */
export class EtcdError extends Error {
  override name = "EtcdError";
  constructor(message: string, readonly unreachable = false, readonly code?: number) {
    super(message);
  }
}

/** Raised by a watch when the revision it resumes from was compacted away. */
export class CompactedError extends EtcdError {
  override name = "CompactedError";
  constructor(readonly compactRevision: number) {
    super(`etcd compacted the history up to revision ${compactRevision}`);
  }
}

/** How to reach etcd. */
export interface EtcdOptions {
  /** Base URLs, e.g. `http://127.0.0.1:2379`; tried in order. */
  endpoints: string[];
  username?: string;
  password?: string;
  /** PEM certificates to trust for `https` endpoints (besides the system's). */
  caCerts?: string[];
  /** Deadline of each request, in ms (default 5000). */
  timeoutMs?: number;
}

/** One key and its value, with the revisions etcd keeps for it. */
export interface KeyValue {
  key: string;
  value: string;
  createRevision: number;
  modRevision: number;
  version: number;
  /** The lease it is attached to ("0": none); a string, as lease ids use all 64 bits. */
  lease: string;
}

/** A change seen by a watch. */
export interface WatchEvent {
  type: "put" | "delete";
  kv: KeyValue;
}

/** A comparison in a transaction. */
export interface Compare {
  key: string;
  /** Compare every key that starts with `key`, not just `key`. */
  prefix?: boolean;
  target: "mod" | "version" | "create" | "value";
  result: "equal" | "less" | "greater" | "not_equal";
  /** A revision or version number, or the value for target "value". */
  value: number | string;
}

/** An operation in a transaction. */
export type TxnOp =
  | { put: { key: string; value: string; lease?: string } }
  | { delete: { key: string; prefix?: boolean } };

/** A watch's handlers. */
export interface WatchHandlers {
  /** The events of one revision (or several), in order; `revision` is the newest seen. */
  onEvents(events: WatchEvent[], revision: number): void;
  /** The watch is established (again); the etcd server is reachable. */
  onConnected?(): void;
  /** The watch broke; it is being retried after `retryMs`. */
  onDisconnected?(error: Error, retryMs: number): void;
  /**
   * The revision to resume from was compacted: the caller must read everything again and
   * return the revision of that read, from which the watch continues.
   */
  onCompacted(error: CompactedError): Promise<number>;
}

/** A running watch. */
export interface Watch {
  /** Stops the watch. */
  close(): void;
  /** Settles once the watch has stopped. */
  done: Promise<void>;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/** Base64 of a string's UTF-8 bytes. */
export function toB64(text: string): string {
  let binary = "";
  for (const byte of encoder.encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary);
}

function fromB64(b64: unknown, what: string): string {
  if (b64 === undefined) return "";
  if (typeof b64 !== "string") throw new EtcdError(`etcd sent a non-string ${what}`);
  try {
    const binary = atob(b64);
    return decoder.decode(Uint8Array.from(binary, (c) => c.charCodeAt(0)));
  } catch {
    throw new EtcdError(`etcd sent a ${what} that is not base64 of UTF-8 text`);
  }
}

/**
 * Base64 of the first key after every key that starts with `prefix`: etcd's range end for a
 * prefix (the prefix with its last byte below 0xff raised by one, the rest cut off).
 */
function prefixEnd(prefix: string): string {
  const bytes = encoder.encode(prefix);
  for (let i = bytes.length - 1; i >= 0; i--) {
    if (bytes[i] < 0xff) {
      const end = bytes.slice(0, i + 1);
      end[i]++;
      return btoa(String.fromCharCode(...end));
    }
  }
  return btoa("\0"); // every key
}

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** An int64 as etcd's gateway sends it (a decimal string; absent is 0). */
function int(v: unknown, what: string): number {
  if (v === undefined) return 0;
  if (typeof v === "number" && Number.isSafeInteger(v)) return v;
  if (typeof v === "string" && /^-?[0-9]{1,16}$/.test(v)) return Number(v);
  throw new EtcdError(`etcd sent a bad ${what}: ${JSON.stringify(v)}`);
}

function id(v: unknown, what: string): string {
  if (v === undefined) return "0";
  if (typeof v === "string" && /^-?[0-9]{1,20}$/.test(v)) return v;
  if (typeof v === "number" && Number.isSafeInteger(v)) return String(v);
  throw new EtcdError(`etcd sent a bad ${what}: ${JSON.stringify(v)}`);
}

function headerRevision(body: Json): number {
  if (!isObject(body.header)) throw new EtcdError("etcd's answer has no header");
  return int(body.header.revision, "revision");
}

function parseKv(v: unknown): KeyValue {
  if (!isObject(v)) throw new EtcdError("etcd sent a key-value that is not an object");
  return {
    key: fromB64(v.key, "key"),
    value: fromB64(v.value, "value"),
    createRevision: int(v.create_revision, "create_revision"),
    modRevision: int(v.mod_revision, "mod_revision"),
    version: int(v.version, "version"),
    lease: id(v.lease, "lease"),
  };
}

function list(v: unknown, what: string): unknown[] {
  if (v === undefined) return [];
  if (!Array.isArray(v)) throw new EtcdError(`etcd sent a ${what} that is not a list`);
  return v;
}

/** Largest response body read (a whole registry fits many times over). */
const MAX_BODY = 64 * 1024 * 1024;
/** Largest line of a watch stream. */
const MAX_LINE = 16 * 1024 * 1024;

/** A client of one etcd cluster. */
export class EtcdClient {
  readonly endpoints: string[];
  readonly #options: EtcdOptions;
  readonly #timeoutMs: number;
  readonly #http: Deno.HttpClient | undefined;
  #token: string | undefined;
  /** The endpoint that answered last; requests start there. */
  #current = 0;

  constructor(options: EtcdOptions) {
    if (options.endpoints.length === 0) throw new EtcdError("no etcd endpoints given");
    this.endpoints = options.endpoints.map((e) => e.replace(/\/+$/, ""));
    this.#options = options;
    this.#timeoutMs = options.timeoutMs ?? 5000;
    this.#http = options.caCerts?.length
      ? Deno.createHttpClient({ caCerts: options.caCerts })
      : undefined;
  }

  /** Releases the HTTP client. */
  close(): void {
    this.#http?.close();
  }

  /** One POST to one endpoint; returns the parsed body or throws. */
  async #post(endpoint: string, path: string, body: Json, signal?: AbortSignal): Promise<Json> {
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (this.#token) headers.authorization = this.#token;
    const timeout = AbortSignal.timeout(this.#timeoutMs);
    let response: Response;
    try {
      response = await fetch(`${endpoint}${path}`, {
        method: "POST",
        headers,
        body: JSON.stringify(body),
        signal: signal ? AbortSignal.any([signal, timeout]) : timeout,
        client: this.#http,
      });
    } catch (err) {
      throw new EtcdError(`${endpoint}: ${describeFetchError(err)}`, true);
    }
    let text: string;
    try {
      text = await readBounded(response, MAX_BODY);
    } catch (err) {
      throw new EtcdError(`${endpoint}: ${describeFetchError(err)}`, true);
    }
    return parseAnswer(endpoint, path, response.status, text);
  }

  /**
   * POSTs `body` to `path`, on each endpoint in turn until one answers; logs in first when a
   * user is configured, and again when the token has expired.
   */
  async request(path: string, body: Json): Promise<Json> {
    let lastError: EtcdError | undefined;
    for (let i = 0; i < this.endpoints.length; i++) {
      const index = (this.#current + i) % this.endpoints.length;
      const endpoint = this.endpoints[index];
      try {
        if (this.#options.username !== undefined && !this.#token) await this.#login(endpoint);
        let answer: Json;
        try {
          answer = await this.#post(endpoint, path, body);
        } catch (err) {
          if (!(err instanceof EtcdError) || !isAuthExpiry(err)) throw err;
          if (this.#options.username === undefined) throw err;
          this.#token = undefined;
          await this.#login(endpoint);
          answer = await this.#post(endpoint, path, body);
        }
        this.#current = index;
        return answer;
      } catch (err) {
        if (!(err instanceof EtcdError) || !err.unreachable) throw err;
        lastError = err;
      }
    }
    throw lastError!;
  }

  async #login(endpoint: string): Promise<void> {
    this.#token = undefined;
    const answer = await this.#post(endpoint, "/v3/auth/authenticate", {
      name: this.#options.username,
      password: this.#options.password ?? "",
    });
    if (typeof answer.token !== "string" || answer.token === "") {
      throw new EtcdError(`${endpoint}: etcd sent no token for user ${this.#options.username}`);
    }
    this.#token = answer.token;
  }

  /** Every key starting with `prefix`, sorted by key, and the revision they were read at. */
  async rangePrefix(prefix: string): Promise<{ kvs: KeyValue[]; revision: number }> {
    const answer = await this.request("/v3/kv/range", {
      key: toB64(prefix),
      range_end: prefixEnd(prefix),
    });
    const kvs = list(answer.kvs, "kvs").map(parseKv);
    return { kvs, revision: headerRevision(answer) };
  }

  /** Writes `value` under `key` (attached to `lease`, if given); returns the new revision. */
  async put(key: string, value: string, lease?: string): Promise<number> {
    const body: Json = { key: toB64(key), value: toB64(value) };
    if (lease !== undefined) body.lease = lease;
    return headerRevision(await this.request("/v3/kv/put", body));
  }

  /** Deletes `key`; returns how many keys were deleted. */
  async delete(key: string): Promise<number> {
    return int((await this.request("/v3/kv/deleterange", { key: toB64(key) })).deleted, "deleted");
  }

  /** Runs `success` if every comparison holds, else `failure`; all or nothing. */
  async txn(
    compare: Compare[],
    success: TxnOp[],
    failure: TxnOp[] = [],
  ): Promise<{ succeeded: boolean; revision: number }> {
    const answer = await this.request("/v3/kv/txn", {
      compare: compare.map(compareJson),
      success: success.map(opJson),
      failure: failure.map(opJson),
    });
    if (answer.succeeded !== undefined && typeof answer.succeeded !== "boolean") {
      throw new EtcdError("etcd sent a non-boolean txn result");
    }
    return { succeeded: answer.succeeded === true, revision: headerRevision(answer) };
  }

  /** A lease that expires `ttlSeconds` after its last keepalive; returns its id. */
  async leaseGrant(ttlSeconds: number): Promise<string> {
    const answer = await this.request("/v3/lease/grant", { TTL: String(ttlSeconds) });
    if (typeof answer.error === "string" && answer.error) throw new EtcdError(answer.error);
    return id(answer.ID, "lease ID");
  }

  /** Renews lease `lease`; returns its TTL in seconds (0 or less: it has expired). */
  async leaseKeepAlive(lease: string): Promise<number> {
    // The gateway serves this bidirectional stream one message per request: the body ends,
    // so does the answer stream, after one result line.
    const answer = await this.request("/v3/lease/keepalive", { ID: lease });
    const result = firstResult(answer);
    return int(result.TTL, "TTL");
  }

  /** Ends lease `lease` at once, deleting every key attached to it. */
  async leaseRevoke(lease: string): Promise<void> {
    await this.request("/v3/lease/revoke", { ID: lease });
  }

  /** Whether some endpoint says it is healthy. */
  async healthy(): Promise<boolean> {
    for (const endpoint of this.endpoints) {
      try {
        const response = await fetch(`${endpoint}/health`, {
          signal: AbortSignal.timeout(this.#timeoutMs),
          client: this.#http,
        });
        const body = await readBounded(response, 4096);
        if (response.ok && JSON.parse(body).health === "true") return true;
      } catch {
        // Try the next.
      }
    }
    return false;
  }

  /**
   * Watches every key starting with `prefix`, from revision `fromRevision` on. A broken
   * stream is opened again (on the next endpoint, after a growing delay) from the revision
   * after the last one seen, so no change is missed or seen twice.
   */
  watch(prefix: string, fromRevision: number, handlers: WatchHandlers): Watch {
    const stop = new AbortController();
    let next = fromRevision;
    const done = (async () => {
      let delay = 0;
      let endpoint = this.#current;
      while (!stop.signal.aborted) {
        if (delay > 0) {
          await sleep(delay, stop.signal);
          if (stop.signal.aborted) break;
        }
        try {
          await this.#watchOnce(this.endpoints[endpoint], prefix, next, stop.signal, {
            created: () => {
              delay = 0;
              handlers.onConnected?.();
            },
            events: (events, revision) => {
              next = revision + 1;
              handlers.onEvents(events, revision);
            },
          });
          if (stop.signal.aborted) break;
          throw new EtcdError("etcd ended the watch", true);
        } catch (err) {
          if (stop.signal.aborted) break;
          let failure = err as Error;
          if (err instanceof CompactedError) {
            try {
              next = await handlers.onCompacted(err) + 1;
              continue;
            } catch (reloadErr) {
              failure = reloadErr as Error;
            }
          }
          delay = Math.min(Math.max(delay * 2, 250), 5000);
          endpoint = (endpoint + 1) % this.endpoints.length;
          handlers.onDisconnected?.(failure, delay);
        }
      }
    })();
    return { close: () => stop.abort(), done };
  }

  /** One watch stream, until it ends or fails. */
  async #watchOnce(
    endpoint: string,
    prefix: string,
    startRevision: number,
    stop: AbortSignal,
    on: { created(): void; events(events: WatchEvent[], revision: number): void },
  ): Promise<void> {
    if (this.#options.username !== undefined && !this.#token) await this.#login(endpoint);
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (this.#token) headers.authorization = this.#token;
    // The deadline covers connecting and the first line only; a watch then lasts.
    const connect = new AbortController();
    const timer = setTimeout(
      () => connect.abort(new Error(`no answer in ${this.#timeoutMs} ms`)),
      this.#timeoutMs,
    );
    let response: Response;
    try {
      response = await fetch(`${endpoint}/v3/watch`, {
        method: "POST",
        headers,
        body: JSON.stringify({
          create_request: {
            key: toB64(prefix),
            range_end: prefixEnd(prefix),
            start_revision: String(startRevision),
          },
        }),
        signal: AbortSignal.any([stop, connect.signal]),
        client: this.#http,
      });
    } catch (err) {
      clearTimeout(timer);
      throw new EtcdError(`${endpoint}: ${describeFetchError(err)}`, true);
    }
    if (!response.ok || !response.body) {
      clearTimeout(timer);
      const text = await readBounded(response, 65536).catch(() => "");
      const answer = parseAnswer(endpoint, "/v3/watch", response.status, text);
      throw new EtcdError(`${endpoint}: watch refused: ${JSON.stringify(answer)}`);
    }
    let buffer = "";
    let created = false;
    try {
      for await (const chunk of response.body.pipeThrough(new TextDecoderStream())) {
        buffer += chunk;
        if (buffer.length > MAX_LINE) throw new EtcdError(`${endpoint}: watch line too long`);
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).trim();
          buffer = buffer.slice(newline + 1);
          if (!line) continue;
          const message = parseJson(endpoint, line);
          if (message.error !== undefined) {
            const e = isObject(message.error) ? message.error : { message: message.error };
            throw new EtcdError(
              `${endpoint}: watch failed: ${String(e.message ?? JSON.stringify(e))}`,
              true,
              typeof e.grpc_code === "number" ? e.grpc_code : undefined,
            );
          }
          if (!isObject(message.result)) {
            throw new EtcdError(`${endpoint}: etcd sent a watch line with no result`);
          }
          const result = message.result;
          const compact = int(result.compact_revision, "compact_revision");
          if (compact > 0) throw new CompactedError(compact);
          if (result.canceled === true) {
            throw new EtcdError(
              `${endpoint}: etcd cancelled the watch: ${String(result.cancel_reason ?? "")}`,
              true,
            );
          }
          if (result.created === true && !created) {
            created = true;
            clearTimeout(timer);
            on.created();
          }
          const events = list(result.events, "events").map(parseEvent);
          if (events.length) {
            on.events(events, Math.max(...events.map((e) => e.kv.modRevision)));
          }
        }
      }
    } catch (err) {
      if (err instanceof EtcdError) throw err;
      throw new EtcdError(`${endpoint}: ${describeFetchError(err)}`, true);
    } finally {
      clearTimeout(timer);
    }
  }
}

function parseEvent(v: unknown): WatchEvent {
  if (!isObject(v)) throw new EtcdError("etcd sent a watch event that is not an object");
  if (v.type !== undefined && v.type !== "PUT" && v.type !== "DELETE") {
    throw new EtcdError(`etcd sent a watch event of unknown type ${JSON.stringify(v.type)}`);
  }
  return { type: v.type === "DELETE" ? "delete" : "put", kv: parseKv(v.kv) };
}

function firstResult(answer: Json): Json {
  // A streamed answer read whole: the first line's "result".
  if (isObject(answer.result)) return answer.result;
  throw new EtcdError("etcd sent a keepalive answer with no result");
}

function compareJson(c: Compare): Json {
  const out: Json = {
    key: toB64(c.key),
    target: c.target.toUpperCase(),
    result: c.result.toUpperCase(),
  };
  if (c.prefix) out.range_end = prefixEnd(c.key);
  const field = { mod: "mod_revision", create: "create_revision", version: "version" } as const;
  if (c.target === "value") out.value = toB64(String(c.value));
  else out[field[c.target]] = String(c.value);
  return out;
}

function opJson(op: TxnOp): Json {
  if ("put" in op) {
    const put: Json = { key: toB64(op.put.key), value: toB64(op.put.value) };
    if (op.put.lease !== undefined) put.lease = op.put.lease;
    return { request_put: put };
  }
  const del: Json = { key: toB64(op.delete.key) };
  if (op.delete.prefix) del.range_end = prefixEnd(op.delete.key);
  return { request_delete_range: del };
}

function parseJson(endpoint: string, text: string): Json {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new EtcdError(`${endpoint}: etcd sent something that is not JSON: ${text.slice(0, 80)}`);
  }
  if (!isObject(value)) throw new EtcdError(`${endpoint}: etcd sent JSON that is not an object`);
  return value;
}

/** Turns an HTTP answer into its body, or an error naming etcd's reason. */
function parseAnswer(endpoint: string, path: string, status: number, text: string): Json {
  // A streamed answer (keepalive) is read whole: its first line is the message.
  const first = text.split("\n").find((l) => l.trim() !== "") ?? "";
  if (status >= 500 && status !== 503 && !first.startsWith("{")) {
    throw new EtcdError(`${endpoint}${path}: HTTP ${status}`, true);
  }
  const body = first ? parseJson(endpoint, first) : {};
  const error = body.error;
  if (status !== 200 || error !== undefined) {
    const message = typeof body.message === "string"
      ? body.message
      : isObject(error) && typeof error.message === "string"
      ? error.message
      : typeof error === "string"
      ? error
      : `HTTP ${status}`;
    const code = typeof body.code === "number" ? body.code : undefined;
    // 14 (unavailable) and 503: this member cannot serve now (no leader); another may.
    const unreachable = status === 503 || code === 14 || /no leader|timed out/.test(message);
    throw new EtcdError(`${endpoint}: etcd refused ${path}: ${message}`, unreachable, code);
  }
  return body;
}

function isAuthExpiry(err: EtcdError): boolean {
  return /invalid auth token|token.*expired/i.test(err.message);
}

function describeFetchError(err: unknown): string {
  const e = err as Error;
  if (e?.name === "TimeoutError") return "no answer in time";
  return e?.message ?? String(err);
}

async function readBounded(response: Response, max: number): Promise<string> {
  if (!response.body) return "";
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of response.body) {
    size += chunk.length;
    if (size > max) throw new Error(`answer larger than ${max} bytes`);
    chunks.push(chunk);
  }
  const all = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.length;
  }
  return new TextDecoder().decode(all);
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done);
  });
}
