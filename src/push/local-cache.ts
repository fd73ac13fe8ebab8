/**
 * Imports BuildStream local cache contents on the mirror host into the mirror's store, so they
 * can be served and replicated upstream (`bst-cache-mirror push --from CACHE_DIR`). Layouts and
 * safe reading are in local-cache-layout.ts, the watcher in local-cache-watch.ts.
 *
 * What each name points at, as the remote would record it (protocol doc §1.4–1.8):
 * - 1.6 ref (`…:v1:<ref>`): the Directory whose Digest the ref file holds.
 * - 2.x artifact: the Artifact proto blob, the ref file's bytes themselves (BuildStream pushes
 *   `add_object(proto.SerializeToString())`, the same bytes), with its `files`, metadata, public
 *   data and logs; buildtree/sources/buildroot/sandbox trees when the cache holds them whole.
 * - 2.x element sources (`…:source:<64 hex>`): the Source proto blob (the file's bytes) and its `files`.
 * - 2.x single source (`…:source:<kind>/<key>`): the Directory `files` of the Source proto in
 *   `source_protos/<kind>/<key>`, as BuildStream's PushDirectory sends it.
 */
import type { FileHandle } from 'node:fs/promises';
import pLimit from 'p-limit';
import type { Logger } from 'pino';
import { artifactRoots, checkMessageSize, parseDirectory, sourceRoots, uniqueDigests } from '../cas/closure.js';
import type { ContentStore, NameRecord } from '../cas/content-store.js';
import { type Digest, digestKey, digestOf, fromWire, groupBySize, isEmptyDigest } from '../cas/digest.js';
import { type MirrorName, artifactName, parseUrn, refName, userArtifactName } from '../cas/names.js';
import { MirrorError, describeError, errorMessage, isMirrorError } from '../errors.js';
import { Source } from '../gen/buildstream/v2/source.js';
import { Digest as DigestProto } from '../gen/build/bazel/remote/execution/v2/remote_execution.js';
import { type CacheObjects, LocalCache, detectLayout, listLocalNames } from './local-cache-layout.js';

export { detectLayout, listLocalNames, nameOfPath, type LocalCacheLayout, type LocalRef } from './local-cache-layout.js';
export { watchLocalCache, type LocalCacheWatch, type LocalCacheWatchOptions } from './local-cache-watch.js';

export type ImportResult =
  | { status: 'imported' | 'present'; blobs: number; bytes: number }
  | { status: 'incomplete'; reason: string }
  | { status: 'failed'; reason: string };

/** One name of importAll: the URN it was imported as (or the name as given, if it is not one) and how it went. */
export interface ImportOutcome {
  readonly urn: string;
  readonly result: ImportResult;
}

/** Blobs up to this size are read whole and written in batches; larger ones are streamed. */
const SMALL_BLOB_BYTES = 1 << 20;
/** Most bytes and blobs in one writeMany. */
const BATCH_BYTES = 4 << 20;
const BATCH_BLOBS = 512;
/** Batches and streams copied at once (each reads its files one at a time). */
const COPY_CONCURRENCY = 8;
/** Directories read per step of the tree walk, and digests per findMissing. */
const WALK_CHUNK = 1024;
const FIND_MISSING_GROUP = 4096;
const STREAM_CHUNK_BYTES = 1 << 20;

/** A blob the closure needs is not in the cache (yet): BuildStream or casd may still be writing. */
class NotYetInCache extends Error {}

/** Copies blobs a name needs from a cache's objects into the store, counting what it copied. */
class Copier {
  blobs = 0;
  bytes = 0;

  constructor(
    private readonly objects: CacheObjects,
    private readonly store: ContentStore,
  ) {}

  private notThere(d: Digest, what: string): NotYetInCache {
    return new NotYetInCache(`${what} ${digestKey(d)} is not in the local cache (${this.objects.pathOf(d)} is missing)`);
  }

  /** Stores `data` as blob `d` (its digest, computed by the caller) unless the store has it. */
  async putBytes(d: Digest, data: Uint8Array): Promise<void> {
    if ((await this.store.findMissing([d])).length === 0) return;
    await this.store.write(d, data);
    this.count([d]);
  }

  private count(ds: readonly Digest[]): void {
    this.blobs += ds.length;
    for (const d of ds) this.bytes += d.sizeBytes;
  }

