import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { toWire } from '../src/cas/digest.js';
import { URN_PREFIX } from '../src/cas/names.js';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { REPO_ROOT, call, readAll, runCli, startMirror, tempDir } from './helpers/mirror.js';

const REF = `proj/el/${'1'.repeat(64)}`;

async function mirrorWithOneRef(t: { after(fn: () => Promise<void>): void }) {
  const up = new FakeUpstream('reference-storage');
  const content = Buffer.from('important file content\n'.repeat(50));
  const file = up.add(content);
  const root = up.addDirectory({ files: [{ name: 'f', digest: file }] });
  up.refs.set(REF, root);
  await up.start();
  t.after(() => up.stop());
  const dir = await tempDir(t);
  const sync = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', REF]);
  assert.equal(sync.code, 0, sync.stderr);
  const objectPath = join(dir, 'cas/objects', file.hash.slice(0, 2), file.hash.slice(2));
  return { dir, file, content, objectPath, up };
}

test('verify finds bit rot; --repair removes the blob and the names that need it; sync heals', async (t) => {
  const { dir, objectPath, up } = await mirrorWithOneRef(t);
  const clean = await runCli(['verify', '--dir', dir]);
  assert.equal(clean.code, 0, clean.stdout);
  assert.match(clean.stdout, /checked 2 blobs and 1 names\nstore is consistent/);

  await writeFile(objectPath, 'rotten');
  const found = await runCli(['verify', '--dir', dir]);
  assert.equal(found.code, 1);
  assert.match(found.stdout, /bad blob [0-9a-f]{64}\/1150: object file has 6 bytes/);
  assert.match(found.stdout, new RegExp(`broken name ${URN_PREFIX}v1:${REF}`));
  assert.match(found.stdout, /run with --repair/);

  const repaired = await runCli(['verify', '--dir', dir, '--repair']);
  assert.equal(repaired.code, 0, repaired.stdout);
  assert.match(repaired.stdout, /\(removed\)/);
  assert.equal((await runCli(['verify', '--dir', dir])).code, 0, 'consistent after repair');

  const heal = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', REF]);
  assert.equal(heal.code, 0);
  assert.match(heal.stdout, /mirrored 1/);
  assert.match(heal.stdout, /transferred 1 blobs/);
});

test('bit rot is never served as valid', async (t) => {
  const { dir, file, objectPath } = await mirrorWithOneRef(t);
  await writeFile(objectPath, Buffer.from('important file content\n'.repeat(50)).fill(0x41, 10, 11));
  const { clients: c } = await startMirror(t, dir);
  const res = await call(c.cas, c.cas.batchReadBlobs, { instanceName: '', digests: [toWire(file)], digestFunction: 0 });
  assert.equal(res.responses[0]?.status?.code, grpc.status.NOT_FOUND);
  assert.match(res.responses[0]?.status?.message ?? '', /corrupt/);
  // Removed, so FindMissingBlobs now says so, and the name that needs it is no longer offered.
  assert.equal((await call(c.cas, c.cas.findMissingBlobs, { instanceName: '', blobDigests: [toWire(file)], digestFunction: 0 })).missingBlobDigests.length, 1);
  await assert.rejects(call(c.refs, c.refs.getReference, { instanceName: '', key: REF }), (e: grpc.ServiceError) => e.code === grpc.status.NOT_FOUND);
});

