/**
 * The benchmark suite: the mirror against BuildStream 1.6's reference server
 * (`buildstream._artifactcache.casserver` from Debian's `buildstream`), on the same data, in the
 * same run, both on 127.0.0.1. Never part of `npm test`.
 *
 *   npm run bench                      # everything (~6 min on 2 cores, ~8 GB of scratch disk)
 *   npm run bench -- --quick           # small sizes, to check the suite itself (~2 min)
 *   npm run bench -- --skip-bst        # only the serving benchmarks (no bst build/pull)
 *
 * Serving benchmarks use one load generator for both servers: scripts/bench/loadgen.py, the gRPC
 * C core client (python3-grpcio) and REAPI stubs BuildStream 1.6 itself uses. Sync and real-client
 * benchmarks run the real `bst` (build, push, pull). The mirror runs from the built CLI
 * (`dist/`), as users run it. Results are printed and saved under scripts/bench/results/.
 */
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, open, rm, symlink, writeFile } from 'node:fs/promises';
import { createServer, connect } from 'node:net';
import { cpus, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import pLimit from 'p-limit';
import type { Digest } from '../../src/cas/digest.js';
import { DiskContentStore } from '../../src/cas/disk-store.js';
import { silentLogger } from '../../src/log.js';
import { type Workload, prepareWorkload, settleDisk, timeBstPull } from './bst-workloads.js';
import { batchReadBlobsPerSecond, byteStreamMBps, findMissingLatency, writeDigestList } from './loadgen.js';
import { ROOT, type RunningServer, runMirrorCli, startMirror, startReference } from './processes.js';

const MiB = 1 << 20;
const { values: opts } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    'skip-bst': { type: 'boolean', default: false },
    seconds: { type: 'string' },
    rounds: { type: 'string' },
    'index-blobs': { type: 'string' },
    'sync-mb': { type: 'string' },
    'sync-blobs': { type: 'string' },
    'huge-mib': { type: 'string' },
  },
});
const quick = opts.quick;
const num = (v: string | undefined, full: number, small: number): number => (v === undefined ? (quick ? small : full) : Number(v));
const SECONDS = num(opts.seconds, 4, 2);
/** Repetitions of each timed measurement; the table shows medians and min-max. */
const ROUNDS = num(opts.rounds, 3, 1);
const LARGE = 64 * MiB;
const VERY_LARGE = num(undefined, 1024, 128) * MiB;
const SMALL_COUNT = 10_000;
const INDEX_COUNT = num(opts['index-blobs'], 1_000_000, 50_000);
const SYNC_BYTES = num(opts['sync-mb'], 1000, 50) * 1e6;
const SYNC_BLOBS = num(opts['sync-blobs'], 10_000, 1000);
const HUGE = num(opts['huge-mib'], 2048, 256) * MiB;

interface Row {
  what: string;
  unit: string;
  mirror: number;
  reference: number | undefined;
  /** How many times better the mirror is (direction depends on the unit). */
  advantage: number | undefined;
  note?: string;
}

const lines: string[] = [];
function say(s = ''): void {
  lines.push(s);
  process.stdout.write(`${s}\n`);
}
function progress(s: string): void {
  process.stderr.write(`[bench] ${s}\n`);
}

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Raw loopback TCP throughput (MB/s): one socket, 1 MiB writes, for `seconds`. */
async function loopbackLimit(seconds: number): Promise<number> {
  let received = 0;
  const server = createServer((s) => s.on('data', (d: Buffer) => (received += d.byteLength)));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as { port: number }).port;
  const sock = connect(port, '127.0.0.1');
  await new Promise<void>((r) => sock.once('connect', () => r()));
  const chunk = Buffer.alloc(MiB, 1);
  const start = performance.now();
  while (performance.now() - start < seconds * 1000) if (!sock.write(chunk)) await new Promise((r) => sock.once('drain', r));
  const elapsed = (performance.now() - start) / 1000;
  sock.destroy();
  server.close();
  return received / elapsed / 1e6;
}

