import type { MirrorError } from '../errors.js';
import type { Digest } from './digest.js';

export interface ByteRange {
  /** First byte to return, 0 <= offset <= size. */
  readonly offset: number;
  /** Most bytes to return; undefined means to the end. */
  readonly limit?: number | undefined;
}

/** A stored blob being read: the length of the requested range and its bytes, in chunks. */
export interface BlobReader {
  /** Bytes the range holds (the requested range clipped to the blob). */
  readonly length: number;
  /**
   * Yields the range in order, `chunkBytes` at a time. Each chunk is a new buffer the caller owns,
   * with `headroom` spare bytes in front of the data (the data is `chunk.subarray(headroom)`), so a
   * transport can write its framing in place instead of copying every byte once more.
   * When the whole blob is read and is due a check, it is rehashed as it is read; a mismatch
   * throws MirrorError('BLOB_CORRUPT') in place of the last chunk (and forgets the blob), so a
   * reader never sees a clean end of bad data.
   */
  chunks(chunkBytes: number, headroom?: number): AsyncIterable<Buffer>;
}

/** A blob's bytes from byte `offset` on, as an upstream streams them. */
export type FetchFrom = (offset: number) => AsyncIterable<Uint8Array>;

export interface ResumableWrite {
  /** Bytes that were already there from an interrupted earlier download (not fetched again). */
  readonly resumedBytes: number;
}

/** Where a name came from and what it needs. */
export interface NameRecord {
  /** What the name points to: a Directory (refs, single sources) or a blob (Artifact/Source proto). */
  readonly type: 'directory' | 'blob';
  readonly digest: Digest;
  /** Blobs the name needs besides `digest` (logs, metadata, public data). */
  readonly referencedBlobs: readonly Digest[];
  /** Directory trees the name needs besides `digest`. */
  readonly referencedDirectories: readonly Digest[];
  /** The upstream it was mirrored from. */
  readonly upstream: string;
  /** When it was mirrored (ms since the epoch). */
  readonly fetchedAt: number;
}

/**
 * Content-addressed blob storage with a name index, the one seam between transports and storage.
 * Safe for concurrent use within one process. Blobs are verified (SHA-256 and size) before they
 * become visible; the empty blob is always present.
 */
export interface ContentStore {
  /** The digests in `digests` that are not stored, in order, duplicates kept. */
  findMissing(digests: readonly Digest[]): Promise<Digest[]>;
  /** A blob's bytes, or undefined when it is not stored (never throws for a miss). */
  read(digest: Digest, range?: ByteRange): Promise<BlobReader | undefined>;
  /**
   * A small blob's whole content, verified against its digest; undefined when not stored.
   * Throws MirrorError('BLOB_CORRUPT') when the stored object no longer matches (and forgets it).
   */
  readBytes(digest: Digest): Promise<Buffer | undefined>;
  /**
   * readBytes for many small blobs with one index lookup. Each entry is the blob's content,
   * undefined when it is not stored, or the MirrorError reading it raised (BLOB_CORRUPT).
   */
  readManyBytes(digests: readonly Digest[]): Promise<(Buffer | undefined | MirrorError)[]>;
  /** Stores a blob. Throws MirrorError('DIGEST_MISMATCH') and stores nothing if content does not match. */
  write(digest: Digest, data: AsyncIterable<Uint8Array> | Uint8Array): Promise<void>;
  /** Stores several small blobs with one index update; each is verified as by write(). */
  writeMany(blobs: readonly { digest: Digest; data: Uint8Array }[]): Promise<void>;
  /**
   * Like writeMany, but a blob that does not match its digest does not stop the others: every
   * sound blob is stored, and each entry of the result is undefined (stored) or that blob's
   * MirrorError('DIGEST_MISMATCH'). Other failures (disk full) throw, storing none of the batch.
   */
  writeEach(blobs: readonly { digest: Digest; data: Uint8Array }[]): Promise<(MirrorError | undefined)[]>;
  /**
   * Stores a large blob that `fetch(offset)` streams from byte `offset`. If an earlier call for
   * this blob was interrupted (a failure, or the process killed), the bytes it received are kept
   * and `fetch` is asked only for the rest; the whole content is verified at the end (and fetched
   * again from zero once if it does not match). Throws MirrorError('DIGEST_MISMATCH') and keeps
   * nothing if the content is wrong; any other failure keeps what was received for the next call.
   */
  writeResumable(digest: Digest, fetch: FetchFrom): Promise<ResumableWrite>;

  /**
   * True when blobs were removed as damaged (bit rot, lost files) since the last repair or
   * re-fetch. Names recorded before may then have incomplete closures, so lookups check them whole.
   */
  hasDamagedBlobs(): boolean;

  /** The record of a name (by canonical URN), or undefined. */
  getName(urn: string): Promise<NameRecord | undefined>;
  /** Records a name. Callers must have stored the name's whole closure first. */
  putName(urn: string, record: NameRecord): Promise<void>;
  deleteName(urn: string): Promise<void>;
  names(): AsyncIterable<[string, NameRecord]>;
}
