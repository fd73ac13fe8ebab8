import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { Artifact } from '../src/gen/buildstream/v2/artifact.js';
import { Source } from '../src/gen/buildstream/v2/source.js';
import { Directory, type GetTreeResponse } from '../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import { type Digest, digestKey, fromWire, toWire } from '../src/cas/digest.js';
import { URN_PREFIX } from '../src/cas/names.js';
import { silentLogger } from '../src/log.js';
import { GrpcUpstream } from '../src/remote/upstream.js';
import { syncNames } from '../src/sync/sync-job.js';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { call, readAll, runCli, startMirror, tempDir, type Clients } from './helpers/mirror.js';

const KEY = 'c'.repeat(64);
const ARTIFACT = `proj/hello/${KEY}`;
const SOURCES_KEY = 'd'.repeat(64);
const SOURCE_KEY = `git/${'e'.repeat(64)}`;
const REF = `proj/old/${'f'.repeat(64)}`;

/** A 2.x-era upstream holding one artifact, one element's sources, one single source and a v1 ref. */
async function twoXUpstream(t: { after(fn: () => Promise<void>): void }) {
  const up = new FakeUpstream('remote-asset');
  const big = randomBytes(300 * 1024); // over the fake's 64 KiB batch limit: ByteStream
  const small = Buffer.from('#!/bin/sh\necho hello\n');
  const nested = up.addDirectory({ files: [{ name: 'data.bin', digest: up.add(big) }] });
  const files = up.addDirectory({
    files: [{ name: 'hello', digest: up.add(small), executable: true }, { name: 'empty', digest: up.add('') }],
    dirs: [{ name: 'share', digest: nested }],
    symlinks: [{ name: 'link', target: 'hello' }],
  });
  const log = up.add('build log\n');
  const low = up.add('low: meta\n');
  const high = up.add('high: meta\n');
  const pub = up.add('public: data\n');
  const w = toWire;
  const artifact = up.add(
    Buffer.from(
      Artifact.encode({
        version: 2, buildSuccess: true, strongKey: KEY, weakKey: KEY, strictKey: KEY,
        files: w(files), publicData: w(pub), logs: [{ name: 'build.log', digest: w(log) }],
        lowDiversityMeta: w(low), highDiversityMeta: w(high),
        buildtree: undefined, sources: undefined, buildroot: undefined, buildsandbox: undefined,
      }).finish(),
    ),
  );
  up.assets.set(`${URN_PREFIX}artifact:${ARTIFACT}`, artifact);
  const srcTree = up.addDirectory({ files: [{ name: 'main.c', digest: up.add('int main(){}\n') }] });
  up.assets.set(`${URN_PREFIX}source:${SOURCES_KEY}`, up.add(Buffer.from(Source.encode({ version: 1, files: w(srcTree) }).finish())));
  const single = up.addDirectory({ files: [{ name: 'README', digest: up.add('single source\n') }] });
  up.assets.set(`${URN_PREFIX}source:${SOURCE_KEY}`, single);
  up.assets.set(`${URN_PREFIX}v1:${REF}`, files);
  await up.start();
  t.after(() => up.stop());
  return { up, big, small, files, artifact, srcTree, single };
}

async function readBlob(c: Clients, d: Digest): Promise<Buffer> {
  if (d.sizeBytes > 64 * 1024) return readAll(c.bytestream, `blobs/${d.hash}/${d.sizeBytes}`);
  const res = await call(c.cas, c.cas.batchReadBlobs, { instanceName: '', digests: [toWire(d)], digestFunction: 0 });
  assert.equal(res.responses[0]?.status?.code, 0, `blob ${digestKey(d)} readable`);
  return res.responses[0]?.data ?? Buffer.alloc(0);
}

async function getTree(c: Clients, root: Digest): Promise<Directory[]> {
  const dirs: Directory[] = [];
  const stream = c.cas.getTree({ instanceName: '', rootDigest: toWire(root), pageSize: 0, pageToken: '', digestFunction: 0 });
  for await (const page of stream as AsyncIterable<GetTreeResponse>) dirs.push(...page.directories);
  return dirs;
}