/** Sequential read MB/s of a file; `cold` first asks the kernel to drop its page cache (root only). */
async function diskReadLimit(path: string, cold: boolean): Promise<number | undefined> {
  if (cold) {
    try {
      execFileSync('sync');
      await writeFile('/proc/sys/vm/drop_caches', '3\n');
    } catch {
      return undefined;
    }
  }
  const start = performance.now();
  let n = 0;
  for await (const c of createReadStream(path, { highWaterMark: MiB }) as AsyncIterable<Buffer>) n += c.byteLength;
  return n / ((performance.now() - start) / 1000) / 1e6;
}

/**
 * What durable writes cost here, the floor under any sync: sequential write of `bytes` ending in
 * fdatasync (MB/s), and 32 KiB files created, written and fdatasynced one at a time (files/s).
 */
async function diskWriteLimits(dir: string, bytes: number): Promise<{ mbps: number; smallFilesPerSecond: number }> {
  const chunk = randomBytes(4 * MiB);
  const big = join(dir, 'write-probe');
  let t0 = performance.now();
  const fh = await open(big, 'w');
  for (let done = 0; done < bytes; done += chunk.byteLength) await fh.write(chunk);
  await fh.datasync();
  await fh.close();
  const mbps = bytes / ((performance.now() - t0) / 1000) / 1e6;
  await rm(big);
  const small = chunk.subarray(0, 32 * 1024);
  const count = 2000;
  t0 = performance.now();
  for (let i = 0; i < count; i++) {
    const f = await open(join(dir, `small-probe-${i}`), 'wx');
    await f.write(small);
    await f.datasync();
    await f.close();
  }
  const smallFilesPerSecond = count / ((performance.now() - t0) / 1000);
  await Promise.all(Array.from({ length: count }, (_, i) => rm(join(dir, `small-probe-${i}`))));
  return { mbps, smallFilesPerSecond };
}

/**
 * Streams a blob into the store without holding it in memory: a 4 MiB random pattern repeated,
 * each copy stamped with its index so no two chunks are alike. Generated twice: once to hash it,
 * once to store it (the store verifies the digest as it writes).
 */
async function writeRandomBlob(store: DiskContentStore, size: number): Promise<Digest> {
  const pattern = randomBytes(4 * MiB);
  function* chunks(): Generator<Buffer> {
    for (let i = 0, left = size; left > 0; i++, left -= pattern.byteLength) {
      const piece = Buffer.from(pattern.subarray(0, Math.min(pattern.byteLength, left)));
      piece.writeUInt32LE(i, 0);
      yield piece;
    }
  }
  const hash = createHash('sha256');
  for (const c of chunks()) hash.update(c);
  const digest = { hash: hash.digest('hex'), sizeBytes: size };
  await store.write(digest, (async function* () {
    yield* chunks();
  })());
  return digest;
}

/**
 * The serving data set, in the mirror's store: a 64 MiB and a 1 GiB blob, SMALL_COUNT blobs of
 * 1-64 KiB, and INDEX_COUNT tiny blobs so FindMissingBlobs runs against a large index. The tiny
 * blobs are written as plain files and indexed directly (a scratch store needs no fsync per file).
 * The reference server's repository links to the same object files.
 */
async function prepareServingData(mirrorDir: string, refRepo: string): Promise<{ large: Digest; veryLarge: Digest; small: Digest[]; tiny: Digest[] }> {
  const store = await DiskContentStore.open(mirrorDir, silentLogger());
  try {
    const large = await writeRandomBlob(store, LARGE);
    const veryLarge = await writeRandomBlob(store, VERY_LARGE);
    const small: Digest[] = [];
    for (let i = 0; i < SMALL_COUNT; i += 1000) {
      const batch = Array.from({ length: Math.min(1000, SMALL_COUNT - i) }, (_, j) => {
        const data = randomBytes(1024 + (((i + j) * 7919) % (63 * 1024)));
        return { digest: { hash: sha256(data), sizeBytes: data.byteLength }, data };
      });
      await store.writeMany(batch);
      small.push(...batch.map((b) => b.digest));
    }
    progress(`indexing ${INDEX_COUNT} tiny blobs`);
    const tiny: Digest[] = [];
    const limit = pLimit(64);
    for (let i = 0; i < INDEX_COUNT; i += 10_000) {
      const batch = Array.from({ length: Math.min(10_000, INDEX_COUNT - i) }, (_, j) => {
        const data = Buffer.from(`tiny blob ${i + j}`);
        return { digest: { hash: sha256(data), sizeBytes: data.byteLength }, data };
      });
      await Promise.all(batch.map(({ digest, data }) => limit(async () => {
        const path = store.objectPath(digest);
        await mkdir(join(path, '..'), { recursive: true });
        await writeFile(path, data);
        await store.index(digest);
      })));
      tiny.push(...batch.map((b) => b.digest));
    }
    await mkdir(join(refRepo, 'cas/refs/heads'), { recursive: true });
    await symlink(join(mirrorDir, 'cas/objects'), join(refRepo, 'cas/objects'));
    return { large, veryLarge, small, tiny };
  } finally {
    await store.close();
  }
}

