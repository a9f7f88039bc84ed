import assert from "node:assert/strict";
import { join } from "node:path";
import {
  clientToml,
  connectUser,
  errorLine,
  Fixture,
  freePort,
  Program,
  readExactly,
  ROOT,
  serverToml,
  startClient,
  startEcho,
  startServer,
  waitUntil,
} from "./helpers.ts";
import { VERSION } from "../src/version.ts";
import { PROTOCOL_VERSION } from "../src/protocol.ts";
import { hostAllowed, type StatusDocument } from "../src/status.ts";

/** A client name that needs escaping everywhere: HTML, JSON and Prometheus labels. */
const ODD_NAME = 'R&D <i>"nas\\2"</i>';

/**
 * A live server with a status page: client "foo bar" connected and serving an echo service
 * with one open tunnel that has carried `SENT` bytes each way, and client {@link ODD_NAME}
 * configured but absent, with one user waiting on its service.
 */
async function liveSetup(extra = "") {
  const fixture = await Fixture.create();
  const foo = await fixture.identity("foo bar");
  const odd = await fixture.identity(ODD_NAME);
  const echo = startEcho();
  const communicationPort = freePort();
  const fooPort = freePort();
  const oddPort = freePort();
  const statusPort = freePort();
  const serverConfig = await fixture.write(
    "server.toml",
    serverToml({
      communicationPort,
      clients: [foo, odd],
      services: [
        { port: fooPort, name: foo.name, targetPort: echo.port },
        { port: oddPort, name: odd.name, targetPort: 22 },
      ],
      extra: `status_port = ${statusPort}\n${extra}`,
    }),
  );
  const clientConfig = await fixture.write(
    "client.toml",
    clientToml({ identity: foo, communicationPort }),
  );
  const server = await startServer(serverConfig);
  const programs: Program[] = [server];
  const conns: Deno.Conn[] = [];
  const cleanup = async () => {
    for (const c of conns) {
      try {
        c.close();
      } catch {
        // Already closed.
      }
    }
    for (const p of programs) await p.stop();
    echo.close();
    await fixture.cleanup();
  };
  try {
    await server.waitFor(new RegExp(`status page on http://127\\.0\\.0\\.1:${statusPort}/`));
    programs.push(await startClient(clientConfig));
    const user = await connectUser(fooPort);
    conns.push(user);
    const payload = crypto.getRandomValues(new Uint8Array(SENT));
    await user.write(payload);
    assert.deepEqual(await readExactly(user, SENT), payload);
    const waiting = await connectUser(oddPort);
    conns.push(waiting);
    const userAddr = user.localAddr as Deno.NetAddr;
    return {
      base: `http://127.0.0.1:${statusPort}`,
      server,
      fooPort,
      oddPort,
      echoPort: echo.port,
      userAddress: `${userAddr.hostname}:${userAddr.port}`,
      closeUser: () => user.close(),
      cleanup,
    };
  } catch (err) {
    await cleanup();
    throw err;
  }
}

const SENT = 1234;

async function getJson(url: string, token?: string): Promise<StatusDocument> {
  const res = await fetch(url, { headers: token ? { authorization: `Bearer ${token}` } : {} });
  assert.equal(res.status, 200, `${url}: ${await res.clone().text()}`);
  assert.match(res.headers.get("content-type") ?? "", /^application\/json/);
  return await res.json();
}

/** Waits until the status document shows the tunnel with every byte counted, and the waiter. */
function settled(base: string, token?: string): Promise<StatusDocument> {
  return waitUntil(async () => {
    const doc = await getJson(`${base}/status.json`, token);
    const t = doc.tunnels[0];
    const ready = t?.bytes_up === SENT && t.bytes_down === SENT &&
      doc.services.some((s) => s.waiting_users === 1);
    return ready ? doc : undefined;
  }, "a live tunnel with all bytes counted and one waiting user on /status.json");
}

