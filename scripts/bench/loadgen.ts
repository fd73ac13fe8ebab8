/** Runs scripts/bench/loadgen.py (the gRPC C core client BuildStream 1.6 uses) and parses its JSON. */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Digest } from '../../src/cas/digest.js';
import { SYSTEM_PYTHON } from '../../test/helpers/buildstream.js';
import { ROOT, spawnTracked } from './processes.js';

const LOADGEN = join(ROOT, 'scripts/bench/loadgen.py');

async function run(args: string[]): Promise<Record<string, number>> {
  const { code, stdout, stderr } = await spawnTracked(SYSTEM_PYTHON, [LOADGEN, ...args]).done;
  if (code !== 0) throw new Error(`loadgen ${args.slice(0, 2).join(' ')} failed (${code}): ${stderr}`);
  return JSON.parse(stdout) as Record<string, number>;
}

function field(result: Record<string, number>, name: string): number {
  const v = result[name];
  if (typeof v !== 'number') throw new Error(`loadgen printed no ${name}`);
  return v;
}

/** Writes digests as `hash size` lines for the load generator. */
export async function writeDigestList(path: string, digests: readonly Digest[]): Promise<string> {
  await writeFile(path, digests.map((d) => `${d.hash} ${d.sizeBytes}\n`).join(''));
  return path;
}

/** ByteStream Read MB/s of one blob with `readers` concurrent readers for `seconds`. */
export async function byteStreamMBps(target: string, blob: Digest, readers: number, seconds: number): Promise<number> {
  return field(await run(['bytestream', target, blob.hash, String(blob.sizeBytes), String(readers), String(seconds)]), 'mb_per_s');
}

/** BatchReadBlobs blobs/s over the listed digests, batches up to `maxBatchBytes`, `inFlight` calls. */
export async function batchReadBlobsPerSecond(target: string, digestList: string, seconds: number, inFlight: number, maxBatchBytes: number): Promise<number> {
  return field(await run(['batch', target, digestList, String(seconds), String(inFlight), String(maxBatchBytes)]), 'blobs_per_s');
}

/** FindMissingBlobs latency (ms) of `perCall` digests, half present (from the list), half absent. */
export async function findMissingLatency(target: string, presentList: string, calls: number, perCall: number): Promise<{ p50: number; p99: number }> {
  const r = await run(['findmissing', target, presentList, String(calls), String(perCall)]);
  return { p50: field(r, 'p50_ms'), p99: field(r, 'p99_ms') };
}

/**
 * Loads the listed blobs, read from `objectsDir` (a `cas/objects` directory), into `target` through
 * its own write API (BatchUpdateBlobs, ByteStream Write), `inFlight` calls at once; then checks
 * with FindMissingBlobs that the server has them all.
 */
export async function uploadBlobs(target: string, objectsDir: string, digestList: string, inFlight: number): Promise<{ blobs: number; bytes: number; seconds: number }> {
  const r = await run(['upload', target, objectsDir, digestList, String(inFlight)]);
  return { blobs: field(r, 'blobs'), bytes: field(r, 'bytes'), seconds: field(r, 'seconds') };
}
