/**
 * Replication of pushed names to upstreams configured with `push: true` (issue 10 §4): durable
 * push jobs (PushQueue) over the upstream write side (GrpcUpstream as UpstreamWriter), against
 * FakeUpstream over real gRPC on loopback and, at the end, BuildStream's own servers.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { artifactRoots } from '../src/cas/closure.js';
import type { NameRecord } from '../src/cas/content-store.js';
import { type Digest, EMPTY_DIGEST, digestKey, digestOf, toWire } from '../src/cas/digest.js';
import { DiskContentStore } from '../src/cas/disk-store.js';
import { URN_PREFIX, artifactName, parseUrn, refName } from '../src/cas/names.js';
import { MirrorError } from '../src/errors.js';
import { Directory } from '../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import { Artifact } from '../src/gen/buildstream/v2/artifact.js';
import { Source } from '../src/gen/buildstream/v2/source.js';
import { silentLogger } from '../src/log.js';
import { localClosure } from '../src/push/push-job.js';
import { type PushJobRecord, PushQueue, type PushTarget, pushJobKey, readPushStats } from '../src/push/push-queue.js';
import { HealthCheckedUpstream, type HealthPolicy, type HealthRecord, UpstreamHealth } from '../src/remote/health.js';
import { isRetryable } from '../src/remote/retryable.js';
import { GrpcUpstream, type UpstreamSpec } from '../src/remote/upstream.js';
import { bst2Available, bstAvailable, startReferenceServer } from './helpers/buildstream.js';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { tempDir } from './helpers/mirror.js';

type T = { after(fn: () => Promise<void> | void): void };

const log = silentLogger();
const FAST_RETRY = { retries: 5, minTimeoutMs: 5, maxTimeoutMs: 40 };
/** Offline after 2 failures, probed every 20 ms at first: outages pass quickly in tests. */
const FAST_HEALTH: HealthPolicy = { failuresToOffline: 2, probeIntervalMs: 20, probeMaxIntervalMs: 200 };
const REF = `proj/hello/${'a'.repeat(64)}`;
const ARTIFACT = `proj/app/${'b'.repeat(64)}`;
const SOURCE_KEY = `git/${'c'.repeat(64)}`;

// ---------------------------------------------------------------------------
// A mirror store holding names, as a push to the mirror or a sync leaves them
// ---------------------------------------------------------------------------

async function openStore(t: T, dir?: string): Promise<{ store: DiskContentStore; dir: string }> {
  const at = dir ?? (await tempDir(t, 'push-queue-'));
  const store = await DiskContentStore.open(at, log);
  t.after(() => store.close());
  return { store, dir: at };
}

/** Builds blobs and Directories into a store. */
class Builder {
  constructor(private readonly store: DiskContentStore) {}

  async blob(data: Buffer | string): Promise<Digest> {
    const buf = typeof data === 'string' ? Buffer.from(data) : data;
    const digest = digestOf(buf);
    await this.store.write(digest, buf);
    return digest;
  }

  async dir(entries: { files?: { name: string; digest: Digest; executable?: boolean }[]; dirs?: { name: string; digest: Digest }[] }): Promise<Digest> {
    const bytes = Directory.encode({
      files: (entries.files ?? []).map((f) => ({ name: f.name, digest: toWire(f.digest), isExecutable: f.executable ?? false })),
      directories: (entries.dirs ?? []).map((d) => ({ name: d.name, digest: toWire(d.digest) })),
      symlinks: [],
    }).finish();
    return this.blob(Buffer.from(bytes));
  }

  /** A tree with small files, five 20 KiB files (more than one 64 KiB batch), an empty file and one 300 KiB file (ByteStream). */
  async tree(tag: string): Promise<Digest> {
    const big = await this.blob(randomBytes(300 * 1024));
    const mids = await Promise.all([1, 2, 3, 4, 5].map((i) => this.blob(randomBytes(20 * 1024 + i))));
    const share = await this.dir({ files: [{ name: 'data.bin', digest: big }, ...mids.map((digest, i) => ({ name: `mid-${i}`, digest }))] });
    const hello = await this.blob(`#!/bin/sh\necho ${tag}\n`);
    return this.dir({
      files: [{ name: 'empty', digest: EMPTY_DIGEST }, { name: 'hello', digest: hello, executable: true }],
      dirs: [{ name: 'share', digest: share }],
    });
  }
}

function record(type: 'directory' | 'blob', digest: Digest, referenced: { blobs?: Digest[]; directories?: Digest[] } = {}): NameRecord {
  return { type, digest, referencedBlobs: referenced.blobs ?? [], referencedDirectories: referenced.directories ?? [], upstream: 'push from test', fetchedAt: Date.now() };
}

