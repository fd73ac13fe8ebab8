import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { EMPTY_DIGEST, digestOf } from '../src/cas/digest.js';
import { DiskContentStore, type DiskStoreOptions } from '../src/cas/disk-store.js';
import { isMirrorError } from '../src/errors.js';
import { silentLogger } from '../src/log.js';
import { tempDir } from './helpers/mirror.js';

async function openStore(t: { after(fn: () => Promise<void>): void }, options: DiskStoreOptions = {}): Promise<DiskContentStore> {
  const store = await DiskContentStore.open(await tempDir(t), silentLogger(), options);
  t.after(() => store.close());
  return store;
}

async function readAll(store: DiskContentStore, d: { hash: string; sizeBytes: number }, range?: { offset: number; limit?: number }): Promise<Buffer> {
  const r = await store.read(d, range);
  assert.ok(r, 'blob is readable');
  const chunks: Buffer[] = [];
  for await (const c of r.chunks(100_000, 3)) chunks.push(c.subarray(3));
  assert.equal(chunks.reduce((n, c) => n + c.byteLength, 0), r.length);
  return Buffer.concat(chunks);
}

test('writes become visible only after verification; layout is objects/<2>/<62>', async (t) => {
  const store = await openStore(t);
  const data = Buffer.from('hello mirror');
  const d = digestOf(data);
  assert.deepEqual(await store.findMissing([d, EMPTY_DIGEST]), [d]);
  await store.write(d, data);
  assert.deepEqual(await store.findMissing([d, EMPTY_DIGEST]), []);
  assert.deepEqual(await readFile(join(store.dir, 'cas/objects', d.hash.slice(0, 2), d.hash.slice(2))), data);
  assert.deepEqual(await readAll(store, d), data);
  assert.deepEqual(await readAll(store, d, { offset: 6, limit: 3 }), Buffer.from('mir'));
  assert.deepEqual(await readAll(store, EMPTY_DIGEST), Buffer.alloc(0));
  // A size mismatch with a stored hash is a miss, not a hit.
  assert.equal((await store.findMissing([{ hash: d.hash, sizeBytes: 3 }])).length, 1);
});

test('content that does not match its digest is refused and leaves nothing behind', async (t) => {
  const store = await openStore(t);
  const d = digestOf(Buffer.from('the real content'));
  for (const bad of [Buffer.from('other content!!!'), Buffer.from('short'), Buffer.from('the real content plus more')]) {
    await assert.rejects(store.write(d, bad), (e: unknown) => isMirrorError(e, 'DIGEST_MISMATCH'));
    await assert.rejects(store.writeMany([{ digest: digestOf(Buffer.from('ok')), data: Buffer.from('ok') }, { digest: d, data: bad }]), (e: unknown) => isMirrorError(e, 'DIGEST_MISMATCH'));
  }
  assert.deepEqual(await store.findMissing([d]), [d]);
  assert.deepEqual(await readdir(join(store.dir, 'tmp')), [], 'no temp files left');
  assert.deepEqual(await readdir(join(store.dir, 'cas/objects')), [], 'no object files written');
});

test('multi-MB blobs stream in and out', async (t) => {
  const store = await openStore(t);
  const data = randomBytes(9 * 1024 * 1024 + 17);
  const d = digestOf(data);
  async function* chunks(): AsyncIterable<Uint8Array> {
    for (let i = 0; i < data.byteLength; i += 100_000) yield data.subarray(i, i + 100_000);
  }
  await store.write(d, chunks());
  const back = await readAll(store, d);
  assert.equal(createHash('sha256').update(back).digest('hex'), d.hash);
});

test('bit rot is detected on read and the blob is dropped (rechecking every read)', async (t) => {
  const store = await openStore(t, { recheckAfterMs: 0 });
  const data = Buffer.from('x'.repeat(4096));
  const d = digestOf(data);
  await store.write(d, data);
  const flipped = Buffer.from(data);
  flipped[100] = 0x79;
  await writeFile(store.objectPath(d), flipped);
  await assert.rejects(readAll(store, d), (e: unknown) => isMirrorError(e, 'BLOB_CORRUPT'));
  assert.deepEqual(await store.findMissing([d]), [d], 'corrupt blob is forgotten');

  await store.write(d, data);
  await writeFile(store.objectPath(d), flipped);
  await assert.rejects(store.readBytes(d), (e: unknown) => isMirrorError(e, 'BLOB_CORRUPT'));
  assert.deepEqual(await store.findMissing([d]), [d]);
});

test('a blob is rehashed on its first whole read by a process, then trusted until the recheck interval', async (t) => {
  const dir = await tempDir(t);
  const data = Buffer.from('y'.repeat(3000));
  const d = digestOf(data);
  const first = await DiskContentStore.open(dir, silentLogger());
  await first.write(d, data);
  await first.close();
  const flipped = Buffer.from(data).fill(0x7a, 5, 6);
  await writeFile(join(dir, 'cas/objects', d.hash.slice(0, 2), d.hash.slice(2)), flipped);
  // A restart (or the interval passing) means the next whole read hashes it again.
  const second = await DiskContentStore.open(dir, silentLogger());
  t.after(() => second.close());
  await assert.rejects(readAll(second, d), (e: unknown) => isMirrorError(e, 'BLOB_CORRUPT'));
  assert.deepEqual(await second.findMissing([d]), [d]);
  // Ranged reads cannot be checked against the digest and are served as stored.
  await second.write(d, data);
  assert.deepEqual(await readAll(second, d, { offset: 10, limit: 5 }), data.subarray(10, 15));
});

test('a blob removed between opening a reader and reading it is a miss, not a failure', async (t) => {
  const store = await openStore(t);
  const data = randomBytes(5000);
  const d = digestOf(data);
  await store.write(d, data);
  const reader = await store.read(d);
  assert.ok(reader);
  await store.forget(d, 'removed by another reader');
  await assert.rejects(async () => {
    for await (const _ of reader.chunks(1024)) assert.fail('no data may come');
  }, (e: unknown) => isMirrorError(e, 'BLOB_NOT_FOUND'));
});

test('a second process cannot open the same store', async (t) => {
  const dir = await tempDir(t);
  const store = await DiskContentStore.open(dir, silentLogger());
  t.after(() => store.close());
  await assert.rejects(DiskContentStore.open(dir, silentLogger()), (e: unknown) => isMirrorError(e, 'STORE_LOCKED') && /in use/.test(e.message));
});
