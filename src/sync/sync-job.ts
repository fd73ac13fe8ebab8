import pLimit from 'p-limit';
import type { Logger } from 'pino';
import type { ContentStore, NameRecord } from '../cas/content-store.js';
import { type Roots, artifactRoots, checkMessageSize, parseDirectory, sourceRoots, uniqueDigests } from '../cas/closure.js';
import { type Digest, EMPTY_DIGEST, digestKey, groupBySize } from '../cas/digest.js';
import { type MirrorName, isDirectoryName, parseUserName } from '../cas/names.js';
import { MirrorError, errorMessage, isMirrorError } from '../errors.js';
import { isUnreachable } from '../remote/health.js';
import type { Upstream } from '../remote/upstream.js';
import { Backlog, type BacklogShare, TaskScope } from './task-scope.js';
import { TransferLimiter } from './transfer-limiter.js';

export interface SyncOptions {
  readonly store: ContentStore;
  /** Tried in order for each name; the first that has it wins. */
  readonly upstreams: readonly Upstream[];
  /** Names as the user gives them: `project/element/key` or full BuildStream URNs. */
  readonly names: readonly string[];
  /** Also mirror 2.x artifacts' buildtree, sources, buildroot and sandbox trees. */
  readonly withBuildtrees?: boolean;
  /** Upstream requests in flight at once (batches and streams). */
  readonly concurrency?: number;
  readonly log: Logger;
  readonly onProgress?: (progress: SyncProgress) => void;
  /** Cancels the run: names not started fail as cancelled, transfers under way stop (partial downloads are kept). */
  readonly signal?: AbortSignal | undefined;
}

export interface SyncProgress {
  readonly namesTotal: number;
  readonly namesDone: number;
  readonly blobsTransferred: number;
  readonly bytesTransferred: number;
  /** Bytes of large blobs received so far that are not yet stored (streams under way). */
  readonly bytesStreaming: number;
  /** Bytes of every blob this run has found missing and queued so far (grows while trees are walked). */
  readonly bytesQueued: number;
  /** Names whose closure has been walked whole: once all have, bytesQueued is the run's total. */
  readonly namesWalked: number;
}

/** An upstream this run could not reach, reported once however many names it failed. */
export interface Outage {
  readonly upstream: string;
  readonly reason: string;
}

export type NameStatus = 'mirrored' | 'present' | 'missing' | 'failed';

export interface NameResult {
  /** The name as given. */
  readonly input: string;
  readonly status: NameStatus;
  /** The URN it was recorded under, when found. */
  readonly urn?: string;
  readonly upstream?: string;
  /** Why it is missing or failed. */
  readonly reason?: string;
  readonly blobsTransferred: number;
  readonly bytesTransferred: number;
}

export interface SyncReport {
  readonly results: NameResult[];
  /** Blobs this run stored, and their bytes (a blob resumed from a partial download counts whole). */
  readonly blobsTransferred: number;
  readonly bytesTransferred: number;
  /** Of bytesTransferred, the bytes that came from partial downloads of an earlier, interrupted run. */
  readonly bytesResumed: number;
  readonly durationMs: number;
  /** Upstreams that could not be reached during the run, with the first reason. */
  readonly outages: Outage[];
}

/** Names synced at once; each name's own blob transfers share the `concurrency` limit. */
const NAME_CONCURRENCY = 4;
/** BuildStream 1.6 groups FindMissingBlobs the same way; it bounds each index lookup. */
const FIND_MISSING_GROUP = 4096;
/** Directories fetched, read and parsed together while walking a tree (bounds memory on wide levels). */
const WALK_CHUNK = 1024;
/** File digests handed to one fetch task (one index lookup, then batches up to the upstream's limit). */
const FILE_CHUNK = 4096;
/** File digests of one name waiting for a transfer slot before its tree walk pauses. */
const MAX_QUEUED_FILES = 16_384;

/**
 * Mirrors each name's whole closure from the first upstream that has it, then records the name,
 * so a name is never visible before every blob it needs is stored. Blobs already stored locally
 * are not transferred again; every transferred blob is verified before it is stored. Returns
 * only when every transfer it started has finished (stored, or failed and cleaned up), so the
 * report counts exactly what was stored.
 */