  private async missingFromStore(ds: readonly Digest[]): Promise<Digest[]> {
    const missing: Digest[] = [];
    for (let i = 0; i < ds.length; i += FIND_MISSING_GROUP) missing.push(...(await this.store.findMissing(ds.slice(i, i + FIND_MISSING_GROUP))));
    return missing;
  }

  /**
   * Copies whole Directory trees, a level at a time: each Directory is read from the store when
   * it has it, else copied from the cache; then every file blob the trees name.
   */
  async trees(roots: readonly Digest[]): Promise<void> {
    const files: Digest[] = [];
    const seen = new Set<string>();
    let level = uniqueDigests(roots);
    while (level.length > 0) {
      for (const d of level) seen.add(digestKey(d));
      const next: Digest[] = [];
      for (let i = 0; i < level.length; i += WALK_CHUNK) {
        const part = level.slice(i, i + WALK_CHUNK);
        for (const d of part) checkMessageSize(d, 'Directory');
        const missing = new Set((await this.store.findMissing(part)).map(digestKey));
        const inStore = part.filter((d) => !missing.has(digestKey(d)));
        const data = new Map<string, Uint8Array>();
        (await this.store.readManyBytes(inStore)).forEach((bytes, k) => {
          const d = inStore[k];
          if (d === undefined) return;
          // Gone or damaged since findMissing: copy it again from the cache.
          if (bytes instanceof Buffer) data.set(digestKey(d), bytes);
          else missing.add(digestKey(d));
        });
        const copy = part.filter((d) => missing.has(digestKey(d)) && !isEmptyDigest(d));
        const copied = await this.copySmall(copy, 'directory');
        for (const [k, d] of copy.entries()) data.set(digestKey(d), copied[k] ?? new Uint8Array());
        for (const d of part) {
          const children = parseDirectory(data.get(digestKey(d)) ?? new Uint8Array(), d);
          files.push(...children.files);
          for (const c of children.directories) if (!seen.has(digestKey(c))) next.push(c);
        }
      }
      level = uniqueDigests(next);
    }
    await this.files(files);
  }

  /** Reads blobs from the cache (one at a time) and stores them in one batch; returns their bytes. */
  private async copySmall(ds: readonly Digest[], what: string): Promise<Buffer[]> {
    if (ds.length === 0) return [];
    const blobs: { digest: Digest; data: Buffer }[] = [];
    for (const d of ds) {
      const data = await this.objects.read(d);
      if (data === undefined) throw this.notThere(d, what);
      blobs.push({ digest: d, data });
    }
    await this.store.writeMany(blobs);
    this.count(ds);
    return blobs.map((b) => b.data);
  }

  /** Streams one large blob from the cache into the store (verified there). */
  private async copyLarge(d: Digest): Promise<void> {
    const handle: FileHandle | undefined = await this.objects.open(d);
    if (handle === undefined) throw this.notThere(d, 'blob');
    try {
      await this.store.write(d, handle.createReadStream({ autoClose: false, highWaterMark: STREAM_CHUNK_BYTES }));
    } finally {
      await handle.close();
    }
    this.count([d]);
  }

  /**
   * Copies the file blobs the store lacks: small ones in batches, large ones streamed, several at
   * once. Waits for every copy to settle, then throws the first failure (a blob that is not in
   * the cache only if nothing worse happened).
   */
  async files(digests: readonly Digest[]): Promise<void> {
    const missing = await this.missingFromStore(uniqueDigests(digests).filter((d) => !isEmptyDigest(d)));
    if (missing.length === 0) return;
    const batches = groupBySize(missing.filter((d) => d.sizeBytes <= SMALL_BLOB_BYTES), BATCH_BYTES).flatMap((g) => {
      const parts: Digest[][] = [];
      for (let i = 0; i < g.length; i += BATCH_BLOBS) parts.push(g.slice(i, i + BATCH_BLOBS));
      return parts;
    });
    const large = missing.filter((d) => d.sizeBytes > SMALL_BLOB_BYTES);
    const limit = pLimit(COPY_CONCURRENCY);
    let stopped = false;
    const guarded = (run: () => Promise<unknown>) =>
      limit(async () => {
        if (stopped) return;
        try {
          await run();
        } catch (err) {
          stopped = true;
          throw err;
        }
      });
    const settled = await Promise.allSettled([
      ...large.map((d) => guarded(() => this.copyLarge(d))),
      ...batches.map((batch) => guarded(() => this.copySmall(batch, 'blob'))),
    ]);
    const errors = settled.flatMap((s) => (s.status === 'rejected' ? [s.reason as unknown] : []));
    const worst = errors.find((e) => !(e instanceof NotYetInCache)) ?? errors[0];
    if (worst !== undefined) throw worst;
  }
}

