import assert from 'node:assert/strict';
import { test } from 'node:test';
import { EMPTY_DIGEST, digestOf, fromWire, parseResourceName } from '../src/cas/digest.js';
import { formatBytes } from '../src/cli/format.js';
import { MirrorError, describeError, isEnvironmentFailure, isMirrorError } from '../src/errors.js';
import { normalElementName, parseUrn, parseUserName, URN_PREFIX } from '../src/cas/names.js';
import { parseRefsText, readRefsPath } from '../src/sync/refs-file.js';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseUpstreamUrl } from '../src/remote/upstream.js';
import { splitListen } from '../src/server/server.js';
import { artifactRoots, parseDirectory, sourceRoots } from '../src/cas/closure.js';
import { Artifact } from '../src/gen/buildstream/v2/artifact.js';
import { Source } from '../src/gen/buildstream/v2/source.js';
import { Directory } from '../src/gen/build/bazel/remote/execution/v2/remote_execution.js';

const H = 'a'.repeat(64);

test('digests from the wire are validated', () => {
  assert.deepEqual(fromWire({ hash: H, sizeBytes: 5n }), { hash: H, sizeBytes: 5 });
  assert.deepEqual(digestOf(Buffer.alloc(0)), EMPTY_DIGEST);
  const bad: [string, bigint, RegExp][] = [
    ['A'.repeat(64), 1n, /64 lowercase hex/],
    ['zz', 1n, /64 lowercase hex/],
    [H, -1n, /negative size/],
    [H, 1n << 60n, /over the maximum/],
    [H, 0n, /not the empty blob/],
  ];
  for (const [hash, size, message] of bad) {
    assert.throws(() => fromWire({ hash, sizeBytes: size }), (e: unknown) => isMirrorError(e, 'INVALID_ARGUMENT') && message.test(e.message));
  }
  assert.throws(() => fromWire(undefined, 'root_digest'), /root_digest is missing/);
});

test('ByteStream resource names', () => {
  assert.deepEqual(parseResourceName(`blobs/${H}/12`, 'read'), { instanceName: '', digest: { hash: H, sizeBytes: 12 } });
  assert.deepEqual(parseResourceName(`main/sub/blobs/${H}/12`, 'read').instanceName, 'main/sub');
  assert.equal(parseResourceName(`uploads/3f1c-aa/blobs/${H}/12/meta/x`, 'write').digest.sizeBytes, 12);
  for (const name of [
    `blobs/${H}/12/extra`,
    `../blobs/${H}/12`,
    `a/../blobs/${H}/12`,
    `blobs/${H}`,
    `blobs/${H}/-1`,
    `blobs/${H}/1e3`,
    `blobs/../../etc/passwd/1`,
    `compressed-blobs/zstd/${H}/12`,
    '',
  ]) {
    assert.throws(() => parseResourceName(name, 'read'), (e: unknown) => isMirrorError(e, 'INVALID_ARGUMENT'), name);
  }
});

test('BuildStream names and URNs', () => {
  const key = 'b'.repeat(64);
  assert.deepEqual(
    parseUserName(`proj/base-tree/${key}`).map((n) => n.urn),
    [`${URN_PREFIX}artifact:proj/base-tree/${key}`, `${URN_PREFIX}v1:proj/base-tree/${key}`],
  );
  assert.equal(parseUrn(`${URN_PREFIX}v1:proj/el/${key}`).kind, 'ref');
  assert.equal(parseUrn(`${URN_PREFIX}v1:proj/el/${key}`).key, `proj/el/${key}`);
  assert.equal(parseUrn(`${URN_PREFIX}source:${key}`).kind, 'element-sources');
  assert.equal(parseUrn(`${URN_PREFIX}source:git/${key}`).kind, 'source');
  for (const bad of ['https://example.com/x', `${URN_PREFIX}bogus:x`, `${URN_PREFIX}artifact:a/b`, `${URN_PREFIX}artifact:a/../c`, `${URN_PREFIX}source:a/b/c`]) {
    assert.throws(() => parseUrn(bad), (e: unknown) => isMirrorError(e, 'INVALID_ARGUMENT'), bad);
  }
  assert.throws(() => parseUserName('  '), /empty name/);
});