export async function syncNames(options: SyncOptions): Promise<SyncReport> {
  const started = Date.now();
  const transfers = new TransferLimiter(options.concurrency ?? 8);
  // Names synced together often share blobs (logs, metadata, common files): each is fetched once.
  const inFlight: InFlight = new Map();
  const perName = pLimit(NAME_CONCURRENCY);
  const totals = { blobs: 0, bytes: 0, resumed: 0, namesDone: 0, streaming: 0, queued: 0, walked: 0 };
  const outages = new Map<string, string>();
  const report = (): void =>
    options.onProgress?.({
      namesTotal: options.names.length,
      namesDone: totals.namesDone,
      blobsTransferred: totals.blobs,
      bytesTransferred: totals.bytes,
      bytesStreaming: totals.streaming,
      bytesQueued: totals.queued,
      namesWalked: totals.walked,
    });
  const results = await Promise.all(
    options.names.map((input) =>
      perName(async () => {
        const counter = {
          blobs: 0,
          bytes: 0,
          walkedOnce: false,
          add(blobs: number, bytes: number, resumed: number, streamed = 0) {
            this.blobs += blobs;
            this.bytes += bytes;
            totals.blobs += blobs;
            totals.bytes += bytes;
            totals.resumed += resumed;
            totals.streaming -= streamed;
            report();
          },
          streamed(bytes: number) {
            totals.streaming += bytes;
            report();
          },
          queued(bytes: number) {
            totals.queued += bytes;
          },
          walked() {
            if (this.walkedOnce) return;
            this.walkedOnce = true;
            totals.walked += 1;
            report();
          },
          unreachable(upstream: string, reason: string) {
            if (!outages.has(upstream)) outages.set(upstream, reason);
          },
        };
        const result = await syncOne(input, options, transfers, inFlight, counter);
        counter.walked();
        totals.namesDone += 1;
        report();
        const fields = { name: input, status: result.status, upstream: result.upstream, blobs: counter.blobs, bytes: counter.bytes };
        if (result.status === 'failed') options.log.error({ ...fields, reason: result.reason }, 'name failed');
        else if (result.status === 'missing') options.log.warn({ ...fields, reason: result.reason }, 'name missing upstream');
        else options.log.info(fields, `name ${result.status}`);
        return { ...result, blobsTransferred: counter.blobs, bytesTransferred: counter.bytes };
      }),
    ),
  );
  return {
    results,
    blobsTransferred: totals.blobs,
    bytesTransferred: totals.bytes,
    bytesResumed: totals.resumed,
    durationMs: Date.now() - started,
    outages: [...outages].map(([upstream, reason]) => ({ upstream, reason })),
  };
}

interface Counter {
  /**
   * Counts blobs stored (with their bytes, of which `resumed` came from partial downloads); a
   * streamed blob hands over its `streamed` bytes in the same step, so progress never dips between.
   */
  add(blobs: number, bytes: number, resumed: number, streamed?: number): void;
  /** Bytes received (positive) or handed over to add() or dropped (negative) of streams under way. */
  streamed(bytes: number): void;
  /** Bytes of blobs queued for transfer. */
  queued(bytes: number): void;
  /** The name's closure has been walked whole (or its sync ended). Idempotent. */
  walked(): void;
  /** An upstream could not be reached (the first reason per upstream is reported). */
  unreachable(upstream: string, reason: string): void;
  readonly blobs: number;
}

/** Blob transfers under way, by digest key, shared by every name of one sync. */
type InFlight = Map<string, Promise<void>>;

/** Why a run was cancelled: its signal's reason (the daemon stopping, the client gone), as a name's failure. */
function cancelledReason(signal: AbortSignal): string {
  return `cancelled: ${signal.reason instanceof Error ? signal.reason.message : 'the daemon is shutting down'}`;
}

