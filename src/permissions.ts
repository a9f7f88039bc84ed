/**
 * The exact Deno permissions each program needs for its config, so that production runs can
 * grant nothing more: Deno itself then refuses any other connection or file.
 * @module
 */
import { dirname } from "node:path";
import type { ClientConfig, ServerConfig } from "./config.ts";

function netHost(host: string): string {
  return host.includes(":") ? `[${host}]` : host;
}

/**
 * Flags for the server: listen on its ports (nothing outbound), read its config and certs, and
 * with `watch` (for `--watch-config`) the config's directory, which the watch needs.
 */
export function serverPermissions(config: ServerConfig, watch = false): string[] {
  const host = netHost(config.listenHost);
  const listen = [config.communicationPort, ...config.services.map((s) => s.port)].map((p) =>
    `${host}:${p}`
  );
  if (config.status) listen.push(`${netHost(config.status.host)}:${config.status.port}`);
  return [
    `--allow-net=${listen.join(",")}`,
    `--allow-read=${[watch ? dirname(config.file) : config.file, ...config.readFiles].join(",")}`,
  ];
}

/** Flags for the client: connect to the server and its allowed targets, read its files. */
export function clientPermissions(config: ClientConfig): string[] {
  const targets = config.allow
    ? config.allow.map((t) => `${netHost(t.host)}:${t.port}`)
    : ["localhost", "127.0.0.1", "[::1]"];
  return [
    `--allow-net=${[`${netHost(config.remoteHost)}:${config.remotePort}`, ...targets].join(",")}`,
    `--allow-read=${[config.file, ...config.readFiles].join(",")}`,
  ];
}
