/**
 * How `deno task certs` and `deno task keygen` put private keys on disk: never through a
 * symlink someone planted, always mode 0600, only in a directory nobody else can write, and by
 * default in the repository's `certs/` folder, which git ignores.
 */
import assert from "node:assert/strict";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { join } from "node:path";
import { CERT_FILES } from "../src/certs.ts";
import { writeFileExclusive } from "../src/secretfile.ts";
import { errorLine, escapeRegExp, Process, ROOT, runScript, sh } from "./helpers.ts";

const FS = ["--allow-read", "--allow-write"];
const KEYS = [CERT_FILES.caKey, CERT_FILES.key];

/** Runs cmd/certs.ts with `args`, as `deno task certs` does. */
function certs(...args: string[]) {
  return runScript("cmd/certs.ts", args, FS);
}

/** Runs cmd/keygen.ts with `args`, as `deno task keygen` does. */
function keygen(...args: string[]) {
  return runScript("cmd/keygen.ts", args, FS);
}

/** Permission bits of `path` itself (not what a link points to). */
async function mode(path: string): Promise<number> {
  return (await Deno.lstat(path)).mode! & 0o777;
}

/** True if anything, even a dangling symlink, is at `path`. */
async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return false;
    throw err;
  }
}

/** Sorted names in `dir`. */
async function names(dir: string): Promise<string[]> {
  return (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort();
}

/** Two private temp dirs: where the command writes, and another user's files it must not touch. */
async function dirs(): Promise<{ out: string; victim: string; cleanup: () => Promise<void> }> {
  const out = await Deno.makeTempDir({ prefix: "natadm-keyfiles-out-" });
  const victim = await Deno.makeTempDir({ prefix: "natadm-keyfiles-victim-" });
  return {
    out,
    victim,
    cleanup: async () => {
      await Deno.remove(out, { recursive: true }).catch(() => {});
      await Deno.remove(victim, { recursive: true }).catch(() => {});
    },
  };
}

Deno.test("certs --force replaces symlinks planted at its file names, never writing through them", async () => {
  const { out, victim, cleanup } = await dirs();
  try {
    for (const file of Object.values(CERT_FILES)) {
      await Deno.writeTextFile(join(victim, file), "victim's file\n", { mode: 0o644 });
      await Deno.symlink(join(victim, file), join(out, file));
    }
    const { code, stderr } = await certs("--out", out, "--force");
    assert.equal(code, 0, stderr);
    for (const file of Object.values(CERT_FILES)) {
      assert.equal(
        await Deno.readTextFile(join(victim, file)),
        "victim's file\n",
        `${file} target`,
      );
      assert.ok((await Deno.lstat(join(out, file))).isFile, `${file} is a file, not the link`);
    }
    for (const key of KEYS) assert.equal(await mode(join(out, key)), 0o600, key);
    assert.deepEqual(await names(out), Object.values(CERT_FILES).sort(), "no temp files left");
    const ca = new X509Certificate(await Deno.readTextFile(join(out, CERT_FILES.caCert)));
    assert.ok(ca.checkPrivateKey(createPrivateKey(await Deno.readTextFile(join(out, KEYS[0])))));
  } finally {
    await cleanup();
  }
});

Deno.test("certs without --force refuses a dangling symlink at a file name and writes nothing", async () => {
  const { out, victim, cleanup } = await dirs();
  try {
    const planted = join(victim, "stolen-ca.key.pem"); // does not exist: the link dangles
    await Deno.symlink(planted, join(out, CERT_FILES.caKey));
    const { code, stderr } = await certs("--out", out);
    assert.equal(code, 1, stderr);
    assert.equal(
      errorLine(stderr, "natadm-certs"),
      `natadm-certs: error: ${join(out, CERT_FILES.caKey)} already exists; use --force to replace`,
    );
    assert.equal(await exists(planted), false, "the CA key was written through the link");
    assert.deepEqual(await names(out), [CERT_FILES.caKey], "other files written anyway");
  } finally {
    await cleanup();
  }
});

Deno.test("keygen never writes through a symlink: --force replaces it, without --force a dangling one is refused", async () => {
  const { out, victim, cleanup } = await dirs();
  try {
    const keyPath = join(out, "client.key.pem");
    const planted = join(victim, "stolen.key.pem");
    await Deno.symlink(planted, keyPath); // dangling
    const refused = await keygen("--out", keyPath);
    assert.equal(refused.code, 1, refused.stderr);
    assert.equal(
      errorLine(refused.stderr, "natadm-keygen"),
      `natadm-keygen: error: ${keyPath} already exists; use --force to replace it`,
    );
    assert.equal(await exists(planted), false, "key written through the dangling link");

    await Deno.writeTextFile(planted, "victim's file\n", { mode: 0o644 });
    const forced = await keygen("--out", keyPath, "--force");
    assert.equal(forced.code, 0, forced.stderr);
    assert.equal(await Deno.readTextFile(planted), "victim's file\n", "link target overwritten");
    assert.ok((await Deno.lstat(keyPath)).isFile, "the link itself was not replaced");
    assert.equal(await mode(keyPath), 0o600);
    assert.match(await Deno.readTextFile(keyPath), /^-----BEGIN PRIVATE KEY-----\n/);
    assert.deepEqual(await names(out), ["client.key.pem"], "no temp files left");
  } finally {
    await cleanup();
  }
});

Deno.test("the key writer itself, without replace, refuses a link planted after any check", async () => {
  // What closes the race between certs' existence check and its write: the final step is a
  // hard link, which fails on anything at the path, a dangling symlink included.
  const { out, victim, cleanup } = await dirs();
  try {
    const keyPath = join(out, "late.key.pem");
    const planted = join(victim, "stolen.key.pem");
    await Deno.symlink(planted, keyPath);
    await assert.rejects(
      writeFileExclusive(keyPath, "secret\n", { mode: 0o600, replace: false }),
      Deno.errors.AlreadyExists,
    );
    assert.equal(await exists(planted), false, "written through the dangling link");
    assert.deepEqual(await names(out), ["late.key.pem"], "temp file left behind");
    assert.ok((await Deno.lstat(keyPath)).isSymlink, "the planted link was replaced, not refused");
  } finally {
    await cleanup();
  }
});

Deno.test("certs and keygen refuse an output directory that group or others can write", async () => {
  const { out, cleanup } = await dirs();
  try {
    for (const dirMode of [0o770, 0o707, 0o1777]) {
      await Deno.chmod(out, dirMode);
      const octal = dirMode.toString(8).padStart(4, "0");
      const expected = (program: string) =>
        `${program}: error: ${out} is writable by group or others (mode ${octal}); ` +
        `make it private first: chmod go-w ${out}`;
      for (const force of [[], ["--force"]]) {
        const c = await certs("--out", out, ...force);
        assert.equal(c.code, 1, c.stderr);
        assert.equal(errorLine(c.stderr, "natadm-certs"), expected("natadm-certs"));
        const k = await keygen("--out", join(out, "client.key.pem"), ...force);
        assert.equal(k.code, 1, k.stderr);
        assert.equal(errorLine(k.stderr, "natadm-keygen"), expected("natadm-keygen"));
        assert.deepEqual(await names(out), [], `files written into a mode ${octal} dir`);
      }
    }
  } finally {
    await Deno.chmod(out, 0o700);
    await cleanup();
  }
});

Deno.test({
  name: "certs and keygen refuse an output directory another user owns, even through a symlink",
  ignore: Deno.uid() !== 0, // only root can give a directory away
  fn: async () => {
    const { out, victim, cleanup } = await dirs();
    try {
      const theirs = join(victim, "theirs");
      await Deno.mkdir(theirs, { mode: 0o755 });
      await Deno.chown(theirs, 65534, 65534);
      const link = join(out, "certs");
      await Deno.symlink(theirs, link);
      for (
        const [program, run] of [
          ["natadm-certs", () => certs("--out", link)],
          ["natadm-keygen", () => keygen("--out", join(link, "client.key.pem"))],
        ] as const
      ) {
        const { code, stderr } = await run();
        assert.equal(code, 1, stderr);
        assert.match(
          errorLine(stderr, program),
          new RegExp(
            `^${program}: error: ${escapeRegExp(link)} belongs to another user \\(uid 65534\\)`,
          ),
        );
        assert.deepEqual(await names(theirs), [], "files written into another user's dir");
      }
    } finally {
      await cleanup();
    }
  },
});

Deno.test("certs and keygen write into the repository's certs/ folder by default", async () => {
  // A copy of the commands and the certs/ folder, so that the real certs/ keeps its keys.
  const copy = await Deno.makeTempDir({ prefix: "natadm-keyfiles-repo-" });
  try {
    for (const entry of ["cmd", "src", "certs", "deno.json", "deno.lock"]) {
      await sh("cp", ["-R", join(ROOT, entry), join(copy, entry)]);
    }
    const before = await names(join(copy, "certs"));
    assert.deepEqual(before, [".gitignore", "README.md"]);
    const run = (script: string) =>
      new Process(Deno.execPath(), ["run", ...FS, join(copy, "cmd", script)]).result();

    const c = await run("certs.ts");
    assert.equal(c.code, 0, c.stderr);
    const k = await run("keygen.ts");
    assert.equal(k.code, 0, k.stderr);
    assert.deepEqual(
      await names(join(copy, "certs")),
      [...before, ...Object.values(CERT_FILES), "client.key.pem"].sort(),
    );
    assert.equal(await mode(join(copy, "certs", "client.key.pem")), 0o600);
    for (const key of KEYS) assert.equal(await mode(join(copy, "certs", key)), 0o600);
  } finally {
    await Deno.remove(copy, { recursive: true });
  }
});

Deno.test("certs/.gitignore keeps every generated file out of git, but not itself or the README", async () => {
  const ignored = async (path: string) => {
    const out = await new Deno.Command("git", {
      args: ["-C", ROOT, "check-ignore", "--no-index", "-q", path],
    }).output();
    assert.ok(out.code === 0 || out.code === 1, new TextDecoder().decode(out.stderr));
    return out.code === 0;
  };
  for (const file of [...Object.values(CERT_FILES), "client.key.pem", "admin.key.pem", "x.new"]) {
    assert.ok(await ignored(`certs/${file}`), `certs/${file} is not ignored`);
  }
  for (const file of ["README.md", ".gitignore"]) {
    assert.equal(await ignored(`certs/${file}`), false, `certs/${file} is ignored`);
  }
  assert.match(await Deno.readTextFile(join(ROOT, "certs", "README.md")), /deno task certs/);
});
