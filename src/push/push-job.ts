import type { Logger } from 'pino';
import type { ContentStore, NameRecord } from '../cas/content-store.js';
import { checkMessageSize, parseDirectory, uniqueDigests } from '../cas/closure.js';
import { type Digest, digestKey } from '../cas/digest.js';
import { type MirrorName, parseUrn } from '../cas/names.js';
import { MirrorError } from '../errors.js';
import { type UpstreamWriter, WRITE_CHUNK_BYTES, dialectHolds } from '../remote/upstream.js';

/**
 * Bytes one entry of a BatchUpdateBlobs request costs besides its data (digest, tags, lengths),
 * counted against the batch limit so a full batch still fits a server's message size limit.
 */
const BATCH_ENTRY_OVERHEAD = 128;
/** Directories read from the store at once while walking a tree. */
const TREE_READ_GROUP = 1024;
/** Uploads (batches or streams) of one name under way at once. */
const DEFAULT_UPLOAD_CONCURRENCY = 4;

export interface PushNameOptions {
  readonly store: ContentStore;
  readonly writer: UpstreamWriter;
  /** The canonical URN of a name recorded in the store. */
  readonly urn: string;
  readonly log: Logger;
  /** Checked between steps; an upload under way finishes (or fails) by itself. */
  readonly signal?: AbortSignal | undefined;
  readonly uploadConcurrency?: number | undefined;
}

export type PushOutcome =
  /** The closure's missing blobs were uploaded, then the name set. */
  | { readonly status: 'pushed'; readonly blobs: number; readonly bytes: number }
  /** The upstream already has the name with the same digest: nothing was sent. */
  | { readonly status: 'present' }
  /** Nothing to do: the upstream cannot hold the name's kind (a 2.x name for a 1.x server). */
  | { readonly status: 'dropped'; readonly reason: string };

/**
 * Replicates one name from the store to one upstream, as BuildStream pushes: ask whether the
 * upstream already has it with the same digest (done if so); walk the name's closure in the
 * store; FindMissingBlobs; upload what is missing (BatchUpdateBlobs within the upstream's batch
 * limit, larger blobs by ByteStream.Write); and set the name LAST, so the upstream never holds a
 * name whose blobs it lacks. Idempotent: run again after any failure (or a kill), it skips what
 * the upstream already has. Throws the first failure (see isRetryable for which to retry); a
 * closure no longer whole in the store is CLOSURE_INCOMPLETE.
 */
export async function pushName(options: PushNameOptions): Promise<PushOutcome> {
  const { store, writer, urn, log, signal } = options;
  const record = await store.getName(urn);
  if (record === undefined) {
    // Acknowledged once, so its loss must show: the job fails (verify --repair removes names whose blobs went bad).
    throw new MirrorError('NAME_NOT_FOUND', 'the name is no longer in the mirror (verify --repair removes names whose blobs went bad): push it to the mirror again');
  }
  const name = parseUrn(urn);
  const { dialect, maxBatchBytes } = await writer.connect();
  if (!dialectHolds(dialect, name.kind)) {
    return { status: 'dropped', reason: `${writer.name} speaks ReferenceStorage (BuildStream 1.x), which holds 1.x refs only` };
  }
  // A pull-only upstream refuses here, before any of the closure is uploaded.
  await writer.checkPushAllowed();
  const there = await writer.resolve(name);
  if (there !== undefined && digestKey(there) === digestKey(record.digest)) return { status: 'present' };
  signal?.throwIfAborted();

  const closure = await localClosure(store, name, record);
  const missing = await writer.findMissing(closure);
  signal?.throwIfAborted();
  const small: Digest[] = [];
  const large: Digest[] = [];
  for (const d of missing) (d.sizeBytes + BATCH_ENTRY_OVERHEAD <= maxBatchBytes ? small : large).push(d);
  const uploads = [
    ...batches(small, maxBatchBytes).map((batch) => async () => {
      signal?.throwIfAborted();
      const data = await store.readManyBytes(batch);
      await writer.batchUpdate(batch.map((digest, i) => ({ digest, data: stored(data[i], digest, urn) })));
    }),
    ...large.map((digest) => async () => {
      signal?.throwIfAborted();
      const reader = await store.read(digest);
      if (reader === undefined) throw notStored(digest, urn);
      await writer.writeStream(digest, reader.chunks(WRITE_CHUNK_BYTES));
    }),
  ];
  await runAll(uploads, options.uploadConcurrency ?? DEFAULT_UPLOAD_CONCURRENCY);
  signal?.throwIfAborted();

  await writer.setName(name, record);
  const bytes = missing.reduce((n, d) => n + d.sizeBytes, 0);
  log.debug({ urn, upstream: writer.name, closure: closure.length, blobs: missing.length, bytes }, 'name pushed upstream');
  return { status: 'pushed', blobs: missing.length, bytes };
}