/** What a ref file says: what the name points at and what it needs. */
interface Parsed {
  readonly type: NameRecord['type'];
  readonly digest: Digest;
  /** The proto blob (the ref file's bytes) for blob names. */
  readonly blob?: Uint8Array;
  readonly directories: readonly Digest[];
  readonly blobs: readonly Digest[];
  /** Trees taken only when the cache holds them whole (an artifact's buildtree and the like). */
  readonly optionalDirectories: readonly Digest[];
}

function parseRef(name: MirrorName, bytes: Buffer, path: string): Parsed {
  switch (name.kind) {
    case 'ref': {
      let wire;
      try {
        wire = DigestProto.decode(bytes);
      } catch (err) {
        throw new MirrorError('INVALID_ARGUMENT', `${path} is not a BuildStream 1.x ref (a serialized Digest): ${errorMessage(err)}`, { cause: err });
      }
      const digest = fromWire(wire, `ref file ${path}`);
      return { type: 'directory', digest, directories: [], blobs: [], optionalDirectories: [] };
    }
    case 'source': {
      let source;
      try {
        source = Source.decode(bytes);
      } catch (err) {
        throw new MirrorError('INVALID_ARGUMENT', `${path} is not a BuildStream Source proto: ${errorMessage(err)}`, { cause: err });
      }
      // BuildStream pushes this name with PushDirectory of the proto's `files`.
      const digest = fromWire(source.files, `Source ${path} files`);
      return { type: 'directory', digest, directories: [], blobs: [], optionalDirectories: [] };
    }
    case 'artifact': {
      const digest = digestOf(bytes);
      const needed = artifactRoots(bytes, digest, false);
      const all = artifactRoots(bytes, digest, true);
      const neededKeys = new Set(needed.directories.map(digestKey));
      const optionalDirectories = uniqueDigests(all.directories.filter((d) => !neededKeys.has(digestKey(d))));
      return { type: 'blob', digest, blob: bytes, directories: needed.directories, blobs: needed.blobs, optionalDirectories };
    }
    case 'element-sources': {
      const digest = digestOf(bytes);
      const roots = sourceRoots(bytes, digest);
      return { type: 'blob', digest, blob: bytes, directories: roots.directories, blobs: roots.blobs, optionalDirectories: [] };
    }
  }
}

async function importName(cache: LocalCache, name: MirrorName, store: ContentStore, log: Logger): Promise<ImportResult> {
  try {
    const where = await cache.locate(name);
    if ('missing' in where) return { status: 'failed', reason: `not in the local cache (no ${where.missing.join(' or ')})` };
    const bytes = await cache.readRef(where.path);
    if (bytes === undefined) return { status: 'failed', reason: `no longer in the local cache (${where.path} was removed)` };
    const parsed = parseRef(name, bytes, where.path);
    const copier = new Copier(where.objects, store);
    if (parsed.blob !== undefined) await copier.putBytes(parsed.digest, parsed.blob);
    if (parsed.type === 'directory') await copier.trees([parsed.digest]);
    else {
      await copier.trees(parsed.directories);
      await copier.files(parsed.blobs);
    }
    const directories = [...parsed.directories];
    for (const d of parsed.optionalDirectories) {
      try {
        await copier.trees([d]);
        directories.push(d);
      } catch (err) {
        if (!(err instanceof NotYetInCache)) throw err;
        log.debug({ urn: name.urn, tree: digestKey(d), reason: err.message }, 'optional tree not imported: not whole in the local cache');
      }
    }
    const existing = await store.getName(name.urn);
    if (existing !== undefined && digestKey(existing.digest) === digestKey(parsed.digest) && copier.blobs === 0) {
      return { status: 'present', blobs: 0, bytes: 0 };
    }
    const record: NameRecord = {
      type: parsed.type,
      digest: parsed.digest,
      referencedBlobs: parsed.blobs,
      referencedDirectories: directories,
      upstream: `local cache ${cache.dir}`,
      fetchedAt: Date.now(),
    };
    await store.putName(name.urn, record);
    log.info({ urn: name.urn, digest: digestKey(parsed.digest), blobs: copier.blobs, bytes: copier.bytes, cache: cache.dir }, 'name imported from local cache');
    return { status: 'imported', blobs: copier.blobs, bytes: copier.bytes };
  } catch (err) {
    if (err instanceof NotYetInCache) {
      log.debug({ urn: name.urn, cache: cache.dir, reason: err.message }, 'local cache name incomplete: not recorded');
      return { status: 'incomplete', reason: `not recorded yet: ${err.message}` };
    }
    const reason = isMirrorError(err, 'DIGEST_MISMATCH') ? `the local cache's copy is corrupt: ${errorMessage(err)}` : describeError(err);
    log.warn({ urn: name.urn, cache: cache.dir, reason }, 'import from local cache failed');
    return { status: 'failed', reason };
  }
}

