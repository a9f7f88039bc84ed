/**
 * The service ports: one public TCP listener per entry of `services`, each handing its users
 * to the pairing, and kept in step with the config on reload.
 * @module
 */
import type { ServiceConfig } from "./config.ts";
import { ConnStream, type Stream } from "./transport.ts";
import { acceptLoop } from "./accept.ts";
import { listenError } from "./listen_error.ts";

/** Open service ports by port number, with the service each serves now. */
export class ServiceListeners {
  #host: string;
  #onUser: (user: Stream, service: ServiceConfig) => void;
  #ports = new Map<number, { listener: Deno.Listener; service: ServiceConfig }>();

  constructor(host: string, onUser: (user: Stream, service: ServiceConfig) => void) {
    this.#host = host;
    this.#onUser = onUser;
  }

  /** Opens a service's public port; throws a one-line error naming the port. */
  open(service: ServiceConfig): void {
    let listener: Deno.Listener;
    try {
      listener = Deno.listen({ hostname: this.#host, port: service.port });
    } catch (err) {
      throw listenError(this.#host, service.port, `services.${service.port}`, err);
    }
    const entry = { listener, service };
    this.#ports.set(service.port, entry);
    acceptLoop(listener, (conn) => {
      (conn as Deno.TcpConn).setNoDelay(true);
      // The entry's service, not the one at open: a reload may have changed it.
      if (this.#ports.get(service.port) === entry) {
        this.#onUser(new ConnStream(conn), entry.service);
      } else conn.close();
    }, `service port ${service.port}`);
  }

  /**
   * Brings the open ports in line with `services`: new ones listen, removed ones stop (their
   * live tunnels run on), changed ones apply to their next user. A port that cannot open is
   * reported in `failed` and the rest go ahead.
   */
  reconcile(services: ServiceConfig[]): {
    added: number;
    removed: number;
    changed: number;
    failed: string[];
  } {
    const wanted = new Map(services.map((s) => [s.port, s]));
    let added = 0, removed = 0, changed = 0;
    const failed: string[] = [];
    for (const [port, entry] of this.#ports) {
      const service = wanted.get(port);
      if (!service) {
        entry.listener.close();
        this.#ports.delete(port);
        removed++;
      } else if (JSON.stringify(service) !== JSON.stringify(entry.service)) {
        entry.service = service;
        changed++;
      }
    }
    for (const service of services) {
      if (this.#ports.has(service.port)) continue;
      try {
        this.open(service);
        added++;
      } catch (err) {
        failed.push((err as Error).message);
      }
    }
    return { added, removed, changed, failed };
  }

  /** Stops accepting on every port. */
  close(): void {
    for (const { listener } of this.#ports.values()) listener.close();
    this.#ports.clear();
  }
}