async function syncOne(
  input: string,
  options: SyncOptions,
  transfers: TransferLimiter,
  inFlight: InFlight,
  counter: Counter,
): Promise<Omit<NameResult, 'blobsTransferred' | 'bytesTransferred'>> {
  if (options.signal?.aborted) return { input, status: 'failed', reason: cancelledReason(options.signal) };
  let candidates: MirrorName[];
  try {
    candidates = parseUserName(input);
  } catch (err) {
    return { input, status: 'failed', reason: errorMessage(err) };
  }
  const upstreamErrors: string[] = [];
  let unreachable = 0;
  for (const upstream of options.upstreams) {
    let found: { name: MirrorName; digest: Digest } | undefined;
    try {
      for (const name of candidates) {
        const digest = await upstream.resolve(name);
        if (digest) {
          found = { name, digest };
          break;
        }
      }
    } catch (err) {
      upstreamErrors.push(errorMessage(err));
      if (isUnreachable(err)) {
        unreachable += 1;
        counter.unreachable(upstream.name, errorMessage(err));
      }
      continue;
    }
    if (!found) continue;
    const { name, digest } = found;
    try {
      const fetcher = new ClosureFetcher(options.store, upstream, transfers, inFlight, counter, options.signal);
      const before = counter.blobs;
      const roots = await fetcher.fetchName(name, digest, options.withBuildtrees ?? false);
      const existing = await options.store.getName(name.urn);
      const record: NameRecord = {
        type: isDirectoryName(name.kind) ? 'directory' : 'blob',
        digest,
        referencedBlobs: roots.blobs,
        referencedDirectories: roots.directories,
        upstream: upstream.name,
        fetchedAt: Date.now(),
      };
      const unchanged = existing !== undefined && digestKey(existing.digest) === digestKey(digest);
      if (!unchanged || counter.blobs !== before) await options.store.putName(name.urn, record);
      return { input, status: unchanged && counter.blobs === before ? 'present' : 'mirrored', urn: name.urn, upstream: upstream.name };
    } catch (err) {
      if (isUnreachable(err)) counter.unreachable(upstream.name, errorMessage(err));
      return { input, status: 'failed', urn: name.urn, upstream: upstream.name, reason: describeFetchError(err) };
    }
  }
  if (unreachable > 0 && unreachable === upstreamErrors.length && unreachable === options.upstreams.length) {
    // Every upstream is out of reach: what the mirror already holds is still good to serve.
    for (const name of candidates) {
      const held = await options.store.getName(name.urn);
      if (held) return { input, status: 'present', urn: name.urn, upstream: held.upstream, reason: 'not checked upstream: no upstream reachable (see the outages)' };
    }
    return { input, status: 'failed', reason: 'no upstream reachable (see the outages)' };
  }
  if (upstreamErrors.length > 0) {
    return { input, status: 'failed', reason: upstreamErrors.join('; ') };
  }
  const tried = candidates.map((c) => c.urn).join(' or ');
  return { input, status: 'missing', reason: `no upstream has ${tried}` };
}

function describeFetchError(err: unknown): string {
  if (isMirrorError(err, 'DIGEST_MISMATCH')) return `upstream sent a corrupt blob, which was not stored: ${err.message}`;
  return errorMessage(err);
}

/**
 * Fetches the blobs of one name that the store lacks, from one upstream. The tree walk waits only
 * for the Directory blobs it reads; file blobs (small in batches, large by ByteStream) are fetched
 * by tasks running beside it, so a closure's big files and its subdirectories move together. Every
 * task belongs to the name's TaskScope, and fetchName returns only when all have settled.
 */
class ClosureFetcher {
  private readonly scope = new TaskScope();
  /** This name's file digests waiting for a transfer slot; the walk pauses when there are too many. */
  private readonly backlog = new Backlog();

  constructor(
    private readonly store: ContentStore,
    private readonly upstream: Upstream,
    private readonly transfers: TransferLimiter,
    private readonly inFlight: InFlight,
    private readonly counter: Counter,
    private readonly signal: AbortSignal | undefined,
  ) {}

  private checkCancelled(): void {
    if (this.signal?.aborted) throw new MirrorError('UPSTREAM_ERROR', cancelledReason(this.signal));
  }