/**
 * Imports one name: reads the ref file, copies every blob of the name's closure that the store
 * lacks from the cache's objects (each verified by the store's write against its digest), then
 * records the name (upstream: `local cache <dir>`) — only if the WHOLE closure is present: a ref
 * whose objects are not all there yet (BuildStream writes objects, then the ref by rename; casd
 * may still be writing) returns 'incomplete' and records nothing, so it can be retried. Blobs
 * copied before that stay in the store (a retry copies only the rest). 'present': the store had
 * the name at that digest and no blob was copied. Large blobs are streamed, small ones batched.
 * Never follows symlinks out of the cache; never writes to the cache.
 */
export async function importLocalName(dir: string, urn: string, store: ContentStore, log: Logger): Promise<ImportResult> {
  let name: MirrorName;
  let cache: LocalCache;
  try {
    name = parseUrn(urn);
    cache = await LocalCache.open(dir);
  } catch (err) {
    return { status: 'failed', reason: errorMessage(err) };
  }
  return importName(cache, name, store, log);
}

/**
 * The URN a user's name stands for in this cache: a URN as it is, or `PROJECT/ELEMENT/KEY`
 * (element path or normal name, full key) as the 2.x artifact if the cache has one, else the 1.x ref.
 */
async function resolveName(cache: LocalCache, input: string): Promise<MirrorName> {
  const name = input.trim();
  if (name.startsWith('urn:')) return parseUrn(name);
  const artifact = userArtifactName(name);
  for (const candidate of [artifactName(artifact), refName(artifact)]) {
    if (!('missing' in (await cache.locate(candidate)))) return candidate;
  }
  throw new MirrorError('NAME_NOT_FOUND', `'${name}' is not in the local cache ${cache.dir} (neither a BuildStream 2 artifact nor a 1.x ref)`);
}

/**
 * Imports every name the cache holds (or the given ones: URNs or PROJECT/ELEMENT/KEY), one at a
 * time, and returns each one's result in order. CONFIG_INVALID (thrown) when `dir` is not a
 * BuildStream cache; a name that cannot be imported is a 'failed' result, not a throw.
 */
export async function importAll(dir: string, store: ContentStore, log: Logger, names?: readonly string[]): Promise<ImportOutcome[]> {
  await detectLayout(dir);
  const inputs = names ?? (await listLocalNames(dir)).map((r) => r.urn);
  const cache = await LocalCache.open(dir);
  const outcomes: ImportOutcome[] = [];
  const started = Date.now();
  for (const input of inputs) {
    let name: MirrorName;
    try {
      name = await resolveName(cache, input);
    } catch (err) {
      outcomes.push({ urn: input, result: { status: 'failed', reason: errorMessage(err) } });
      continue;
    }
    outcomes.push({ urn: name.urn, result: await importName(cache, name, store, log) });
  }
  const counts: Record<ImportResult['status'], number> = { imported: 0, present: 0, incomplete: 0, failed: 0 };
  let blobs = 0;
  let bytes = 0;
  for (const { result } of outcomes) {
    counts[result.status] += 1;
    if (result.status === 'imported') {
      blobs += result.blobs;
      bytes += result.bytes;
    }
  }
  log.info({ cache: dir, ...counts, blobs, bytes, ms: Date.now() - started }, 'local cache import done');
  return outcomes;
}