test('names as users copy them from bst show: element paths are normalised, short keys and junctions refused', () => {
  const key = 'c'.repeat(64);
  const urns = (input: string): string[] => parseUserName(input).map((n) => n.urn);
  // `bst show --format '%{name} %{full-key}'` prints element paths; BuildStream's artifact names use normal names.
  assert.deepEqual(urns(`project/sub/hello.bst/${key}`), [`${URN_PREFIX}artifact:project/sub-hello/${key}`, `${URN_PREFIX}v1:project/sub-hello/${key}`]);
  assert.equal(parseUserName(`p/a/b/c.bst/${key}`)[0]?.key, `p/a-b-c/${key}`);
  assert.equal(parseUserName(`p/top.bst/${key}`)[0]?.key, `p/top/${key}`);
  assert.equal(parseUserName(`p/odd name+x.bst/${key}`)[0]?.key, `p/odd_name_x/${key}`);
  assert.equal(parseUserName(`p/already-normal/${key}`)[0]?.key, `p/already-normal/${key}`);
  assert.equal(normalElementName('base/tree.bst'), 'base-tree');
  const invalid = (e: unknown): boolean => isMirrorError(e, 'INVALID_ARGUMENT');
  assert.throws(() => parseUserName('p/top.bst/3f1c2a9b'), /short cache key '3f1c2a9b'.*full 64-character key.*bst show --deps all --format '%\{name\} %\{full-key\}'/);
  assert.throws(() => parseUserName(`urn:fdc:buildstream.build:2020:artifact:p/e/3f1c2a9b`), /short cache key/);
  assert.throws(() => parseUserName(`p/top.bst/${key.toUpperCase()}`), /does not end in a cache key/);
  assert.throws(() => parseUserName(`top.bst/${key}`), /expected PROJECT\/ELEMENT\/KEY/);
  assert.throws(() => parseUserName(`p//${key}`), /expected PROJECT\/ELEMENT\/KEY/);
  assert.throws(() => parseUserName(`p/freedesktop-sdk.bst:components/glib.bst/${key}`), /junction/);
  for (const bad of ['p/top.bst/3f1c2a9b', 'just-a-word', `p/e/${key}x`]) assert.throws(() => parseUserName(bad), invalid, bad);
});

test('sizes and rates are printed rounded', () => {
  assert.equal(formatBytes(517.8466939730837), '518 B');
  assert.equal(formatBytes(0), '0 B');
  assert.equal(formatBytes(1536), '1.5 KiB');
  assert.equal(formatBytes(3 * 1024 ** 3), '3.0 GiB');
});

test('errors: the root cause of a chain is shown, and environment failures are told apart', () => {
  // The shape of a store opened on a full disk: our error, LevelDB's, then its IO error.
  const leveldb = Object.assign(new Error('Database failed to open'), { code: 'LEVEL_DATABASE_NOT_OPEN', cause: new Error('IO error: /data/index/LOG: No space left on device') });
  const open = new MirrorError('CONFIG_INVALID', `cannot open the index in /data/index: ${leveldb.message}`, { cause: leveldb });
  assert.equal(describeError(open), 'cannot open the index in /data/index: Database failed to open (cause: IO error: /data/index/LOG: No space left on device)');
  assert.ok(isEnvironmentFailure(open));
  const enospc = new MirrorError('UPSTREAM_ERROR', 'writing blob x failed', { cause: Object.assign(new Error('no space left on device, write'), { code: 'ENOSPC' }) });
  assert.ok(isEnvironmentFailure(enospc));
  assert.ok(isEnvironmentFailure(Object.assign(new Error('open x'), { code: 'EACCES' })));
  // A message that already says its cause is not repeated; input and peer errors are not environment failures.
  const plain = new MirrorError('CONFIG_INVALID', 'cannot read refs file x: ENOENT: no such file', { cause: new Error('ENOENT: no such file') });
  assert.equal(describeError(plain), 'cannot read refs file x: ENOENT: no such file');
  assert.ok(!isEnvironmentFailure(plain));
  assert.ok(!isEnvironmentFailure(new MirrorError('UPSTREAM_UNAVAILABLE', 'http://x: GetCapabilities failed (UNAVAILABLE)')));
  const loop: { message: string; cause?: unknown } = new Error('loop');
  loop.cause = loop;
  assert.equal(describeError(loop), 'loop');
});

