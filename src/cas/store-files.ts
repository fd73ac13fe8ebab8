import { createHash, randomUUID } from 'node:crypto';
import { constants } from 'node:fs';
import { type FileHandle, mkdir, open, readdir, rename, rm, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { MirrorError, errorMessage } from '../errors.js';
import type { FetchFrom } from './content-store.js';
import { type BlobFile, type ReadReply, type ReadRequest, type ReadFile, type WriteReply, type WriteRequest, blobReaderProgram, blobWriterProgram } from './blob-io.js';
import { type Digest, digestKey } from './digest.js';
import { IoWorker } from './io-worker.js';

/** What the store's temp area holds: stale temp files, or partial downloads kept to resume. */
export interface TempFile {
  readonly name: string;
  readonly path: string;
  readonly sizeBytes: number;
  /** Set for a partial download: the blob it is the beginning of. */
  readonly partialOf?: Digest;
}

/** What a read of an object file reports back to the store, which decides what it means. */
export interface ChunkHooks {
  /** The object file is gone (removed since the index was asked); returns the error to throw. */
  gone(): Error;
  /** The file is shorter than the range, or (when checked) does not hash to its digest; returns the error to throw. */
  damaged(why: string): Promise<Error>;
  /** A checked read hashed the whole file and it matched. */
  verified(): void;
}

const PARTIAL = /^partial-([0-9a-f]{64})-(\d{1,16})$/;
const HASH_READ_BYTES = 1 << 20;

/**
 * The store's files: blobs under `<dir>/cas/objects/<2 hex>/<62 hex>` (the layout BuildStream's
 * own caches use) and the temp area `<dir>/tmp`, where blobs are written and verified before
 * they are renamed into place. Also the two worker threads that write and read small blobs. It
 * knows nothing of the index: DiskContentStore records what this wrote.
 *
 * The temp area holds two kinds of file. Temp files (random names) exist only while a write is
 * under way, so any found when the store is opened are a crash's leftovers. Partial downloads
 * (`partial-<hash>-<size>`) are the first bytes of a large blob whose download was interrupted;
 * they are kept on purpose, so the next download of that blob resumes where it stopped.
 */
export class StoreFiles {
  readonly tmpDir: string;
  readonly objectsDir: string;
  private readonly createdDirs = new Set<string>();
  private readonly writer = new IoWorker<WriteRequest, WriteReply>('blob writer', blobWriterProgram);
  private readonly reader = new IoWorker<ReadRequest, ReadReply>('blob reader', blobReaderProgram);

  constructor(
    readonly dir: string,
    private readonly log: Logger,
  ) {
    this.tmpDir = join(dir, 'tmp');
    this.objectsDir = join(dir, 'cas', 'objects');
  }

  /** Creates the data directory's layout (CONFIG_INVALID when that is impossible). */
  async create(): Promise<void> {
    try {
      await mkdir(this.objectsDir, { recursive: true });
      await mkdir(this.tmpDir, { recursive: true });
    } catch (err) {
      throw new MirrorError('CONFIG_INVALID', `cannot create the data directory ${this.dir}: ${errorMessage(err)}`, { cause: err });
    }
  }

  async close(): Promise<void> {
    await Promise.all([this.writer.close(), this.reader.close()]);
  }

  objectPath(digest: Digest): string {
    return join(this.objectsDir, digest.hash.slice(0, 2), digest.hash.slice(2));
  }

  partialPath(digest: Digest): string {
    return join(this.tmpDir, `partial-${digest.hash}-${digest.sizeBytes}`);
  }

  /** The size of an object file, or undefined when there is none. */
  async objectSize(digest: Digest): Promise<number | undefined> {
    try {
      return (await stat(this.objectPath(digest))).size;
    } catch (err) {
      if (isErrno(err, 'ENOENT')) return undefined;
      throw err;
    }
  }

  /**
   * Yields bytes [start, end) of an object file, `chunkBytes` at a time, each chunk a fresh
   * buffer with `headroom` spare bytes in front. With `check` (a whole-file read), the content is
   * hashed as it streams and a mismatch is thrown in place of the last chunk.
   */
  async *chunks(digest: Digest, start: number, end: number, check: boolean, chunkBytes: number, headroom: number, hooks: ChunkHooks): AsyncGenerator<Buffer> {
    // Opened here rather than when the read was set up, so a reader never iterated holds no file.
    let fh;
    try {
      fh = await open(this.objectPath(digest), 'r');
    } catch (err) {
      if (isErrno(err, 'ENOENT')) throw hooks.gone();
      throw err;
    }
    // The store checked the size; object files are only ever replaced by a verified copy, and a
    // file that shrank since is caught below.
    const hash = check ? createHash('sha256') : undefined;
    try {
      for (let pos = start; pos < end; ) {
        const n = Math.min(chunkBytes, end - pos);
        // A fresh buffer per chunk: the transport may still hold the previous one.
        const chunk = Buffer.allocUnsafe(headroom + n);
        for (let filled = 0; filled < n; ) {
          const { bytesRead } = await fh.read(chunk, headroom + filled, n - filled, pos + filled);
          if (bytesRead === 0) throw await hooks.damaged('its object file shrank while being read');
          filled += bytesRead;
        }
        pos += n;
        if (hash) {
          hash.update(chunk.subarray(headroom));
          if (pos === end) {
            if (hash.digest('hex') !== digest.hash) throw await hooks.damaged('its content no longer matches its digest');
            hooks.verified();
          }
        }
        yield chunk;
      }
    } finally {
      await fh.close();
    }
  }

  /** Reads small object files whole on the reader thread (see blobReaderProgram). */
  readMany(files: readonly ReadFile[]): Promise<ReadReply> {
    return this.reader.request({ files });
  }

  /**
   * Verifies and writes small blobs on the writer thread, each fdatasynced and renamed into
   * place. With `allOrNothing`, a blob that does not match its digest fails the batch and
   * nothing is written; otherwise the others are written. Returns what was written (to be
   * indexed) and the mismatches (by position in `blobs`).
   */
  async writeSmall(blobs: readonly { digest: Digest; data: Uint8Array }[], allOrNothing: boolean): Promise<{ written: Digest[]; mismatches: readonly { index: number; message: string }[] }> {
    if (blobs.length === 0) return { written: [], mismatches: [] };
    const files: BlobFile[] = blobs.map(({ digest, data }) => ({ hash: digest.hash, size: digest.sizeBytes, data, tmp: join(this.tmpDir, randomUUID()), path: this.objectPath(digest) }));
    const { mismatches } = await this.writer.request({ blobs: files, allOrNothing });
    if (allOrNothing && mismatches.length > 0) return { written: [], mismatches };
    const bad = new Set(mismatches.map((m) => m.index));
    return { written: blobs.filter((_, i) => !bad.has(i)).map((b) => b.digest), mismatches };
  }

  /** Streams data to a temp file, verifying size and SHA-256 and fsyncing; returns its path. */
  async writeTemp(digest: Digest, data: AsyncIterable<Uint8Array> | Iterable<Uint8Array>): Promise<string> {
    const tmp = join(this.tmpDir, randomUUID());
    const fh = await open(tmp, 'wx', 0o644);
    const hash = createHash('sha256');
    let size = 0;
    try {
      try {
        for await (const chunk of data) {
          size += chunk.byteLength;
          if (size > digest.sizeBytes) throw mismatch(digest, `more than ${digest.sizeBytes} bytes were sent`);
          hash.update(chunk);
          await writeAll(fh, chunk, undefined);
        }
        if (size !== digest.sizeBytes) throw mismatch(digest, `${size} bytes were sent`);
        const actual = hash.digest('hex');
        if (actual !== digest.hash) throw mismatch(digest, `the content hashes to ${actual}`);
        await fh.sync();
      } finally {
        await fh.close();
      }
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw err;
    }
    return tmp;
  }

  /** Renames verified temp files into place (on failure, removes them). */
  async commit(written: readonly { digest: Digest; tmp: string }[]): Promise<void> {
    try {
      for (const { digest } of written) await this.objectDir(digest);
      await Promise.all(written.map(({ digest, tmp }) => rename(tmp, this.objectPath(digest))));
    } catch (err) {
      await Promise.all(written.map((w) => unlink(w.tmp).catch(() => undefined)));
      throw err;
    }
  }

  /**
   * Downloads a large blob into its partial file and renames it into place once the whole file
   * is verified. Bytes already in the partial file (from an interrupted download) are hashed
   * first and not fetched again: `fetch` is called with their count. If the whole then does not
   * match, the kept prefix may be what is wrong (e.g. written just before a power cut), so the
   * download is repeated once from zero before DIGEST_MISMATCH is thrown. Any other failure keeps
   * what was received, for the next attempt. Callers serialise calls for one digest. Returns the
   * bytes that came from the partial file.
   */
  async writePartial(digest: Digest, fetch: FetchFrom): Promise<{ resumedBytes: number }> {
    const path = this.partialPath(digest);
    const fh = await open(path, constants.O_RDWR | constants.O_CREAT, 0o644);
    let keep = true;
    let closed = false;
    try {
      for (let attempt = 0; ; attempt += 1) {
        const hash = createHash('sha256');
        const resumed = await hashPrefix(fh, digest.sizeBytes, hash);
        let size = resumed;
        let problem: string | undefined;
        if (size < digest.sizeBytes) {
          for await (const chunk of fetch(size)) {
            if (size + chunk.byteLength > digest.sizeBytes) {
              problem = `more than ${digest.sizeBytes} bytes were sent`;
              break;
            }
            await writeAll(fh, chunk, size);
            hash.update(chunk);
            size += chunk.byteLength;
          }
        }
        if (problem === undefined && size !== digest.sizeBytes) problem = `${size} bytes were sent`;
        if (problem === undefined) {
          const actual = hash.digest('hex');
          if (actual !== digest.hash) problem = `the content hashes to ${actual}`;
        }
        if (problem === undefined) {
          await fh.sync();
          closed = true;
          await fh.close();
          await this.objectDir(digest);
          await rename(path, this.objectPath(digest));
          return { resumedBytes: resumed };
        }
        if (resumed > 0 && attempt === 0) {
          this.log.warn({ digest: digestKey(digest), resumedBytes: resumed, problem }, 'a resumed download does not match its digest; fetching it again from the start');
          await fh.truncate(0);
          continue;
        }
        keep = false;
        throw mismatch(digest, problem);
      }
    } finally {
      if (!closed) await fh.close();
      if (!keep) await unlink(path).catch(() => undefined);
    }
  }

  /** Every object file on disk: its name as a hash, and its path. */
  async *objectFiles(): AsyncIterable<{ hash: string; path: string }> {
    let prefixes: string[];
    try {
      prefixes = await readdir(this.objectsDir);
    } catch {
      return;
    }
    for (const prefix of prefixes.sort()) {
      if (!/^[0-9a-f]{2}$/.test(prefix)) continue;
      for (const rest of (await readdir(join(this.objectsDir, prefix))).sort()) {
        yield { hash: prefix + rest, path: join(this.objectsDir, prefix, rest) };
      }
    }
  }

  async removeObject(digest: Digest): Promise<void> {
    await unlink(this.objectPath(digest)).catch(() => undefined);
  }

  /** What the temp area holds (a few files: only crashes and interrupted downloads leave any). */
  async tempFiles(): Promise<TempFile[]> {
    let names: string[];
    try {
      names = await readdir(this.tmpDir);
    } catch (err) {
      if (isErrno(err, 'ENOENT')) return [];
      throw err;
    }
    const files: TempFile[] = [];
    for (const name of names.sort()) {
      const path = join(this.tmpDir, name);
      const sizeBytes = await stat(path).then((s) => s.size, () => 0);
      const m = PARTIAL.exec(name);
      files.push({ name, path, sizeBytes, ...(m?.[1] !== undefined ? { partialOf: { hash: m[1], sizeBytes: Number(m[2]) } } : {}) });
    }
    return files;
  }

  async removeTemp(file: TempFile): Promise<void> {
    await rm(file.path, { recursive: true, force: true });
  }

  /**
   * Removes temp files (not partial downloads). Only the process holding the store writes there,
   * so at open they are all a crash's leftovers.
   */
  async removeStaleTemp(): Promise<void> {
    for (const file of await this.tempFiles()) if (!file.partialOf) await this.removeTemp(file);
  }

  private async objectDir(digest: Digest): Promise<void> {
    const dir = join(this.objectsDir, digest.hash.slice(0, 2));
    if (!this.createdDirs.has(dir)) {
      await mkdir(dir, { recursive: true });
      this.createdDirs.add(dir);
    }
  }
}

/**
 * Hashes what a partial file holds (at most `max` bytes; a longer file is cut back to nothing,
 * as it cannot be a prefix) and returns its length.
 */
async function hashPrefix(fh: FileHandle, max: number, hash: ReturnType<typeof createHash>): Promise<number> {
  let size = (await fh.stat()).size;
  if (size > max) {
    await fh.truncate(0);
    size = 0;
  }
  const buf = Buffer.allocUnsafe(Math.min(HASH_READ_BYTES, Math.max(size, 1)));
  for (let pos = 0; pos < size; ) {
    const { bytesRead } = await fh.read(buf, 0, Math.min(buf.byteLength, size - pos), pos);
    if (bytesRead === 0) {
      await fh.truncate(pos);
      return pos;
    }
    hash.update(buf.subarray(0, bytesRead));
    pos += bytesRead;
  }
  return size;
}

async function writeAll(fh: FileHandle, chunk: Uint8Array, position: number | undefined): Promise<void> {
  for (let off = 0; off < chunk.byteLength; ) {
    off += (await fh.write(chunk, off, chunk.byteLength - off, position === undefined ? null : position + off)).bytesWritten;
  }
}

export function mismatch(digest: Digest, detail: string): MirrorError {
  return new MirrorError('DIGEST_MISMATCH', `content does not match digest ${digestKey(digest)}: ${detail}`);
}

export function isErrno(err: unknown, code: string): boolean {
  return err instanceof Error && (err as NodeJS.ErrnoException).code === code;
}