function median(xs: readonly number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.floor((sorted.length - 1) / 2)] ?? 0;
}

/** `min-max` of repeated measurements, for the note column. */
function spread(xs: readonly number[]): string {
  return `${fmt(Math.min(...xs))}-${fmt(Math.max(...xs))}`;
}

function fmt(n: number): string {
  return n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2);
}

async function servingBenchmarks(work: string, rows: Row[], loopback: number): Promise<void> {
  const mirrorDir = join(work, 'serving-mirror');
  const refRepo = join(work, 'serving-reference');
  progress('generating the serving data set');
  const data = await prepareServingData(mirrorDir, refRepo);
  const smallList = await writeDigestList(join(work, 'small.txt'), data.small);
  // FindMissing's present half: a sample spread over the whole index.
  const step = Math.max(1, Math.floor(data.tiny.length / 50_000));
  const presentList = await writeDigestList(join(work, 'present.txt'), data.tiny.filter((_, i) => i % step === 0));

  const mirror = await startMirror(mirrorDir);
  const reference = await startReference(refRepo);
  try {
    // Alternating rounds, medians: this VM's throughput drifts by tens of percent between runs.
    const both = async (what: string, unit: string, fn: (s: RunningServer) => Promise<number>, higherIsBetter: boolean): Promise<void> => {
      progress(what);
      const ms: number[] = [];
      const rs: number[] = [];
      for (let round = 0; round < ROUNDS; round++) {
        ms.push(await fn(mirror));
        rs.push(await fn(reference));
      }
      const m = median(ms);
      const r = median(rs);
      rows.push({ what, unit, mirror: m, reference: r, advantage: higherIsBetter ? m / r : r / m, note: `${spread(ms)} vs ${spread(rs)}` });
    };
    const ofLoopback = (mbps: number): string => `${((mbps / loopback) * 100).toFixed(0)}% of loopback`;
    for (const [blob, label] of [[data.large, '64 MiB'], [data.veryLarge, `${VERY_LARGE / MiB} MiB`]] as const) {
      for (const readers of [1, 8]) {
        await both(`ByteStream Read ${label} blob, ${readers} reader${readers > 1 ? 's' : ''}`, 'MB/s', (s) => byteStreamMBps(s.target, blob, readers, SECONDS), true);
        const row = rows[rows.length - 1];
        if (row) row.note = `${ofLoopback(row.mirror)}; ${row.note ?? ''}`;
      }
    }
    await both('BatchReadBlobs, 1-64 KiB blobs, 4 calls in flight', 'blobs/s', (s) => batchReadBlobsPerSecond(s.target, smallList, SECONDS, 4, MiB), true);
    progress('FindMissingBlobs');
    const fm = { mirror: await findMissingLatency(mirror.target, presentList, 100, 10_000), reference: await findMissingLatency(reference.target, presentList, 100, 10_000) };
    const indexed = data.tiny.length + data.small.length + 2;
    rows.push({ what: `FindMissingBlobs 10,000 digests, ${indexed.toLocaleString('en')} stored, p50`, unit: 'ms', mirror: fm.mirror.p50, reference: fm.reference.p50, advantage: fm.reference.p50 / fm.mirror.p50 });
    rows.push({ what: `FindMissingBlobs 10,000 digests, ${indexed.toLocaleString('en')} stored, p99`, unit: 'ms', mirror: fm.mirror.p99, reference: fm.reference.p99, advantage: fm.reference.p99 / fm.mirror.p99 });
    rows.push({ what: `Start-up to listening, ${indexed.toLocaleString('en')} blobs stored`, unit: 'ms', mirror: mirror.startupMs, reference: reference.startupMs, advantage: reference.startupMs / mirror.startupMs });
    rows.push({ what: 'Mirror peak RSS over all serving benchmarks above', unit: 'MiB', mirror: await mirror.peakRssMiB(), reference: await reference.peakRssMiB(), advantage: undefined });
  } finally {
    await mirror.stop();
    await reference.stop();
    await rm(join(refRepo, 'cas/objects'), { force: true });
  }
}