Deno.test("/status.json shows the connected client, every service and the live tunnel", async () => {
  const env = await liveSetup();
  try {
    const doc = await settled(env.base);
    assert.equal(doc.version, VERSION);
    assert(doc.uptime_seconds >= 0 && doc.uptime_seconds < 600, String(doc.uptime_seconds));
    assert(!Number.isNaN(Date.parse(doc.started)));
    assert.equal(doc.auth_failures, 0);

    assert.equal(doc.clients.length, 2);
    const foo = doc.clients.find((c) => c.name === "foo bar")!;
    assert.equal(foo.connected, true);
    assert.match(foo.remote ?? "", /^127\.0\.0\.1:\d+$/);
    assert.equal(foo.protocol_version, PROTOCOL_VERSION);
    for (const t of [foo.connected_since, foo.last_heartbeat]) {
      assert(t !== null && Math.abs(Date.parse(t) - Date.now()) < 120_000, String(t));
    }
    const odd = doc.clients.find((c) => c.name === ODD_NAME)!;
    assert.deepEqual(
      [odd.connected, odd.remote, odd.connected_since, odd.protocol_version],
      [false, null, null, null],
    );

    const fooService = doc.services.find((s) => s.port === env.fooPort)!;
    assert.deepEqual(
      fooService,
      {
        port: env.fooPort,
        client: "foo bar",
        target: `localhost:${env.echoPort}`,
        live_tunnels: 1,
        waiting_users: 0,
        tunnels_total: 1,
        bytes_up: SENT,
        bytes_down: SENT,
      },
    );
    const oddService = doc.services.find((s) => s.port === env.oddPort)!;
    assert.equal(oddService.client, ODD_NAME);
    assert.equal(oddService.waiting_users, 1);
    assert.equal(oddService.live_tunnels, 0);

    assert.equal(doc.tunnels.length, 1);
    const [tunnel] = doc.tunnels;
    assert.equal(tunnel.user, env.userAddress);
    assert.equal(tunnel.service, env.fooPort);
    assert.equal(tunnel.client, "foo bar");
    assert(Math.abs(Date.parse(tunnel.started) - Date.now()) < 120_000);
  } finally {
    await env.cleanup();
  }
});

/** One sample of the exposition: metric name, labels, value. */
interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

const NAME = "[a-zA-Z_:][a-zA-Z0-9_:]*";
const LABEL_VALUE = String.raw`"(?:[^"\\\n]|\\[\\"n])*"`;
const LABEL = `[a-zA-Z_][a-zA-Z0-9_]*=${LABEL_VALUE}`;
const VALUE = String.raw`(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|NaN|[+-]Inf)`;
const SAMPLE_LINE = new RegExp(
  `^(${NAME})(?:\\{((?:${LABEL})(?:,${LABEL})*,?)?\\})? (${VALUE})(?: -?\\d+)?$`,
);

/**
 * Parses Prometheus text exposition strictly: every line is a HELP, a TYPE or a sample in the
 * format's grammar, and every sample belongs to a family with HELP and TYPE given before it.
 */
function parseExposition(text: string): { samples: Sample[]; types: Map<string, string> } {
  assert(text.endsWith("\n"), "exposition must end with a line feed");
  const help = new Set<string>();
  const types = new Map<string, string>();
  const samples: Sample[] = [];
  text.slice(0, -1).split("\n").forEach((line, i) => {
    const at = `line ${i + 1}: ${JSON.stringify(line)}`;
    let m: RegExpMatchArray | null;
    if ((m = line.match(new RegExp(`^# HELP (${NAME}) (.*)$`)))) {
      assert(!help.has(m[1]), `${at}: second HELP for ${m[1]}`);
      help.add(m[1]);
    } else if (
      (m = line.match(new RegExp(`^# TYPE (${NAME}) (counter|gauge|histogram|summary|untyped)$`)))
    ) {
      assert(!types.has(m[1]), `${at}: second TYPE for ${m[1]}`);
      types.set(m[1], m[2]);
    } else if ((m = line.match(SAMPLE_LINE))) {
      const [, name, labelText, value] = m;
      assert(help.has(name) && types.has(name), `${at}: no HELP and TYPE before the sample`);
      const labels: Record<string, string> = {};
      for (const l of (labelText ?? "").matchAll(new RegExp(`(\\w+)=(${LABEL_VALUE})`, "g"))) {
        assert(!(l[1] in labels), `${at}: label ${l[1]} twice`);
        labels[l[1]] = l[2].slice(1, -1).replace(
          /\\(.)/g,
          (_, c: string) => c === "n" ? "\n" : c,
        );
      }
      samples.push({ name, labels, value: Number(value.replace("Inf", "Infinity")) });
    } else {
      assert.fail(`${at}: not a HELP, TYPE or sample line of the exposition format`);
    }
  });
  for (const name of types.keys()) {
    assert(help.has(name), `${name} has TYPE but no HELP`);
  }
  return { samples, types };
}

