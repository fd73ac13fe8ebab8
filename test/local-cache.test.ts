/**
 * Importing BuildStream local caches into the mirror's store (src/push/local-cache*.ts): real
 * bst 1.6 and 2.8 builds into temp caches (watched while they build), whole closures, a second
 * import that copies nothing, refs whose objects are partly missing, the watcher on refs renamed
 * into directories that did not exist, and a hand-made cache for symlinks and corrupt objects.
 */
import assert from 'node:assert/strict';
import { cp, mkdir, readFile, rename, rm, symlink, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { closureProblem } from '../src/cas/closure.js';
import type { ContentStore } from '../src/cas/content-store.js';
import { type Digest, digestKey, digestOf, toWire } from '../src/cas/digest.js';
import { DiskContentStore } from '../src/cas/disk-store.js';
import { URN_PREFIX, artifactName, refName } from '../src/cas/names.js';
import { isMirrorError } from '../src/errors.js';
import { Artifact } from '../src/gen/buildstream/v2/artifact.js';
import { Source } from '../src/gen/buildstream/v2/source.js';
import { Digest as DigestProto, Directory } from '../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import { silentLogger } from '../src/log.js';
import { type ImportOutcome, detectLayout, importAll, importLocalName, listLocalNames, nameOfPath, watchLocalCache } from '../src/push/local-cache.js';
import {
  assertBstOk,
  bst2Available,
  bst2UserConfig,
  bstAvailable,
  bstUserConfig,
  deterministicBytes,
  listArtifactRefs,
  listBst2ArtifactRefs,
  listBst2ElementSources,
  listBst2ServerAssets,
  listBst2SourceProtos,
  runBst,
  startReferenceServer,
  writeBst2Project,
  writeBstProject,
} from './helpers/buildstream.js';
import { tempDir } from './helpers/mirror.js';

type After = { after(fn: () => Promise<void> | void): void; diagnostic(message: string): void };

const MiB = 1024 * 1024;
/** The largest file of the harness project (test/helpers/buildstream.ts): streamed, not batched. */
const FIVE_MIB = digestOf(deterministicBytes('five-mib', 5 * MiB + 4321));

function objectPath(objectsDir: string, d: Digest): string {
  return join(objectsDir, d.hash.slice(0, 2), d.hash.slice(2));
}

async function openStore(t: After, dir: string): Promise<DiskContentStore> {
  const store = await DiskContentStore.open(dir, silentLogger());
  t.after(() => store.close());
  return store;
}

async function problemOf(store: ContentStore, urn: string): Promise<string | undefined> {
  const record = await store.getName(urn);
  if (record === undefined) return 'not recorded';
  return closureProblem(urn, record, (d) => store.readBytes(d).catch(() => undefined), (ds) => store.findMissing(ds));
}

/** Names a watcher reported, and ways to wait for them (the test's timeout bounds each wait). */
function recorder() {
  const seen: string[] = [];
  let waiters: { done: () => boolean; resolve: () => void }[] = [];
  const check = (): void => {
    waiters = waiters.filter((w) => {
      if (!w.done()) return true;
      w.resolve();
      return false;
    });
  };
  const until = (done: () => boolean): Promise<void> =>
    new Promise((resolve) => {
      waiters.push({ done, resolve });
      check();
    });
  return {
    seen,
    onName(urn: string): void {
      seen.push(urn);
      check();
    },
    /** Resolves once every one of `want` was reported. */
    all: (want: readonly string[]) => until(() => want.every((u) => seen.includes(u))),
    /** Resolves once `urn` was reported `times` times in all. */
    count: (urn: string, times: number) => until(() => seen.filter((u) => u === urn).length >= times),
  };
}

function statuses(outcomes: readonly ImportOutcome[]): string[] {
  return outcomes.map((o) => `${o.urn} ${o.result.status}${'reason' in o.result ? `: ${o.result.reason}` : ''}`);
}

function sumBytes(outcomes: readonly ImportOutcome[]): { blobs: number; bytes: number } {
  let blobs = 0;
  let bytes = 0;
  for (const { result } of outcomes) {
    if (result.status === 'imported' || result.status === 'present') {
      blobs += result.blobs;
      bytes += result.bytes;
    }
  }
  return { blobs, bytes };
}

/** Imports the whole cache twice into a fresh store: everything whole the first time, nothing copied the second. */
async function importTwice(t: After, cache: string, storeDir: string, expected: readonly string[]): Promise<{ store: DiskContentStore; first: ImportOutcome[] }> {
  const store = await openStore(t, storeDir);
  let started = performance.now();
  const first = await importAll(cache, store, silentLogger());
  const firstMs = performance.now() - started;
  assert.deepEqual(first.map((o) => o.urn).sort(), [...expected].sort());
  assert.ok(first.every((o) => o.result.status === 'imported'), statuses(first).join('\n'));
  for (const o of first) assert.equal(await problemOf(store, o.urn), undefined, o.urn);
  const copied = sumBytes(first);
  assert.ok(copied.bytes > FIVE_MIB.sizeBytes, `${copied.bytes} bytes copied`);
  assert.deepEqual(await store.findMissing([FIVE_MIB]), [], 'the 5 MiB file (streamed) is in the store');
  for (const o of first) assert.match((await store.getName(o.urn))?.upstream ?? '', new RegExp(`^local cache ${cache}$`));

  started = performance.now();
  const second = await importAll(cache, store, silentLogger());
  const secondMs = performance.now() - started;
  assert.ok(second.every((o) => o.result.status === 'present'), statuses(second).join('\n'));
  assert.deepEqual(sumBytes(second), { blobs: 0, bytes: 0 });
  t.diagnostic(`${first.length} names, ${copied.blobs} blobs, ${copied.bytes} bytes: first import ${firstMs.toFixed(0)} ms, second ${secondMs.toFixed(0)} ms`);
  return { store, first };
}

test('bst 1.6: refs appearing during a build are reported, import whole, and a second import is present with 0 blobs; partly missing objects are incomplete', { timeout: 300_000 }, async (t) => {
  assert.ok(bstAvailable(), 'BuildStream 1.6 is required (scripts/test-deps.sh)');
  const root = await tempDir(t, 'local-cache-bst1-');
  const project = await writeBstProject(join(root, 'project'));
  const cache = join(root, 'cache');
  await mkdir(cache);
  const reported = recorder();
  const watcher = watchLocalCache(cache, { onName: (urn) => reported.onName(urn), log: silentLogger(), debounceMs: 10 });
  t.after(() => watcher.close());
  await watcher.ready;

  const config = join(root, 'bst.conf');
  await writeFile(config, bstUserConfig({ root: cache, remotes: [], projectName: project.projectName }));
  let started = performance.now();
  assertBstOk(await runBst(['build', project.topElement], { cwd: project.projectDir, config }), 'bst build');
  t.diagnostic(`bst 1.6 build: ${(performance.now() - started).toFixed(0)} ms`);

  const refs = await listArtifactRefs(join(cache, 'artifacts'));
  assert.equal(refs.length, 5, refs.join(' ')); // four elements, the stack under its weak key too
  const urns = refs.map((r) => refName(r).urn);
  assert.equal(await detectLayout(cache), 'bst1');
  const listed = await listLocalNames(cache);
  assert.deepEqual(listed.map((l) => l.urn).sort(), [...urns].sort());
  for (const l of listed) {
    assert.equal(nameOfPath(cache, 'bst1', l.path), l.urn);
    assert.equal(nameOfPath(cache, 'bst2', l.path), undefined);
  }
  assert.equal(nameOfPath(cache, 'bst1', join(cache, 'artifacts', 'tmp', 'tmpabc123')), undefined);
  started = performance.now();
  await reported.all(urns);
  t.diagnostic(`watcher had reported every ref ${(performance.now() - started).toFixed(0)} ms after bst exited`);

  const { store } = await importTwice(t, cache, join(root, 'store'), urns);
  for (const l of listed) {
    const record = await store.getName(l.urn);
    const pointsAt = DigestProto.decode(await readFile(l.path));
    assert.equal(record?.type, 'directory');
    assert.equal(record?.digest.hash, pointsAt.hash);
    assert.equal(record?.digest.sizeBytes, Number(pointsAt.sizeBytes));
  }

  await t.test('a ref whose objects are partly missing is incomplete, records nothing, and imports once they are there', async (t) => {
    const copy = join(root, 'partial');
    await cp(join(cache, 'artifacts', 'cas'), join(copy, 'artifacts', 'cas'), { recursive: true });
    const lost = objectPath(join(copy, 'artifacts', 'cas', 'objects'), FIVE_MIB);
    const kept = await readFile(lost);
    await unlink(lost);
    const tree = refName(refs.find((r) => r.startsWith(`${project.projectName}/base-tree/`)) ?? '').urn;
    const extra = refName(refs.find((r) => r.startsWith(`${project.projectName}/base-extra/`)) ?? '').urn;
    const fresh = await openStore(t, join(root, 'store-partial'));
    const result = await importLocalName(copy, tree, fresh, silentLogger());
    assert.equal(result.status, 'incomplete', JSON.stringify(result));
    assert.match('reason' in result ? result.reason : '', new RegExp(FIVE_MIB.hash));
    assert.equal(await fresh.getName(tree), undefined, 'nothing recorded');
    assert.equal((await importLocalName(copy, extra, fresh, silentLogger())).status, 'imported', 'other refs are not affected');

    // BuildStream (or casd) finishes writing: the retry copies what is still missing.
    await writeFile(lost, kept);
    const retry = await importLocalName(copy, tree, fresh, silentLogger());
    assert.equal(retry.status, 'imported', JSON.stringify(retry));
    assert.ok('bytes' in retry && retry.bytes >= FIVE_MIB.sizeBytes);
    assert.equal(await problemOf(fresh, tree), undefined);
  });
});

test('bst 2.8: artifacts, element sources and single sources appearing during a build are reported, import whole as the remote records them, and again as present; partly missing objects are incomplete', { timeout: 300_000 }, async (t) => {
  assert.ok(bst2Available(), 'BuildStream 2.8 is required (scripts/test-deps.sh)');
  const root = await tempDir(t, 'local-cache-bst2-');
  const project = await writeBst2Project(join(root, 'project'));
  const cache = join(root, 'cache');
  await mkdir(cache);
  const reported = recorder();
  const watcher = watchLocalCache(cache, { onName: (urn) => reported.onName(urn), log: silentLogger(), debounceMs: 10 });
  t.after(() => watcher.close());
  await watcher.ready;

  // The same build also pushes to BuildStream's own 2.x server: what it records is what the import must record.
  const server = await startReferenceServer({ bst: 2, repo: join(root, 'server'), enablePush: true });
  t.after(() => server.stop());
  const remote = [{ url: server.url, push: true }];
  const config = join(root, 'bst2.conf');
  await writeFile(config, bst2UserConfig({ root: cache, projectName: project.projectName, artifacts: remote, sourceCaches: remote }));
  let started = performance.now();
  assertBstOk(await runBst(['build', project.topElement], { cwd: project.projectDir, config, bst: 2 }), 'bst build');
  t.diagnostic(`bst 2.8 build with push: ${(performance.now() - started).toFixed(0)} ms`);

  const artifacts = (await listBst2ArtifactRefs(cache)).map((n) => artifactName(n).urn);
  const elementSources = (await listBst2ElementSources(cache)).map((k) => `${URN_PREFIX}source:${k}`);
  const singleSources = (await listBst2SourceProtos(cache)).map((k) => `${URN_PREFIX}source:${k}`);
  assert.equal(artifacts.length, 8, artifacts.join(' ')); // strong and weak key of four elements
  assert.ok(elementSources.length > 0 && singleSources.length > 0, 'the build cached element sources and single sources');
  const urns = [...artifacts, ...elementSources, ...singleSources];
  assert.equal(await detectLayout(cache), 'bst2');
  const listed = await listLocalNames(cache);
  assert.deepEqual(listed.map((l) => l.urn).sort(), [...urns].sort());
  for (const l of listed) assert.equal(nameOfPath(cache, 'bst2', l.path), l.urn);
  assert.equal(nameOfPath(cache, 'bst2', join(cache, 'artifacts', 'refs', 'harness', 'top', 'tmpk2j3h4g5')), undefined);
  started = performance.now();
  await reported.all(urns);
  t.diagnostic(`watcher had reported every name ${(performance.now() - started).toFixed(0)} ms after bst exited`);

  const { store } = await importTwice(t, cache, join(root, 'store'), urns);
  const serverAssets = new Map((await listBst2ServerAssets(server.repo)).map((a) => [a.uri, a]));
  for (const l of listed) {
    const record = await store.getName(l.urn);
    const bytes = await readFile(l.path);
    if (singleSources.includes(l.urn)) {
      // source_protos/<kind>/<key> holds a Source proto; the name is its `files` Directory.
      const files = Source.decode(bytes).files;
      assert.equal(record?.type, 'directory', l.urn);
      assert.equal(record?.digest.hash, files?.hash, l.urn);
    } else {
      // artifacts/refs and elementsources hold the proto; the name is that proto as a blob.
      assert.equal(record?.type, 'blob', l.urn);
      assert.deepEqual(record?.digest, digestOf(bytes), l.urn);
      assert.deepEqual(await store.readBytes(digestOf(bytes)), bytes);
    }
    const asset = serverAssets.get(l.urn);
    if (asset !== undefined && record !== undefined) {
      assert.equal(asset.kind, record.type, l.urn);
      assert.equal(asset.digest, digestKey(record.digest), `${l.urn}: the server records what the import does`);
    }
  }
  // BuildStream pushed every artifact and every source, so each was compared above.
  for (const urn of urns) assert.ok(serverAssets.has(urn), `${urn} on the server (it has ${[...serverAssets.keys()].join(' ')})`);

  await t.test('an artifact whose files tree is partly missing is incomplete and records nothing', async (t) => {
    const copy = join(root, 'partial');
    for (const part of ['cas', 'artifacts', 'elementsources', 'source_protos']) await cp(join(cache, part), join(copy, part), { recursive: true, verbatimSymlinks: true });
    const treeRef = listed.find((l) => l.urn.startsWith(`${URN_PREFIX}artifact:${project.projectName}/base-tree/`));
    assert.ok(treeRef);
    const files = Artifact.decode(await readFile(treeRef.path)).files;
    assert.ok(files);
    await unlink(objectPath(join(copy, 'cas', 'objects'), { hash: files.hash, sizeBytes: Number(files.sizeBytes) }));
    const fresh = await openStore(t, join(root, 'store-partial'));
    const result = await importLocalName(copy, treeRef.urn, fresh, silentLogger());
    assert.equal(result.status, 'incomplete', JSON.stringify(result));
    assert.match('reason' in result ? result.reason : '', new RegExp(`directory ${files.hash}`));
    assert.equal(await fresh.getName(treeRef.urn), undefined, 'nothing recorded');
  });
});

test('watcher: refs renamed into directories that did not exist at the start are reported (both layouts), temp files are not, replaced refs are reported again', { timeout: 60_000 }, async (t) => {
  const cache = await tempDir(t, 'local-cache-watch-');
  const reported = recorder();
  const watcher = watchLocalCache(cache, { onName: (urn) => reported.onName(urn), log: silentLogger(), debounceMs: 0 });
  t.after(() => watcher.close());
  await watcher.ready;

  const key = (n: number): string => n.toString(16).padStart(64, '0');
  const digestBytes = DigestProto.encode(toWire(digestOf(Buffer.from('x')))).finish();

  // 1.6: written in artifacts/tmp, renamed into a new refs/heads/<project>/<element>/.
  await mkdir(join(cache, 'artifacts', 'tmp'), { recursive: true });
  await writeFile(join(cache, 'artifacts', 'tmp', 'tmp_ref'), digestBytes);
  await mkdir(join(cache, 'artifacts', 'cas', 'refs', 'heads', 'proj', 'elem'), { recursive: true });
  await rename(join(cache, 'artifacts', 'tmp', 'tmp_ref'), join(cache, 'artifacts', 'cas', 'refs', 'heads', 'proj', 'elem', key(1)));
  const v1 = refName(`proj/elem/${key(1)}`).urn;
  await reported.all([v1]);

  // 2.x: temp files in the same directory, then renamed.
  const v2 = [artifactName(`proj/sub-elem/${key(2)}`).urn, `${URN_PREFIX}source:${key(3)}`, `${URN_PREFIX}source:git/${key(4)}`];
  const v2Paths = [join(cache, 'artifacts', 'refs', 'proj', 'sub-elem', key(2)), join(cache, 'elementsources', key(3)), join(cache, 'source_protos', 'git', key(4))];
  for (const path of v2Paths) {
    const dir = join(path, '..');
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, 'tmpq1w2e3r4'), 'proto');
    await rename(join(dir, 'tmpq1w2e3r4'), path);
  }
  await reported.all(v2);

  // A ref replaced by a rename over it is a new ref.
  const replaced = v2Paths[0] ?? '';
  await writeFile(`${join(replaced, '..', 'tmpz9x8c7v6')}`, 'proto 2');
  await rename(join(replaced, '..', 'tmpz9x8c7v6'), replaced);
  await reported.count(v2[0] ?? '', 2);
  assert.deepEqual([...new Set(reported.seen)].sort(), [v1, ...v2].sort(), 'only ref names are reported');
});