/** A 1.x ref pointing to a whole tree. */
async function putRef(store: DiskContentStore, b: Builder, ref = REF): Promise<{ urn: string; root: Digest }> {
  const root = await b.tree(ref);
  const urn = refName(ref).urn;
  await store.putName(urn, record('directory', root));
  return { urn, root };
}

/** A 2.x artifact: an Artifact proto whose files tree, logs, metadata and public data are all in the store. */
async function putArtifact(store: DiskContentStore, b: Builder): Promise<{ urn: string; digest: Digest; rec: NameRecord }> {
  const files = await b.tree('artifact');
  const logFile = await b.blob('build log\n');
  const low = await b.blob('low: meta\n');
  const high = await b.blob('high: meta\n');
  const pub = await b.blob('public: data\n');
  const key = ARTIFACT.split('/')[2] ?? '';
  const proto = Buffer.from(
    Artifact.encode(
      Artifact.fromPartial({
        version: 2, buildSuccess: true, strongKey: key, weakKey: key, strictKey: key,
        files: toWire(files), publicData: toWire(pub), logs: [{ name: 'build.log', digest: toWire(logFile) }],
        lowDiversityMeta: toWire(low), highDiversityMeta: toWire(high),
      }),
    ).finish(),
  );
  const digest = await b.blob(proto);
  const roots = artifactRoots(proto, digest, true);
  const rec = record('blob', digest, roots);
  const urn = artifactName(ARTIFACT).urn;
  await store.putName(urn, rec);
  return { urn, digest, rec };
}

// ---------------------------------------------------------------------------
// Upstreams and queues
// ---------------------------------------------------------------------------

async function fake(t: T, dialect: 'remote-asset' | 'reference-storage', acceptWrites = true): Promise<FakeUpstream> {
  const up = new FakeUpstream(dialect);
  up.acceptWrites = acceptWrites;
  await up.start();
  t.after(() => up.stop());
  return up;
}

async function target(t: T, spec: UpstreamSpec, policy: HealthPolicy = FAST_HEALTH): Promise<PushTarget & { health: UpstreamHealth }> {
  const inner = await GrpcUpstream.create(spec);
  const health = await UpstreamHealth.load(spec.url, { policy, log });
  const writer = new HealthCheckedUpstream(inner, health);
  t.after(() => writer.close());
  return { name: spec.url, writer, health };
}

function queueFor(t: T, store: DiskContentStore, targets: readonly PushTarget[], retry = FAST_RETRY): PushQueue {
  const queue = new PushQueue({ store, table: store.stateTable<PushJobRecord>('push-jobs'), targets: () => targets, log, retry });
  t.after(() => queue.stop(1000));
  return queue;
}

/** Resolves once the breaker's record passes `test` (no polling: UpstreamHealth reports each change). */
function until(health: UpstreamHealth, test: (r: HealthRecord) => boolean): Promise<void> {
  if (test(health.state)) return Promise.resolve();
  return new Promise((resolve) => {
    const off = health.onChange((r) => {
      if (test(r)) {
        off();
        resolve();
      }
    });
  });
}

/** The name's closure as the mirror's store holds it (the empty blob included). */
async function closureOf(store: DiskContentStore, urn: string): Promise<Digest[]> {
  const rec = await store.getName(urn);
  assert.ok(rec, `${urn} is recorded`);
  return localClosure(store, parseUrn(urn), rec);
}

/**
 * Asserts the fake holds the name's whole closure, that every blob of it was written before the
 * name was set (`nameEntry` in writeLog), and (unless names sharing blobs were pushed
 * concurrently, when both jobs may find a shared blob missing) that no blob was uploaded twice.
 */
async function assertReplicated(up: FakeUpstream, store: DiskContentStore, urn: string, nameEntry: string, once = true): Promise<void> {
  const at = up.writeLog.indexOf(nameEntry);
  assert.ok(at >= 0, `${nameEntry} was written`);
  for (const d of await closureOf(store, urn)) {
    assert.ok(up.blobs.has(d.hash), `upstream has ${digestKey(d)}`);
    const written = up.writeLog.indexOf(`blob ${d.hash}`);
    assert.ok(written < at, `${digestKey(d)} was there before ${nameEntry}`);
  }
  if (!once) return;
  const uploaded = up.writeLog.filter((e) => e.startsWith('blob '));
  assert.equal(new Set(uploaded).size, uploaded.length, 'no blob was uploaded twice');
}