Deno.test("/metrics is valid Prometheus exposition with the server's numbers", async () => {
  const env = await liveSetup();
  try {
    await settled(env.base);
    const res = await fetch(`${env.base}/metrics`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
    const text = await res.text();
    const { samples, types } = parseExposition(text);
    const value = (name: string, labels: Record<string, string> = {}) => {
      const found = samples.filter((s) =>
        s.name === name && JSON.stringify(Object.entries(s.labels).sort()) ===
          JSON.stringify(Object.entries(labels).sort())
      );
      assert.equal(found.length, 1, `one sample ${name}${JSON.stringify(labels)} in:\n${text}`);
      return found[0].value;
    };
    const foo = String(env.fooPort);
    const odd = String(env.oddPort);
    assert.equal(value("natadm_up"), 1);
    assert(value("natadm_uptime_seconds") >= 0);
    assert.equal(value("natadm_clients_configured"), 2);
    assert.equal(value("natadm_clients_connected"), 1);
    assert.equal(value("natadm_client_connected", { client: "foo bar" }), 1);
    // The odd name comes back intact through the label escaping.
    assert.equal(value("natadm_client_connected", { client: ODD_NAME }), 0);
    assert.equal(value("natadm_tunnels_active"), 1);
    assert.equal(value("natadm_tunnels_active_by_service", { service: foo, client: "foo bar" }), 1);
    assert.equal(value("natadm_tunnels_active_by_service", { service: odd, client: ODD_NAME }), 0);
    assert.equal(value("natadm_tunnels_total", { service: foo }), 1);
    assert.equal(value("natadm_tunnels_total", { service: odd }), 0);
    assert.equal(value("natadm_bytes_total", { service: foo, direction: "up" }), SENT);
    assert.equal(value("natadm_bytes_total", { service: foo, direction: "down" }), SENT);
    assert.equal(value("natadm_bytes_total", { service: odd, direction: "up" }), 0);
    assert.equal(value("natadm_auth_failures_total"), 0);
    assert.equal(value("natadm_pending_users", { service: foo }), 0);
    assert.equal(value("natadm_pending_users", { service: odd }), 1);
    for (
      const counter of ["natadm_tunnels_total", "natadm_bytes_total", "natadm_auth_failures_total"]
    ) {
      assert.equal(types.get(counter), "counter", counter);
    }
    assert.equal(types.get("natadm_tunnels_active"), "gauge");
    assert(text.includes('natadm_client_connected{client="R&D <i>\\"nas\\\\2\\"</i>"} 0\n'), text);
  } finally {
    await env.cleanup();
  }
});

Deno.test("with status_token, every endpoint needs the Bearer token; / also takes ?token=", async () => {
  const token = "s3cret-Token/with+chars";
  const env = await liveSetup(`status_token = "${token}"`);
  try {
    const status = async (path: string, init: RequestInit = {}) => {
      const res = await fetch(`${env.base}${path}`, init);
      await res.body?.cancel();
      return res.status;
    };
    const bearer = (t: string) => ({ headers: { authorization: `Bearer ${t}` } });
    for (const path of ["/", "/status.json", "/metrics", "/nope"]) {
      assert.equal(await status(path), 401, `${path} without a token`);
      assert.equal(await status(path, bearer("wrong")), 401, `${path} with a wrong token`);
      assert.equal(await status(path, bearer(token + "x")), 401, `${path} with a longer token`);
    }
    assert.equal(await status("/status.json", bearer(token)), 200);
    assert.equal(await status("/metrics", bearer(token)), 200);
    assert.equal(await status("/", bearer(token)), 200);
    const q = `?token=${encodeURIComponent(token)}`;
    assert.equal(await status(`/${q}`), 200, "the dashboard with ?token=");
    assert.equal(await status(`/?token=wrong`), 401);
    assert.equal(await status(`/status.json${q}`), 401, "?token= is only for the page");
    assert.equal(await status(`/metrics${q}`), 401, "?token= is only for the page");
    const res = await fetch(`${env.base}/`);
    assert.equal(res.headers.get("www-authenticate"), 'Bearer realm="natadm"');
    assert.match(await res.text(), /\?token=/);
    // Authorized, but unknown path or method.
    assert.equal(await status("/nope", bearer(token)), 404);
    assert.equal(await status("/status.json", { method: "POST", ...bearer(token) }), 405);
    const doc = await settled(env.base, token);
    assert.equal(doc.tunnels.length, 1);
  } finally {
    await env.cleanup();
  }
});

Deno.test("without a token: unknown paths are 404, other methods 405, the page is HTML", async () => {
  const env = await liveSetup();
  try {
    const fetchStatus = async (path: string, method = "GET") => {
      const res = await fetch(`${env.base}${path}`, { method });
      const text = await res.text();
      return { status: res.status, text, type: res.headers.get("content-type") ?? "", res };
    };
    assert.equal((await fetchStatus("/nope")).status, 404);
    assert.equal((await fetchStatus("/status.json/x")).status, 404);
    const post = await fetchStatus("/metrics", "POST");
    assert.equal(post.status, 405);
    assert.equal(post.res.headers.get("allow"), "GET");
    assert.equal((await fetchStatus("/", "DELETE")).status, 405);
    const page = await fetchStatus("/");
    assert.equal(page.status, 200);
    assert.match(page.type, /^text\/html/);
    assert.match(page.text, /<meta name="viewport" content="width=device-width/);
    assert.doesNotMatch(page.text, /(src|href)="(https?:)?\/\//, "no external assets");
  } finally {
    await env.cleanup();
  }
});

/**
 * The status line of a raw HTTP/1.1 GET with exactly the `Host` header given (none when
 * undefined): fetch() would send its own.
 */
async function statusWithHost(
  port: number,
  path: string,
  host: string | undefined,
  extra = "",
): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    const head = host === undefined
      ? `GET ${path} HTTP/1.0\r\n`
      : `GET ${path} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n`;
    await conn.write(new TextEncoder().encode(`${head}${extra}\r\n`));
    const buf = new Uint8Array(4096);
    const n = await Promise.race([
      conn.read(buf),
      new Promise<never>((_, reject) =>
        setTimeout(() => reject(new Error("no reply in 10 s")), 10_000)
      ),
    ]);
    const text = new TextDecoder().decode(buf.subarray(0, n ?? 0));
    return text.split("\r\n")[0];
  } finally {
    conn.close();
  }
}

Deno.test("without a token, a Host that is not the page's address is refused (DNS rebinding)", async () => {
  const env = await liveSetup();
  try {
    const port = Number(new URL(env.base).port);
    // A page on attacker.example whose name now resolves to 127.0.0.1 sends its own name.
    for (const path of ["/", "/status.json", "/metrics"]) {
      for (
        const host of [`attacker.example:${port}`, "attacker.example", `localhost.evil:${port}`]
      ) {
        assert.match(
          await statusWithHost(port, path, host),
          /^HTTP\/1\.1 403 /,
          `${path} with Host: ${host}`,
        );
      }
    }
    const warning = /WRN.*Host "attacker\.example:\d+" is not/;
    await env.server.waitFor(warning);
    // The bound address and its name, with or without the port, are the page itself.
    for (const host of [`127.0.0.1:${port}`, "127.0.0.1", `localhost:${port}`, "LocalHost."]) {
      assert.match(
        await statusWithHost(port, "/status.json", host),
        /^HTTP\/1\.1 200 /,
        `Host: ${host}`,
      );
    }
    // An HTTP/1.0 client without a Host header is not a browser.
    assert.match(await statusWithHost(port, "/metrics", undefined), /^HTTP\/1\.[01] 200 /);
    const res = await fetch(`${env.base}/status.json`);
    await res.body?.cancel();
    assert.equal(res.status, 200, "fetch() by address");
    assert.equal(env.server.count(warning), 1, "a refused Host is logged as a warning once");
  } finally {
    await env.cleanup();
  }
});

Deno.test("the Host check: the bound address and its names pass, other names do not", () => {
  const cases: [string | null, string, boolean][] = [
    ["127.0.0.1:8080", "127.0.0.1", true],
    ["localhost", "127.0.0.1", true],
    ["[::1]:8080", "::1", true],
    ["localhost:1", "::1", true],
    ["127.0.0.1", "::1", false],
    ["evil.example", "127.0.0.1", false],
    ["127.0.0.1.evil.example", "127.0.0.1", false],
    ["", "127.0.0.1", false],
    ["a b", "127.0.0.1", false],
    ["192.0.2.7:80", "192.0.2.7", true],
    ["localhost", "192.0.2.7", false],
    ["status.example", "status.example", true],
    ["192.0.2.7", "0.0.0.0", true],
    ["[2001:db8::1]:80", "::", true],
    ["localhost", "0.0.0.0", true],
    ["status.example", "0.0.0.0", false],
    [null, "127.0.0.1", true],
  ];
  for (const [header, bound, allowed] of cases) {
    assert.equal(hostAllowed(header, bound), allowed, `Host ${header} on ${bound}`);
  }
});

Deno.test("with a token, the token decides, whatever the Host (a reverse proxy may set any)", async () => {
  const env = await liveSetup('status_token = "tok"');
  try {
    const port = Number(new URL(env.base).port);
    const bearer = "Authorization: Bearer tok\r\n";
    assert.match(
      await statusWithHost(port, "/status.json", "status.example.org", bearer),
      /^HTTP\/1\.1 200 /,
    );
    assert.match(
      await statusWithHost(port, "/status.json", "status.example.org"),
      /^HTTP\/1\.1 401 /,
    );
  } finally {
    await env.cleanup();
  }
});

Deno.test("a status_port already in use: one clear error line and a non-zero exit", async () => {
  const fixture = await Fixture.create();
  const busy = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const identity = await fixture.identity("foo bar");
    const busyPort = (busy.addr as Deno.NetAddr).port;
    const config = await fixture.write(
      "server.toml",
      serverToml({
        communicationPort: freePort(),
        clients: [identity],
        services: [],
        extra: `status_port = ${busyPort}`,
      }),
    );
    const { code, stderr } = await new Program("server.ts", ["--config", config]).result();
    assert.notEqual(code, 0);
    const line = errorLine(stderr, "natadm-server");
    // The wording of every port in use (tests/listen_error_test.ts).
    assert.equal(
      line,
      `natadm-server: error: cannot listen on 127.0.0.1:${busyPort} (status_port): ` +
        "the port is in use by another program",
    );
  } finally {
    busy.close();
    await fixture.cleanup();
  }
});

