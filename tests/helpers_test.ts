/** The test helpers themselves: what every other test relies on them for. */
import assert from "node:assert/strict";
import { freePort } from "./helpers.ts";

Deno.test("freePort: never hands out a port the kernel may give an outgoing connection", async () => {
  const [low, high] = (await Deno.readTextFile("/proc/sys/net/ipv4/ip_local_port_range"))
    .trim().split(/\s+/).map(Number);
  const ports = Array.from({ length: 50 }, () => freePort());
  for (const port of ports) {
    assert.ok(port < low || port > high, `port ${port} is in the ephemeral range ${low}-${high}`);
    const listener = Deno.listen({ hostname: "0.0.0.0", port });
    listener.close();
  }
  assert.equal(new Set(ports).size, ports.length, "a port was handed out twice");
});
