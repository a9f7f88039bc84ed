/**
 * Soak helper: runs several NATadm clients in one process, one per config file given, so that
 * a 2-core machine can host hundreds of client identities with real TLS control and data
 * connections. `deno run --allow-net --allow-read soak/host.ts CONFIG...`
 * @module
 */
import { loadClientConfig } from "../src/config.ts";
import { Client } from "../src/client.ts";
import { setupLogging } from "../src/log.ts";

await setupLogging("warning");
const clients = await Promise.all(
  Deno.args.map(async (file) => new Client(await loadClientConfig(file))),
);
const stop = () => {
  for (const client of clients) client.stop();
};
Deno.addSignalListener("SIGTERM", stop);
Deno.addSignalListener("SIGINT", stop);
const codes = await Promise.all(clients.map((client) => client.run()));
Deno.exit(codes.find((code) => code !== 0) ?? 0);
