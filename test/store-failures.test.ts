/**
 * The store after failures (issue 8): a failed sync leaves no writes behind, verify tells crash
 * leftovers from problems and changes nothing unless asked, unreferenced blobs can be pruned,
 * and large blobs resume where an interrupted sync stopped.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { mkdir, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { type Digest, digestOf } from '../src/cas/digest.js';
import { DiskContentStore } from '../src/cas/disk-store.js';
import { HashPrefixSet } from '../src/cas/hash-set.js';
import { formatBytes } from '../src/cli/format.js';
import { silentLogger } from '../src/log.js';
import { GrpcUpstream } from '../src/remote/upstream.js';
import { syncNames } from '../src/sync/sync-job.js';
import { TaskScope } from '../src/sync/task-scope.js';
import { TransferLimiter } from '../src/sync/transfer-limiter.js';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { REPO_ROOT, runCli, tempDir } from './helpers/mirror.js';

type T = { after(fn: () => Promise<void> | void): void };

const MiB = 1 << 20;

/** A bounded poll: resolves once `check` holds, fails the test after `timeoutMs`. */
async function until(what: string, check: () => Promise<boolean> | boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

function partialPath(dir: string, d: Digest): string {
  return join(dir, 'tmp', `partial-${d.hash}-${d.sizeBytes}`);
}

async function sizeOf(path: string): Promise<number | undefined> {
  return stat(path).then((s) => s.size, () => undefined);
}

/** Every file under the object and temp directories, with a hash of its content. */
async function fileSnapshot(dir: string): Promise<Map<string, string>> {
  const files = new Map<string, string>();
  const walk = async (sub: string): Promise<void> => {
    for (const entry of await readdir(join(dir, sub), { withFileTypes: true }).catch(() => [])) {
      const rel = join(sub, entry.name);
      if (entry.isDirectory()) await walk(rel);
      else files.set(rel, createHash('sha256').update(await readFile(join(dir, rel))).digest('hex'));
    }
  };
  await walk('cas');
  await walk('tmp');
  return files;
}

/** What the store holds, read after the process that wrote it exited: temp files, object files, index entries. */
async function storeState(dir: string): Promise<{ tmp: string[]; objects: Map<string, string>; indexed: Map<string, number> }> {
  const tmp = await readdir(join(dir, 'tmp')).catch(() => []);
  const objects = new Map<string, string>();
  for (const prefix of await readdir(join(dir, 'cas/objects')).catch(() => [])) {
    for (const rest of await readdir(join(dir, 'cas/objects', prefix))) objects.set(prefix + rest, join(dir, 'cas/objects', prefix, rest));
  }
  const store = await DiskContentStore.open(dir, silentLogger());
  const indexed = new Map<string, number>();
  try {
    for await (const e of store.blobEntries()) indexed.set(e.hash, e.sizeBytes);
  } finally {
    await store.close();
  }
  return { tmp, objects, indexed };
}

/**
 * A 1.x ref whose tree holds `count` small files (many batches at the fake's 64 KiB limit) and a
 * few files over the batch limit (ByteStream), and a second, healthy ref.
 */
async function manyBlobs(t: T, count: number) {
  const up = new FakeUpstream('reference-storage');
  const small: Digest[] = [];
  for (let i = 0; i < count; i++) small.push(up.add(Buffer.concat([Buffer.from(`file ${i}\n`), randomBytes(1000)])));
  const large = [0, 1, 2].map(() => up.add(randomBytes(300 * 1024)));
  const sub = up.addDirectory({ files: large.map((d, i) => ({ name: `large-${i}`, digest: d })) });
  const root = up.addDirectory({ files: small.map((d, i) => ({ name: `small-${i}`, digest: d })), dirs: [{ name: 'sub', digest: sub }] });
  const ref = `proj/many/${'a'.repeat(64)}`;
  up.refs.set(ref, root);
  const healthy = `proj/healthy/${'b'.repeat(64)}`;
  up.refs.set(healthy, up.addDirectory({ files: [{ name: 'ok', digest: up.add('a healthy file\n') }] }));
  await up.start();
  t.after(() => up.stop());
  return { up, small, large, root, ref, healthy };
}

interface JsonReport {
  results: { input: string; status: string; reason?: string; blobsTransferred: number; bytesTransferred: number }[];
  blobsTransferred: number;
  bytesTransferred: number;
}

test('a sync failed by a corrupt blob returns only after its writes: no temp files, every object indexed, exact counts', async (t) => {
  const { up, small, ref } = await manyBlobs(t, 3000);
  const bad = small[0];
  assert.ok(bad);
  up.corrupt.set(bad.hash, Buffer.alloc(bad.sizeBytes, 0x41));
  const dir = await tempDir(t);
  // The name fails at its first batch, while dozens of its batches are still queued or being
  // written: sync must not return (and close the store under them) until they are done.
  const run = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', ref, '--json']);
  assert.equal(run.code, 1, run.stderr);
  const report = JSON.parse(run.stdout) as JsonReport;
  assert.deepEqual(report.results.map((r) => r.status), ['failed']);
  assert.match(report.results[0]?.reason ?? '', /corrupt blob, which was not stored/);

  const state = await storeState(dir);
  assert.deepEqual(state.tmp, [], 'no temp file left');
  const unindexed = [...state.objects.keys()].filter((h) => !state.indexed.has(h));
  assert.deepEqual(unindexed, [], 'every object file the sync wrote is indexed');
  assert.ok(!state.indexed.has(bad.hash), 'the corrupt blob is not stored');
  // The blobs fetched in the same batch as the corrupt one are valid content: stored and indexed.
  assert.ok(small[1] && state.indexed.has(small[1].hash), 'valid blobs of the failed batch are indexed');
  // The summary counts exactly what this run stored (the store was empty).
  assert.equal(report.blobsTransferred, state.indexed.size);
  assert.equal(report.bytesTransferred, [...state.indexed.values()].reduce((n, s) => n + s, 0));
});

/** A ref with one small file, synced into a fresh store; returns the store's directory. */
async function syncedStore(t: T) {
  const up = new FakeUpstream('reference-storage');
  const ref = `proj/one/${'c'.repeat(64)}`;
  up.refs.set(ref, up.addDirectory({ files: [{ name: 'f', digest: up.add('important file content\n') }] }));
  await up.start();
  t.after(() => up.stop());
  const dir = await tempDir(t);
  const sync = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', ref]);
  assert.equal(sync.code, 0, sync.stderr);
  return { dir, ref };
}

/** Puts a valid object file in place without indexing it: what a crash between rename and index write leaves. */
async function unindexedObject(dir: string, content: Buffer): Promise<Digest> {
  const d = digestOf(content);
  await mkdir(join(dir, 'cas/objects', d.hash.slice(0, 2)), { recursive: true });
  await writeFile(join(dir, 'cas/objects', d.hash.slice(0, 2), d.hash.slice(2)), content);
  return d;
}

test('verify without --repair changes nothing; crash leftovers are reported but are not problems; --repair re-indexes and removes them', async (t) => {
  const { dir } = await syncedStore(t);
  const orphan = await unindexedObject(dir, randomBytes(3000));
  await writeFile(join(dir, 'tmp', randomUUID()), randomBytes(1000));
  const large = randomBytes(2 * MiB);
  const partial = digestOf(large);
  await writeFile(partialPath(dir, partial), large.subarray(0, MiB));
  const before = await fileSnapshot(dir);

  const check = await runCli(['verify', '--dir', dir]);
  assert.equal(check.code, 0, check.stdout + check.stderr);
  assert.match(check.stdout, /^checked 2 blobs and 1 names\n/);
  assert.match(check.stdout, /\nunindexed objects left by an interrupted sync: 1, 2\.9 KiB, all valid \(--repair re-indexes them\)\n/);
  assert.match(check.stdout, /\ntemp files left by an interrupted sync: 1, 1000 B \(--repair removes them\)\n/);
  assert.match(check.stdout, /\npartial downloads: 1, 1\.0 MiB \(kept: the next sync of their names resumes them; --prune removes them\)\n/);
  assert.match(check.stdout, /\nstore is consistent\n$/);
  assert.deepEqual(await fileSnapshot(dir), before, 'verify without --repair changed no file');

  const repair = await runCli(['verify', '--dir', dir, '--repair']);
  assert.equal(repair.code, 0, repair.stdout + repair.stderr);
  assert.match(repair.stdout, /\nunindexed objects left by an interrupted sync: 1, 2\.9 KiB, all valid \(re-indexed\)\n/);
  assert.match(repair.stdout, /\ntemp files left by an interrupted sync: 1, 1000 B \(removed\)\n/);
  assert.match(repair.stdout, /\npartial downloads: 1, 1\.0 MiB \(kept: /);
  assert.match(repair.stdout, /\nstore is consistent\n$/);
  assert.deepEqual(await readdir(join(dir, 'tmp')), [`partial-${partial.hash}-${partial.sizeBytes}`], 'only the partial download is left');
  const store = await DiskContentStore.open(dir, silentLogger(), { create: false });
  try {
    assert.deepEqual(await store.findMissing([orphan]), [], 'the valid unindexed object was re-indexed');
  } finally {
    await store.close();
  }
  const after = await runCli(['verify', '--dir', dir]);
  assert.equal(after.code, 0);
  assert.match(after.stdout, /^checked 3 blobs and 1 names\n/);
  assert.doesNotMatch(after.stdout, /unindexed|temp files/);
});

test('verify of a directory that holds no store fails with exit 2 and creates nothing', async (t) => {
  const parent = await tempDir(t);
  const dir = join(parent, 'no-store-here');
  const run = await runCli(['verify', '--dir', dir]);
  assert.equal(run.code, 2, run.stdout + run.stderr);
  assert.match(run.stderr, new RegExp(`there is no bst-cache-mirror store in ${dir}`));
  assert.deepEqual(await readdir(parent), [], 'nothing was created');
});

test('a bad unindexed object file is a problem: verify exits 1, --repair deletes it', async (t) => {
  const { dir } = await syncedStore(t);
  const content = randomBytes(500);
  const d = await unindexedObject(dir, content);
  const path = join(dir, 'cas/objects', d.hash.slice(0, 2), d.hash.slice(2));
  await writeFile(path, Buffer.concat([content, Buffer.from('x')]));
  const check = await runCli(['verify', '--dir', dir]);
  assert.equal(check.code, 1, check.stdout);
  assert.match(check.stdout, new RegExp(`\\nbad unindexed object file ${path}: its content hashes to [0-9a-f]{64}\\n`));
  assert.match(check.stdout, /problems found; run with --repair/);
  const repair = await runCli(['verify', '--dir', dir, '--repair']);
  assert.equal(repair.code, 0, repair.stdout);
  assert.match(repair.stdout, / \(deleted\)\n/);
  assert.equal(await sizeOf(path), undefined);
});

test('blobs of a sync that never completed are reported as unreferenced, kept by --repair, removed by --prune', async (t) => {
  const { up, small, ref, healthy } = await manyBlobs(t, 300);
  const bad = small[0];
  assert.ok(bad);
  up.corrupt.set(bad.hash, Buffer.alloc(bad.sizeBytes, 0x41));
  const dir = await tempDir(t);
  const run = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', ref, '--ref', healthy, '--json']);
  assert.equal(run.code, 1, run.stderr);
  const report = JSON.parse(run.stdout) as JsonReport;
  const [failed, mirrored] = report.results;
  assert.equal(failed?.status, 'failed');
  assert.equal(mirrored?.status, 'mirrored');
  const orphaned = await storeState(dir);
  assert.ok(failed.blobsTransferred > 0, 'the failed name stored part of its closure');
  const healthyBlobs = orphaned.indexed.size - failed.blobsTransferred;
  const line = (how: string): RegExp =>
    new RegExp(`\\nunreferenced blobs, needed by no name: ${failed.blobsTransferred}, ${formatBytes(failed.bytesTransferred).replace('.', '\\.')} ${how}`);

  const check = await runCli(['verify', '--dir', dir]);
  assert.equal(check.code, 0, check.stdout + check.stderr);
  assert.match(check.stdout, line('\\(kept: a sync of the names they were fetched for will not fetch them again; --prune removes them\\)\\n'));
  assert.match(check.stdout, /\nstore is consistent\n$/);

  const repair = await runCli(['verify', '--dir', dir, '--repair']);
  assert.equal(repair.code, 0, repair.stdout + repair.stderr);
  assert.match(repair.stdout, line('\\(kept: '));
  assert.equal((await storeState(dir)).indexed.size, orphaned.indexed.size, '--repair keeps them');

  const prune = await runCli(['verify', '--dir', dir, '--prune']);
  assert.equal(prune.code, 0, prune.stdout + prune.stderr);
  assert.match(prune.stdout, line('\\(removed\\)\\n'));
  const pruned = await storeState(dir);
  assert.equal(pruned.indexed.size, healthyBlobs, 'only the healthy name\'s blobs are left');
  assert.equal(pruned.objects.size, healthyBlobs, 'their files were deleted too');
  const after = await runCli(['verify', '--dir', dir]);
  assert.equal(after.code, 0);
  assert.equal(after.stdout, `checked ${healthyBlobs} blobs and 1 names\nstore is consistent\n`);
});

/** Starts `bst-cache-mirror sync` as a child process that the test can kill. */
function startSync(args: string[]): { kill(): Promise<void> } {
  const child = spawn(process.execPath, ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts'), 'sync', ...args], { cwd: REPO_ROOT, stdio: 'ignore' });
  const exited = once(child, 'exit');
  return {
    kill: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

test('a large blob interrupted by kill -9 resumes with read_offset where it stopped, and the whole file is verified', async (t) => {
  const up = new FakeUpstream('reference-storage');
  const big = randomBytes(24 * MiB);
  const bigD = up.add(big);
  const ref = `proj/big/${'e'.repeat(64)}`;
  up.refs.set(ref, up.addDirectory({ files: [{ name: 'big', digest: bigD }, { name: 'small', digest: up.add('small file\n') }] }));
  up.stallAfterBytes = 5 * MiB;
  await up.start();
  t.after(() => up.stop());
  const dir = await tempDir(t);

  const first = startSync(['--dir', dir, '--upstream', up.url, '--ref', ref]);
  t.after(() => first.kill());
  await until('the first 5 MiB are in the partial download', async () => (await sizeOf(partialPath(dir, bigD))) === 5 * MiB);
  await first.kill();
  assert.deepEqual(up.readOffsets, [0]);
  // A temp file of a write the kill cut short: sync removes it when it opens the store.
  await writeFile(join(dir, 'tmp', randomUUID()), 'stale');

  up.stallAfterBytes = undefined;
  const second = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', ref, '--json']);
  assert.equal(second.code, 0, second.stdout + second.stderr);
  const report = JSON.parse(second.stdout) as JsonReport & { bytesResumed: number };
  assert.deepEqual(up.readOffsets, [0, 5 * MiB], 'the second sync asked only for the rest');
  assert.equal(report.bytesResumed, 5 * MiB);
  assert.deepEqual(await readdir(join(dir, 'tmp')), [], 'the partial download became the object; the stale temp file is gone');
  assert.deepEqual(await readFile(join(dir, 'cas/objects', bigD.hash.slice(0, 2), bigD.hash.slice(2))), big);
  const summary = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', ref]);
  assert.match(summary.stdout, /mirrored 0, already present 1/);
  const verify = await runCli(['verify', '--dir', dir]);
  assert.equal(verify.code, 0, verify.stdout);
  assert.match(verify.stdout, /store is consistent\n$/);
});

test('a partial download that does not match is fetched again from zero, and the summary says what was resumed', async (t) => {
  const up = new FakeUpstream('remote-asset');
  const big = randomBytes(3 * MiB);
  const bigD = up.add(big);
  const urn = `urn:fdc:buildstream.build:2020:source:tar/${'f'.repeat(64)}`;
  up.assets.set(urn, up.addDirectory({ files: [{ name: 'big', digest: bigD }] }));
  await up.start();
  t.after(() => up.stop());
  const dir = await tempDir(t);
  await mkdir(join(dir, 'tmp'), { recursive: true });
  // Not the blob's first MiB (say, written just before a power cut).
  await writeFile(partialPath(dir, bigD), Buffer.alloc(MiB));
  const run = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', urn]);
  assert.equal(run.code, 0, run.stdout + run.stderr);
  assert.deepEqual(up.readOffsets, [MiB, 0], 'resumed, found the whole wrong, fetched it again from zero');
  assert.match(run.stdout, /transferred 2 blobs, 3\.0 MiB in [\d.]+ s \([^)]+\/s\)\n/, 'nothing counted as resumed');
  assert.deepEqual(await readFile(join(dir, 'cas/objects', bigD.hash.slice(0, 2), bigD.hash.slice(2))), big);
  assert.deepEqual(await readdir(join(dir, 'tmp')), []);

  // A good partial: the summary says how much came from it.
  const other = randomBytes(2 * MiB);
  const otherD = up.add(other);
  const urn2 = `urn:fdc:buildstream.build:2020:source:tar/${'9'.repeat(64)}`;
  up.assets.set(urn2, up.addDirectory({ files: [{ name: 'other', digest: otherD }] }));
  await writeFile(partialPath(dir, otherD), other.subarray(0, MiB + 5));
  const resumed = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', urn2]);
  assert.equal(resumed.code, 0, resumed.stdout + resumed.stderr);
  assert.match(resumed.stdout, /transferred 2 blobs, 2\.0 MiB in [\d.]+ s \([^)]+\/s\), of which 1\.0 MiB resumed from partial downloads of an interrupted sync\n/);
  assert.equal(up.readOffsets.at(-1), MiB + 5);
});

test("a closure's subdirectories and small files are fetched while its large blob streams; a dropped stream resumes", async (t) => {
  const up = new FakeUpstream('reference-storage');
  const big = randomBytes(4 * MiB);
  const bigD = up.add(big);
  const files = Array.from({ length: 40 }, (_, i) => up.add(`small file ${i}\n`));
  const level3 = up.addDirectory({ files: files.slice(20).map((d, i) => ({ name: `c${i}`, digest: d })) });
  const level2 = up.addDirectory({ files: files.slice(1, 20).map((d, i) => ({ name: `b${i}`, digest: d })), dirs: [{ name: 'deeper', digest: level3 }] });
  const root = up.addDirectory({ files: [{ name: 'big', digest: bigD }, { name: 'a', digest: files[0] ?? bigD }], dirs: [{ name: 'sub', digest: level2 }] });
  const ref = `proj/tree/${'7'.repeat(64)}`;
  up.refs.set(ref, root);
  up.stallAfterBytes = 512 * 1024;
  await up.start();
  t.after(() => up.stop());
  const dir = await tempDir(t);
  const store = await DiskContentStore.open(dir, silentLogger(), { removeStaleTemp: true });
  t.after(() => store.close());
  const upstream = await GrpcUpstream.create({ url: up.url });
  t.after(() => upstream.close());
  const log = silentLogger();
  const rest = [root, level2, level3, ...files];

  const running = syncNames({ store, upstreams: [upstream], names: [ref], log });
  // The big blob's read is stalled upstream: everything else of the closure still arrives.
  await until('the rest of the closure is stored while the big blob is stalled', async () =>
    up.stalledReads.size === 1 && (await store.findMissing(rest)).length === 0 && (await sizeOf(partialPath(dir, bigD))) === 512 * 1024,
  );
  // The connection drops: the name fails, after its other transfers, keeping what the big blob got.
  for (const call of up.stalledReads) call.emit('error', { code: grpc.status.UNAVAILABLE, details: 'connection dropped' });
  up.stalledReads.clear();
  const first = await running;
  assert.equal(first.results[0]?.status, 'failed');
  assert.match(first.results[0]?.reason ?? '', /connection dropped/);
  assert.equal(first.blobsTransferred, rest.length, 'counted exactly what was stored');
  assert.equal(await sizeOf(partialPath(dir, bigD)), 512 * 1024, 'the partial download is kept');

  up.stallAfterBytes = undefined;
  const second = await syncNames({ store, upstreams: [upstream], names: [ref], log });
  assert.equal(second.results[0]?.status, 'mirrored');
  assert.equal(second.blobsTransferred, 1);
  assert.equal(second.bytesTransferred, big.byteLength);
  assert.equal(second.bytesResumed, 512 * 1024);
  assert.deepEqual(up.readOffsets, [0, 512 * 1024]);
  assert.deepEqual(await store.findMissing([bigD]), []);
  assert.deepEqual(await readdir(join(dir, 'tmp')), []);
});

test('TransferLimiter: streams leave a slot for batches, and directories go first', async () => {
  const limiter = new TransferLimiter(3);
  const started: string[] = [];
  const gates = new Map<string, () => void>();
  const job = (name: string, kind: { priority: boolean; stream: boolean }): Promise<void> =>
    limiter.run(kind, () => {
      started.push(name);
      return new Promise<void>((resolve) => gates.set(name, resolve));
    });
  const stream = { priority: false, stream: true };
  const batch = { priority: false, stream: false };
  const dir = { priority: true, stream: false };
  const all = [job('s1', stream), job('s2', stream), job('s3', stream), job('b1', batch), job('b2', batch), job('d1', dir)];
  // Two streams take two of three slots; the third stream waits and a batch passes it.
  assert.deepEqual(started, ['s1', 's2', 'b1']);
  gates.get('b1')?.();
  await until('the next job starts', () => started.length === 4);
  assert.deepEqual(started.at(-1), 'd1', 'a directory goes before queued files');
  gates.get('d1')?.();
  await until('the next job starts', () => started.length === 5);
  assert.deepEqual(started.at(-1), 'b2', 'the third stream still waits: two are running');
  gates.get('s1')?.();
  await until('the next job starts', () => started.length === 6);
  assert.deepEqual(started.at(-1), 's3');
  for (const name of ['s2', 's3', 'b2']) gates.get(name)?.();
  await Promise.all(all);
});

test('TaskScope: drain waits for every task, including tasks started by tasks, then throws the first failure', async () => {
  const scope = new TaskScope();
  const finished: string[] = [];
  let release: () => void = () => undefined;
  const slow = new Promise<void>((resolve) => (release = resolve));
  scope.spawn(async () => {
    throw new Error('first failure');
  });
  scope.spawn(async () => {
    await Promise.resolve();
    scope.spawn(async () => {
      await slow;
      finished.push('child');
    });
    finished.push('parent');
  });
  let drained = false;
  const draining = scope.drain().finally(() => (drained = true));
  await until('the parent task ran', () => finished.includes('parent'));
  assert.equal(drained, false, 'drain waits for the child task');
  assert.equal(scope.failed, true);
  release();
  await assert.rejects(draining, /first failure/);
  assert.deepEqual(finished, ['parent', 'child']);
});

test('HashPrefixSet holds many hashes exactly by their first 64 bits', () => {
  const set = new HashPrefixSet();
  const hashes = Array.from({ length: 50_000 }, (_, i) => createHash('sha256').update(`blob ${i}`).digest('hex'));
  for (const h of hashes) set.add(h);
  for (const h of hashes.slice(0, 100)) set.add(h);
  assert.equal(set.size, hashes.length);
  assert.ok(hashes.every((h) => set.has(h)));
  assert.ok(!set.has(createHash('sha256').update('not added').digest('hex')));
  set.add('0'.repeat(64));
  assert.ok(set.has('0'.repeat(64)));
  assert.ok(!set.has(`${'0'.repeat(15)}1${'0'.repeat(48)}`));
});