const UPLOAD_NAME = /^uploads\/[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\/blobs\/[0-9a-f]{64}\/\d+$/;

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

test('a 1.x ref is replicated to a ReferenceStorage upstream: whole closure first, UpdateReference last', async (t) => {
  const { store } = await openStore(t);
  const b = new Builder(store);
  const { urn, root } = await putRef(store, b);
  const up = await fake(t, 'reference-storage');
  const queue = queueFor(t, store, [await target(t, { url: up.url })]);
  await queue.start();

  await queue.enqueue(urn);
  await queue.onIdle();

  assert.equal(digestKey(up.refs.get(REF) ?? EMPTY_DIGEST), digestKey(root));
  await assertReplicated(up, store, urn, `ref ${REF}`);
  const closure = await closureOf(store, urn);
  assert.deepEqual(new Set(up.writeLog.filter((e) => e.startsWith('blob '))), new Set(closure.map((d) => `blob ${d.hash}`)), 'exactly the closure was uploaded');
  // As 1.6's server, the fake reports the empty blob missing until it is uploaded: it was.
  assert.ok(up.blobs.has(EMPTY_DIGEST.hash));
  // As BuildStream 1.6 pushes: one key per UpdateReference, no instance name, uploads/{uuid4}/blobs/… for large blobs.
  assert.deepEqual(up.refUpdates.map((r) => [r.instanceName, r.keys]), [['', [REF]]]);
  assert.equal(up.count('ByteStream.Write'), 1, 'the 300 KiB blob went by ByteStream');
  assert.match(up.uploadNames[0] ?? '', UPLOAD_NAME);
  assert.ok(up.count('BatchUpdateBlobs') >= 2, 'the small blobs went in batches within the 64 KiB limit');
  assert.deepEqual(await queue.stats(), { depth: 0, failed: [] });
});

test('2.x names to a Remote Asset upstream with an instance name: PushBlob with references, PushDirectory for Directory names; a second push sends nothing', async (t) => {
  const { store } = await openStore(t);
  const b = new Builder(store);
  const artifact = await putArtifact(store, b);
  const sourceTree = await b.tree('source');
  const sourceUrn = `${URN_PREFIX}source:${SOURCE_KEY}`;
  await store.putName(sourceUrn, record('directory', sourceTree));
  const sourcesProto = await b.blob(Buffer.from(Source.encode({ version: 1, files: toWire(sourceTree) }).finish()));
  const elementSourcesUrn = `${URN_PREFIX}source:${'d'.repeat(64)}`;
  await store.putName(elementSourcesUrn, record('blob', sourcesProto, { directories: [sourceTree] }));
  const ref = await putRef(store, b);
  const up = await fake(t, 'remote-asset');
  const queue = queueFor(t, store, [await target(t, { url: up.url, instanceName: 'office' })]);
  await queue.start();

  await Promise.all([artifact.urn, sourceUrn, elementSourcesUrn, ref.urn].map((urn) => queue.enqueue(urn)));
  await queue.onIdle();

  assert.equal(digestKey(up.assets.get(artifact.urn) ?? EMPTY_DIGEST), digestKey(artifact.digest));
  assert.equal(digestKey(up.assets.get(sourceUrn) ?? EMPTY_DIGEST), digestKey(sourceTree));
  assert.equal(digestKey(up.assets.get(elementSourcesUrn) ?? EMPTY_DIGEST), digestKey(sourcesProto));
  assert.equal(digestKey(up.assets.get(ref.urn) ?? EMPTY_DIGEST), digestKey(ref.root));
  for (const urn of [artifact.urn, sourceUrn, elementSourcesUrn, ref.urn]) await assertReplicated(up, store, urn, `asset ${urn}`, false);

  const byUri = new Map(up.assetPushes.map((p) => [p.request.uris.join(' '), p]));
  const pushedArtifact = byUri.get(artifact.urn);
  assert.equal(pushedArtifact?.method, 'PushBlob');
  // BuildStream 2's _push_artifact_proto: references_blobs = metadata, logs, public data; references_directories = files.
  assert.deepEqual(new Set(pushedArtifact?.request.referencesBlobs.map((d) => d.hash)), new Set(artifact.rec.referencedBlobs.map((d) => d.hash)));
  assert.deepEqual(pushedArtifact?.request.referencesDirectories.map((d) => d.hash), artifact.rec.referencedDirectories.map((d) => d.hash));
  assert.equal(byUri.get(elementSourcesUrn)?.method, 'PushBlob');
  assert.deepEqual(byUri.get(elementSourcesUrn)?.request.referencesDirectories.map((d) => d.hash), [sourceTree.hash]);
  // Single sources and 1.x refs (v1 URNs, as 1.6 in asset mode) are Directory names: PushDirectory, no references.
  for (const urn of [sourceUrn, ref.urn]) {
    const pushed = byUri.get(urn);
    assert.equal(pushed?.method, 'PushDirectory');
    assert.deepEqual([pushed?.request.referencesBlobs, pushed?.request.referencesDirectories], [[], []]);
  }
  assert.ok(up.uploadNames.length > 0 && up.uploadNames.every((n) => n.startsWith('office/') && UPLOAD_NAME.test(n.slice('office/'.length))), up.uploadNames.join());
  for (const method of ['FindMissingBlobs', 'BatchUpdateBlobs', 'ByteStream.Write', 'FetchBlob', 'FetchDirectory', 'PushBlob', 'PushDirectory']) {
    assert.equal(up.instanceNames.get(method), 'office', `${method} carries the instance name`);
  }

  // Pushed again (a CI retry): the upstream has it with the same digest, so nothing is uploaded.
  const writes = up.writeLog.length;
  const [fetches, finds] = [up.count('FetchBlob'), up.count('FindMissingBlobs')];
  await queue.enqueue(artifact.urn);
  await queue.onIdle();
  assert.equal(up.writeLog.length, writes, 'nothing written again');
  assert.equal(up.count('FetchBlob'), fetches + 1, 'the upstream was asked once');
  assert.equal(up.count('FindMissingBlobs'), finds, 'no closure was even looked at');
  assert.deepEqual(await queue.stats(), { depth: 0, failed: [] });
});

test('UNAVAILABLE twice, then success: the job retries with backoff and completes', async (t) => {
  const { store } = await openStore(t);
  const b = new Builder(store);
  const { urn, root } = await putRef(store, b);
  const up = await fake(t, 'reference-storage');
  up.failNext('FindMissingBlobs', grpc.status.UNAVAILABLE, 2);
  const tgt = await target(t, { url: up.url }, { ...FAST_HEALTH, failuresToOffline: 3 });
  const queue = queueFor(t, store, [tgt]);
  await queue.start();

  await queue.enqueue(urn);
  await queue.onIdle();

  assert.equal(digestKey(up.refs.get(REF) ?? EMPTY_DIGEST), digestKey(root));
  assert.equal(up.count('FindMissingBlobs'), 3);
  assert.equal(up.count('GetReference'), 3, 'each attempt asked first whether the upstream has the name');
  await assertReplicated(up, store, urn, `ref ${REF}`);
  assert.equal(tgt.health.state.state, 'online');
  assert.deepEqual(await queue.stats(), { depth: 0, failed: [] });
});

test('the upstream dies mid-push and comes back on the same port: the job waits while it is offline and completes', { timeout: 60_000 }, async (t) => {
  const { store } = await openStore(t);
  const b = new Builder(store);
  const { urn, root } = await putRef(store, b);
  const up = await fake(t, 'reference-storage');
  const port = up.port;
  up.onNextCall('BatchUpdateBlobs', () => up.kill());
  const tgt = await target(t, { url: up.url });
  // Three retries only: waiting out the outage (many failed probes) must not use them up.
  const queue = queueFor(t, store, [tgt], { ...FAST_RETRY, retries: 3 });
  await queue.start();

  await queue.enqueue(urn);
  await until(tgt.health, (r) => r.state === 'offline');
  const during = await queue.stats();
  assert.equal(during.depth, 1, 'the job is still pending while the upstream is offline');
  await up.start(port);
  await queue.onIdle();

  assert.equal(tgt.health.state.state, 'online');
  assert.equal(digestKey(up.refs.get(REF) ?? EMPTY_DIGEST), digestKey(root));
  await assertReplicated(up, store, urn, `ref ${REF}`);
  assert.deepEqual(await queue.stats(), { depth: 0, failed: [] });
});

test('an index/storage split (BuildStream 2 type: index + type: storage): blobs go to storage, the name to the index, last', async (t) => {
  const { store } = await openStore(t);
  const b = new Builder(store);
  const artifact = await putArtifact(store, b);
  const index = await fake(t, 'remote-asset');
  const storage = await fake(t, 'remote-asset');
  storage.maxBatchBytes = 32 * 1024;
  const queue = queueFor(t, store, [await target(t, { url: index.url, storage: { url: storage.url } })]);
  await queue.start();
  await queue.enqueue(artifact.urn);
  await queue.onIdle();

  assert.deepEqual(index.writeLog, [`asset ${artifact.urn}`]);
  assert.equal(index.count('FindMissingBlobs') + index.count('BatchUpdateBlobs') + index.count('ByteStream.Write'), 0);
  for (const d of await closureOf(store, artifact.urn)) assert.ok(storage.blobs.has(d.hash), `storage has ${digestKey(d)}`);
  assert.equal(storage.assets.size, 0);
  assert.ok(storage.count('BatchUpdateBlobs') >= 4, 'batches kept within the storage server\'s 32 KiB limit');
  assert.deepEqual(await queue.stats(), { depth: 0, failed: [] });
});

test('a pull-only upstream: the job fails once with PERMISSION_DENIED, no retry; retryFailed queues it again', async (t) => {
  const { store } = await openStore(t);
  const b = new Builder(store);
  const { urn, root } = await putRef(store, b);
  const up = await fake(t, 'reference-storage', false);
  const queue = queueFor(t, store, [await target(t, { url: up.url })]);
  await queue.start();

  await queue.enqueue(urn);
  await queue.onIdle();

  const { depth, failed } = await queue.stats();
  assert.equal(depth, 0);
  assert.equal(failed.length, 1);
  const [job] = failed;
  assert.equal(job?.state, 'failed');
  assert.equal(job?.attempts, 1);
  assert.equal(job?.urn, urn);
  assert.equal(job?.upstream, up.url);
  assert.match(job?.lastError ?? '', /PERMISSION_DENIED/);
  assert.equal(typeof job?.lastAttemptAt, 'number');
  assert.equal(up.count('Status'), 1, 'one attempt: refused, not retried');
  // Refused by Status (allow_updates false) before anything was uploaded.
  assert.equal(up.count('GetReference') + up.count('FindMissingBlobs') + up.count('BatchUpdateBlobs'), 0);
  assert.equal(up.refs.size, 0);

  // The admin enables push upstream, then retries the failed jobs.
  up.acceptWrites = true;
  assert.equal(await queue.retryFailed(), 1);
  await queue.onIdle();
  assert.equal(digestKey(up.refs.get(REF) ?? EMPTY_DIGEST), digestKey(root));
  assert.deepEqual(await queue.stats(), { depth: 0, failed: [] });
  assert.equal(await queue.retryFailed(), 0);
});

test('durability: a job recorded before a restart completes after it, and a job replayed after its name was set uploads nothing', async (t) => {
  const { store, dir } = await openStore(t);
  const b = new Builder(store);
  const { urn, root } = await putRef(store, b);
  const up = await fake(t, 'reference-storage');
  const tgt = await target(t, { url: up.url });

  // Recorded, never run: the queue is not started (as a daemon killed right after acknowledging a push).
  const before = new PushQueue({ store, table: store.stateTable<PushJobRecord>('push-jobs'), targets: () => [tgt], log, retry: FAST_RETRY });
  await before.enqueue(urn);
  await before.enqueue(urn);
  const recorded = await before.stats();
  assert.equal(recorded.depth, 1, 'one job per (name, upstream), not duplicated');
  assert.equal(typeof recorded.oldestCreatedAt, 'number');
  assert.equal(up.writeLog.length, 0);
  await store.close();

  const reopened = await DiskContentStore.open(dir, log);
  t.after(() => reopened.close());
  const after = queueFor(t, reopened, [tgt]);
  await after.start();
  await after.onIdle();
  assert.equal(digestKey(up.refs.get(REF) ?? EMPTY_DIGEST), digestKey(root));
  await assertReplicated(up, reopened, urn, `ref ${REF}`);
  assert.deepEqual(await after.stats(), { depth: 0, failed: [] });

  // Killed after UpdateReference but before the job's record was deleted: the next start replays it.
  const table = reopened.stateTable<PushJobRecord>('push-jobs');
  await table.put(pushJobKey(up.url, urn), { urn, upstream: up.url, createdAt: Date.now(), attempts: 0, state: 'pending' });
  const writes = up.writeLog.length;
  const asks = up.count('GetReference');
  const replay = queueFor(t, reopened, [tgt]);
  await replay.start();
  await replay.onIdle();
  assert.equal(up.writeLog.length, writes, 'nothing uploaded or set twice');
  assert.equal(up.count('GetReference'), asks + 1);
  assert.equal(up.count('FindMissingBlobs'), 1, 'the closure was only looked at by the first run');
  assert.deepEqual(await replay.stats(), { depth: 0, failed: [] });
});

test('stop() ends waits for an offline upstream at once and leaves the job recorded', async (t) => {
  const { store } = await openStore(t);
  const b = new Builder(store);
  const { urn } = await putRef(store, b);
  const up = await fake(t, 'reference-storage');
  const tgt = await target(t, { url: up.url }, { failuresToOffline: 1, probeIntervalMs: 60_000, probeMaxIntervalMs: 60_000 });
  up.kill();
  const queue = queueFor(t, store, [tgt]);
  await queue.start();
  await queue.enqueue(urn);
  await until(tgt.health, (r) => r.state === 'offline');

  await queue.stop(1000);
  const { depth, failed } = await queue.stats();
  assert.equal(depth, 1);
  assert.deepEqual(failed, []);
  await queue.onIdle();
});

test('a 2.x name for a ReferenceStorage upstream is dropped; a name gone from the mirror and a job whose upstream left the config fail visibly; dropFailed forgets them', async (t) => {
  const { store } = await openStore(t);
  const b = new Builder(store);
  const artifact = await putArtifact(store, b);
  const up = await fake(t, 'reference-storage');
  const targets: PushTarget[] = [await target(t, { url: up.url })];
  const queue = new PushQueue({ store, table: store.stateTable<PushJobRecord>('push-jobs'), targets: () => targets, log, retry: FAST_RETRY });
  t.after(() => queue.stop(1000));
  await queue.start();
  await queue.enqueue(artifact.urn);
  const gone = refName(`proj/gone/${'e'.repeat(64)}`).urn;
  await queue.enqueue(gone);
  await queue.onIdle();
  const first = await queue.stats();
  assert.equal(first.depth, 0);
  assert.deepEqual(
    first.failed.map((f) => [f.urn, f.attempts]),
    [[gone, 1]],
    'the acknowledged name removed from the mirror (e.g. by verify --repair) fails after one attempt, with no upload and no retry',
  );
  assert.match(first.failed[0]?.lastError ?? '', /no longer in the mirror/);
  assert.equal(up.writeLog.length, 0);

  // The upstream is renamed in the config (or set to push: false) while a job waits for it.
  const { urn: ref, root } = await putRef(store, b, `proj/kept/${'f'.repeat(64)}`);
  targets.length = 0;
  targets.push({ ...(await target(t, { url: up.url })), name: 'renamed' });
  await queue.enqueue(ref);
  await queue.retryFailed();
  await queue.onIdle();
  const second = await queue.stats();
  const orphan = second.failed.find((f) => f.upstream === up.url && f.urn === gone);
  assert.match(orphan?.lastError ?? '', /no longer an upstream with push: true in the config/);
  assert.equal(up.refs.get(`proj/kept/${'f'.repeat(64)}`)?.hash, root.hash, 'the renamed target gets new jobs');
  assert.equal(await queue.dropFailed(), second.failed.length);
  assert.deepEqual(await queue.stats(), { depth: 0, failed: [] });
});

test('a job whose push never recorded its name (kill -9 or a failed write in between) is dropped, not failed', async (t) => {
  const { store } = await openStore(t);
  const up = await fake(t, 'reference-storage');
  const targets: PushTarget[] = [await target(t, { url: up.url })];
  const table = store.stateTable<PushJobRecord>('push-jobs');
  const first = new PushQueue({ store, table, targets: () => targets, log, retry: FAST_RETRY });
  await first.start();
  const urn = refName(`proj/unnamed/${'9'.repeat(64)}`).urn;
  await assert.rejects(first.enqueue(urn, () => Promise.reject(new Error('the disk is full'))), /the disk is full/);
  await first.stop(1000);
  assert.equal((await readPushStats(table)).depth, 1, 'the job was recorded before the name');
  // The next start runs it: the name is not there, and it was never acknowledged.
  const second = new PushQueue({ store, table, targets: () => targets, log, retry: FAST_RETRY });
  t.after(() => second.stop(1000));
  await second.start();
  await second.onIdle();
  assert.deepEqual(await second.stats(), { depth: 0, failed: [] });
  assert.equal(up.writeLog.length, 0);
});

test('upstream writes: early committed_size is success, a short upload and a corrupt blob are final errors', async (t) => {
  const up = await fake(t, 'remote-asset');
  const writer = await GrpcUpstream.create({ url: up.url });
  t.after(() => writer.close());
  const big = randomBytes(3 << 20);
  const digest = digestOf(big);
  up.blobs.set(digest.hash, big);
  up.earlyCommit = true;
  async function* chunks(data: Buffer, size = 1 << 20): AsyncIterable<Uint8Array> {
    for (let at = 0; at < data.byteLength; at += size) yield data.subarray(at, at + size);
  }
  await writer.writeStream(digest, chunks(big));
  assert.equal(up.count('ByteStream.Write'), 1);
  assert.deepEqual(up.writeLog, [], 'answered from what it had');

  up.earlyCommit = false;
  const other = randomBytes(2 << 20);
  const otherDigest = digestOf(other);
  await assert.rejects(writer.writeStream(otherDigest, chunks(other.subarray(0, 1 << 20))), (e: MirrorError) => e.code === 'DIGEST_MISMATCH' && !isRetryable(e));
  const corrupt = Buffer.from(other);
  corrupt[5] = (corrupt[5] ?? 0) ^ 1;
  await assert.rejects(writer.writeStream(otherDigest, chunks(corrupt)), (e: MirrorError) => e.code === 'UPSTREAM_ERROR' && /FAILED_PRECONDITION/.test(e.message) && !isRetryable(e));
  assert.equal(up.blobs.has(otherDigest.hash), false);
  await writer.writeStream(otherDigest, chunks(other, 300 * 1024));
  assert.deepEqual(up.blobs.get(otherDigest.hash), other);
  up.acceptWrites = false;
  const third = randomBytes(3 << 20);
  await assert.rejects(writer.writeStream(digestOf(third), chunks(third)), (e: MirrorError) => e.code === 'UPSTREAM_ERROR' && /PERMISSION_DENIED/.test(e.message) && !isRetryable(e));
  up.acceptWrites = true;

  // BatchUpdateBlobs: a blob the upstream refuses fails the call with its status.
  up.failNext('BatchUpdateBlobs', grpc.status.RESOURCE_EXHAUSTED);
  await assert.rejects(writer.batchUpdate([{ digest: digestOf(Buffer.from('x')), data: Buffer.from('x') }]), (e: MirrorError) => e.code === 'UPSTREAM_ERROR' && isRetryable(e));
  await assert.rejects(writer.batchUpdate([{ digest: digestOf(Buffer.from('x')), data: Buffer.from('y') }]), (e: MirrorError) => e.code === 'UPSTREAM_ERROR' && /INVALID_ARGUMENT/.test(e.message) && !isRetryable(e));
  assert.deepEqual(await writer.findMissing([digest, otherDigest, digestOf(Buffer.from('absent'))]), [digestOf(Buffer.from('absent'))]);
});

test('isRetryable: the one retry decision', () => {
  const service = (code: grpc.status): Error => Object.assign(new Error(grpc.status[code]), { code, details: '' });
  const wrapped = (code: grpc.status): MirrorError => new MirrorError('UPSTREAM_ERROR', 'x', { cause: service(code) });
  for (const code of [grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED, grpc.status.RESOURCE_EXHAUSTED, grpc.status.ABORTED, grpc.status.INTERNAL, grpc.status.UNKNOWN]) {
    assert.equal(isRetryable(service(code)), true, grpc.status[code]);
    assert.equal(isRetryable(wrapped(code)), true, `wrapped ${grpc.status[code]}`);
  }
  for (const code of [grpc.status.PERMISSION_DENIED, grpc.status.UNAUTHENTICATED, grpc.status.INVALID_ARGUMENT, grpc.status.FAILED_PRECONDITION, grpc.status.NOT_FOUND, grpc.status.UNIMPLEMENTED]) {
    assert.equal(isRetryable(service(code)), false, grpc.status[code]);
    assert.equal(isRetryable(new MirrorError('UPSTREAM_UNAVAILABLE', 'x', { cause: service(code) })), false, `wrapped ${grpc.status[code]}`);
  }
  assert.equal(isRetryable(new MirrorError('UPSTREAM_UNAVAILABLE', 'cancelled', { cause: service(grpc.status.CANCELLED) })), true);
  assert.equal(isRetryable(new MirrorError('UPSTREAM_UNAVAILABLE', 'stalled')), true);
  assert.equal(isRetryable(new MirrorError('CLOSURE_INCOMPLETE', 'gone')), false);
  assert.equal(isRetryable(new TypeError('bug')), false);
});

// ---------------------------------------------------------------------------
// Against BuildStream's own servers: what we push, they take and serve back
// ---------------------------------------------------------------------------

/** Reads back every digest through a fresh client, as a puller would. */
async function assertServed(spec: UpstreamSpec, name: string, expected: Digest, closure: readonly Digest[]): Promise<void> {
  const reader = await GrpcUpstream.create(spec);
  try {
    assert.equal(digestKey((await reader.resolve(parseUrn(name))) ?? EMPTY_DIGEST), digestKey(expected));
    const { maxBatchBytes } = await reader.connect();
    for (const d of closure) {
      if (d.sizeBytes < maxBatchBytes) {
        const [r] = await reader.batchRead([d]);
        assert.ok(r && 'data' in r && digestKey(digestOf(r.data)) === digestKey(d), `served ${digestKey(d)}`);
      } else {
        const parts: Uint8Array[] = [];
        for await (const part of reader.readStream(d)) parts.push(part);
        assert.equal(digestKey(digestOf(Buffer.concat(parts))), digestKey(d));
      }
    }
  } finally {
    reader.close();
  }
}

test('BuildStream 1.6 bst-artifact-server takes our push (ReferenceStorage, ByteStream uploads), and refuses it without --enable-push', { timeout: 120_000 }, async (t) => {
  assert.ok(bstAvailable(), 'BuildStream 1.6 is required: apt-get install -y buildstream');
  const { store } = await openStore(t);
  const b = new Builder(store);
  const huge = await b.blob(randomBytes((2 << 20) + 7)); // over 1.6's 1 MiB batch limit
  const root = await b.dir({ files: [{ name: 'huge', digest: huge }], dirs: [{ name: 'tree', digest: await b.tree('bst16') }] });
  const urn = refName(REF).urn;
  await store.putName(urn, record('directory', root));

  const server = await startReferenceServer({ repo: await tempDir(t, 'bst16-repo-'), enablePush: true, logRpcs: true });
  t.after(() => server.stop());
  const queue = queueFor(t, store, [await target(t, { url: server.url })]);
  await queue.start();
  await queue.enqueue(urn);
  await queue.onIdle();
  assert.deepEqual(await queue.stats(), { depth: 0, failed: [] });
  // Whether it takes pushes (Status, as bst 1.6 asks) and whether it has the ref first, blobs
  // next (batches within 1 MiB, the 2 MiB blob by ByteStream), the ref last.
  const methods = server.rpcs().map((r) => `${r.method.split('/').at(-1)} ${r.code}`);
  assert.deepEqual(methods.filter((m) => !/^(FetchDirectory|GetCapabilities|BatchUpdateBlobs|Write) /.test(m)), ['Status OK', 'GetReference NOT_FOUND', 'FindMissingBlobs OK', 'UpdateReference OK'], methods.join(', '));
  assert.ok(methods.includes('Write OK') && methods.includes('BatchUpdateBlobs OK'), methods.join(', '));
  assert.ok(methods.lastIndexOf('Write OK') < methods.indexOf('UpdateReference OK') && methods.lastIndexOf('BatchUpdateBlobs OK') < methods.indexOf('UpdateReference OK'));
  await assertServed({ url: server.url }, urn, root, await closureOf(store, urn));

  const readOnly = await startReferenceServer({ repo: await tempDir(t, 'bst16-ro-'), enablePush: false });
  t.after(() => readOnly.stop());
  const denied = queueFor(t, store, [await target(t, { url: readOnly.url })]);
  await denied.start();
  await denied.enqueue(urn);
  await denied.onIdle();
  const { failed } = await denied.stats();
  assert.equal(failed.length, 1);
  assert.equal(failed[0]?.attempts, 1);
  assert.match(failed[0]?.lastError ?? '', /PERMISSION_DENIED/);
});

test('BuildStream 2 casd-backed server takes our push (Remote Asset PushBlob/PushDirectory), also split into index and storage servers; without --enable-push the refusal is final', { timeout: 180_000 }, async (t) => {
  assert.ok(bst2Available(), 'BuildStream 2 is required (see test/helpers/buildstream.ts)');
  const { store } = await openStore(t);
  const b = new Builder(store);
  const artifact = await putArtifact(store, b);
  const sourceTree = await b.tree('source');
  const sourceUrn = `${URN_PREFIX}source:${SOURCE_KEY}`;
  await store.putName(sourceUrn, record('directory', sourceTree));

  const server = await startReferenceServer({ bst: 2, repo: await tempDir(t, 'bst2-repo-'), enablePush: true, logRpcs: true });
  t.after(() => server.stop());
  const queue = queueFor(t, store, [await target(t, { url: server.url })]);
  await queue.start();
  await queue.enqueue(artifact.urn);
  await queue.enqueue(sourceUrn);
  await queue.onIdle();
  assert.deepEqual(await queue.stats(), { depth: 0, failed: [] });
  await assertServed({ url: server.url }, artifact.urn, artifact.digest, await closureOf(store, artifact.urn));
  await assertServed({ url: server.url }, sourceUrn, sourceTree, await closureOf(store, sourceUrn));
  const sets = server.rpcs().filter((r) => /PushBlob|PushDirectory/.test(r.method)).map((r) => `${r.method.split('/').at(-1)} ${r.code} ${r.uris.join(' ')}`);
  // The empty PushBlob is the push probe BuildStream 2 also sends (INVALID_ARGUMENT: push is there), once per upstream client.
  assert.deepEqual(sets.filter((m) => m.startsWith('PushBlob INVALID_ARGUMENT')).length >= 1, true, sets.join(', '));
  assert.deepEqual(sets.filter((m) => !m.startsWith('PushBlob INVALID_ARGUMENT')).sort(), [`PushBlob OK ${artifact.urn}`, `PushDirectory OK ${sourceUrn}`]);

  // BuildStream's split share: an index-only server (no CAS) and a storage server; the index takes names whose blobs are elsewhere.
  const indexOnly = await startReferenceServer({ bst: 2, repo: await tempDir(t, 'bst2-index-'), enablePush: true, indexOnly: true });
  t.after(() => indexOnly.stop());
  const storageOnly = await startReferenceServer({ bst: 2, repo: await tempDir(t, 'bst2-storage-'), enablePush: true });
  t.after(() => storageOnly.stop());
  const split = { url: indexOnly.url, storage: { url: storageOnly.url } };
  const toSplit = queueFor(t, store, [await target(t, split)]);
  await toSplit.start();
  await toSplit.enqueue(artifact.urn);
  await toSplit.onIdle();
  assert.deepEqual(await toSplit.stats(), { depth: 0, failed: [] });
  await assertServed(split, artifact.urn, artifact.digest, await closureOf(store, artifact.urn));

  // Without --enable-push the 2.x server has no Push service: UNIMPLEMENTED, final.
  const noPush = await startReferenceServer({ bst: 2, repo: await tempDir(t, 'bst2-ro-'), enablePush: false });
  t.after(() => noPush.stop());
  const refused = queueFor(t, store, [await target(t, { url: noPush.url })]);
  await refused.start();
  await refused.enqueue(artifact.urn);
  await refused.onIdle();
  const { failed } = await refused.stats();
  assert.equal(failed.length, 1);
  assert.equal(failed[0]?.attempts, 1);
  assert.match(failed[0]?.lastError ?? '', /UNIMPLEMENTED/);
});
