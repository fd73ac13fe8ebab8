import { createHash, randomUUID } from 'node:crypto';
import { mkdir, open, readdir, rename, rm, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { Level } from 'level';
import type { Logger } from 'pino';
import { MirrorError, errorMessage } from '../errors.js';
import { type BlobFile, type ReadFile, type ReadReply, type ReadRequest, type WriteReply, type WriteRequest, blobReaderProgram, blobWriterProgram } from './blob-io.js';
import { IoWorker } from './io-worker.js';
import type { BlobReader, ByteRange, ContentStore, NameRecord } from './content-store.js';
import { type Digest, digestKey, isEmptyDigest, parseDigestKey } from './digest.js';

/** How a name record is kept in LevelDB (digests as `hash/size` strings). */
interface StoredName {
  type: 'directory' | 'blob';
  digest: string;
  blobs: string[];
  directories: string[];
  upstream: string;
  fetchedAt: number;
}

/** A blob's index entry: its size and the last time (unix seconds) it was written or read. */
export interface BlobEntry {
  readonly hash: string;
  readonly sizeBytes: number;
  readonly lastAccess: number;
}

const TOUCH_FLUSH_MS = 30_000;
/** Most files and bytes one request to the reader thread asks for (see readManyBytes). */
const READ_REQUEST_FILES = 1024;
const READ_REQUEST_BYTES = 4 << 20;
/** Keys per parallel index lookup in findMissing. */
const LOOKUP_GROUP = 2500;
/** How long a blob hashed by this process is trusted before a read hashes it again (see open()). */
export const DEFAULT_RECHECK_AFTER_MS = 24 * 3600 * 1000;
/** Bounds the memory of the checked-blob table (about 150 bytes an entry). */
const MAX_CHECKED_ENTRIES = 200_000;

async function* emptyChunks(): AsyncGenerator<Buffer> {
  // Nothing to read: the empty blob, or a range that starts at the end.
}

export interface DiskStoreOptions {
  /**
   * A blob read whole is rehashed as it streams unless this process wrote or hashed it less than
   * this long ago; 0 rehashes on every read. Hashing runs at about 2 GB/s on one core, so
   * rehashing every read would halve what one core can serve, while rot shows up on the first
   * read after start or after this interval (and `verify` checks everything).
   */
  readonly recheckAfterMs?: number;
}
const TOUCH_FLUSH_COUNT = 10_000;

/**
 * The mirror's store: blobs as files under `<dir>/cas/objects/<2 hex>/<62 hex>` (the layout
 * BuildStream's own caches use) and a LevelDB index under `<dir>/index` that records which blobs
 * are complete and which names exist. A blob is visible only once it is in the index, and it is
 * put there only after its file was verified, fsynced and renamed into place.
 */
export class DiskContentStore implements ContentStore {
  readonly dir: string;
  private readonly db: Level<string, string>;
  private readonly blobs;
  private readonly nameIndex;
  /** Blobs removed as damaged since the last repair: hash -> why. See hasDamagedBlobs(). */
  private readonly damaged;
  private damagedCount = 0;
  private readonly log: Logger;
  private readonly tmpDir: string;
  private readonly objectsDir: string;
  private readonly createdDirs = new Set<string>();
  /** Last-access updates not yet written: hash -> size. Batched so reads cost no index write. */
  private pendingTouches = new Map<string, number>();
  private touchTimer: NodeJS.Timeout | undefined;
  /** hash -> when this process last hashed it (written or checked on read); oldest first. */
  private readonly checkedAt = new Map<string, number>();
  private readonly recheckAfterMs: number;
  private readonly writer = new IoWorker<WriteRequest, WriteReply>('blob writer', blobWriterProgram);
  private readonly reader = new IoWorker<ReadRequest, ReadReply>('blob reader', blobReaderProgram);

  private constructor(dir: string, db: Level<string, string>, log: Logger, options: DiskStoreOptions) {
    this.dir = dir;
    this.db = db;
    this.blobs = db.sublevel<string, string>('blobs', { valueEncoding: 'utf8' });
    this.nameIndex = db.sublevel<string, StoredName>('names', { valueEncoding: 'json' });
    this.damaged = db.sublevel<string, string>('damaged', { valueEncoding: 'utf8' });
    this.log = log;
    this.tmpDir = join(dir, 'tmp');
    this.objectsDir = join(dir, 'cas', 'objects');
    this.recheckAfterMs = options.recheckAfterMs ?? DEFAULT_RECHECK_AFTER_MS;
  }

  /** Opens (creating if needed) the store in `dir`. Only one process may have a store open. */
  static async open(dir: string, log: Logger, options: DiskStoreOptions = {}): Promise<DiskContentStore> {
    try {
      await mkdir(join(dir, 'cas', 'objects'), { recursive: true });
    } catch (err) {
      throw new MirrorError('CONFIG_INVALID', `cannot create the data directory ${dir}: ${errorMessage(err)}`, { cause: err });
    }
    const db = new Level<string, string>(join(dir, 'index'), { valueEncoding: 'utf8' });
    try {
      await db.open();
    } catch (err) {
      if (isLockedError(err)) {
        throw new MirrorError('STORE_LOCKED', `the store in ${dir} is in use by another bst-cache-mirror process (its LevelDB index is locked)`, { cause: err });
      }
      throw new MirrorError('CONFIG_INVALID', `cannot open the index in ${join(dir, 'index')}: ${errorMessage(err)}`, { cause: err });
    }
    const store = new DiskContentStore(dir, db, log, options);
    for await (const _ of store.damaged.keys()) store.damagedCount += 1;
    // Only the index holder writes temp files, so anything left there is from a crash.
    await rm(store.tmpDir, { recursive: true, force: true });
    await mkdir(store.tmpDir, { recursive: true });
    return store;
  }

  async close(): Promise<void> {
    if (this.touchTimer) clearTimeout(this.touchTimer);
    this.touchTimer = undefined;
    await this.flushTouches();
    await Promise.all([this.writer.close(), this.reader.close()]);
    await this.db.close();
  }

  objectPath(digest: Digest): string {
    return join(this.objectsDir, digest.hash.slice(0, 2), digest.hash.slice(2));
  }

  async findMissing(digests: readonly Digest[]): Promise<Digest[]> {
    if (digests.length === 0) return [];
    // LevelDB answers a getMany on one pool thread; a few smaller ones in parallel answer sooner
    // (10,000 keys against 1,000,000: ~27 ms as one call, ~19 ms as four).
    const keys = digests.map((d) => d.hash);
    const groups: Promise<(string | undefined)[]>[] = [];
    for (let i = 0; i < keys.length; i += LOOKUP_GROUP) groups.push(this.blobs.getMany(keys.slice(i, i + LOOKUP_GROUP)));
    const sizes = (await Promise.all(groups)).flat();
    const missing: Digest[] = [];
    digests.forEach((d, i) => {
      if (isEmptyDigest(d)) return;
      const entry = sizes[i];
      if (entry === undefined || entrySize(entry) !== d.sizeBytes) missing.push(d);
    });
    return missing;
  }

  private async isIndexed(digest: Digest): Promise<boolean> {
    const entry = await this.blobs.get(digest.hash);
    return entry !== undefined && entrySize(entry) === digest.sizeBytes;
  }

  async read(digest: Digest, range: ByteRange = { offset: 0 }): Promise<BlobReader | undefined> {
    if (isEmptyDigest(digest)) return { length: 0, chunks: emptyChunks };
    if (!(await this.isIndexed(digest))) return undefined;
    const path = this.objectPath(digest);
    let size: number;
    try {
      size = (await stat(path)).size;
    } catch (err) {
      if (isErrno(err, 'ENOENT')) {
        await this.forget(digest, 'its object file is missing');
        return undefined;
      }
      throw err;
    }
    if (size !== digest.sizeBytes) {
      await this.forget(digest, `its object file has ${size} bytes instead of ${digest.sizeBytes}`);
      return undefined;
    }
    this.touch(digest);
    const start = range.offset;
    const end = range.limit === undefined ? digest.sizeBytes : Math.min(digest.sizeBytes, start + range.limit);
    if (end <= start) return { length: 0, chunks: emptyChunks };
    // Only a whole-blob read can be checked against the digest as it streams.
    const check = start === 0 && end === digest.sizeBytes && this.isDueCheck(digest);
    return {
      length: end - start,
      chunks: (chunkBytes, headroom = 0) => this.readChunks(digest, path, start, end, check, chunkBytes, headroom),
    };
  }

  private async *readChunks(digest: Digest, path: string, start: number, end: number, check: boolean, chunkBytes: number, headroom: number): AsyncGenerator<Buffer> {
    // Opened here rather than in read(), so a reader that is never iterated holds no file.
    let fh;
    try {
      fh = await open(path, 'r');
    } catch (err) {
      // Removed since read() looked (another reader found it damaged): a miss, not a failure.
      if (isErrno(err, 'ENOENT')) throw new MirrorError('BLOB_NOT_FOUND', `blob ${digestKey(digest)} is no longer in the mirror`);
      throw err;
    }
    // read() checked the size; object files are only ever replaced by a verified copy, and a file
    // that shrank since is caught below.
    const hash = check ? createHash('sha256') : undefined;
    try {
      for (let pos = start; pos < end; ) {
        const n = Math.min(chunkBytes, end - pos);
        // A fresh buffer per chunk: the transport may still hold the previous one.
        const chunk = Buffer.allocUnsafe(headroom + n);
        for (let filled = 0; filled < n; ) {
          const { bytesRead } = await fh.read(chunk, headroom + filled, n - filled, pos + filled);
          if (bytesRead === 0) throw await this.corrupt(digest, 'its object file shrank while being read');
          filled += bytesRead;
        }
        pos += n;
        if (hash) {
          hash.update(chunk.subarray(headroom));
          if (pos === end) {
            if (hash.digest('hex') !== digest.hash) throw await this.corrupt(digest, 'its content no longer matches its digest');
            this.markChecked(digest.hash);
          }
        }
        yield chunk;
      }
    } finally {
      await fh.close();
    }
  }

  /** Forgets a damaged blob and returns the error a reader gets for it. */
  private async corrupt(digest: Digest, why: string): Promise<MirrorError> {
    await this.forget(digest, why);
    return new MirrorError('BLOB_CORRUPT', `stored blob ${digestKey(digest)} is corrupt and was removed; run 'bst-cache-mirror verify --repair' and sync again`);
  }

  /** True when the blob has not been hashed by this process within `recheckAfterMs`. */
  private isDueCheck(digest: Digest): boolean {
    if (this.recheckAfterMs <= 0) return true;
    const at = this.checkedAt.get(digest.hash);
    return at === undefined || Date.now() - at >= this.recheckAfterMs;
  }

  private markChecked(hash: string): void {
    if (this.recheckAfterMs <= 0) return;
    // Re-inserted so the Map's order is oldest check first, which is what gets evicted.
    this.checkedAt.delete(hash);
    this.checkedAt.set(hash, Date.now());
    if (this.checkedAt.size > MAX_CHECKED_ENTRIES) {
      const oldest = this.checkedAt.keys().next();
      if (!oldest.done) this.checkedAt.delete(oldest.value);
    }
  }

  async readBytes(digest: Digest): Promise<Buffer | undefined> {
    const [result] = await this.readManyBytes([digest]);
    if (result instanceof MirrorError) throw result;
    return result;
  }

  async readManyBytes(digests: readonly Digest[]): Promise<(Buffer | undefined | MirrorError)[]> {
    const entries = await this.blobs.getMany(digests.map((d) => d.hash));
    const results: (Buffer | undefined | MirrorError)[] = digests.map(() => undefined);
    const toRead: { index: number; digest: Digest; file: ReadFile }[] = [];
    digests.forEach((digest, i) => {
      const entry = entries[i];
      if (isEmptyDigest(digest)) results[i] = Buffer.alloc(0);
      else if (entry !== undefined && entrySize(entry) === digest.sizeBytes) {
        const check = this.isDueCheck(digest);
        toRead.push({ index: i, digest, file: { path: this.objectPath(digest), size: digest.sizeBytes, ...(check ? { hash: digest.hash } : {}) } });
      }
    });
    // One reader thread serves every caller: a big request (a GetTree level) goes in parts, one
    // at a time, so other callers' requests get in between.
    for (let start = 0; start < toRead.length; ) {
      let end = start;
      for (let bytes = 0; end < toRead.length && end - start < READ_REQUEST_FILES && (end === start || bytes < READ_REQUEST_BYTES); end++) {
        bytes += toRead[end]?.file.size ?? 0;
      }
      const part = toRead.slice(start, end);
      start = end;
      const { results: read, data } = await this.reader.request({ files: part.map((r) => r.file) });
      for (const [k, { index, digest, file }] of part.entries()) {
        const r = read[k];
        if (r === undefined || r.status === 'missing') {
          await this.forget(digest, 'its object file is missing');
        } else if (r.status === 'bad') {
          results[index] = await this.corrupt(digest, r.why);
        } else {
          if (file.hash !== undefined) this.markChecked(digest.hash);
          this.touch(digest);
          results[index] = Buffer.from(data, r.offset, digest.sizeBytes);
        }
      }
    }
    return results;
  }

  async write(digest: Digest, data: AsyncIterable<Uint8Array> | Uint8Array): Promise<void> {
    if (isEmptyDigest(digest)) {
      if (data instanceof Uint8Array && data.byteLength !== 0) throw mismatch(digest, 'data was given for the empty blob');
      return;
    }
    const tmp = await this.writeTemp(digest, data instanceof Uint8Array ? [data] : data);
    await this.commit([{ digest, tmp }]);
  }

  async writeMany(blobs: readonly { digest: Digest; data: Uint8Array }[]): Promise<void> {
    const files: BlobFile[] = [];
    for (const { digest, data } of blobs) {
      if (isEmptyDigest(digest)) {
        if (data.byteLength !== 0) throw mismatch(digest, 'data was given for the empty blob');
        continue;
      }
      files.push({ hash: digest.hash, size: digest.sizeBytes, data, tmp: join(this.tmpDir, randomUUID()), path: this.objectPath(digest) });
    }
    if (files.length === 0) return;
    const { mismatch: problem } = await this.writer.request({ blobs: files });
    if (problem !== undefined) throw new MirrorError('DIGEST_MISMATCH', problem);
    await this.record(files.map((f) => ({ hash: f.hash, sizeBytes: f.size })));
  }

  /** Streams data to a temp file, verifying size and SHA-256 and fsyncing; returns its path. */
  private async writeTemp(digest: Digest, data: AsyncIterable<Uint8Array> | Iterable<Uint8Array>): Promise<string> {
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
          let off = 0;
          while (off < chunk.byteLength) off += (await fh.write(chunk, off, chunk.byteLength - off)).bytesWritten;
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

  /** Renames verified temp files into place, then records them in the index. */
  private async commit(written: readonly { digest: Digest; tmp: string }[]): Promise<void> {
    if (written.length === 0) return;
    try {
      for (const { digest } of written) {
        const dir = join(this.objectsDir, digest.hash.slice(0, 2));
        if (!this.createdDirs.has(dir)) {
          await mkdir(dir, { recursive: true });
          this.createdDirs.add(dir);
        }
      }
      await Promise.all(written.map(({ digest, tmp }) => rename(tmp, this.objectPath(digest))));
    } catch (err) {
      await Promise.all(written.map((w) => unlink(w.tmp).catch(() => undefined)));
      throw err;
    }
    await this.record(written.map((w) => w.digest));
  }

  /** Records blobs whose files are in place (and were just hashed) in the index, in one batch. */
  private async record(digests: readonly Digest[]): Promise<void> {
    if (digests.length === 0) return;
    for (const digest of digests) this.markChecked(digest.hash);
    const now = nowSeconds();
    await this.blobs.batch(digests.map((digest) => ({ type: 'put' as const, key: digest.hash, value: `${digest.sizeBytes}:${now}` })));
    if (this.damagedCount > 0) {
      const healed = (await this.damaged.getMany(digests.map((d) => d.hash))).filter((v) => v !== undefined).length;
      if (healed > 0) {
        await this.damaged.batch(digests.map((digest) => ({ type: 'del' as const, key: digest.hash })));
        this.damagedCount -= healed;
      }
    }
  }

  /** Drops a blob from the index and deletes its file (used when it is found damaged). */
  async forget(digest: Digest, why: string): Promise<void> {
    this.log.error({ digest: digestKey(digest) }, `stored blob removed: ${why}`);
    this.pendingTouches.delete(digest.hash);
    this.checkedAt.delete(digest.hash);
    if ((await this.damaged.get(digest.hash)) === undefined) this.damagedCount += 1;
    await this.db.batch([
      { type: 'del', key: digest.hash, sublevel: this.blobs },
      { type: 'put', key: digest.hash, value: why, sublevel: this.damaged },
    ]);
    await unlink(this.objectPath(digest)).catch(() => undefined);
  }

  hasDamagedBlobs(): boolean {
    return this.damagedCount > 0;
  }

  /** Called by verify --repair once no remaining name needs a removed blob. */
  async clearDamage(): Promise<void> {
    await this.damaged.clear();
    this.damagedCount = 0;
  }

  /** Records a blob that is already in place (used by verify to re-index orphaned objects). */
  async index(digest: Digest): Promise<void> {
    await this.blobs.put(digest.hash, `${digest.sizeBytes}:${nowSeconds()}`);
  }

  async *blobEntries(): AsyncIterable<BlobEntry> {
    for await (const [hash, value] of this.blobs.iterator()) {
      const [size = '0', atime = '0'] = value.split(':');
      yield { hash, sizeBytes: Number(size), lastAccess: Number(atime) };
    }
  }

  /** Every object file on disk, as digests of its name and actual size. */
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

  async getName(urn: string): Promise<NameRecord | undefined> {
    const stored = await this.nameIndex.get(urn);
    return stored === undefined ? undefined : fromStoredName(stored);
  }

  async putName(urn: string, record: NameRecord): Promise<void> {
    await this.nameIndex.put(urn, {
      type: record.type,
      digest: digestKey(record.digest),
      blobs: record.referencedBlobs.map(digestKey),
      directories: record.referencedDirectories.map(digestKey),
      upstream: record.upstream,
      fetchedAt: record.fetchedAt,
    });
  }

  async deleteName(urn: string): Promise<void> {
    await this.nameIndex.del(urn);
  }

  async *names(): AsyncIterable<[string, NameRecord]> {
    for await (const [urn, stored] of this.nameIndex.iterator()) yield [urn, fromStoredName(stored)];
  }

  private touch(digest: Digest): void {
    this.pendingTouches.set(digest.hash, digest.sizeBytes);
    if (this.pendingTouches.size >= TOUCH_FLUSH_COUNT) {
      void this.flushTouches().catch((err: unknown) => this.log.warn({ err }, 'could not record last access times'));
    } else if (!this.touchTimer) {
      this.touchTimer = setTimeout(() => {
        this.touchTimer = undefined;
        void this.flushTouches().catch((err: unknown) => this.log.warn({ err }, 'could not record last access times'));
      }, TOUCH_FLUSH_MS);
      this.touchTimer.unref();
    }
  }

  private async flushTouches(): Promise<void> {
    if (this.pendingTouches.size === 0) return;
    const touches = this.pendingTouches;
    this.pendingTouches = new Map();
    const now = nowSeconds();
    await this.blobs.batch([...touches].map(([hash, size]) => ({ type: 'put' as const, key: hash, value: `${size}:${now}` })));
  }
}

function fromStoredName(s: StoredName): NameRecord {
  return {
    type: s.type,
    digest: parseDigestKey(s.digest),
    referencedBlobs: s.blobs.map(parseDigestKey),
    referencedDirectories: s.directories.map(parseDigestKey),
    upstream: s.upstream,
    fetchedAt: s.fetchedAt,
  };
}

function entrySize(entry: string): number {
  const colon = entry.indexOf(':');
  return Number(colon < 0 ? entry : entry.slice(0, colon));
}

function nowSeconds(): number {
  return Math.floor(Date.now() / 1000);
}

function mismatch(digest: Digest, detail: string): MirrorError {
  return new MirrorError('DIGEST_MISMATCH', `content does not match digest ${digestKey(digest)}: ${detail}`);
}

function isErrno(err: unknown, code: string): boolean {
  return err instanceof Error && (err as NodeJS.ErrnoException).code === code;
}

function isLockedError(err: unknown): boolean {
  for (let e: unknown = err; e instanceof Error; e = e.cause) {
    if ((e as { code?: unknown }).code === 'LEVEL_LOCKED') return true;
  }
  return false;
}
