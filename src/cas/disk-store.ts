import type { Logger } from 'pino';
import { MirrorError } from '../errors.js';
import type { ReadFile } from './blob-io.js';
import type { BlobReader, ByteRange, ContentStore, FetchFrom, NameRecord, ResumableWrite } from './content-store.js';
import { type Digest, EMPTY_DIGEST, digestKey, isEmptyDigest } from './digest.js';
import { type ChunkHooks, StoreFiles, type TempFile, mismatch } from './store-files.js';
import type { StateTable } from './state-table.js';
import { type BlobEntry, StoreIndex } from './store-index.js';

export type { BlobEntry } from './store-index.js';
export type { TempFile } from './store-files.js';

/** Most files and bytes one request to the reader thread asks for (see readManyBytes). */
const READ_REQUEST_FILES = 1024;
const READ_REQUEST_BYTES = 4 << 20;
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
  /**
   * Create the store when `dir` holds none (the default). `verify` opens with false: it requires
   * an existing store and, without --repair, must change nothing.
   */
  readonly create?: boolean;
  /**
   * Remove temp files a crash left in `<dir>/tmp` (partial downloads are kept, to be resumed).
   * Only the process holding the store writes there, so at open every temp file is stale; `sync`
   * removes them. `serve` never writes blobs and leaves them; `verify` reports them, and removes
   * them with --repair.
   */
  readonly removeStaleTemp?: boolean;
}

/**
 * The mirror's store, the one ContentStore: blob files (StoreFiles: objects, temp area, worker
 * threads) and their LevelDB index (StoreIndex: complete blobs, names, damage), tied together by
 * the rule that a blob is visible only once it is in the index, and it is put there only after
 * its file was verified, fsynced and renamed into place. It also decides when a read rehashes.
 */
export class DiskContentStore implements ContentStore {
  readonly dir: string;
  private readonly files: StoreFiles;
  private readonly storeIndex: StoreIndex;
  /** hash -> when this process last hashed it (written or checked on read); oldest first. */
  private readonly checkedAt = new Map<string, number>();
  private readonly recheckAfterMs: number;
  /** Writes under way; close() waits for them, so no write outlives the store. */
  private readonly writes = new Set<Promise<unknown>>();
  /** Resumable writes under way, by hash: a second one for the same blob waits for the first. */
  private readonly resumable = new Map<string, Promise<unknown>>();
  private closing = false;

  private constructor(files: StoreFiles, index: StoreIndex, options: DiskStoreOptions) {
    this.dir = files.dir;
    this.files = files;
    this.storeIndex = index;
    this.recheckAfterMs = options.recheckAfterMs ?? DEFAULT_RECHECK_AFTER_MS;
  }

  /** Opens the store in `dir` (creating it unless `create: false`). Only one process may have a store open. */
  static async open(dir: string, log: Logger, options: DiskStoreOptions = {}): Promise<DiskContentStore> {
    const create = options.create ?? true;
    const files = new StoreFiles(dir, log);
    if (create) await files.create();
    const index = await StoreIndex.open(dir, log, create);
    try {
      if (options.removeStaleTemp) await files.removeStaleTemp();
    } catch (err) {
      await index.close();
      throw err;
    }
    return new DiskContentStore(files, index, options);
  }

  /** Waits for every write under way to finish, then closes the index and the worker threads. */
  async close(): Promise<void> {
    this.closing = true;
    while (this.writes.size > 0) await Promise.allSettled([...this.writes]);
    await this.files.close();
    await this.storeIndex.close();
  }

  objectPath(digest: Digest): string {
    return this.files.objectPath(digest);
  }

  findMissing(digests: readonly Digest[]): Promise<Digest[]> {
    return this.storeIndex.findMissing(digests);
  }

