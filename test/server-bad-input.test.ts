import assert from 'node:assert/strict';
import { readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { digestOf, EMPTY_DIGEST, toWire } from '../src/cas/digest.js';
import { URN_PREFIX } from '../src/cas/names.js';
import { FindMissingBlobsRequest, FindMissingBlobsResponse } from '../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import { call, readAll, startMirror, tempDir } from './helpers/mirror.js';

const H = 'a'.repeat(64);
const code = (c: grpc.status, message?: RegExp) => (e: grpc.ServiceError) => {
  assert.equal(grpc.status[e.code], grpc.status[c], e.details);
  if (message) assert.match(e.details, message);
  return true;
};

test('pull-only: every write is PERMISSION_DENIED and the store is untouched', async (t) => {
  const dir = await tempDir(t);
  const { clients: c } = await startMirror(t, dir);
  const data = Buffer.from('pushed');
  const d = toWire(digestOf(data));
  await assert.rejects(call(c.cas, c.cas.batchUpdateBlobs, { instanceName: '', requests: [{ digest: d, data, compressor: 0 }], digestFunction: 0 }), code(grpc.status.PERMISSION_DENIED, /pull-only/));
  await assert.rejects(call(c.cas, c.cas.batchUpdateBlobs, { instanceName: '', requests: [], digestFunction: 0 }), code(grpc.status.PERMISSION_DENIED));
  await assert.rejects(call(c.push, c.push.pushBlob, { instanceName: '', uris: [], qualifiers: [], blobDigest: d, referencesBlobs: [], referencesDirectories: [], digestFunction: 0 }), code(grpc.status.PERMISSION_DENIED));
  await assert.rejects(call(c.push, c.push.pushDirectory, { instanceName: '', uris: [`${URN_PREFIX}v1:p/e/k`], qualifiers: [], rootDirectoryDigest: d, referencesBlobs: [], referencesDirectories: [], digestFunction: 0 }), code(grpc.status.PERMISSION_DENIED));
  await assert.rejects(call(c.refs, c.refs.updateReference, { instanceName: '', keys: ['p/e/k'], digest: d }), code(grpc.status.PERMISSION_DENIED));
  const status = await call(c.refs, c.refs.status, { instanceName: '' });
  assert.equal(status.allowUpdates, false);
  await assert.rejects(
    new Promise((resolve, reject) => {
      const w = c.bytestream.write((err, res) => (err ? reject(err) : resolve(res)));
      w.write({ resourceName: `uploads/1234/blobs/${d.hash}/${data.byteLength}`, writeOffset: 0n, finishWrite: true, data });
      w.end();
    }),
    code(grpc.status.PERMISSION_DENIED),
  );
  assert.deepEqual(await readdir(join(dir, 'cas/objects')), []);
});

test('BuildStream probes get the answers BuildStream expects', async (t) => {
  const { clients: c } = await startMirror(t, await tempDir(t));
  const caps = await call(c.capabilities, c.capabilities.getCapabilities, { instanceName: '' });
  assert.deepEqual(caps.cacheCapabilities?.digestFunctions, [1]);
  assert.equal(caps.cacheCapabilities?.maxBatchTotalSizeBytes, 1n << 20n);
  assert.equal(caps.cacheCapabilities?.actionCacheUpdateCapabilities?.updateEnabled, false);
  assert.deepEqual((await call(c.cas, c.cas.batchReadBlobs, { instanceName: '', digests: [], digestFunction: 0 })).responses, []);
  // Empty Fetch requests: INVALID_ARGUMENT is how clients recognise a Remote Asset server.
  await assert.rejects(call(c.fetch, c.fetch.fetchDirectory, { instanceName: '', uris: [], qualifiers: [], digestFunction: 0 }), code(grpc.status.INVALID_ARGUMENT));
  await assert.rejects(call(c.fetch, c.fetch.fetchBlob, { instanceName: '', uris: [], qualifiers: [], digestFunction: 0 }), code(grpc.status.INVALID_ARGUMENT));
  // Misses are gRPC NOT_FOUND errors (1.6 ignores in-band status).
  await assert.rejects(call(c.fetch, c.fetch.fetchBlob, { instanceName: '', uris: [`${URN_PREFIX}artifact:p/e/${H}`], qualifiers: [], digestFunction: 0 }), code(grpc.status.NOT_FOUND));
  await assert.rejects(call(c.refs, c.refs.getReference, { instanceName: '', key: `p/e/${H}` }), code(grpc.status.NOT_FOUND));
  await assert.rejects(readAll(c.bytestream, `blobs/${H}/10`), code(grpc.status.NOT_FOUND));
  // The empty blob is always there.
  assert.deepEqual((await call(c.cas, c.cas.findMissingBlobs, { instanceName: '', blobDigests: [toWire(EMPTY_DIGEST)], digestFunction: 0 })).missingBlobDigests, []);
  assert.equal((await readAll(c.bytestream, `blobs/${EMPTY_DIGEST.hash}/0`)).byteLength, 0);
});

test('bad input is INVALID_ARGUMENT (or NOT_FOUND / OUT_OF_RANGE where the protocol says), never a crash', async (t) => {
  const { clients: c, store } = await startMirror(t, await tempDir(t));
  const data = Buffer.from('0123456789');
  const d = digestOf(data);
  await store.write(d, data);
  const fm = (hash: string, sizeBytes: bigint) => call(c.cas, c.cas.findMissingBlobs, { instanceName: '', blobDigests: [{ hash, sizeBytes }], digestFunction: 0 });
  await assert.rejects(fm('xyz', 1n), code(grpc.status.INVALID_ARGUMENT, /64 lowercase hex/));
  await assert.rejects(fm(H.toUpperCase(), 1n), code(grpc.status.INVALID_ARGUMENT));
  await assert.rejects(fm(H, -5n), code(grpc.status.INVALID_ARGUMENT, /negative size/));
  await assert.rejects(fm(H, 1n << 62n), code(grpc.status.INVALID_ARGUMENT, /over the maximum/));
  await assert.rejects(call(c.cas, c.cas.findMissingBlobs, { instanceName: '', blobDigests: [toWire(d)], digestFunction: 7 }), code(grpc.status.INVALID_ARGUMENT, /SHA256 only/));
  await assert.rejects(call(c.cas, c.cas.findMissingBlobs, { instanceName: '../x', blobDigests: [], digestFunction: 0 }), code(grpc.status.INVALID_ARGUMENT));
  // Batches over the advertised limit.
  await assert.rejects(
    call(c.cas, c.cas.batchReadBlobs, { instanceName: '', digests: [{ hash: H, sizeBytes: 600_000n }, { hash: 'b'.repeat(64), sizeBytes: 600_000n }], digestFunction: 0 }),
    code(grpc.status.INVALID_ARGUMENT, /max_batch_total_size_bytes/),
  );
  // Resource names.
  for (const name of [`blobs/${d.hash}/10/extra`, `../blobs/${d.hash}/10`, `blobs/../../../etc/passwd/10`, `blobs/${d.hash}/abc`, 'nothing', `compressed-blobs/zstd/${d.hash}/10`]) {
    await assert.rejects(readAll(c.bytestream, name), code(grpc.status.INVALID_ARGUMENT), name);
  }
  await assert.rejects(readAll(c.bytestream, `blobs/${d.hash}/10`, 11n), code(grpc.status.OUT_OF_RANGE));
  await assert.rejects(readAll(c.bytestream, `blobs/${d.hash}/10`, -1n), code(grpc.status.OUT_OF_RANGE));
  await assert.rejects(readAll(c.bytestream, `blobs/${d.hash}/10`, 0n, -1n), code(grpc.status.INVALID_ARGUMENT));
  assert.equal((await readAll(c.bytestream, `main/blobs/${d.hash}/10`, 3n, 4n)).toString(), '3456');
  assert.equal((await readAll(c.bytestream, `blobs/${d.hash}/10`, 10n)).byteLength, 0);
  // REAPI reserves uploads/… for writes: it is not an instance name to read from.
  await assert.rejects(readAll(c.bytestream, `uploads/2f0c6e0e-5b1c-4a3e-9f5e-1c2d3e4f5a6b/blobs/${d.hash}/10`), code(grpc.status.INVALID_ARGUMENT, /reserved word 'uploads'.*reads take \[instance\/\]blobs\/HASH\/SIZE/));
  await assert.rejects(readAll(c.bytestream, `main/actions/blobs/${d.hash}/10`), code(grpc.status.INVALID_ARGUMENT, /reserved word 'actions'/));
  // URNs.
  const fb = (uris: string[], qualifiers: { name: string; value: string }[] = []) => call(c.fetch, c.fetch.fetchBlob, { instanceName: '', uris, qualifiers, digestFunction: 0 });
  await assert.rejects(fb(['https://example.com/file.tar.gz']), code(grpc.status.INVALID_ARGUMENT, /only BuildStream names/));
  await assert.rejects(fb([`${URN_PREFIX}nonsense:x`]), code(grpc.status.INVALID_ARGUMENT, /URN kind/));
  await assert.rejects(fb([`${URN_PREFIX}artifact:../../etc`]), code(grpc.status.INVALID_ARGUMENT));
  await assert.rejects(fb([`${URN_PREFIX}v1:p/e/k`]), code(grpc.status.INVALID_ARGUMENT, /use FetchDirectory/));
  await assert.rejects(fb([`${URN_PREFIX}artifact:p/e/k`], [{ name: 'resource_type', value: 'x' }]), code(grpc.status.INVALID_ARGUMENT, /qualifiers/));
  await assert.rejects(call(c.refs, c.refs.getReference, { instanceName: '', key: '../../etc/passwd' }), code(grpc.status.INVALID_ARGUMENT));
  // Fan-out per request is bounded; a miss of several URIs says so plainly.
  const many = Array.from({ length: 65 }, (_, i) => `${URN_PREFIX}artifact:p/e/${i.toString(16).padStart(64, '0')}`);
  await assert.rejects(fb(many), code(grpc.status.INVALID_ARGUMENT, /at most 64 URIs per request, got 65/));
  await assert.rejects(fb(many.slice(0, 2)), code(grpc.status.NOT_FOUND, /^none of the 2 URIs is in the mirror$/));
  const tree = async (pageToken: string) => {
    const stream = c.cas.getTree({ instanceName: '', rootDigest: toWire(d), pageSize: 0, pageToken, digestFunction: 0 }, new grpc.Metadata(), { deadline: Date.now() + 10_000 });
    for await (const _page of stream) void _page;
  };
  await assert.rejects(tree('garbage'), code(grpc.status.INVALID_ARGUMENT, /page_token/));
  await assert.rejects(tree(''), code(grpc.status.INVALID_ARGUMENT, /not a Directory|Directory/));
});

test('undecodable messages are INVALID_ARGUMENT; requests over 8 MiB are RESOURCE_EXHAUSTED', async (t) => {
  const { server } = await startMirror(t, await tempDir(t));
  const client = new grpc.Client(server.address, grpc.credentials.createInsecure(), { 'grpc.max_send_message_length': 128 << 20, 'grpc.max_receive_message_length': 16 << 20 });
  t.after(() => client.close());
  const raw = (payload: Buffer) =>
    new Promise((resolve, reject) =>
      client.makeUnaryRequest(
        '/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs',
        (b: Buffer) => b,
        (b: Buffer) => b,
        payload,
        new grpc.Metadata(),
        { deadline: Date.now() + 10_000 },
        (err, res) => (err ? reject(err) : resolve(res)),
      ),
    );
  await assert.rejects(raw(Buffer.from([0x12, 0xff, 0xff, 0xff, 0x0f, 0x01])), code(grpc.status.INVALID_ARGUMENT, /not a valid/));
  // Refused by grpc-js from the length prefix, before the message is buffered.
  await assert.rejects(raw(Buffer.alloc((8 << 20) + 1)), code(grpc.status.RESOURCE_EXHAUSTED, /larger than max \(8388609 vs 8388608\)/));
  // A FindMissingBlobs of 100,000 digests (~7.5 MB) is the largest legitimate request; it fits.
  const blobDigests = Array.from({ length: 100_000 }, (_, i) => ({ hash: i.toString(16).padStart(64, '0'), sizeBytes: 1_000_000_000n + BigInt(i) }));
  const large = Buffer.from(FindMissingBlobsRequest.encode({ instanceName: '', blobDigests, digestFunction: 0 }).finish());
  assert.ok(large.byteLength > 7_000_000 && large.byteLength < 8 << 20, `${large.byteLength} bytes`);
  const answer = FindMissingBlobsResponse.decode((await raw(large)) as Buffer);
  assert.equal(answer.missingBlobDigests.length, 100_000);
});

test('GetTree rooted at a blob too large to be a Directory is refused by its size, without reading it; other reads go on', async (t) => {
  const dir = await tempDir(t);
  const { clients: c, store } = await startMirror(t, dir);
  const big = Buffer.alloc((16 << 20) + 1, 1);
  const bigDigest = digestOf(big);
  await store.write(bigDigest, big);
  const small = Buffer.from('small blob\n');
  const smallDigest = digestOf(small);
  await store.write(smallDigest, small);
  // Same size, other bytes: had GetTree read the blob, the store's rehash would drop it as corrupt.
  await writeFile(join(dir, 'cas', 'objects', bigDigest.hash.slice(0, 2), bigDigest.hash.slice(2)), Buffer.alloc(big.byteLength, 2));
  const tree = async (root: typeof bigDigest): Promise<void> => {
    const stream = c.cas.getTree({ instanceName: '', rootDigest: toWire(root), pageSize: 0, pageToken: '', digestFunction: 0 }, new grpc.Metadata(), { deadline: Date.now() + 10_000 });
    for await (const _page of stream) void _page;
  };
  const refusals = Array.from({ length: 4 }, () => assert.rejects(tree(bigDigest), code(grpc.status.INVALID_ARGUMENT, /is 16777217 bytes, more than a Directory may be/)));
  const batch = call(c.cas, c.cas.batchReadBlobs, { instanceName: '', digests: [toWire(smallDigest)], digestFunction: 0 });
  await Promise.all(refusals);
  assert.deepEqual((await batch).responses[0]?.data, small);
  const found = await call(c.cas, c.cas.findMissingBlobs, { instanceName: '', blobDigests: [toWire(bigDigest)], digestFunction: 0 });
  assert.deepEqual(found.missingBlobDigests, [], 'the large blob was never read, so never found corrupt');
});
