import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { DiskContentStore } from '../src/cas/disk-store.js';
import { type Digest, digestOf, toWire } from '../src/cas/digest.js';
import { URN_PREFIX } from '../src/cas/names.js';
import { Artifact } from '../src/gen/buildstream/v2/artifact.js';
import { Directory } from '../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import type { WriteRequest, WriteResponse } from '../src/gen/google/bytestream/bytestream.js';
import { silentLogger } from '../src/log.js';
import { MirrorServer } from '../src/server/server.js';
import { call, clientsFor, tempDir, type Clients } from './helpers/mirror.js';

const KEY = 'a'.repeat(64);
const TOKEN = 'office-ci-secret';

function directory(files: { name: string; digest: Digest }[], dirs: { name: string; digest: Digest }[] = []): Buffer {
  return Buffer.from(
    Directory.encode({
      files: files.map((f) => ({ name: f.name, digest: toWire(f.digest), isExecutable: false })),
      directories: dirs.map((d) => ({ name: d.name, digest: toWire(d.digest) })),
      symlinks: [],
    }).finish(),
  );
}

async function pushMirror(t: test.TestContext, accessToken: string | undefined = TOKEN) {
  const dir = await tempDir(t);
  const log = silentLogger();
  const store = await DiskContentStore.open(dir, log);
  const pushed: string[] = [];
  const server = await MirrorServer.start(store, {
    listen: '127.0.0.1:0',
    maxBatchBytes: 1 << 20,
    log,
    push: {
      sink: {
        namePushed: async (urn, recordName) => {
          pushed.push(urn);
          await recordName();
        },
      },
      accessToken,
    },
  });
  t.after(async () => {
    await server.stop(1000);
    await store.close();
  });
  return { store, server, pushed };
}

/** Clients whose every call carries the bearer token. */
function authed(address: string, token: string, scheme = 'Bearer'): Clients {
  // grpc-js sends call credentials only over TLS, so the header is set on each call's metadata.
  const clients = clientsFor(address);
  const withToken = <C extends grpc.Client>(client: C): C => {
    const proto = Object.getPrototypeOf(client) as Record<string, unknown>;
    return new Proxy(client, {
      get(target, prop, receiver) {
        const value = Reflect.get(target, prop, receiver) as unknown;
        if (typeof value !== 'function' || !(prop in proto)) return value;
        return (...args: unknown[]) => {
          const md = args.find((a): a is grpc.Metadata => a instanceof grpc.Metadata);
          md?.set('authorization', `${scheme} ${token}`);
          return (value as (...a: unknown[]) => unknown).apply(target, args);
        };
      },
    });
  };
  return { ...clients, cas: withToken(clients.cas), bytestream: withToken(clients.bytestream), push: withToken(clients.push), refs: withToken(clients.refs), fetch: withToken(clients.fetch) };
}

function writeBlob(clients: Clients, data: Buffer, md = new grpc.Metadata()): Promise<WriteResponse> {
  const digest = digestOf(data);
  return new Promise((resolve, reject) => {
    const stream = clients.bytestream.write(md, { deadline: Date.now() + 30_000 }, (err, res) => (err ? reject(err) : resolve(res as WriteResponse)));
    const chunk = 1 << 20;
    for (let off = 0; off < data.byteLength || off === 0; off += chunk) {
      const end = Math.min(off + chunk, data.byteLength);
      const req: WriteRequest = { resourceName: `uploads/${randomUUID()}/blobs/${digest.hash}/${digest.sizeBytes}`, writeOffset: BigInt(off), finishWrite: end === data.byteLength, data: data.subarray(off, end) };
      stream.write(req);
      if (end === data.byteLength) break;
    }
    stream.end();
  });
}

