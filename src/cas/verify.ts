import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readFile, unlink } from 'node:fs/promises';
import type { Logger } from 'pino';
import { closureProblem } from './closure.js';
import { type Digest, digestKey } from './digest.js';
import type { DiskContentStore } from './disk-store.js';

export interface VerifyReport {
  readonly blobsChecked: number;
  /** Indexed blobs whose file is missing, has the wrong size or the wrong hash. */
  readonly badBlobs: { digest: string; problem: string }[];
  /** Object files not in the index (a crash between rename and index write) that verify. */
  readonly orphansRecovered: number;
  /** Object files not in the index that do not verify. */
  readonly orphansBad: number;
  readonly namesChecked: number;
  /** Names whose closure is incomplete once bad blobs are discounted. */
  readonly brokenNames: { urn: string; problem: string }[];
  readonly repaired: boolean;
}

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
 * through the store, so a run without `repair` changes nothing. With `repair`, bad blobs and the
 * names that need them are removed from the index (bad files deleted) and valid orphaned object
 * files are indexed again; the next sync then fetches what is missing.
 */
export async function verifyStore(store: DiskContentStore, options: { repair: boolean; log: Logger }): Promise<VerifyReport> {
  const bad = new Map<string, string>();
  const indexed = new Set<string>();
  let blobsChecked = 0;
  for await (const entry of store.blobEntries()) {
    blobsChecked += 1;
    indexed.add(entry.hash);
    const digest = { hash: entry.hash, sizeBytes: entry.sizeBytes };
    const actual = await hashFile(store.objectPath(digest));
    let problem: string | undefined;
    if (actual === undefined) problem = 'object file is missing or unreadable';
    else if (actual.size !== entry.sizeBytes) problem = `object file has ${actual.size} bytes`;
    else if (actual.hash !== entry.hash) problem = `object file hashes to ${actual.hash}`;
    if (problem) bad.set(digestKey(digest), problem);
  }
  let orphansRecovered = 0;
  let orphansBad = 0;
  for await (const file of store.objectFiles()) {
    if (indexed.has(file.hash)) continue;
    const actual = await hashFile(file.path);
    if (actual && actual.hash === file.hash) {
      orphansRecovered += 1;
      if (options.repair) await store.index({ hash: file.hash, sizeBytes: actual.size });
    } else {
      orphansBad += 1;
      if (options.repair) await unlink(file.path).catch(() => undefined);
    }
  }
  // Reads without side effects: a bad or unindexed blob is simply unusable here.
  const read = async (d: Digest): Promise<Buffer | undefined> => {
    if (bad.has(digestKey(d)) || (await store.findMissing([d])).length > 0) return undefined;
    if (d.sizeBytes === 0) return Buffer.alloc(0);
    const data = await readFile(store.objectPath(d)).catch(() => undefined);
    return data?.byteLength === d.sizeBytes ? data : undefined;
  };
  const brokenNames: { urn: string; problem: string }[] = [];
  let namesChecked = 0;
  for await (const [urn, record] of store.names()) {
    namesChecked += 1;
    const problem = await closureProblem(urn, record, read, async (ds) => {
      const missing = await store.findMissing(ds);
      return missing.length > 0 ? missing : ds.filter((d) => bad.has(digestKey(d)));
    });
    if (problem) brokenNames.push({ urn, problem });
  }
  if (options.repair) {
    for (const key of bad.keys()) {
      const [hash = '', size = '0'] = key.split('/');
      await store.forget({ hash, sizeBytes: Number(size) }, `verify: ${bad.get(key)}`);
    }
    for (const { urn, problem } of brokenNames) {
      options.log.warn({ urn, problem }, 'name removed: its closure is incomplete');
      await store.deleteName(urn);
    }
    // Every name left has a complete closure again.
    await store.clearDamage();
  }
  return {
    blobsChecked,
    badBlobs: [...bad].map(([digest, problem]) => ({ digest, problem })),
    orphansRecovered,
    orphansBad,
    namesChecked,
    brokenNames,
    repaired: options.repair,
  };
}