test('2.x dialect: sync artifacts and sources, then read them as a 2.x client would', async (t) => {
  const { up, big, small, files, srcTree, single } = await twoXUpstream(t);
  const dir = await tempDir(t);
  const upstream = await GrpcUpstream.create({ url: up.url });
  t.after(() => upstream.close());
  assert.deepEqual(await upstream.connect(), { dialect: 'remote-asset', maxBatchBytes: 64 * 1024 });

  const run = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', ARTIFACT, '--ref', `${URN_PREFIX}source:${SOURCES_KEY}`, '--ref', `${URN_PREFIX}source:${SOURCE_KEY}`, '--ref', `${URN_PREFIX}v1:${REF}`]);
  assert.equal(run.code, 0, run.stdout + run.stderr);
  assert.match(run.stdout, /mirrored 4, already present 0, missing upstream 0, failed 0 \(of 4 names\)/);

  const { clients: c, store } = await startMirror(t, dir);
  // Artifact: FetchBlob -> Artifact proto -> its files tree, logs and metadata.
  const fetched = await call(c.fetch, c.fetch.fetchBlob, { instanceName: '', uris: [`${URN_PREFIX}artifact:${ARTIFACT}`], qualifiers: [], digestFunction: 0 });
  const artifact = Artifact.decode(await readBlob(c, fromWire(fetched.blobDigest)));
  assert.equal(artifact.strongKey, KEY);
  const tree = await getTree(c, fromWire(artifact.files));
  assert.equal(tree.length, 2);
  assert.deepEqual(tree[0]?.symlinks, [{ name: 'link', target: 'hello' }]);
  assert.equal(tree[0]?.files.find((f) => f.name === 'hello')?.isExecutable, true);
  assert.deepEqual(await readBlob(c, fromWire(tree[0]?.files.find((f) => f.name === 'hello')?.digest)), small);
  assert.deepEqual(await readBlob(c, fromWire(tree[1]?.files[0]?.digest)), big);
  for (const d of [artifact.publicData, artifact.lowDiversityMeta, artifact.highDiversityMeta, artifact.logs[0]?.digest]) {
    assert.ok((await readBlob(c, fromWire(d))).byteLength > 0);
  }
  // Element sources: FetchBlob -> Source proto -> files tree.
  const src = await call(c.fetch, c.fetch.fetchBlob, { instanceName: '', uris: [`${URN_PREFIX}source:${SOURCES_KEY}`], qualifiers: [], digestFunction: 0 });
  const source = Source.decode(await readBlob(c, fromWire(src.blobDigest)));
  assert.equal(digestKey(fromWire(source.files)), digestKey(srcTree));
  assert.equal((await getTree(c, srcTree)).length, 1);
  // Single source: FetchDirectory.
  const one = await call(c.fetch, c.fetch.fetchDirectory, { instanceName: '', uris: [`${URN_PREFIX}source:${SOURCE_KEY}`], qualifiers: [], digestFunction: 0 });
  assert.equal(digestKey(fromWire(one.rootDirectoryDigest)), digestKey(single));
  // A 1.6 asset-mode v1 URN and the same 1.x ref through ReferenceStorage meet.
  const v1 = await call(c.fetch, c.fetch.fetchDirectory, { instanceName: '', uris: [`${URN_PREFIX}v1:${REF}`], qualifiers: [], digestFunction: 0 });
  const ref = await call(c.refs, c.refs.getReference, { instanceName: '', key: REF });
  assert.equal(digestKey(fromWire(v1.rootDirectoryDigest)), digestKey(files));
  assert.equal(digestKey(fromWire(ref.digest)), digestKey(files));
  // Every blob the fake holds is now in the mirror.
  assert.deepEqual(await store.findMissing([...up.blobs.values()].map((b) => ({ hash: createHashHex(b), sizeBytes: b.byteLength }))), []);
});

