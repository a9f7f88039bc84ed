/**
 * Links between the servers of a cluster: each server listens on its `peer_port` for TLS from
 * the others, and both ends must present a certificate signed by the cluster's CA (mutual
 * TLS). A link is a {@link Mux} on which only the dialling server opens streams, each with a
 * {@link PeerOpen} payload naming a client the other server holds; the other server relays the
 * stream with a new stream on that client's connection. One link per peer server, reused by
 * every tunnel to it, and dialled again when it fails.
 *
 * Each server keeps a link to every member of the cluster and announces, on the links it
 * accepted, the etcd revision of its registry; the dialling side can then ask for the whole
 * registry on a stream, which is how a server cut off from etcd catches up from its peers.
 * @module
 */
import * as tls from "node:tls";
import type { ClusterSettings } from "./config.ts";
import {
  decodePeerOpen,
  decodeSnapshot,
  encodePeerOpen,
  encodeRegistryRequest,
  encodeSnapshot,
  MAX_SNAPSHOT_BYTES,
  type Message,
  type OpenRequest,
  type PeerOpen,
  ProtocolError,
  type RegistrySnapshot,
} from "./protocol.ts";
import type { SharedRegistry } from "./etcd_registry.ts";
import { Mux, type MuxStream } from "./mux.ts";
import {
  HANDSHAKE_TIMEOUT_MS,
  listenTls,
  SocketStream,
  type Stream,
  type TlsListener,
} from "./transport.ts";
import { listenError } from "./listen_error.ts";
import type { TunnelTarget } from "./tunnels.ts";
import { log } from "./log.ts";

const logger = log("cluster");

/** Heartbeat of a peer link, both ways. */
const PEER_INTERVAL_MS = 2000;
/** Streams open at once on one link at most (each side's own limits apply per client). */
const MAX_PEER_STREAMS = 1 << 20;

/** A peer's registry must arrive within this long. */
const SNAPSHOT_TIMEOUT_MS = 5000;

/** What the accepting server does with a stream a peer opened. */
export type PeerOpenHandler = (stream: MuxStream, request: PeerOpen, from: string) => void;

/** What a server gives its peer links. */
export interface PeerHandlers {
  /** A peer opened a tunnel to a client of ours. */
  onOpen: PeerOpenHandler;
  /** The registry this server announces and hands to peers that ask. */
  registry?: SharedRegistry;
  /** A server we dialled (at `peer`, `host:port`) announced its registry's revision. */
  onRevision?: (peer: string, revision: number) => void;
}

/** A client another server holds, reached over the peer link to that server. */
export class Forward implements TunnelTarget {
  readonly #mux: Mux;
  /** @param via the id of the server that holds client `name` */
  constructor(readonly name: string, readonly via: string, mux: Mux) {
    this.#mux = mux;
  }

  /** Whether the link to that server is gone. */
  get closed(): boolean {
    return this.#mux.closed;
  }

  /** Opens a stream to `host:port` of the client on the link, for `user`. */
  open(request: OpenRequest): MuxStream {
    return this.#mux.open(encodePeerOpen({
      client: this.name,
      host: request.host,
      port: request.port,
      by: request.user,
    }));
  }
}

/** This server's peer port and its links to the other servers. */
export class Peers {
  readonly #settings: ClusterSettings;
  readonly #listenHost: string;
  readonly #handlers: PeerHandlers;
  #listener: TlsListener | undefined;
  #tick: ReturnType<typeof setInterval> | undefined;
  /** The peer addresses of the other members, as the cluster's records say. */
  #members: () => string[] = () => [];
  /** Members whose last dial failed (their failure was logged once). */
  readonly #failing = new Set<string>();
  /** Links this server dialled, by peer address; a pending dial is shared. */
  readonly #links = new Map<string, Promise<Mux>>();
  /** Links this server dialled that are up, by peer address. */
  readonly #up = new Map<string, Mux>();
  /** Links other servers dialled to us. */
  readonly #accepted = new Set<Mux>();
  #closed = false;

  constructor(settings: ClusterSettings, listenHost: string, handlers: PeerHandlers) {
    this.#settings = settings;
    this.#listenHost = listenHost;
    this.#handlers = handlers;
  }