  /**
   * Fetches the name's closure; returns what it references besides its own digest. Throws the
   * first failure, after every transfer the name started has finished or been dropped unstarted.
   */
  async fetchName(name: MirrorName, digest: Digest, withBuildtrees: boolean): Promise<Roots> {
    let roots: Roots = { directories: [], blobs: [] };
    this.scope.spawn(async () => {
      if (isDirectoryName(name.kind)) {
        await this.walkTrees([digest]);
        this.counter.walked();
        return;
      }
      checkMessageSize(digest, name.kind === 'artifact' ? 'BuildStream Artifact' : 'BuildStream Source');
      await this.fetchBlobs([digest], true);
      const data = await this.mustRead(digest);
      roots = name.kind === 'artifact' ? artifactRoots(data, digest, withBuildtrees) : sourceRoots(data, digest);
      await this.fetchFiles(roots.blobs);
      await this.walkTrees(roots.directories);
      this.counter.walked();
    });
    await this.scope.drain();
    return roots;
  }

  /** Walks whole Directory trees, one level (in chunks) at a time, handing their files to fetchFiles. */
  private async walkTrees(roots: readonly Digest[]): Promise<void> {
    const seen = new Set<string>();
    let level = uniqueDigests(roots);
    while (level.length > 0) {
      for (const d of level) seen.add(digestKey(d));
      const next: Digest[] = [];
      for (let i = 0; i < level.length; i += WALK_CHUNK) {
        if (this.scope.failed) return;
        const part = level.slice(i, i + WALK_CHUNK);
        for (const d of part) checkMessageSize(d, 'Directory');
        await this.fetchBlobs(part, true);
        const children = (await this.mustReadMany(part)).map((data, k) => parseDirectory(data, part[k] ?? EMPTY_DIGEST));
        await this.fetchFiles(children.flatMap((c) => c.files));
        for (const c of children) for (const d of c.directories) if (!seen.has(digestKey(d))) next.push(d);
      }
      level = uniqueDigests(next);
    }
  }

  /** Starts fetching file blobs in tasks of the scope; waits only while the backlog is full. */
  private async fetchFiles(digests: readonly Digest[]): Promise<void> {
    const unique = uniqueDigests(digests);
    for (let i = 0; i < unique.length; i += FILE_CHUNK) {
      await this.backlog.below(MAX_QUEUED_FILES);
      if (this.scope.failed) return;
      const part = unique.slice(i, i + FILE_CHUNK);
      const share = this.backlog.take(part.length);
      this.scope.spawn(async () => {
        try {
          await this.fetchBlobs(part, false, share);
        } finally {
          share.releaseAll();
        }
      });
    }
  }

  private async mustRead(digest: Digest): Promise<Uint8Array> {
    return (await this.mustReadMany([digest]))[0] ?? Buffer.alloc(0);
  }

  /** Reads blobs just fetched, in one store request. */
  private async mustReadMany(digests: readonly Digest[]): Promise<Uint8Array[]> {
    const results = await this.store.readManyBytes(digests);
    return results.map((data, i) => {
      if (data instanceof MirrorError) throw data;
      if (data === undefined) throw new MirrorError('BLOB_NOT_FOUND', `blob ${digestKey(digests[i] ?? EMPTY_DIGEST)} vanished from the store during sync`);
      return data;
    });
  }

  /**
   * Transfers the digests the store lacks: small ones in batches, large ones by ByteStream.
   * Blobs another name is already fetching are waited for instead, and fetched here only if
   * that transfer did not store them. `share` is given back as the digests get going.
   */
  private async fetchBlobs(digests: readonly Digest[], priority: boolean, share?: BacklogShare): Promise<void> {
    const unique = uniqueDigests(digests);
    const missing: Digest[] = [];
    for (let i = 0; i < unique.length; i += FIND_MISSING_GROUP) {
      missing.push(...(await this.store.findMissing(unique.slice(i, i + FIND_MISSING_GROUP))));
    }
    share?.release(digests.length - missing.length);
    if (missing.length === 0) return;
    const { maxBatchBytes } = await this.upstream.connect();
    // From here to transfer() registering its blobs there is no await, so no other name can
    // start the same blobs in between.
    const elsewhere = missing.filter((d) => this.inFlight.has(digestKey(d)));
    share?.release(elsewhere.length);
    await settleAll([
      this.transfer(missing.filter((d) => !this.inFlight.has(digestKey(d))), maxBatchBytes, priority, share),
      (async () => {
        if (elsewhere.length === 0) return;
        await Promise.allSettled(elsewhere.map((d) => this.inFlight.get(digestKey(d))));
        await this.transfer(await this.store.findMissing(elsewhere), maxBatchBytes, priority);
      })(),
    ]);
  }