function createHashHex(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

test('a second sync transfers nothing', async (t) => {
  const { up } = await twoXUpstream(t);
  const dir = await tempDir(t);
  const first = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', ARTIFACT]);
  assert.equal(first.code, 0, first.stderr);
  const reads = up.count('BatchReadBlobs') + up.count('ByteStream.Read');
  assert.ok(reads > 0);
  const second = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', ARTIFACT]);
  assert.equal(second.code, 0, second.stderr);
  assert.match(second.stdout, /mirrored 0, already present 1/);
  assert.match(second.stdout, /transferred 0 blobs, 0 B/);
  assert.equal(up.count('BatchReadBlobs') + up.count('ByteStream.Read'), reads, 'no blob was read upstream again');
});

test('a corrupt upstream blob is rejected, reported and never stored', async (t) => {
  const { up, small, big } = await twoXUpstream(t);
  const dir = await tempDir(t);
  up.corrupt.set(createHashHex(small), Buffer.from('#!/bin/sh\necho pwned\n'));
  up.corrupt.set(createHashHex(big), Buffer.concat([big.subarray(0, 1000), Buffer.from('x'), big.subarray(1001)]));
  const run = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', ARTIFACT, '--ref', `${URN_PREFIX}source:${SOURCE_KEY}`]);
  assert.equal(run.code, 1, run.stdout);
  assert.match(run.stdout, /mirrored 1, already present 0, missing upstream 0, failed 1/);
  assert.match(run.stdout, /failed: proj\/hello\/c+: upstream sent a corrupt blob, which was not stored/);
  const { store, clients: c } = await startMirror(t, dir);
  assert.equal((await store.findMissing([{ hash: createHashHex(small), sizeBytes: small.byteLength }])).length, 1);
  assert.equal((await store.findMissing([{ hash: createHashHex(big), sizeBytes: big.byteLength }])).length, 1);
  await assert.rejects(
    call(c.fetch, c.fetch.fetchBlob, { instanceName: '', uris: [`${URN_PREFIX}artifact:${ARTIFACT}`], qualifiers: [], digestFunction: 0 }),
    (e: grpc.ServiceError) => e.code === grpc.status.NOT_FOUND,
  );
});

test('1.x dialect: refs from a ReferenceStorage upstream; upstreams tried in order; misses and outages reported', async (t) => {
  const old = new FakeUpstream('reference-storage');
  const root = old.addDirectory({ files: [{ name: 'f', digest: old.add('1.x file\n') }] });
  old.refs.set(REF, root);
  await old.start();
  t.after(() => old.stop());
  const dir = await tempDir(t);
  const log = silentLogger();
  const down = await GrpcUpstream.create({ url: 'http://127.0.0.1:1' });
  const live = await GrpcUpstream.create({ url: old.url });
  t.after(() => {
    down.close();
    live.close();
  });
  assert.equal((await live.connect()).dialect, 'reference-storage');
  const { store, clients: c } = await startMirror(t, dir);
  const report = await syncNames({ store, upstreams: [down, live], names: [REF, `proj/absent/${KEY}`, 'not a name'], log });
  const [mirrored, missing, bad] = report.results;
  // The unreachable upstream fails its part; the next one still serves the name.
  assert.equal(mirrored?.status, 'mirrored');
  assert.equal(mirrored?.upstream, old.url);
  assert.equal(missing?.status, 'failed');
  assert.match(missing?.reason ?? '', /127\.0\.0\.1:1.*UNAVAILABLE/);
  assert.equal(bad?.status, 'failed');
  assert.match(bad?.reason ?? '', /'not a name' is not a name: expected PROJECT\/ELEMENT\/KEY/);
  const noDown = await syncNames({ store, upstreams: [live], names: [`proj/absent/${KEY}`], log });
  assert.equal(noDown.results[0]?.status, 'missing');
  const got = await call(c.refs, c.refs.getReference, { instanceName: '', key: REF });
  assert.equal(digestKey(fromWire(got.digest)), digestKey(root));
  const v1 = await call(c.fetch, c.fetch.fetchDirectory, { instanceName: '', uris: [`${URN_PREFIX}v1:${REF}`], qualifiers: [], digestFunction: 0 });
  assert.equal(digestKey(fromWire(v1.rootDirectoryDigest)), digestKey(root));
});

test('names synced together fetch a shared blob once', async (t) => {
  const up = new FakeUpstream('reference-storage');
  const shared = up.add(randomBytes(200 * 1024)); // over the fake's batch limit: one ByteStream read each time
  const refs = Array.from({ length: 6 }, (_, i) => {
    const own = up.add(`file of element ${i}\n`);
    const root = up.addDirectory({ files: [{ name: 'shared.bin', digest: shared }, { name: `own-${i}`, digest: own }] });
    const ref = `proj/el${i}/${String(i).repeat(64)}`;
    up.refs.set(ref, root);
    return ref;
  });
  await up.start();
  t.after(() => up.stop());
  const dir = await tempDir(t);
  const run = await runCli(['sync', '--dir', dir, '--upstream', up.url, ...refs.flatMap((r) => ['--ref', r])]);
  assert.equal(run.code, 0, run.stderr);
  assert.match(run.stdout, /mirrored 6, already present 0/);
  assert.equal(up.count('ByteStream.Read'), 1, 'the shared blob was read from upstream once');
});