  /**
   * Keeps a link to every member `members()` names (`host:port` of their peer ports, this
   * server's left out), and announces this server's registry revision on every accepted
   * link, each heartbeat.
   */
  keepLinks(members: () => string[]): void {
    this.#members = members;
    clearInterval(this.#tick);
    this.#tick = setInterval(() => {
      this.linkMembers();
      this.announce();
    }, PEER_INTERVAL_MS);
    this.linkMembers();
  }

  /** Dials every member {@link keepLinks} names that has no link yet (at once, not next tick). */
  linkMembers(): void {
    if (this.#closed) return;
    for (const peer of this.#members()) {
      if (this.#links.has(peer)) continue;
      this.link(peer).then(() => this.#failing.delete(peer), (err) => {
        if (this.#failing.has(peer)) return;
        this.#failing.add(peer);
        logger.warn("cannot link to cluster member {peer}: {error}", {
          peer,
          error: (err as Error).message,
        });
      });
    }
  }

  /** Tells every server linked to us the revision of our registry. */
  announce(): void {
    const registry = this.#handlers.registry;
    if (!registry) return;
    for (const mux of this.#accepted) {
      mux.sendControl({ type: "registry", revision: registry.revision }).catch(() => {});
    }
  }

  /** The registry of the server at `peer`, asked for on our link to it. */
  async fetchRegistry(peer: string): Promise<RegistrySnapshot> {
    const mux = await this.link(peer);
    const stream = mux.open(encodeRegistryRequest());
    const timer = setTimeout(
      () => stream.reset(`no registry from ${peer} within ${SNAPSHOT_TIMEOUT_MS} ms`),
      SNAPSHOT_TIMEOUT_MS,
    );
    try {
      await stream.closeWrite();
      const chunks: Uint8Array[] = [];
      let size = 0;
      const buffer = new Uint8Array(64 * 1024);
      for (;;) {
        const n = await stream.read(buffer);
        if (n === null) break;
        size += n;
        if (size > MAX_SNAPSHOT_BYTES) {
          stream.reset("registry snapshot too large");
          throw new ProtocolError(`peer ${peer}: registry over ${MAX_SNAPSHOT_BYTES} bytes`);
        }
        chunks.push(buffer.slice(0, n));
      }
      const bytes = new Uint8Array(size);
      let at = 0;
      for (const chunk of chunks) {
        bytes.set(chunk, at);
        at += chunk.length;
      }
      try {
        return decodeSnapshot(bytes);
      } catch (err) {
        throw new ProtocolError(`peer ${peer}: ${(err as Error).message}`);
      }
    } finally {
      clearTimeout(timer);
    }
  }

  /** The peer port actually bound. */
  get port(): number {
    return this.#listener?.port ?? this.#settings.peerPort;
  }

  /** Listens on `peer_port`; throws a one-line error naming the key if it cannot. */
  async listen(): Promise<void> {
    const { peerPort, certPem, keyPem, caPem } = this.#settings;
    try {
      this.#listener = await listenTls({
        hostname: this.#listenHost,
        port: peerPort,
        cert: certPem,
        key: keyPem,
        clientCa: caPem,
        name: "peer port",
        onConnection: (stream) => this.#accept(stream),
        onHandshakeError: (remote, err) =>
          logger.warn("peer link from {remote} refused in its TLS handshake: {error}", {
            remote,
            error: err.message,
          }),
      });
    } catch (err) {
      throw listenError(this.#listenHost, peerPort, "peer_port", err);
    }
  }

  /** A server dialled us and showed a certificate of the cluster's CA: serve its streams. */
  async #accept(stream: Stream): Promise<void> {
    stream.limitUnread?.(undefined);
    const from = stream.remote;
    const mux: Mux = new Mux(stream, {
      onOpen: (tunnel, payload) => {
        let request: ReturnType<typeof decodePeerOpen>;
        try {
          request = decodePeerOpen(payload);
        } catch (err) {
          throw new ProtocolError(`peer ${from}: ${(err as Error).message}`);
        }
        if ("registry" in request) return this.#sendRegistry(tunnel, from);
        this.#handlers.onOpen(tunnel, request, from);
        // Its reader is the client's stream, with credit of its own: judged by that, this
        // window would never grow, and the extra hop would halve a bulk upload. (After the
        // open, so that the client's stream goes out first.)
        tunnel.widen(mux.maxWindow);
      },
      onControl: (message: Message) => {
        if (message.type === "ping") return;
        throw new ProtocolError(`unexpected "${message.type}" from peer ${from}`);
      },
    }, { maxStreams: MAX_PEER_STREAMS, rttMs: 1 });
    this.#accepted.add(mux);
    logger.info("peer link from {remote} up", { remote: from });
    mux.startHeartbeat(PEER_INTERVAL_MS);
    const registry = this.#handlers.registry;
    if (registry) {
      mux.sendControl({ type: "registry", revision: registry.revision }).catch(() => {});
    }
    const reason = await mux.run();
    this.#accepted.delete(mux);
    logger.info("peer link from {remote} down ({reason})", {
      remote: from,
      reason: reason.message,
    });
  }

  /** A peer asked for our registry: it goes on the stream, which then ends. */
  async #sendRegistry(stream: MuxStream, from: string): Promise<void> {
    const registry = this.#handlers.registry;
    if (!registry) return stream.reset("this server's registry is not in etcd");
    try {
      await stream.write(encodeSnapshot(registry.snapshot()));
      await stream.closeWrite();
    } catch (err) {
      logger.info("registry for peer {remote} not sent: {error}", {
        remote: from,
        error: (err as Error).message,
      });
    }
  }

  /** The link to the server at `peer` (`host:port`): the open one, or a new one. */
  link(peer: string): Promise<Mux> {
    if (this.#closed) return Promise.reject(new Error("server closed"));
    const known = this.#links.get(peer);
    if (known) return known;
    const dial = this.#dial(peer);
    this.#links.set(peer, dial);
    dial.then((mux) => {
      this.#up.set(peer, mux);
      mux.run().then((reason) => {
        if (this.#links.get(peer) === dial) this.#links.delete(peer);
        if (this.#up.get(peer) === mux) this.#up.delete(peer);
        logger.info("peer link to {peer} down ({reason})", { peer, reason: reason.message });
      });
    }, () => {
      if (this.#links.get(peer) === dial) this.#links.delete(peer);
    });
    return dial;
  }

  /** Whether a link to `peer` is up (not just being dialled). */
  isUp(peer: string): boolean {
    const mux = this.#up.get(peer);
    return mux !== undefined && !mux.closed;
  }

  async #dial(peer: string): Promise<Mux> {
    const cut = peer.lastIndexOf(":");
    const host = peer.slice(0, cut).replace(/^\[(.*)\]$/, "$1");
    const port = Number(peer.slice(cut + 1));
    const { certPem, keyPem, caPem } = this.#settings;
    const started = performance.now();
    const socket = await new Promise<tls.TLSSocket>((resolve, reject) => {
      const socket = tls.connect({
        host,
        port,
        cert: certPem,
        key: keyPem,
        ca: caPem,
        minVersion: "TLSv1.2",
      });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`peer ${peer}: no TLS handshake within ${HANDSHAKE_TIMEOUT_MS} ms`));
      }, HANDSHAKE_TIMEOUT_MS);
      socket.once("secureConnect", () => {
        clearTimeout(timer);
        socket.off("error", fail);
        resolve(socket);
      });
      const fail = (err: Error) => {
        clearTimeout(timer);
        socket.destroy();
        reject(new Error(`peer ${peer}: ${err.message}`));
      };
      socket.once("error", fail);
    });
    socket.setNoDelay(true);
    const stream = new SocketStream(socket);
    const mux = new Mux(stream, {
      onControl: (message: Message) => {
        if (message.type === "ping") return;
        if (message.type === "registry") return this.#handlers.onRevision?.(peer, message.revision);
        throw new ProtocolError(`unexpected "${message.type}" from peer ${peer}`);
      },
    }, { maxStreams: MAX_PEER_STREAMS, rttMs: performance.now() - started });
    mux.startHeartbeat(PEER_INTERVAL_MS);
    logger.info("peer link to {peer} up", { peer });
    if (this.#closed) mux.close(new Error("server closed"));
    return mux;
  }

  /** Stops listening and closes every link. */
  close(): void {
    this.#closed = true;
    clearInterval(this.#tick);
    this.#listener?.close();
    for (const mux of this.#accepted) mux.close(new Error("server closed"));
    for (const dial of this.#links.values()) {
      dial.then((mux) => mux.close(new Error("server closed")), () => {});
    }
    this.#links.clear();
  }
}
