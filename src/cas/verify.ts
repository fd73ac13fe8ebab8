import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readFile, unlink } from 'node:fs/promises';
import type { Logger } from 'pino';
import { closureProblem } from './closure.js';
import { type Digest, digestKey, isEmptyDigest } from './digest.js';
import type { DiskContentStore } from './disk-store.js';
import { HashPrefixSet } from './hash-set.js';

/** How many files, and their bytes. */
export interface Amount {
  readonly count: number;
  readonly bytes: number;
}

export interface VerifyOptions {
  /** Fix problems (remove bad blobs and the names that need them) and tidy crash leftovers. */
  readonly repair: boolean;
  /** Also remove blobs no name needs and partial downloads; implies `repair`. */
  readonly prune: boolean;
  readonly log: Logger;
}

/**
 * What verify found. Problems (bad blobs, broken names, bad unindexed files) mean the store is
 * not what its index says. Leftovers (valid unindexed objects, temp files) are what a crash may
 * legitimately leave; partial downloads and unreferenced blobs are resumable data. None of those
 * is a problem.
 */
export interface VerifyReport {
  readonly blobsChecked: number;
  /** Indexed blobs whose file is missing, has the wrong size or the wrong hash. */
  readonly badBlobs: { digest: string; problem: string }[];
  readonly namesChecked: number;
  /** Names whose closure is incomplete once bad blobs are discounted. */
  readonly brokenNames: { urn: string; problem: string }[];
  /** Object files not in the index that do not match their name (no crash leaves these). */
  readonly badUnindexed: { path: string; problem: string }[];
  /** Object files not in the index that match their name (a crash between rename and index write). */
  readonly unindexed: Amount;
  /** Temp files in `<dir>/tmp` (a crash during a write). */
  readonly tempFiles: Amount;
  /** Partial downloads in `<dir>/tmp`, kept so the next sync resumes them. */
  readonly partialDownloads: Amount;
  /** Sound blobs no intact name needs (a sync that did not finish, or names removed). */
  readonly unreferenced: Amount;
  readonly repaired: boolean;
  readonly pruned: boolean;
}

/** Indexed blobs removed per index batch when pruning. */
const PRUNE_GROUP = 1000;
/** Object files looked up in the index at once. */
const LOOKUP_GROUP = 1000;

async function hashFile(path: string): Promise<{ hash: string; size: number } | undefined> {
  try {
    const hash = createHash('sha256');
    let size = 0;
    for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 }) as AsyncIterable<Buffer>) {
      hash.update(chunk);
      size += chunk.byteLength;
    }
    return { hash: hash.digest('hex'), size };
  } catch {
    return undefined;
  }
}

/**
 * Rehashes every stored blob and checks every name's closure. Reads files directly rather than
 * through the store, so a run without `repair` changes nothing (the store is opened with
 * `create: false` and no temp clean-up). With `repair`, bad blobs and the names that need them are
 * removed from the index (bad files deleted), valid unindexed object files are indexed again and
 * temp files removed; the next sync then fetches what is missing.
 *
 * Blobs no name needs are only removed with `prune`, never by `repair` alone: they are valid, and
 * they are usually the part of a closure an interrupted or failed sync already fetched, which the
 * next sync of that name would otherwise fetch again (a BuildStream admin expects a repair to keep
 * such resumable data). Partial downloads are kept for the same reason. Pruning asks for the
 * space back, knowing the next sync of those names starts over.
 */