/** Drops the huge element from a workload, for the sync and pull comparisons. */
async function withoutHuge(w: Workload): Promise<Workload> {
  const elements = w.elements.filter((e) => e !== 'huge.bst');
  const refs = w.refs.filter((r) => !r.includes('/huge/'));
  const refsFile = join(w.workDir, 'refs-without-huge.txt');
  await writeFile(refsFile, `${refs.join('\n')}\n`);
  return { ...w, elements, refs, refsFile };
}

async function bstBenchmarks(work: string, rows: Row[]): Promise<void> {
  progress(`preparing the BuildStream workload: ~${(SYNC_BYTES / 1e6).toFixed(0)} MB in ~${SYNC_BLOBS} files + one ${HUGE / MiB} MiB file (bst build + push)`);
  const full = await prepareWorkload(join(work, 'bst'), { totalBytes: SYNC_BYTES, blobCount: SYNC_BLOBS, artifacts: 8, hugeBlobBytes: HUGE, log: progress });
  try {
    const w = await withoutHuge(full);
    const hugeRefs = full.refs.filter((r) => !w.refs.includes(r));
    const scale = `${w.elements.length} artifacts, ${(w.fileBytes / 1e6).toFixed(0)} MB in ${w.files.toLocaleString('en')} files`;
    const mirrorDir = join(work, 'bst-mirror');
    const syncArgs = (refsFile: string): string[] => ['sync', '--dir', mirrorDir, '--upstream', full.reference.url, '--refs-file', refsFile, '--log-level', 'error'];
    const pullRef: number[] = [];
    const pullRefDurable: number[] = [];
    const syncs: { seconds: number; peakRssMiB: number }[] = [];
    const noops: number[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      progress(`round ${round + 1}/${ROUNDS}: bst pull from the reference server, then sync and no-op sync`);
      const pulled = (await timeBstPull(w, full.reference.url)).seconds;
      // bst 1.6 never fsyncs; the mirror's sync is durable when it exits. Flushing what bst
      // wrote gives the like-for-like time.
      const flushStart = performance.now();
      await settleDisk();
      pullRef.push(pulled);
      pullRefDurable.push(pulled + (performance.now() - flushStart) / 1000);
      await rm(mirrorDir, { recursive: true, force: true });
      await settleDisk();
      syncs.push(await runMirrorCli(syncArgs(w.refsFile), work));
      await settleDisk();
      const noop = await runMirrorCli(syncArgs(w.refsFile), work);
      if (!/transferred 0 blobs/.test(noop.stdout)) throw new Error(`the second sync transferred data:\n${noop.stdout}`);
      noops.push(noop.seconds);
    }
    const syncSeconds = syncs.map((x) => x.seconds);
    const sync = median(syncSeconds);
    rows.push({ what: `Sync ${scale} from the reference server (mirror sync vs bst pull)`, unit: 's', mirror: sync, reference: median(pullRef), advantage: median(pullRef) / sync, note: `${spread(syncSeconds)} vs ${spread(pullRef)}; sync peak RSS ${fmt(Math.max(...syncs.map((x) => x.peakRssMiB)))} MiB` });
    rows.push({ what: 'The same, with bst pull\'s writes flushed to disk (both durable)', unit: 's', mirror: sync, reference: median(pullRefDurable), advantage: median(pullRefDurable) / sync, note: `${spread(syncSeconds)} vs ${spread(pullRefDurable)}` });
    rows.push({ what: `No-op sync of the same ${w.refs.length} refs (${full.casBlobs.toLocaleString('en')} blobs on the server)`, unit: 's', mirror: median(noops), reference: undefined, advantage: undefined, note: spread(noops) });

    const mirror = await startMirror(mirrorDir);
    const pullMirror: number[] = [];
    const pullRefAgain: number[] = [];
    try {
      for (let round = 0; round < ROUNDS; round++) {
        progress(`round ${round + 1}/${ROUNDS}: bst pull from the mirror and from the reference server`);
        pullMirror.push((await timeBstPull(w, mirror.url)).seconds);
        pullRefAgain.push((await timeBstPull(w, full.reference.url)).seconds);
      }
    } finally {
      await mirror.stop();
    }
    rows.push({ what: `bst pull ${scale}: from the mirror vs from the reference server`, unit: 's', mirror: median(pullMirror), reference: median(pullRefAgain), advantage: median(pullRefAgain) / median(pullMirror), note: `${spread(pullMirror)} vs ${spread(pullRefAgain)}` });

    if (!full.hugeBlob) throw new Error('the workload has no huge blob');
    progress(`sync and serve of the ${HUGE / MiB} MiB blob`);
    const hugeRefsFile = join(work, 'huge-refs.txt');
    await writeFile(hugeRefsFile, `${hugeRefs.join('\n')}\n`);
    const hugeSync = await runMirrorCli(syncArgs(hugeRefsFile), work);
    rows.push({ what: `Mirror peak RSS syncing an artifact with one ${HUGE / MiB} MiB file`, unit: 'MiB', mirror: hugeSync.peakRssMiB, reference: undefined, advantage: undefined });
    const server = await startMirror(mirrorDir);
    try {
      const mbps = await byteStreamMBps(server.target, full.hugeBlob, 1, 1);
      rows.push({ what: `Mirror peak RSS serving the ${HUGE / MiB} MiB blob (ByteStream, 1 reader)`, unit: 'MiB', mirror: await server.peakRssMiB(), reference: undefined, advantage: undefined, note: `${fmt(mbps)} MB/s` });
    } finally {
      await server.stop();
    }
  } finally {
    await full.dispose();
  }
}