test('push listener: blobs by batch and by stream, then PushBlob of an artifact whose closure is complete, is recorded and queued', async (t) => {
  const { store, server, pushed } = await pushMirror(t);
  const c = authed(server.address, TOKEN);
  t.after(() => c.close());
  const big = randomBytes(3 << 20);
  const small = Buffer.from('small file\n');
  const files = directory([{ name: 'big', digest: digestOf(big) }, { name: 'small', digest: digestOf(small) }]);
  const log = Buffer.from('build log\n');
  const artifact = Buffer.from(Artifact.encode({ version: 2, buildSuccess: true, strongKey: KEY, weakKey: KEY, strictKey: KEY, files: toWire(digestOf(files)), logs: [{ name: 'build.log', digest: toWire(digestOf(log)) }] }).finish());
  const urn = `${URN_PREFIX}artifact:proj/hello/${KEY}`;

  // The BuildStream 2 push probe: an empty PushBlob is INVALID_ARGUMENT (push allowed).
  await assert.rejects(call(c.push, c.push.pushBlob, { instanceName: '', uris: [], qualifiers: [], blobDigest: toWire(digestOf(artifact)), referencesBlobs: [], referencesDirectories: [], digestFunction: 0 }), { code: grpc.status.INVALID_ARGUMENT });
  // Before the blobs: refused, nothing recorded.
  await assert.rejects(call(c.push, c.push.pushBlob, { instanceName: '', uris: [urn], qualifiers: [], blobDigest: toWire(digestOf(artifact)), referencesBlobs: [], referencesDirectories: [], digestFunction: 0 }), { code: grpc.status.FAILED_PRECONDITION });

  const batch = await call(c.cas, c.cas.batchUpdateBlobs, {
    instanceName: '',
    requests: [small, files, log, artifact].map((data) => ({ digest: toWire(digestOf(data)), data, compressor: 0 })),
    digestFunction: 0,
  });
  assert.deepEqual(batch.responses.map((r) => r.status?.code), [0, 0, 0, 0]);
  // Still missing the big file: the artifact's closure is incomplete.
  await assert.rejects(call(c.push, c.push.pushBlob, { instanceName: '', uris: [urn], qualifiers: [], blobDigest: toWire(digestOf(artifact)), referencesBlobs: [], referencesDirectories: [], digestFunction: 0 }), (err: grpc.ServiceError) => err.code === grpc.status.FAILED_PRECONDITION && /big|missing/.test(err.details));
  assert.equal(await store.getName(urn), undefined);
  assert.deepEqual(pushed, []);

  const written = await writeBlob(c, big);
  assert.equal(written.committedSize, BigInt(big.byteLength));
  await call(c.push, c.push.pushBlob, { instanceName: '', uris: [urn], qualifiers: [], blobDigest: toWire(digestOf(artifact)), referencesBlobs: [], referencesDirectories: [], digestFunction: 0 });
  assert.deepEqual(pushed, [urn]);
  const record = await store.getName(urn);
  assert.equal(record?.digest.hash, digestOf(artifact).hash);
  // And it is served from there at once.
  const fetched = await call(c.fetch, c.fetch.fetchBlob, { instanceName: '', uris: [urn], qualifiers: [], digestFunction: 0, timeout: undefined, oldestContentAccepted: undefined });
  assert.equal(fetched.blobDigest?.hash, digestOf(artifact).hash);

  // A name pointing at another kind of message is refused, though a protobuf decoder alone would
  // take it (skipping every field of the wrong wire type).
  const other = `${URN_PREFIX}artifact:proj/other/${'c'.repeat(64)}`;
  const asArtifact = { instanceName: '', uris: [other], qualifiers: [], blobDigest: toWire(digestOf(files)), referencesBlobs: [], referencesDirectories: [], digestFunction: 0 };
  await assert.rejects(call(c.push, c.push.pushBlob, asArtifact), (err: grpc.ServiceError) => err.code === grpc.status.INVALID_ARGUMENT && /is not a BuildStream Artifact/.test(err.details));
  const asSource = { ...asArtifact, uris: [`${URN_PREFIX}source:${'c'.repeat(64)}`], blobDigest: toWire(digestOf(artifact)) };
  await assert.rejects(call(c.push, c.push.pushBlob, asSource), (err: grpc.ServiceError) => err.code === grpc.status.INVALID_ARGUMENT && /is not a BuildStream Source/.test(err.details));
  await assert.rejects(call(c.refs, c.refs.updateReference, { instanceName: '', keys: [`proj/other/${'c'.repeat(64)}`], digest: toWire(digestOf(artifact)) }), (err: grpc.ServiceError) => err.code === grpc.status.INVALID_ARGUMENT && /is not a Directory/.test(err.details));
  assert.deepEqual(pushed, [urn]);
});