export async function verifyStore(store: DiskContentStore, options: VerifyOptions): Promise<VerifyReport> {
  const repair = options.repair || options.prune;
  const bad = new Map<string, string>();
  let blobsChecked = 0;
  for await (const entry of store.blobEntries()) {
    blobsChecked += 1;
    const digest = { hash: entry.hash, sizeBytes: entry.sizeBytes };
    const actual = await hashFile(store.objectPath(digest));
    let problem: string | undefined;
    if (actual === undefined) problem = 'object file is missing or unreadable';
    else if (actual.size !== entry.sizeBytes) problem = `object file has ${actual.size} bytes`;
    else if (actual.hash !== entry.hash) problem = `object file hashes to ${actual.hash}`;
    if (problem) bad.set(digestKey(digest), problem);
  }

  // Object files the index does not know. Those that match their name are sound content, usable
  // below as if indexed; they are few (what crashes left), so a plain map holds them.
  const orphans = new Map<string, number>();
  const badUnindexed: { path: string; problem: string }[] = [];
  let group: { hash: string; path: string }[] = [];
  const checkGroup = async (): Promise<void> => {
    const sizes = await store.indexedSizes(group.map((f) => f.hash));
    for (const [i, file] of group.entries()) {
      if (sizes[i] !== undefined) continue;
      const actual = await hashFile(file.path);
      if (actual && actual.hash === file.hash) orphans.set(file.hash, actual.size);
      else badUnindexed.push({ path: file.path, problem: actual ? `its content hashes to ${actual.hash}` : 'it is unreadable' });
    }
    group = [];
  };
  for await (const file of store.objectFiles()) {
    group.push(file);
    if (group.length >= LOOKUP_GROUP) await checkGroup();
  }
  await checkGroup();

  // A blob is usable when it is indexed and sound, or a sound unindexed file.
  const usable = async (ds: readonly Digest[]): Promise<boolean[]> => {
    const sizes = await store.indexedSizes(ds.map((d) => d.hash));
    return ds.map((d, i) => isEmptyDigest(d) || (!bad.has(digestKey(d)) && (sizes[i] === d.sizeBytes || orphans.get(d.hash) === d.sizeBytes)));
  };
  const referenced = new HashPrefixSet();
  const brokenNames: { urn: string; problem: string }[] = [];
  let namesChecked = 0;
  for await (const [urn, record] of store.names()) {
    namesChecked += 1;
    // Everything this name's closure reaches; it counts as referenced only if the name is intact.
    const reached: string[] = [];
    const read = async (d: Digest): Promise<Buffer | undefined> => {
      reached.push(d.hash);
      if (!(await usable([d]))[0]) return undefined;
      if (d.sizeBytes === 0) return Buffer.alloc(0);
      const data = await readFile(store.objectPath(d)).catch(() => undefined);
      return data?.byteLength === d.sizeBytes ? data : undefined;
    };
    const problem = await closureProblem(urn, record, read, async (ds) => {
      for (const d of ds) reached.push(d.hash);
      const ok = await usable(ds);
      return ds.filter((_, i) => !ok[i]);
    });
    if (problem) brokenNames.push({ urn, problem });
    else for (const hash of reached) referenced.add(hash);
  }

  const temps = await store.tempFiles();
  const tempFiles = temps.filter((f) => !f.partialOf);
  const partials = temps.filter((f) => f.partialOf);

  if (repair) {
    for (const [key, problem] of bad) {
      const [hash = '', size = '0'] = key.split('/');
      await store.forget({ hash, sizeBytes: Number(size) }, `verify: ${problem}`);
    }
    for (const { urn, problem } of brokenNames) {
      options.log.warn({ urn, problem }, 'name removed: its closure is incomplete');
      await store.deleteName(urn);
    }
    // Every name left has a complete closure again.
    await store.clearDamage();
    for (const { path } of badUnindexed) await unlink(path).catch(() => undefined);
    for (const [hash, sizeBytes] of orphans) await store.index({ hash, sizeBytes });
    for (const file of tempFiles) await store.removeTemp(file);
  }

  // Sound blobs no intact name reaches: indexed ones (orphans are indexed by now when repairing).
  let unreferencedCount = 0;
  let unreferencedBytes = 0;
  let toPrune: Digest[] = [];
  const unreferenced = async (d: Digest): Promise<void> => {
    if (referenced.has(d.hash) || bad.has(digestKey(d))) return;
    unreferencedCount += 1;
    unreferencedBytes += d.sizeBytes;
    if (!options.prune) return;
    toPrune.push(d);
    if (toPrune.length >= PRUNE_GROUP) {
      await store.removeBlobs(toPrune);
      toPrune = [];
    }
  };
  for await (const entry of store.blobEntries()) await unreferenced({ hash: entry.hash, sizeBytes: entry.sizeBytes });
  if (!repair) for (const [hash, sizeBytes] of orphans) await unreferenced({ hash, sizeBytes });
  if (toPrune.length > 0) await store.removeBlobs(toPrune);
  if (options.prune) for (const file of partials) await store.removeTemp(file);

  return {
    blobsChecked,
    badBlobs: [...bad].map(([digest, problem]) => ({ digest, problem })),
    namesChecked,
    brokenNames,
    badUnindexed,
    unindexed: amount([...orphans.values()]),
    tempFiles: amount(tempFiles.map((f) => f.sizeBytes)),
    partialDownloads: amount(partials.map((f) => f.sizeBytes)),
    unreferenced: { count: unreferencedCount, bytes: unreferencedBytes },
    repaired: repair,
    pruned: options.prune,
  };
}

function amount(sizes: readonly number[]): Amount {
  return { count: sizes.length, bytes: sizes.reduce((n, s) => n + s, 0) };
}