/**
 * Every blob the name needs, from the store: its own digest, the referenced blobs, and every
 * Directory and file of its trees (the referenced directories, plus its own digest for a
 * Directory name). The empty blob stays in: REAPI servers report it present, but BuildStream
 * 1.6's server keeps it as an object file like any other, reports it missing until uploaded,
 * and drops a ref (GetReference: NOT_FOUND) whose tree names an object it lacks. Throws
 * CLOSURE_INCOMPLETE if the store no longer has all of it.
 */
export async function localClosure(store: ContentStore, name: MirrorName, record: NameRecord): Promise<Digest[]> {
  const files: Digest[] = [...record.referencedBlobs];
  const trees: Digest[] = [...record.referencedDirectories];
  if (record.type === 'directory') trees.push(record.digest);
  else files.push(record.digest);
  const directories: Digest[] = [];
  const seen = new Set<string>();
  let level = uniqueDigests(trees);
  while (level.length > 0) {
    const next: Digest[] = [];
    for (let i = 0; i < level.length; i += TREE_READ_GROUP) {
      const group = level.slice(i, i + TREE_READ_GROUP);
      for (const d of group) {
        checkMessageSize(d, 'Directory');
        seen.add(digestKey(d));
      }
      const data = await store.readManyBytes(group);
      group.forEach((d, k) => {
        const children = parseDirectory(stored(data[k], d, name.urn), d);
        files.push(...children.files);
        next.push(...children.directories);
      });
      directories.push(...group);
    }
    level = uniqueDigests(next).filter((d) => !seen.has(digestKey(d)));
  }
  const all = uniqueDigests([...directories, ...files]);
  const absent = await store.findMissing(all);
  const first = absent[0];
  if (first !== undefined) throw notStored(first, name.urn, absent.length - 1);
  return all;
}

/** A blob's bytes as the store gave them, or the reason they cannot be pushed. */
function stored(data: Buffer | undefined | MirrorError, digest: Digest, urn: string): Buffer {
  if (data instanceof MirrorError) throw data;
  if (data === undefined) throw notStored(digest, urn);
  return data;
}

function notStored(digest: Digest, urn: string, more = 0): MirrorError {
  const others = more > 0 ? ` (and ${more} more)` : '';
  return new MirrorError('CLOSURE_INCOMPLETE', `${urn} cannot be pushed: blob ${digestKey(digest)}${others} of its closure is no longer in the mirror`);
}

/** Splits digests, in order, into BatchUpdateBlobs requests within `budget` bytes, overhead included. */
function batches(digests: readonly Digest[], budget: number): Digest[][] {
  const out: Digest[][] = [];
  let current: Digest[] = [];
  let bytes = 0;
  for (const d of digests) {
    const cost = d.sizeBytes + BATCH_ENTRY_OVERHEAD;
    if (current.length > 0 && bytes + cost > budget) {
      out.push(current);
      current = [];
      bytes = 0;
    }
    current.push(d);
    bytes += cost;
  }
  if (current.length > 0) out.push(current);
  return out;
}

/** Runs the tasks, `concurrency` at a time; after the first failure starts no more, and throws it once the running ones settle. */
async function runAll(tasks: readonly (() => Promise<void>)[], concurrency: number): Promise<void> {
  let next = 0;
  let failure: { err: unknown } | undefined;
  const worker = async (): Promise<void> => {
    while (failure === undefined && next < tasks.length) {
      const task = tasks[next++];
      try {
        await task?.();
      } catch (err) {
        failure ??= { err };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, tasks.length) }, worker));
  if (failure !== undefined) throw failure.err;
}