test('a hand-made cache: imports whole; refs or objects that are symlinks out of the cache, or corrupt objects, fail; not a cache is CONFIG_INVALID', async (t) => {
  const root = await tempDir(t, 'local-cache-fake-');
  const cache = join(root, 'cache');
  const objects = join(cache, 'artifacts', 'cas', 'objects');
  const put = async (data: Uint8Array): Promise<Digest> => {
    const d = digestOf(data);
    await mkdir(join(objects, d.hash.slice(0, 2)), { recursive: true });
    await writeFile(objectPath(objects, d), data);
    return d;
  };
  const small = Buffer.from('hello\n');
  const big = deterministicBytes('fake-big', 3 * MiB + 7);
  const smallD = await put(small);
  const bigD = await put(big);
  const sub = await put(Directory.encode({ files: [{ name: 'big.bin', digest: toWire(bigD), isExecutable: false }], directories: [], symlinks: [] }).finish());
  const top = await put(
    Directory.encode({ files: [{ name: 'hello', digest: toWire(smallD), isExecutable: true }], directories: [{ name: 'sub', digest: toWire(sub) }], symlinks: [] }).finish(),
  );
  const refs = join(cache, 'artifacts', 'cas', 'refs', 'heads', 'p', 'e');
  await mkdir(refs, { recursive: true });
  await writeFile(join(refs, 'a'.repeat(64)), DigestProto.encode(toWire(top)).finish());
  const urn = refName(`p/e/${'a'.repeat(64)}`).urn;

  await assert.rejects(detectLayout(root), (err) => isMirrorError(err, 'CONFIG_INVALID') && err.message.includes(root));
  await assert.rejects(listLocalNames(join(root, 'nowhere')), (err) => isMirrorError(err, 'CONFIG_INVALID'));
  assert.equal(await detectLayout(cache), 'bst1');
  assert.equal(await detectLayout(join(cache, 'artifacts')), 'bst1', "a 1.6 artifactdir given directly");

  const store = await openStore(t, join(root, 'store'));
  const result = await importLocalName(cache, urn, store, silentLogger());
  assert.deepEqual(result, { status: 'imported', blobs: 4, bytes: small.length + big.length + sub.sizeBytes + top.sizeBytes });
  assert.equal(await problemOf(store, urn), undefined);
  assert.deepEqual(await importLocalName(cache, urn, store, silentLogger()), { status: 'present', blobs: 0, bytes: 0 });
  const byName = await importAll(join(cache, 'artifacts'), store, silentLogger(), [`p/e/${'a'.repeat(64)}`, 'p/e/short']);
  assert.deepEqual(byName.map((o) => [o.urn, o.result.status]), [[urn, 'present'], ['p/e/short', 'failed']]);

  // A ref that is a symlink out of the cache.
  const outside = join(root, 'outside');
  await mkdir(outside);
  await writeFile(join(outside, 'ref'), DigestProto.encode(toWire(top)).finish());
  await symlink(join(outside, 'ref'), join(refs, 'b'.repeat(64)));
  const linked = await importLocalName(cache, refName(`p/e/${'b'.repeat(64)}`).urn, await openStore(t, join(root, 'store2')), silentLogger());
  assert.equal(linked.status, 'failed');
  assert.match('reason' in linked ? linked.reason : '', /leads out of the local cache/);

  // An object that is a symlink (to a file with the right bytes, outside): not followed.
  const fresh = await openStore(t, join(root, 'store3'));
  await writeFile(join(outside, 'small'), small);
  await rm(objectPath(objects, smallD));
  await symlink(join(outside, 'small'), objectPath(objects, smallD));
  const viaLink = await importLocalName(cache, urn, fresh, silentLogger());
  assert.equal(viaLink.status, 'failed', JSON.stringify(viaLink));
  assert.match('reason' in viaLink ? viaLink.reason : '', /symlink/);
  assert.equal(await fresh.getName(urn), undefined);

  // A corrupt object (right size, wrong bytes).
  await rm(objectPath(objects, smallD));
  await writeFile(objectPath(objects, smallD), Buffer.from('HELLO\n'));
  const corrupt = await importLocalName(cache, urn, fresh, silentLogger());
  assert.equal(corrupt.status, 'failed', JSON.stringify(corrupt));
  assert.match('reason' in corrupt ? corrupt.reason : '', /corrupt/);
  assert.equal(await fresh.getName(urn), undefined);
});