async function main(): Promise<void> {
  progress('building dist/ (the benchmarks run the built CLI)');
  execFileSync('npm', ['run', '--silent', 'build'], { cwd: ROOT, stdio: 'inherit' });
  const work = await mkdtemp(join(tmpdir(), 'bst-mirror-bench-'));
  const rows: Row[] = [];
  try {
    say(`bst-cache-mirror benchmark, ${new Date().toISOString()}${quick ? ' (--quick sizes)' : ''}`);
    say(`machine: ${cpus().length} x ${cpus()[0]?.model ?? '?'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM, node ${process.version}`);
    // A capacity, so the best of three short runs.
    const loopback = Math.max(await loopbackLimit(2), await loopbackLimit(2), await loopbackLimit(2));
    const probe = join(work, 'disk-probe');
    const probeData = randomBytes(256 * MiB);
    await writeFile(probe, probeData);
    const diskCold = await diskReadLimit(probe, true);
    const diskWarm = await diskReadLimit(probe, false);
    await rm(probe);
    const writes = await diskWriteLimits(work, 512 * MiB);
    say(`limits: loopback TCP ${fmt(loopback)} MB/s (one socket); disk sequential read ${diskCold === undefined ? 'n/a' : fmt(diskCold)} MB/s cold, ${fmt(diskWarm ?? 0)} MB/s from page cache;`);
    say(`        disk sequential write ${fmt(writes.mbps)} MB/s (ending in fdatasync); ${fmt(writes.smallFilesPerSecond)} files/s creating, writing and fdatasyncing 32 KiB files one at a time`);

    await servingBenchmarks(work, rows, loopback);
    if (!opts['skip-bst']) await bstBenchmarks(work, rows);

    say('');
    say('| benchmark | unit | mirror | reference server | mirror advantage | note |');
    say('| --- | --- | ---: | ---: | ---: | --- |');
    for (const r of rows) {
      say(`| ${r.what} | ${r.unit} | ${fmt(r.mirror)} | ${r.reference === undefined ? '' : fmt(r.reference)} | ${r.advantage === undefined ? '' : `${r.advantage.toFixed(2)}x`} | ${r.note ?? ''} |`);
    }
    say('');
    say('mirror advantage: mirror/reference for rates, reference/mirror for times; > 1 means the mirror is better.');
    const out = join(ROOT, 'scripts/bench/results', `${new Date().toISOString().replace(/[:.]/g, '-')}${quick ? '-quick' : ''}.txt`);
    await writeFile(out, `${lines.join('\n')}\n`);
    process.stdout.write(`saved ${out}\n`);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

await main();