test('push listener: a corrupt upload is refused and nothing stored; UpdateReference records a 1.x ref; Status allows updates', async (t) => {
  const { store, server, pushed } = await pushMirror(t);
  const c = authed(server.address, TOKEN);
  t.after(() => c.close());
  const good = Buffer.from('content\n');
  const liar = { digest: toWire(digestOf(Buffer.from('something else\n'))), data: good, compressor: 0 };
  const res = await call(c.cas, c.cas.batchUpdateBlobs, { instanceName: '', requests: [liar], digestFunction: 0 });
  assert.equal(res.responses[0]?.status?.code, grpc.status.INVALID_ARGUMENT);
  // A compressor the mirror never advertised: refused, not stored as if it were plain data.
  const zstd = await call(c.cas, c.cas.batchUpdateBlobs, { instanceName: '', requests: [{ digest: toWire(digestOf(good)), data: good, compressor: 1 }], digestFunction: 0 });
  assert.equal(zstd.responses[0]?.status?.code, grpc.status.INVALID_ARGUMENT);
  assert.match(zstd.responses[0]?.status?.message ?? '', /compressor ZSTD is not supported/);
  assert.equal((await store.findMissing([digestOf(good)])).length, 1);
  assert.deepEqual(await store.findMissing([digestOf(Buffer.from('something else\n'))]), [digestOf(Buffer.from('something else\n'))]);
  // A streamed upload whose bytes are not its digest's: refused, nothing kept.
  const big = randomBytes(2 << 20);
  const claimed = digestOf(randomBytes(2 << 20));
  await assert.rejects(
    new Promise((resolve, reject) => {
      const stream = c.bytestream.write(new grpc.Metadata(), { deadline: Date.now() + 30_000 }, (err, r) => (err ? reject(err) : resolve(r)));
      stream.write({ resourceName: `uploads/${randomUUID()}/blobs/${claimed.hash}/${claimed.sizeBytes}`, writeOffset: 0n, finishWrite: true, data: big });
      stream.end();
    }),
    { code: grpc.status.INVALID_ARGUMENT },
  );
  assert.equal((await store.findMissing([claimed])).length, 1);

  const root = directory([{ name: 'f', digest: digestOf(good) }]);
  await call(c.cas, c.cas.batchUpdateBlobs, { instanceName: '', requests: [good, root].map((data) => ({ digest: toWire(digestOf(data)), data, compressor: 0 })), digestFunction: 0 });
  const ref = `proj/old/${KEY}`;
  assert.equal((await call(c.refs, c.refs.status, { instanceName: '' })).allowUpdates, true);
  await call(c.refs, c.refs.updateReference, { instanceName: '', keys: [ref], digest: toWire(digestOf(root)) });
  assert.deepEqual(pushed, [`${URN_PREFIX}v1:${ref}`]);
});

test('push listener: calls without the token are UNAUTHENTICATED; a push listener without authentication does not start', async (t) => {
  const { server, pushed } = await pushMirror(t);
  const plain = clientsFor(server.address);
  t.after(() => plain.close());
  await assert.rejects(call(plain.cas, plain.cas.batchUpdateBlobs, { instanceName: '', requests: [], digestFunction: 0 }), { code: grpc.status.UNAUTHENTICATED });
  const wrong = authed(server.address, 'guess');
  t.after(() => wrong.close());
  await assert.rejects(call(wrong.cas, wrong.cas.findMissingBlobs, { instanceName: '', blobDigests: [], digestFunction: 0 }), { code: grpc.status.UNAUTHENTICATED });
  const unprefixed = authed(server.address, TOKEN, '');
  t.after(() => unprefixed.close());
  await assert.rejects(call(unprefixed.cas, unprefixed.cas.findMissingBlobs, { instanceName: '', blobDigests: [], digestFunction: 0 }), { code: grpc.status.UNAUTHENTICATED });
  // The scheme name is case-insensitive, as in HTTP.
  const lower = authed(server.address, TOKEN, 'bearer');
  t.after(() => lower.close());
  await call(lower.cas, lower.cas.findMissingBlobs, { instanceName: '', blobDigests: [], digestFunction: 0 });
  assert.deepEqual(pushed, []);
  await assert.rejects(pushMirror(t, ''), /must authenticate its clients/);
});
