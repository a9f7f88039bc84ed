/**
 * Writing key and certificate files so that nobody else can redirect, read or swap them. A file
 * is first written to an exclusive new name in its own directory (mode as asked, 0600 for keys),
 * synced, then renamed over the target or, when an existing file must not be replaced,
 * hard-linked to it. No step follows a symlink: a link planted at the target is replaced (or
 * refused), never written through. The directory must be writable by its owner only.
 * @module
 */
import { basename, dirname, join } from "node:path";

/** A refusal to write into a place that others could tamper with; its message is one line. */
export class UnsafeOutputError extends Error {
  override name = "UnsafeOutputError";
}

/** True if anything is at `path`, a dangling symlink included. */
export async function pathExists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return false;
    throw err;
  }
}

/**
 * Throws {@link UnsafeOutputError} unless `dir` is a directory that neither group nor others
 * may write (a sticky bit does not help: others could still add files) and, if `uid` is given,
 * that belongs to `uid` or to root.
 */
export async function checkPrivateDir(dir: string, uid?: number): Promise<void> {
  let info;
  try {
    info = await Deno.stat(dir);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new UnsafeOutputError(`directory ${dir} does not exist`);
    }
    throw err;
  }
  if (!info.isDirectory) throw new UnsafeOutputError(`${dir} is not a directory`);
  const mode = (info.mode ?? 0) & 0o7777;
  if (mode & 0o022) {
    throw new UnsafeOutputError(
      `${dir} is writable by group or others (mode ${mode.toString(8).padStart(4, "0")}); ` +
        `make it private first: chmod go-w ${dir}`,
    );
  }
  if (uid !== undefined && info.uid !== null && info.uid !== uid && info.uid !== 0) {
    throw new UnsafeOutputError(
      `${dir} belongs to another user (uid ${info.uid}); write keys only into a directory you own`,
    );
  }
}

/**
 * Creates `dir` (mode 0755, whatever the umask) if it is missing, then checks it as
 * {@link checkPrivateDir} does.
 */
export async function prepareOutputDir(dir: string): Promise<void> {
  if (!(await pathExists(dir))) {
    await Deno.mkdir(dir, { recursive: true, mode: 0o755 });
    await Deno.chmod(dir, 0o755); // a umask of 002 would leave it group-writable
  }
  await checkPrivateDir(dir);
}

/** Options for {@link writeFileExclusive}. */
export interface WriteOptions {
  /** Permission bits of the new file: 0o600 for a private key. */
  mode: number;
  /** Replace whatever is at the path (a file or a symlink itself); otherwise refuse it. */
  replace: boolean;
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.length;) done += await file.write(bytes.subarray(done));
}

/**
 * Writes `text` to `path` atomically and exclusively: an exclusive new file next to it, synced,
 * then renamed over `path` (`replace`) or linked to it, which fails with
 * `Deno.errors.AlreadyExists` if anything, even a dangling symlink, is there. Throws
 * {@link UnsafeOutputError} if the directory is not private to the caller.
 */
export async function writeFileExclusive(
  path: string,
  text: string,
  options: WriteOptions,
): Promise<void> {
  const dir = dirname(path);
  await checkPrivateDir(dir);
  const temp = join(dir, `.${basename(path)}.${crypto.randomUUID()}.tmp`);
  // createNew is O_CREAT|O_EXCL: it fails on anything already at `temp`, a symlink included.
  const file = await Deno.open(temp, { write: true, createNew: true, mode: options.mode });
  let placed = false;
  try {
    try {
      // The new file is owned by whoever writes: the directory must be theirs (or root's).
      await checkPrivateDir(dir, (await file.stat()).uid ?? undefined);
      await writeAll(file, new TextEncoder().encode(text));
      await file.sync();
    } finally {
      file.close();
    }
    if (options.replace) {
      await Deno.rename(temp, path); // replaces a symlink at `path` itself, never its target
      placed = true;
    } else {
      await linkNew(temp, path);
    }
  } finally {
    if (!placed) await Deno.remove(temp).catch(() => {});
  }
  await syncDir(dir);
}

/** Links `temp` to `path` unless something is there; link(2) neither follows nor replaces. */
async function linkNew(temp: string, path: string): Promise<void> {
  try {
    await Deno.link(temp, path);
  } catch (err) {
    if (err instanceof Deno.errors.AlreadyExists) throw err;
    // A file system without hard links: check, then rename (a narrow race, but no link followed).
    if (await pathExists(path)) throw new Deno.errors.AlreadyExists(`${path} already exists`);
    await Deno.rename(temp, path);
  }
}

/** Makes the directory entry durable; not every platform can open a directory, so best effort. */
async function syncDir(dir: string): Promise<void> {
  try {
    using handle = await Deno.open(dir, { read: true });
    await handle.sync();
  } catch {
    // The file's contents are synced; only its name might be lost in a crash.
  }
}