test('refs files allow comments and blank lines; a refs directory skips hidden files and editors\' backups', async (t) => {
  assert.deepEqual(parseRefsText('# wanted\n\nproj/a/k1  # trailing\r\n  urn:x  \n#x\n'), ['proj/a/k1', 'urn:x']);
  const dir = await mkdtemp(join(tmpdir(), 'refs-dir-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await mkdir(join(dir, 'team'));
  await writeFile(join(dir, 'team', 'wanted'), 'p/b/k\n');
  await writeFile(join(dir, 'a'), 'p/a/k\n');
  for (const leftover of ['a~', '#a#', '.a.swp', 'a.swp', 'a.orig', '.hidden']) await writeFile(join(dir, leftover), 'p/old/k\n');
  assert.deepEqual(await readRefsPath(dir), ['p/a/k', 'p/b/k']);
});

test('upstream URLs and listen addresses', () => {
  assert.deepEqual(parseUpstreamUrl('http://cache:11001'), { target: 'cache:11001', tls: false });
  assert.deepEqual(parseUpstreamUrl('https://cache.example.org'), { target: 'cache.example.org:443', tls: true });
  assert.throws(() => parseUpstreamUrl('grpc://x:1'), /only http and https/);
  assert.throws(() => parseUpstreamUrl('http://x:1/main'), /--instance-name/);
  assert.throws(() => parseUpstreamUrl('not a url'), /not a URL/);
  assert.deepEqual(splitListen('127.0.0.1:0'), { host: '127.0.0.1', port: 0 });
  assert.deepEqual(splitListen('[::1]:11001'), { host: '::1', port: 11001 });
  assert.deepEqual(splitListen(':11001'), { host: '0.0.0.0', port: 11001 });
  assert.throws(() => splitListen('localhost'), /HOST:PORT/);
  assert.throws(() => splitListen('h:99999'), /HOST:PORT/);
});

test('Directory, Artifact and Source blobs are told apart by their wire types, not taken for one another', () => {
  const file = { hash: 'a'.repeat(64), sizeBytes: 3n };
  const sub = { hash: 'b'.repeat(64), sizeBytes: 10n };
  const blobs = {
    directory: Buffer.from(Directory.encode({ files: [{ name: 'f', digest: file, isExecutable: true }], directories: [], symlinks: [] }).finish()),
    subdirectoriesOnly: Buffer.from(Directory.encode({ files: [], directories: [{ name: 'd', digest: sub }], symlinks: [] }).finish()),
    artifact: Buffer.from(Artifact.encode(Artifact.fromPartial({ version: 1, strongKey: 'k'.repeat(64), files: sub })).finish()),
    // BuildStream sets version on every artifact; a failed build leaves build_success unset.
    failedArtifact: Buffer.from(Artifact.encode(Artifact.fromPartial({ version: 1, buildSuccess: false, strongKey: 'c'.repeat(64), weakKey: 'd'.repeat(64), files: sub })).finish()),
    source: Buffer.from(Source.encode({ version: 1, files: sub }).finish()),
    text: Buffer.from('int main() { return 0; }\n'),
  };
  const kinds = {
    directory: (b: Buffer) => parseDirectory(b, digestOf(b)),
    artifact: (b: Buffer) => artifactRoots(b, digestOf(b), false),
    source: (b: Buffer) => sourceRoots(b, digestOf(b)),
  };
  const accepted = (kind: keyof typeof kinds, blob: Buffer): boolean => {
    try {
      kinds[kind](blob);
      return true;
    } catch (err) {
      assert.ok(isMirrorError(err, 'INVALID_ARGUMENT'), String(err));
      return false;
    }
  };
  const table = Object.fromEntries(Object.entries(blobs).map(([name, blob]) => [name, (Object.keys(kinds) as (keyof typeof kinds)[]).filter((k) => accepted(k, blob))]));
  assert.deepEqual(table, {
    directory: ['directory'],
    subdirectoriesOnly: ['directory'],
    artifact: ['artifact'],
    failedArtifact: ['artifact'],
    source: ['source'],
    text: [],
  });
  assert.deepEqual(parseDirectory(Buffer.alloc(0), digestOf(Buffer.alloc(0))), { files: [], directories: [] }, 'the empty Directory');
});
