/**
 * Defences of the server against hostile peers that are not about the protocol itself:
 * a growing delay for an address and name that keep failing authentication, and source allow
 * lists.
 * @module
 */
import { BlockList, isIPv4, isIPv6 } from "node:net";

/** Failed authentications of one address and name before their refusals slow down. */
export const AUTH_FREE_FAILURES = 2;

/** Delay after the first failure beyond the free ones; it doubles with each further one. */
export const AUTH_DELAY_FIRST_MS = 250;

/**
 * Longest delay before a refusal: well below the client's own step timeout
 * (`AUTH_STEP_TIMEOUT_MS`, 10 s), so even a penalised client hears why it was refused.
 */
export const AUTH_DELAY_MAX_MS = 2_000;

/** An address's failures are forgotten after this long without another. */
export const AUTH_FAILURE_MEMORY_MS = 15 * 60_000;

/** Addresses remembered at most; the oldest is forgotten first beyond this. */
export const AUTH_FAILURE_ADDRESSES = 10_000;

/**
 * Tracks authentication failures per key (the server uses "address name") and says how long
 * to stall the next refusal. Only refusals wait: a correct signature is never delayed.
 */
export class AuthPenalty {
  #failures = new Map<string, { count: number; last: number }>();

  /** Records a failure from `address`. */
  fail(address: string, now = Date.now()): void {
    const entry = this.#failures.get(address);
    this.#failures.delete(address); // re-insert: the map's order is oldest-first
    this.#failures.set(address, {
      count: entry && now - entry.last < AUTH_FAILURE_MEMORY_MS ? entry.count + 1 : 1,
      last: now,
    });
    if (this.#failures.size > AUTH_FAILURE_ADDRESSES) {
      this.#failures.delete(this.#failures.keys().next().value!);
    }
  }

  /** Milliseconds to wait before answering `address`; 0 for one in good standing. */
  delay(address: string, now = Date.now()): number {
    const entry = this.#failures.get(address);
    if (!entry || now - entry.last >= AUTH_FAILURE_MEMORY_MS) return 0;
    const over = entry.count - AUTH_FREE_FAILURES;
    if (over <= 0) return 0;
    return Math.min(AUTH_DELAY_MAX_MS, AUTH_DELAY_FIRST_MS * 2 ** (over - 1));
  }

  /** Forgets `address`'s failures after it authenticates. */
  succeed(address: string): void {
    this.#failures.delete(address);
  }
}

/** A set of IPv4 and IPv6 networks, from `["203.0.113.0/24", "2001:db8::/32"]`. */
export class Networks {
  #list = new BlockList();

  /** Parses CIDR strings; throws naming the first that is not one. */
  constructor(readonly cidrs: string[]) {
    for (const cidr of cidrs) {
      const m = /^([^/]+)(?:\/(\d{1,3}))?$/.exec(cidr);
      const address = m?.[1] ?? "";
      const type = isIPv4(address) ? "ipv4" : isIPv6(address) ? "ipv6" : undefined;
      const prefix = m?.[2] === undefined ? (type === "ipv4" ? 32 : 128) : Number(m[2]);
      if (!type || prefix > (type === "ipv4" ? 32 : 128)) {
        throw new Error(`"${cidr}" is not an IPv4 or IPv6 network such as "203.0.113.0/24"`);
      }
      this.#list.addSubnet(address, prefix, type);
    }
  }

  /** Whether `address` (IPv4, IPv6, or IPv4-mapped IPv6) is in one of the networks. */
  has(address: string): boolean {
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
    if (mapped) return this.#list.check(mapped[1], "ipv4");
    if (isIPv4(address)) return this.#list.check(address, "ipv4");
    return isIPv6(address) && this.#list.check(address, "ipv6");
  }
}
