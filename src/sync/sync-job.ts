import pLimit from 'p-limit';
import type { Logger } from 'pino';
import type { ContentStore, NameRecord } from '../cas/content-store.js';
import { type Roots, artifactRoots, parseDirectory, sourceRoots, uniqueDigests } from '../cas/closure.js';
import { type Digest, EMPTY_DIGEST, digestKey } from '../cas/digest.js';
import { type MirrorName, isDirectoryName, parseUserName } from '../cas/names.js';
import { MirrorError, errorMessage, isMirrorError } from '../errors.js';
import type { Upstream } from '../remote/upstream.js';

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
}

export interface SyncProgress {
  readonly namesTotal: number;
  readonly namesDone: number;
  readonly blobsTransferred: number;
  readonly bytesTransferred: number;
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
  readonly blobsTransferred: number;
  readonly bytesTransferred: number;
  readonly durationMs: number;
}

/** Names synced at once; each name's own blob transfers share the `concurrency` limit. */
const NAME_CONCURRENCY = 4;
/** BuildStream 1.6 groups FindMissingBlobs the same way; it bounds each index lookup. */
const FIND_MISSING_GROUP = 4096;

/**
 * Mirrors each name's whole closure from the first upstream that has it, then records the name,
 * so a name is never visible before every blob it needs is stored. Blobs already stored locally
 * are not transferred again; every transferred blob is verified before it is stored.
 */
