/**
 * The one wording for a port that cannot be opened, whichever port it is and whichever API
 * (Deno's or node's) failed: `cannot listen on HOST:PORT (KEY): REASON`.
 * @module
 */

/** Why listening failed, in words, from a Deno error class or a node error code. */
function reason(err: unknown): string {
  const e = err as Error & { code?: string };
  if (e instanceof Deno.errors.AddrInUse || e?.code === "EADDRINUSE") {
    return "the port is in use by another program";
  }
  if (e instanceof Deno.errors.AddrNotAvailable || e?.code === "EADDRNOTAVAIL") {
    return "this machine has no such address";
  }
  if (e instanceof Deno.errors.NotCapable) {
    return "Deno's --allow-net does not grant it (run with the flags --print-permissions prints)";
  }
  if (e instanceof Deno.errors.PermissionDenied || e?.code === "EACCES") {
    return "permission denied (ports below 1024 need privileges)";
  }
  // node's messages repeat the call and address: "listen EINVAL: invalid argument 1.2.3.4:5".
  const message = String(e?.message ?? err);
  return message.replace(/^listen \w+: /, "").replace(/ \S+:\d+$/, "");
}

/**
 * The error for a listener on `host`:`port` that `err` stopped, naming the config key that set
 * the port (`communication_port`, `services.10022`, `status_port`).
 */
export function listenError(host: string, port: number, key: string, err: unknown): Error {
  const where = host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
  return new Error(`cannot listen on ${where} (${key}): ${reason(err)}`);
}