test('bit rot in a large blob fails the ByteStream read instead of ending it cleanly', async (t) => {
  const up = new FakeUpstream('remote-asset');
  const big = Buffer.alloc(3 << 20, 7);
  const file = up.add(big);
  const root = up.addDirectory({ files: [{ name: 'big', digest: file }] });
  up.assets.set(`${URN_PREFIX}v1:${REF}`, root);
  await up.start();
  t.after(() => up.stop());
  const dir = await tempDir(t);
  assert.equal((await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', `${URN_PREFIX}v1:${REF}`])).code, 0);
  const rotten = Buffer.from(big);
  rotten[2 << 20] = 8;
  await writeFile(join(dir, 'cas/objects', file.hash.slice(0, 2), file.hash.slice(2)), rotten);
  const { clients: c } = await startMirror(t, dir);
  await assert.rejects(readAll(c.bytestream, `blobs/${file.hash}/${file.sizeBytes}`), (e: grpc.ServiceError) => e.code === grpc.status.NOT_FOUND && /corrupt/.test(e.details));
  assert.equal(createHash('sha256').update(big).digest('hex'), file.hash);
});

test('CLI: usage and configuration errors exit 2 with a message; missing names exit 1', async (t) => {
  const dir = await tempDir(t);
  const noNames = await runCli(['sync', '--dir', dir, '--upstream', 'http://127.0.0.1:1']);
  assert.equal(noNames.code, 2);
  assert.match(noNames.stderr, /no names to sync: give --ref NAME, --refs-file FILE or --project DIR --target ELEMENT.bst/);
  // Files named on the command line are made absolute against the CLI's directory (a running
  // daemon opens them from its own).
  const relativeCert = await runCli(['sync', '--dir', dir, '--upstream', 'https://127.0.0.1:1', '--server-cert', 'no-such-ca.pem', '--ref', REF]);
  assert.equal(relativeCert.code, 2);
  assert.ok(relativeCert.stderr.includes(`cannot read the server certificate file ${join(REPO_ROOT, 'no-such-ca.pem')}`), relativeCert.stderr);
  const badUrl = await runCli(['sync', '--dir', dir, '--upstream', 'ftp://x', '--ref', REF]);
  assert.equal(badUrl.code, 2);
  assert.match(badUrl.stderr, /only http and https/);
  const noFile = await runCli(['sync', '--dir', dir, '--upstream', 'http://127.0.0.1:1', '--refs-file', join(dir, 'nope.txt')]);
  assert.equal(noFile.code, 2);
  assert.match(noFile.stderr, /cannot read refs file/);
  const badListen = await runCli(['serve', '--dir', dir, '--listen', 'nonsense']);
  assert.equal(badListen.code, 2);
  assert.match(badListen.stderr, /HOST:PORT/);
  assert.equal((await runCli(['frobnicate'])).code, 2);
  // A short key or a malformed name is a usage error before any upstream is asked (127.0.0.1:1 would refuse).
  const refsFile = join(dir, 'wanted.txt');
  await writeFile(refsFile, `harness/top.bst/3f1c2a9b\nnot-a-name\n${REF}\n`);
  const shortKey = await runCli(['sync', '--dir', dir, '--upstream', 'http://127.0.0.1:1', '--refs-file', refsFile]);
  assert.equal(shortKey.code, 2, shortKey.stderr);
  assert.match(shortKey.stderr, /invalid names:\n  'harness\/top.bst\/3f1c2a9b' has a short cache key '3f1c2a9b': give the full 64-character key, as bst show --deps all --format '%\{name\} %\{full-key\}' TARGET.bst prints it\n  'not-a-name' is not a name/);
  assert.doesNotMatch(shortKey.stderr, /127\.0\.0\.1:1/);
  // Certificate and key files are parsed when the upstream is set up: a wrong file is exit 2, naming it.
  for (const [flag, what] of [['--server-cert', 'server certificate file /etc/passwd is not a PEM certificate'], ['--client-key', 'client key file /etc/passwd is not a PEM private key']] as const) {
    const badPem = await runCli(['sync', '--dir', dir, '--upstream', 'https://127.0.0.1:1', flag, '/etc/passwd', '--ref', REF]);
    assert.equal(badPem.code, 2, badPem.stderr);
    assert.match(badPem.stderr, new RegExp(what));
  }
  // The environment refusing (sysfs refuses mkdir, even to root) is exit 3, with the system's own words.
  // (sync, not verify: verify never creates a store.)
  const refused = await runCli(['sync', '--dir', '/sys/bst-cache-mirror-test/store', '--upstream', 'http://127.0.0.1:1', '--ref', REF]);
  assert.equal(refused.code, 3, refused.stderr);
  assert.match(refused.stderr, /cannot create the data directory \/sys\/bst-cache-mirror-test\/store: EPERM: operation not permitted/);
  const badPair = await runCli(['sync', '--dir', dir, '--upstream', 'index=http://127.0.0.1:1', '--ref', REF]);
  assert.equal(badPair.code, 2);
  assert.match(badPair.stderr, /an index\/storage pair needs both index=URL and storage=URL/);

  const up = new FakeUpstream('remote-asset');
  await up.start();
  t.after(() => up.stop());
  const missing = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', REF]);
  assert.equal(missing.code, 1);
  assert.match(missing.stdout, /missing upstream 1/);
  assert.match(missing.stdout, /missing: proj\/el\/1+: no upstream has urn:fdc:buildstream.build:2020:artifact:proj\/el\/1+ or urn:fdc:buildstream.build:2020:v1:proj\/el\/1+/);
  // Nothing outside the data directory was touched, and no temp file was left.
  assert.deepEqual(await readdir(join(dir, 'tmp')), []);
});

test('README: the CLI reference is the real --help output', async () => {
  const readme = await readFile(join(REPO_ROOT, 'README.md'), 'utf8');
  for (const command of [[], ['serve'], ['sync'], ['push'], ['status'], ['verify']]) {
    const help = await runCli([...command, '--help']);
    assert.equal(help.code, 0);
    assert.ok(readme.includes(`\`\`\`\n${help.stdout.trimEnd()}\n\`\`\``), `README's CLI reference is out of date for '${command.join(' ') || '(top level)'} --help': regenerate it`);
  }
});
