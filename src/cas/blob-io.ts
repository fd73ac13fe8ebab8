/**
 * The store's two worker programs: storing batches of small blobs (sync) and reading them
 * (BatchReadBlobs, GetTree, lookups). Each is self-contained source run on its own thread by
 * IoWorker; see there for why.
 */
import type { WorkerAnswer } from './io-worker.js';

/** One small blob to store: expected hash and size, content, temp path and final path. */
export interface BlobFile {
  readonly hash: string;
  readonly size: number;
  readonly data: Uint8Array;
  readonly tmp: string;
  readonly path: string;
}

export interface WriteRequest {
  readonly blobs: readonly BlobFile[];
  /**
   * true: one blob that does not match its digest fails the whole batch (nothing is written).
   * false: the blobs that match are written, the others skipped and reported.
   */
  readonly allOrNothing: boolean;
}

/** The blobs (by index in the request) whose content does not match their digest, with why. */
export interface WriteReply {
  readonly mismatches: readonly { readonly index: number; readonly message: string }[];
}

/**
 * Checks every blob's size and SHA-256 first, then writes each sound one to its temp file and
 * fdatasyncs it, and only when all are written renames them into place; on failure it removes
 * its temp files. The caller indexes what was written only on success, so the batch becomes
 * visible whole or not at all (a rename failing midway leaves verified, unindexed files, which
 * `verify --repair` re-indexes).
 */
export function blobWriterProgram(): (request: WriteRequest) => WorkerAnswer<WriteReply> {
  const { createHash } = require('node:crypto') as typeof import('node:crypto');
  const fs = require('node:fs') as typeof import('node:fs');
  const path = require('node:path') as typeof import('node:path');
  const madeDirs = new Set<string>();
  return ({ blobs: all, allOrNothing }) => {
    const mismatches: { index: number; message: string }[] = [];
    const blobs = all.filter((blob, index) => {
      const problem =
        blob.data.byteLength !== blob.size ? `${blob.data.byteLength} bytes were sent` : (() => {
          const actual = createHash('sha256').update(blob.data).digest('hex');
          return actual === blob.hash ? undefined : `the content hashes to ${actual}`;
        })();
      if (problem !== undefined) mismatches.push({ index, message: `content does not match digest ${blob.hash}/${blob.size}: ${problem}` });
      return problem === undefined;
    });
    if (allOrNothing && mismatches.length > 0) return { reply: { mismatches: mismatches.slice(0, 1) } };
    const written: string[] = [];
    try {
      for (const blob of blobs) {
        const fd = fs.openSync(blob.tmp, 'wx', 0o644);
        written.push(blob.tmp);
        try {
          for (let off = 0; off < blob.data.byteLength; ) off += fs.writeSync(fd, blob.data, off, blob.data.byteLength - off);
          fs.fdatasyncSync(fd);
        } finally {
          fs.closeSync(fd);
        }
      }
      for (const blob of blobs) {
        const dir = path.dirname(blob.path);
        if (!madeDirs.has(dir)) {
          fs.mkdirSync(dir, { recursive: true });
          madeDirs.add(dir);
        }
        fs.renameSync(blob.tmp, blob.path);
      }
    } catch (err) {
      for (const tmp of written) fs.rmSync(tmp, { force: true });
      throw err;
    }
    return { reply: { mismatches } };
  };
}

/** One stored blob to read whole; `hash` is set when its content is due a check. */
export interface ReadFile {
  readonly path: string;
  readonly size: number;
  readonly hash?: string;
}

export interface ReadRequest {
  readonly files: readonly ReadFile[];
}

export type ReadResult =
  | { readonly status: 'ok'; readonly offset: number }
  | { readonly status: 'missing' }
  | { readonly status: 'bad'; readonly why: string };

/** The results in request order; each `ok` blob is `size` bytes at `offset` in `data`. */
export interface ReadReply {
  readonly results: ReadResult[];
  readonly data: ArrayBuffer;
}

/** Reads every file into one buffer, which is moved (not copied) back to the caller. */
export function blobReaderProgram(): (request: ReadRequest) => WorkerAnswer<ReadReply> {
  const { createHash } = require('node:crypto') as typeof import('node:crypto');
  const fs = require('node:fs') as typeof import('node:fs');
  return ({ files }) => {
    // Its own ArrayBuffer (never Buffer's shared pool), so it can be transferred.
    const out = Buffer.allocUnsafeSlow(files.reduce((n, f) => n + f.size, 0));
    let offset = 0;
    const results = files.map((file): ReadResult => {
      let fd: number;
      try {
        fd = fs.openSync(file.path, 'r');
      } catch (err) {
        if ((err as { code?: string }).code === 'ENOENT') return { status: 'missing' };
        throw err;
      }
      try {
        const size = fs.fstatSync(fd).size;
        if (size !== file.size) return { status: 'bad', why: `its object file has ${size} bytes instead of ${file.size}` };
        const at = offset;
        for (let got = 0; got < file.size; ) {
          const n = fs.readSync(fd, out, at + got, file.size - got, got);
          if (n === 0) return { status: 'bad', why: 'its object file shrank while being read' };
          got += n;
        }
        if (file.hash !== undefined && createHash('sha256').update(out.subarray(at, at + file.size)).digest('hex') !== file.hash) {
          return { status: 'bad', why: 'its content no longer matches its digest' };
        }
        offset += file.size;
        return { status: 'ok', offset: at };
      } finally {
        fs.closeSync(fd);
      }
    });
    return { reply: { results, data: out.buffer }, transfer: [out.buffer] };
  };
}
