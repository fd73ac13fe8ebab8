/**
 * Upstreams that misbehave without failing: a ByteStream read that sends part of a blob and then
 * nothing, on a healthy connection. The sync must end with the reason, in bounded time.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { readdir } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { createServer as createTlsServer } from 'node:tls';
import { test } from 'node:test';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { runCli, tempDir } from './helpers/mirror.js';
import { makeCertificate } from './helpers/tls.js';

const REF = `proj/stalled/${'d'.repeat(64)}`;

test('a ByteStream read that stalls upstream ends the sync with its reason after the idle timeout, and leaves no temp file', { timeout: 120_000 }, async (t) => {
  const up = new FakeUpstream('reference-storage');
  const big = Buffer.alloc(3 << 20, 7);
  up.refs.set(REF, up.addDirectory({ files: [{ name: 'big', digest: up.add(big) }, { name: 'small', digest: up.add('small\n') }] }));
  up.stallAfterBytes = 1 << 20;
  await up.start();
  t.after(() => up.stop());
  const dir = await tempDir(t);

  const sync = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', REF, '--read-idle-timeout', '0.5']);
  assert.equal(sync.code, 1, sync.stdout + sync.stderr);
  assert.match(sync.stdout, /failed 1 \(of 1 names\)/);
  assert.match(sync.stdout, new RegExp(`failed: ${REF}: ${up.url}: ByteStream.Read of [0-9a-f]{64}/${big.byteLength} stalled: no data for 0.5 s`));
  // The client gave up on the stalled call rather than leaving it open (the test times out otherwise).
  await Promise.all([...up.stalledReads].map((call) => (call.cancelled ? undefined : once(call, 'cancelled'))));
  // No temp file left behind; the 1 MiB received is kept as a partial download, resumed next time.
  assert.deepEqual(await readdir(join(dir, 'tmp')), [`partial-${createHash('sha256').update(big).digest('hex')}-${big.byteLength}`]);

  // The upstream recovers: the next sync completes.
  up.stallAfterBytes = undefined;
  const again = await runCli(['sync', '--dir', dir, '--upstream', up.url, '--ref', REF]);
  assert.equal(again.code, 0, again.stdout + again.stderr);
  assert.match(again.stdout, /mirrored 1/);
  assert.deepEqual(up.readOffsets, [0, 1 << 20]);
  assert.deepEqual(await readdir(join(dir, 'tmp')), []);
});

test('an http:// upstream that speaks TLS is reported as such, not as a failed connection', { timeout: 60_000 }, async (t) => {
  const dir = await tempDir(t);
  const { cert, key } = await makeCertificate(dir);
  const server = createTlsServer({ cert, key, ALPNProtocols: ['h2'] }, (socket) => socket.end());
  server.on('tlsClientError', () => undefined);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const { port } = server.address() as AddressInfo;

  const sync = await runCli(['sync', '--dir', join(dir, 'mirror'), '--upstream', `http://127.0.0.1:${port}`, '--ref', REF]);
  assert.equal(sync.code, 1, sync.stdout + sync.stderr);
  assert.match(sync.stdout, new RegExp(`failed: ${REF}: http://127.0.0.1:${port} speaks TLS: use https://127.0.0.1:${port} \\(with --server-cert`));
});

test('an upstream tree naming a huge blob as a Directory fails the name without fetching the blob', { timeout: 60_000 }, async (t) => {
  const up = new FakeUpstream('reference-storage');
  const huge = up.add(Buffer.alloc((16 << 20) + 1, 3));
  up.refs.set(REF, up.addDirectory({ dirs: [{ name: 'not-a-dir', digest: huge }] }));
  await up.start();
  t.after(() => up.stop());
  const sync = await runCli(['sync', '--dir', await tempDir(t), '--upstream', up.url, '--ref', REF]);
  assert.equal(sync.code, 1, sync.stdout + sync.stderr);
  assert.match(sync.stdout, /is 16777217 bytes, more than a Directory may be \(16777216\): it is not a Directory/);
  assert.equal(up.count('ByteStream.Read'), 0, 'the huge blob was never fetched');
});