const CHROMIUM = "/usr/bin/chromium";
const haveChromium = (() => {
  try {
    return Deno.statSync(CHROMIUM).isFile;
  } catch {
    return false;
  }
})();
if (!haveChromium) {
  console.log(`status: skipped the dashboard browser test: ${CHROMIUM} is not installed`);
}

Deno.test({
  name: "the dashboard in headless Chromium shows the client and the tunnel's user, escaped",
  ignore: !haveChromium,
  async fn() {
    const { chromium } = await import("playwright-core");
    const token = "page-token";
    const env = await liveSetup(`status_token = "${token}"`);
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    try {
      await settled(env.base, token);
      const page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
      page.setDefaultTimeout(20_000);
      const errors: string[] = [];
      page.on("pageerror", (err) => errors.push(err.message));
      await page.goto(`${env.base}/?token=${token}`);
      // Rendered from the page's own fetch of /status.json, which it sends the token with.
      await page.locator("#clients").getByText("foo bar", { exact: true }).waitFor();
      await page.locator("#tunnels").getByText(env.userAddress).waitFor();
      await page.locator("#services").getByText("1.2 KiB").first().waitFor();
      const clients = await page.locator("#clients").innerText();
      assert.match(clients, /foo bar\s+connected\s+127\.0\.0\.1:\d+/);
      // The odd name is shown as text: its <i> is not markup.
      assert(clients.includes(ODD_NAME), clients);
      assert.equal(await page.locator("main i:not(.dot)").count(), 0, "an <i> from data is markup");
      assert.match(clients, /offline/);
      const tunnels = await page.locator("#tunnels").innerText();
      assert(tunnels.includes(env.userAddress), tunnels);
      assert.match(tunnels, new RegExp(`${env.fooPort}\\s+foo bar`));
      const tiles = await page.locator("#tiles").innerText();
      assert.match(tiles, /1 \/ 2\s+clients connected/);
      assert.match(tiles, /1\s+live tunnels/);
      assert.match(tiles, /1\s+users waiting/);
      assert.match(await page.locator("#state").innerText(), /^updated /);
      assert.deepEqual(errors, []);

      await Deno.mkdir(join(ROOT, "test-artifacts"), { recursive: true });
      await page.screenshot({
        path: join(ROOT, "test-artifacts", "dashboard.png"),
        fullPage: true,
      });
      // The README's picture is refreshed on request only, so test runs leave the tree clean.
      if (Deno.env.get("NATADM_UPDATE_DOCS") === "1") {
        await Deno.copyFile(
          join(ROOT, "test-artifacts", "dashboard.png"),
          join(ROOT, "docs", "dashboard.png"),
        );
      }

      // On a phone-sized screen every row is a card: no horizontal scrolling.
      await page.setViewportSize({ width: 390, height: 844 });
      const overflow = await page.evaluate<number>(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth",
      );
      assert(overflow <= 0, `the page scrolls sideways by ${overflow} px on a phone`);
      await page.screenshot({
        path: join(ROOT, "test-artifacts", "dashboard-phone.png"),
        fullPage: true,
      });

      // It refreshes by itself: a closed tunnel disappears without a reload.
      await env.closeUser();
      await page.locator("#tunnels").getByText("No live tunnels").waitFor();
    } finally {
      await browser.close();
      await env.cleanup();
    }
  },
});
