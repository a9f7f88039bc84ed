/**
 * The client's tunnels: for each stream the server opens, check the allow list and the
 * client's own limits, connect to the local target, and relay.
 * @module
 */
import type { ClientConfig } from "./config.ts";
import { decodeOpen, type OpenRequest } from "./protocol.ts";
import { type MuxStream, relay } from "./mux.ts";
import { connectTcp, type Stream } from "./transport.ts";
import { log } from "./log.ts";

const logger = log("client");

/** Hosts that mean this machine, where a client without an allow list may connect. */
const LOCAL_HOSTS = new Set(["localhost", "127.0.0.1", "::1"]);

/**
 * Whether a client may connect to `host:port`: an entry of its allow list says so, or, with
 * no list, the host is this machine.
 */
export function allows(allow: ClientConfig["allow"], host: string, port: number): boolean {
  const h = host.toLowerCase();
  if (allow === undefined) return LOCAL_HOSTS.has(h);
  return allow.some((entry) => entry.host === h && entry.port === port);
}

/** The tunnels of one client process, across its connections. */
export class LocalTunnels {
  #config: ClientConfig;
  #live = new Set<Promise<void>>();
  #streams = new Set<MuxStream>();
  /** Opens the server may still make at once: `max_tunnel_rate` a second, as much in a burst. */
  #tokens: number;
  #refilled = performance.now();

  constructor(config: ClientConfig) {
    this.#config = config;
    this.#tokens = config.maxTunnelRate;
  }

  /** Live tunnels right now. */
  get size(): number {
    return this.#live.size;
  }

  /** Every live tunnel's promise, for a caller that waits for them all. */
  all(): Promise<void[]> {
    return Promise.all(this.#live);
  }

  /** Serves a stream the server opened with this request payload. */
  serve(stream: MuxStream, payload: Uint8Array): void {
    let request: OpenRequest;
    try {
      request = decodeOpen(payload);
    } catch (err) {
      return stream.reset((err as Error).message);
    }
    const why = this.#refusal(request);
    if (why) {
      logger.warn("refused to connect user {user} to {target}: {why}", {
        user: request.user,
        target: `${request.host}:${request.port}`,
        why,
      });
      return stream.reset(`${request.host}:${request.port}: ${why}`);
    }
    const tunnel = this.#run(stream, request).catch((err) => {
      logger.warn("tunnel for user {user} failed: {error}", {
        user: request.user,
        error: (err as Error).message,
      });
    }).finally(() => this.#live.delete(tunnel));
    this.#live.add(tunnel);
  }

  /** Why `request` is refused by this client's own rules, or null. */
  #refusal(request: OpenRequest): string | null {
    if (!allows(this.#config.allow, request.host, request.port)) return "not in the allow list";
    if (this.#live.size >= this.#config.maxTunnels) {
      return `${this.#live.size} tunnels are open (max_tunnels)`;
    }
    const now = performance.now();
    const rate = this.#config.maxTunnelRate;
    this.#tokens = Math.min(rate, this.#tokens + (now - this.#refilled) * rate / 1000);
    this.#refilled = now;
    if (this.#tokens < 1) return `more than ${rate} tunnels a second (max_tunnel_rate)`;
    this.#tokens--;
    return null;
  }

  async #run(stream: MuxStream, request: OpenRequest): Promise<void> {
    const target = `${request.host}:${request.port}`;
    let local: Stream;
    try {
      local = await connectTcp(request.host, request.port);
    } catch (err) {
      const reason = `cannot connect to ${target}: ${(err as Error).message}`;
      stream.reset(reason);
      throw new Error(reason);
    }
    if (stream.isClosed()) return local.close();
    this.#streams.add(stream);
    const started = performance.now();
    // Bytes first, then the log line: formatting it is no reason for the user to wait.
    const relayed = relay(local, stream);
    logger.info("tunnel open: user {user} → {target}", { user: request.user, target });
    const result = await relayed;
    this.#streams.delete(stream);
    logger.info(
      "tunnel closed: user {user} → {target}; {up} bytes up, {down} bytes down, {ms} ms" +
        (result.error ? " (cut short: {error})" : ""),
      {
        user: request.user,
        target,
        up: result.received,
        down: result.sent,
        ms: Math.round(performance.now() - started),
        error: result.error?.message,
      },
    );
  }

  /** Waits for live tunnels up to `graceMs`, then cuts the rest. */
  async drain(graceMs: number): Promise<void> {
    if (this.#live.size === 0) return;
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      this.all(),
      new Promise<void>((resolve) => timer = setTimeout(resolve, graceMs)),
    ]);
    clearTimeout(timer);
    for (const stream of this.#streams) stream.reset("the client is shutting down");
    await this.all();
  }
}