  async read(digest: Digest, range: ByteRange = { offset: 0 }): Promise<BlobReader | undefined> {
    if (isEmptyDigest(digest)) return { length: 0, chunks: emptyChunks };
    if (!(await this.storeIndex.isIndexed(digest))) return undefined;
    const size = await this.files.objectSize(digest);
    if (size === undefined) {
      await this.forget(digest, 'its object file is missing');
      return undefined;
    }
    if (size !== digest.sizeBytes) {
      await this.forget(digest, `its object file has ${size} bytes instead of ${digest.sizeBytes}`);
      return undefined;
    }
    this.storeIndex.touch(digest);
    const start = range.offset;
    const end = range.limit === undefined ? digest.sizeBytes : Math.min(digest.sizeBytes, start + range.limit);
    if (end <= start) return { length: 0, chunks: emptyChunks };
    // Only a whole-blob read can be checked against the digest as it streams.
    const check = start === 0 && end === digest.sizeBytes && this.isDueCheck(digest);
    const hooks: ChunkHooks = {
      // Removed since read() looked (another reader found it damaged): a miss, not a failure.
      gone: () => new MirrorError('BLOB_NOT_FOUND', `blob ${digestKey(digest)} is no longer in the mirror`),
      damaged: (why) => this.corrupt(digest, why),
      verified: () => this.markChecked(digest.hash),
    };
    return {
      length: end - start,
      chunks: (chunkBytes, headroom = 0) => this.files.chunks(digest, start, end, check, chunkBytes, headroom, hooks),
    };
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
    const sizes = await this.storeIndex.sizesOf(digests.map((d) => d.hash));
    const results: (Buffer | undefined | MirrorError)[] = digests.map(() => undefined);
    const toRead: { index: number; digest: Digest; file: ReadFile }[] = [];
    digests.forEach((digest, i) => {
      if (isEmptyDigest(digest)) results[i] = Buffer.alloc(0);
      else if (sizes[i] === digest.sizeBytes) {
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
      const { results: read, data } = await this.files.readMany(part.map((r) => r.file));
      for (const [k, { index, digest, file }] of part.entries()) {
        const r = read[k];
        if (r === undefined || r.status === 'missing') {
          await this.forget(digest, 'its object file is missing');
        } else if (r.status === 'bad') {
          results[index] = await this.corrupt(digest, r.why);
        } else {
          if (file.hash !== undefined) this.markChecked(digest.hash);
          this.storeIndex.touch(digest);
          results[index] = Buffer.from(data, r.offset, digest.sizeBytes);
        }
      }
    }
    return results;
  }

  write(digest: Digest, data: AsyncIterable<Uint8Array> | Uint8Array): Promise<void> {
    return this.tracked(async () => {
      if (isEmptyDigest(digest)) {
        if (data instanceof Uint8Array && data.byteLength !== 0) throw mismatch(digest, 'data was given for the empty blob');
        return;
      }
      const tmp = await this.files.writeTemp(digest, data instanceof Uint8Array ? [data] : data);
      await this.files.commit([{ digest, tmp }]);
      await this.record([digest]);
    });
  }

  writeMany(blobs: readonly { digest: Digest; data: Uint8Array }[]): Promise<void> {
    return this.tracked(async () => {
      const files = blobs.filter(({ digest, data }) => {
        if (!isEmptyDigest(digest)) return true;
        if (data.byteLength !== 0) throw mismatch(digest, 'data was given for the empty blob');
        return false;
      });
      const { written, mismatches } = await this.files.writeSmall(files, true);
      if (mismatches[0] !== undefined) throw new MirrorError('DIGEST_MISMATCH', mismatches[0].message);
      await this.record(written);
    });
  }

  writeEach(blobs: readonly { digest: Digest; data: Uint8Array }[]): Promise<(MirrorError | undefined)[]> {
    return this.tracked(async () => {
      const results: (MirrorError | undefined)[] = blobs.map(() => undefined);
      const positions: number[] = [];
      blobs.forEach(({ digest, data }, i) => {
        if (!isEmptyDigest(digest)) positions.push(i);
        else if (data.byteLength !== 0) results[i] = mismatch(digest, 'data was given for the empty blob');
      });
      const { written, mismatches } = await this.files.writeSmall(positions.map((i) => blobs[i] ?? { digest: EMPTY_DIGEST, data: new Uint8Array() }), false);
      await this.record(written);
      for (const m of mismatches) results[positions[m.index] ?? 0] = new MirrorError('DIGEST_MISMATCH', m.message);
      return results;
    });
  }

  writeResumable(digest: Digest, fetch: FetchFrom): Promise<ResumableWrite> {
    return this.tracked(async () => {
      if (isEmptyDigest(digest)) return { resumedBytes: 0 };
      const previous = this.resumable.get(digest.hash);
      const mine = (async () => {
        if (previous) await previous.catch(() => undefined);
        const result = await this.files.writePartial(digest, fetch);
        await this.record([digest]);
        return result;
      })();
      this.resumable.set(digest.hash, mine);
      try {
        return await mine;
      } finally {
        if (this.resumable.get(digest.hash) === mine) this.resumable.delete(digest.hash);
      }
    });
  }

  /** Runs a write, registered so close() waits for it. */
  private tracked<R>(run: () => Promise<R>): Promise<R> {
    // A write after close() is a programmer mistake, not a MirrorError.
    if (this.closing) return Promise.reject(new TypeError(`the store in ${this.dir} is closing: no new writes`));
    const write = run();
    this.writes.add(write);
    const done = (): void => {
      this.writes.delete(write);
    };
    write.then(done, done);
    return write;
  }

  /** Records blobs whose files are in place (and were just hashed) in the index, in one batch. */
  private async record(digests: readonly Digest[]): Promise<void> {
    if (digests.length === 0) return;
    for (const digest of digests) this.markChecked(digest.hash);
    await this.storeIndex.record(digests);
  }

  /** Drops a blob from the index and deletes its file (used when it is found damaged). */
  async forget(digest: Digest, why: string): Promise<void> {
    this.checkedAt.delete(digest.hash);
    await this.storeIndex.forget(digest, why);
    await this.files.removeObject(digest);
  }

  /**
   * Deletes sound blobs no name needs (verify --prune): out of the index first, then their
   * files, so an interruption leaves valid unindexed files, never an index entry without a file.
   */
  async removeBlobs(digests: readonly Digest[]): Promise<void> {
    for (const d of digests) this.checkedAt.delete(d.hash);
    await this.storeIndex.remove(digests.map((d) => d.hash));
    for (const d of digests) await this.files.removeObject(d);
  }

  hasDamagedBlobs(): boolean {
    return this.storeIndex.hasDamagedBlobs();
  }

  /** Called by verify --repair once no remaining name needs a removed blob. */
  async clearDamage(): Promise<void> {
    await this.storeIndex.clearDamage();
  }

  /** Records a blob that is already in place (used by verify to re-index orphaned objects). */
  async index(digest: Digest): Promise<void> {
    await this.storeIndex.put(digest);
  }

  /** The indexed size of each hash, or undefined where it is not indexed. */
  indexedSizes(hashes: readonly string[]): Promise<(number | undefined)[]> {
    return this.storeIndex.sizesOf(hashes);
  }

  /** A table of the daemon's own state in the store's database (see StateTable). */
  stateTable<V>(name: string): StateTable<V> {
    return this.storeIndex.stateTable<V>(name);
  }

  /** Blobs and names stored, and the blobs' bytes (walks the index: about a second per million blobs). */
  async stats(): Promise<{ blobs: number; bytes: number; names: number }> {
    let blobs = 0;
    let bytes = 0;
    let names = 0;
    for await (const entry of this.storeIndex.blobEntries()) {
      blobs += 1;
      bytes += entry.sizeBytes;
    }
    for await (const _ of this.storeIndex.names()) names += 1;
    return { blobs, bytes, names };
  }

  blobEntries(): AsyncIterable<BlobEntry> {
    return this.storeIndex.blobEntries();
  }

  /** Every object file on disk: its name as a hash, and its path. */
  objectFiles(): AsyncIterable<{ hash: string; path: string }> {
    return this.files.objectFiles();
  }

  /** What `<dir>/tmp` holds: stale temp files and partial downloads. */
  tempFiles(): Promise<TempFile[]> {
    return this.files.tempFiles();
  }

  removeTemp(file: TempFile): Promise<void> {
    return this.files.removeTemp(file);
  }

  getName(urn: string): Promise<NameRecord | undefined> {
    return this.storeIndex.getName(urn);
  }

  putName(urn: string, record: NameRecord): Promise<void> {
    return this.storeIndex.putName(urn, record);
  }

  deleteName(urn: string): Promise<void> {
    return this.storeIndex.deleteName(urn);
  }

  names(): AsyncIterable<[string, NameRecord]> {
    return this.storeIndex.names();
  }
}