  /**
   * Queues transfers of `missing` (registered as in flight until they settle) and waits for all
   * of them to settle, then throws the first failure. A transfer whose turn comes after the name
   * failed is dropped; one whose blobs another name stored meanwhile fetches only what is still
   * missing, so no blob is fetched twice and the counts stay exact.
   */
  private async transfer(missing: readonly Digest[], maxBatchBytes: number, priority: boolean, share?: BacklogShare): Promise<void> {
    if (missing.length === 0) return;
    this.counter.queued(missing.reduce((n, d) => n + d.sizeBytes, 0));
    const large = missing.filter((d) => d.sizeBytes > maxBatchBytes);
    const batches = groupBySize(missing.filter((d) => d.sizeBytes <= maxBatchBytes), maxBatchBytes);
    const track = (digestsOf: readonly Digest[], stream: boolean, run: (still: Digest[]) => Promise<void>): Promise<void> => {
      const done = this.transfers.run({ priority, stream }, async () => {
        share?.release(digestsOf.length);
        if (this.scope.failed) return;
        this.checkCancelled();
        const still = await this.store.findMissing(digestsOf);
        if (still.length > 0) await run(still);
      });
      for (const d of digestsOf) this.inFlight.set(digestKey(d), done);
      const forget = (): void => {
        for (const d of digestsOf) if (this.inFlight.get(digestKey(d)) === done) this.inFlight.delete(digestKey(d));
      };
      done.then(forget, forget);
      return done;
    };
    await settleAll([
      ...batches.map((batch) => track(batch, false, (still) => this.fetchBatch(still))),
      ...large.map((d) => track([d], true, () => this.fetchLarge(d))),
    ]);
  }

  /** Stores every sound blob of a batch, counts them, then throws for the first bad or absent one. */
  private async fetchBatch(batch: readonly Digest[]): Promise<void> {
    const results = await this.upstream.batchRead(batch);
    const found: { digest: Digest; data: Uint8Array }[] = [];
    const absent: Digest[] = [];
    for (const r of results) {
      if ('missing' in r) absent.push(r.digest);
      else found.push(r);
    }
    const errors = await this.store.writeEach(found);
    const stored = found.filter((_, i) => errors[i] === undefined);
    this.counter.add(stored.length, stored.reduce((n, b) => n + b.digest.sizeBytes, 0), 0);
    const bad = errors.find((e) => e !== undefined);
    if (bad) throw bad;
    if (absent[0]) throw new MirrorError('BLOB_NOT_FOUND', `${this.upstream.name} does not have blob ${digestKey(absent[0])}, which the name needs`);
  }

  /** Streams a large blob into the store, resuming a partial download an earlier run left. */
  private async fetchLarge(digest: Digest): Promise<void> {
    let received = 0;
    const counter = this.counter;
    const upstream = this.upstream;
    const fetcher = this;
    // Progress moves while a large blob streams, so a 2 GiB blob on a slow link does not look stalled.
    async function* counted(offset: number): AsyncIterable<Uint8Array> {
      for await (const chunk of upstream.readStream(digest, offset)) {
        fetcher.checkCancelled();
        received += chunk.byteLength;
        counter.streamed(chunk.byteLength);
        yield chunk;
      }
    }
    try {
      const { resumedBytes } = await this.store.writeResumable(digest, counted);
      const handedOver = received;
      received = 0;
      counter.add(1, digest.sizeBytes, resumedBytes, handedOver);
    } finally {
      if (received > 0) counter.streamed(-received);
    }
  }
}

/** Waits for every promise to settle, then throws the first rejection (Promise.all would not wait). */
async function settleAll(promises: readonly Promise<unknown>[]): Promise<void> {
  const settled = await Promise.allSettled(promises);
  for (const s of settled) if (s.status === 'rejected') throw s.reason;
}