export async function syncNames(options: SyncOptions): Promise<SyncReport> {
  const started = Date.now();
  const transfers = pLimit(options.concurrency ?? 8);
  // Names synced together often share blobs (logs, metadata, common files): each is fetched once.
  const inFlight: InFlight = new Map();
  const perName = pLimit(NAME_CONCURRENCY);
  const totals = { blobs: 0, bytes: 0, namesDone: 0 };
  const report = (): void =>
    options.onProgress?.({
      namesTotal: options.names.length,
      namesDone: totals.namesDone,
      blobsTransferred: totals.blobs,
      bytesTransferred: totals.bytes,
    });
  const results = await Promise.all(
    options.names.map((input) =>
      perName(async () => {
        const counter = {
          blobs: 0,
          bytes: 0,
          add(blobs: number, bytes: number) {
            this.blobs += blobs;
            this.bytes += bytes;
            totals.blobs += blobs;
            totals.bytes += bytes;
            report();
          },
        };
        const result = await syncOne(input, options, transfers, inFlight, counter);
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
  return { results, blobsTransferred: totals.blobs, bytesTransferred: totals.bytes, durationMs: Date.now() - started };
}

interface Counter {
  add(blobs: number, bytes: number): void;
  readonly blobs: number;
}

type Limit = ReturnType<typeof pLimit>;
/** Blob transfers under way, by digest key, shared by every name of one sync. */
type InFlight = Map<string, Promise<void>>;

async function syncOne(
  input: string,
  options: SyncOptions,
  transfers: Limit,
  inFlight: InFlight,
  counter: Counter,
): Promise<Omit<NameResult, 'blobsTransferred' | 'bytesTransferred'>> {
  let candidates: MirrorName[];
  try {
    candidates = parseUserName(input);
  } catch (err) {
    return { input, status: 'failed', reason: errorMessage(err) };
  }
  const upstreamErrors: string[] = [];
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
      continue;
    }
    if (!found) continue;
    const { name, digest } = found;
    try {
      const fetcher = new ClosureFetcher(options.store, upstream, transfers, inFlight, counter);
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
      return { input, status: 'failed', urn: name.urn, upstream: upstream.name, reason: describeFetchError(err) };
    }
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

/** Fetches the blobs of one name that the store lacks, from one upstream. */
class ClosureFetcher {
  constructor(
    private readonly store: ContentStore,
    private readonly upstream: Upstream,
    private readonly transfers: Limit,
    private readonly inFlight: InFlight,
    private readonly counter: Counter,
  ) {}

  /** Fetches the name's closure; returns what it references besides its own digest. */
  async fetchName(name: MirrorName, digest: Digest, withBuildtrees: boolean): Promise<Roots> {
    if (isDirectoryName(name.kind)) {
      await this.fetchTrees([digest]);
      return { directories: [], blobs: [] };
    }
    await this.fetchBlobs([digest]);
    const data = await this.mustRead(digest);
    const roots = name.kind === 'artifact' ? artifactRoots(data, digest, withBuildtrees) : sourceRoots(data, digest);
    await this.fetchBlobs(roots.blobs);
    await this.fetchTrees(roots.directories);
    return roots;
  }

  /** Fetches whole Directory trees, one level at a time. */
  private async fetchTrees(roots: readonly Digest[]): Promise<void> {
    const seen = new Set<string>();
    let level = uniqueDigests(roots);
    while (level.length > 0) {
      for (const d of level) seen.add(digestKey(d));
      await this.fetchBlobs(level);
      const children = (await this.mustReadMany(level)).map((data, i) => parseDirectory(data, level[i] ?? EMPTY_DIGEST));
      await this.fetchBlobs(uniqueDigests(children.flatMap((c) => c.files)));
      level = uniqueDigests(children.flatMap((c) => c.directories)).filter((d) => !seen.has(digestKey(d)));
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
   * that transfer failed.
   */
  private async fetchBlobs(digests: readonly Digest[]): Promise<void> {
    const unique = uniqueDigests(digests);
    const missing: Digest[] = [];
    for (let i = 0; i < unique.length; i += FIND_MISSING_GROUP) {
      missing.push(...(await this.store.findMissing(unique.slice(i, i + FIND_MISSING_GROUP))));
    }
    if (missing.length === 0) return;
    const { maxBatchBytes } = await this.upstream.connect();
    // From here to transfer() registering its blobs there is no await, so no other name can
    // start the same blobs in between.
    const elsewhere = missing.filter((d) => this.inFlight.has(digestKey(d)));
    await Promise.all([
      this.transfer(missing.filter((d) => !this.inFlight.has(digestKey(d))), maxBatchBytes),
      (async () => {
        if (elsewhere.length === 0) return;
        await Promise.allSettled(elsewhere.map((d) => this.inFlight.get(digestKey(d))));
        await this.transfer(await this.store.findMissing(elsewhere), maxBatchBytes);
      })(),
    ]);
  }

  /** Starts transfers of `missing` (registered as in flight until they settle) and awaits them. */
  private async transfer(missing: readonly Digest[], maxBatchBytes: number): Promise<void> {
    if (missing.length === 0) return;
    const batches: Digest[][] = [];
    const large: Digest[] = [];
    let current: Digest[] = [];
    let currentBytes = 0;
    for (const d of missing) {
      if (d.sizeBytes > maxBatchBytes) {
        large.push(d);
        continue;
      }
      if (currentBytes + d.sizeBytes > maxBatchBytes && current.length > 0) {
        batches.push(current);
        current = [];
        currentBytes = 0;
      }
      current.push(d);
      currentBytes += d.sizeBytes;
    }
    if (current.length > 0) batches.push(current);
    const track = (digestsOf: readonly Digest[], run: () => Promise<void>): Promise<void> => {
      const done = this.transfers(run);
      for (const d of digestsOf) this.inFlight.set(digestKey(d), done);
      const forget = (): void => {
        for (const d of digestsOf) if (this.inFlight.get(digestKey(d)) === done) this.inFlight.delete(digestKey(d));
      };
      done.then(forget, forget);
      return done;
    };
    await Promise.all([...batches.map((batch) => track(batch, () => this.fetchBatch(batch))), ...large.map((d) => track([d], () => this.fetchLarge(d)))]);
  }

  private async fetchBatch(batch: readonly Digest[]): Promise<void> {
    const results = await this.upstream.batchRead(batch);
    const blobs: { digest: Digest; data: Uint8Array }[] = [];
    for (const r of results) {
      if ('missing' in r) throw new MirrorError('BLOB_NOT_FOUND', `${this.upstream.name} does not have blob ${digestKey(r.digest)}, which the name needs`);
      blobs.push(r);
    }
    await this.store.writeMany(blobs);
    this.counter.add(blobs.length, blobs.reduce((n, b) => n + b.digest.sizeBytes, 0));
  }

  private async fetchLarge(digest: Digest): Promise<void> {
    await this.store.write(digest, this.upstream.readStream(digest));
    this.counter.add(1, digest.sizeBytes);
  }
}
