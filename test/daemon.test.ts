import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, stat, writeFile } from 'node:fs/promises';
import { type Server, type Socket, createServer } from 'node:net';
import { join } from 'node:path';
import test from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { DiskContentStore } from '../src/cas/disk-store.js';
import { URN_PREFIX } from '../src/cas/names.js';
import { verifyStore } from '../src/cas/verify.js';
import { loadConfig, parseConfig } from '../src/config/load.js';
import type { RunRecord, StatusReport } from '../src/control/protocol.js';
import { Daemon } from '../src/daemon/daemon.js';
import type { MirrorError } from '../src/errors.js';
import { FetchClient, PushClient } from '../src/gen/build/bazel/remote/asset/v1/remote_asset.js';
import { ContentAddressableStorageClient, Digest as DigestMessage, Directory } from '../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import { type Digest, digestOf, toWire } from '../src/cas/digest.js';
import { silentLogger } from '../src/log.js';
import { FakeUpstream } from './helpers/fake-upstream.js';
import { CLI, REPO_ROOT, runCli, tempDir } from './helpers/mirror.js';

const KEY = 'a'.repeat(64);
const REF_A = `proj/a/${KEY}`;
const REF_B = `proj/b/${'b'.repeat(64)}`;

/** A 1.x upstream holding refs A and B, each a small tree. */
async function refsUpstream(t: test.TestContext): Promise<FakeUpstream> {
  const up = new FakeUpstream('reference-storage');
  up.refs.set(REF_A, up.addDirectory({ files: [{ name: 'a', digest: up.add('file of a\n') }] }));
  up.refs.set(REF_B, up.addDirectory({ files: [{ name: 'b', digest: up.add('file of b\n') }] }));
  await up.start();
  t.after(() => up.stop());
  return up;
}

function config(dir: string, yaml: string) {
  return parseConfig(`dir: ${dir}\nlisten: ["127.0.0.1:0"]\nlog-level: silent\n${yaml}`, join(dir, 'mirror.yaml'));
}

async function startDaemon(t: test.TestContext, dir: string, yaml: string, options: { syncAtStart?: boolean } = {}): Promise<Daemon> {
  const daemon = await Daemon.start(config(dir, yaml), { log: silentLogger(), ...options });
  t.after(() => daemon.stop());
  return daemon;
}

/** Resolves with the first run record (from now on) that `match` accepts. */
function nextRun(daemon: Daemon, match: (r: RunRecord) => boolean = () => true): Promise<RunRecord> {
  return new Promise((resolve) => daemon.onRunEnd((r) => match(r) && resolve(r)));
}

function fetchClient(t: test.TestContext, address: string): FetchClient {
  const client = new FetchClient(address, grpc.credentials.createInsecure());
  t.after(() => client.close());
  return client;
}

function fetchDirectory(client: FetchClient, uri: string): Promise<{ code: grpc.status; ms: number }> {
  const started = Date.now();
  return new Promise((resolve) => {
    client.fetchDirectory({ instanceName: '', uris: [uri], qualifiers: [], digestFunction: 0 }, new grpc.Metadata(), { deadline: Date.now() + 30_000 }, (err) =>
      resolve({ code: err ? err.code : grpc.status.OK, ms: Date.now() - started }),
    );
  });
}

test('daemon: sync, status and verify from the CLI go through the running daemon (no lock error)', async (t) => {
  const up = await refsUpstream(t);
  const dir = await tempDir(t);
  await startDaemon(t, dir, `upstreams:\n  - name: central\n    url: ${up.url}\n`);
  const sync = await runCli(['sync', '--dir', dir, '--ref', REF_A]);
  assert.equal(sync.code, 0, sync.stderr);
  assert.match(sync.stdout, /mirrored 1, already present 0, missing upstream 0, failed 0 \(of 1 names\)/);
  const again = await runCli(['sync', '--dir', dir, '--ref', REF_A, '--ref', `proj/c/${'c'.repeat(64)}`]);
  assert.equal(again.code, 1);
  assert.match(again.stdout, /already present 1, missing upstream 1/);
  // With no names, the CLI asks for a run of the configured selection (empty here).
  const configured = await runCli(['sync', '--dir', dir]);
  assert.equal(configured.code, 0, configured.stderr);

  const status = await runCli(['status', '--dir', dir, '--json']);
  assert.equal(status.code, 0, status.stderr);
  const report = JSON.parse(status.stdout) as StatusReport;
  assert.equal(report.daemon?.pid !== undefined, true);
  assert.equal(report.store.names, 1);
  assert.equal(report.runs.length, 3);
  assert.deepEqual(report.runs.map((r) => r.triggers.map((x) => x.kind).join()), ['cli', 'cli', 'cli']);
  assert.equal(report.upstreams[0]?.name, 'central');
  assert.equal(report.upstreams[0]?.state, 'online');
  const human = await runCli(['status', '--dir', dir]);
  assert.match(human.stdout, /daemon: running/);
  assert.match(human.stdout, /central: online/);

  const verify = await runCli(['verify', '--dir', dir]);
  assert.equal(verify.code, 0, verify.stderr);
  assert.match(verify.stdout, /store is consistent/);
  assert.doesNotMatch(`${sync.stderr}${status.stderr}${verify.stderr}`, /lock/i);
});

test('daemon: a cron schedule and a changed refs file each trigger a run; a burst of changes makes one run', async (t) => {
  const up = await refsUpstream(t);
  const dir = await tempDir(t);
  const refsDir = join(dir, 'refs.d');
  await mkdir(refsDir);
  await writeFile(join(refsDir, 'a.refs'), `${REF_A}\n`);
  const daemon = await startDaemon(t, dir, `upstreams:\n  - url: ${up.url}\nsync:\n  refs-files: [${refsDir}]\n  watch-debounce: 300ms\n`, { syncAtStart: false });
  // The refs file trigger (chokidar): adding B is seen and mirrored.
  const fromFile = nextRun(daemon, (r) => r.triggers.some((x) => x.kind === 'refs-file'));
  await writeFile(join(refsDir, 'a.refs'), `${REF_A}\n${REF_B}\n`);
  const run = await fromFile;
  assert.equal(run.outcome, 'ok');
  assert.deepEqual(run.names, { mirrored: 2, present: 0, missing: 0, failed: 0 });
  await daemon.onIdle();

  // Thirty files written at once (a `git pull`) make one run, not thirty.
  const runs: RunRecord[] = [];
  daemon.onRunEnd((r) => runs.push(r));
  const burst = nextRun(daemon);
  await Promise.all(Array.from({ length: 30 }, (_, i) => writeFile(join(refsDir, `more-${i}.refs`), `${REF_A}\n`)));
  await burst;
  await daemon.onIdle();
  assert.equal(runs.length, 1);
  assert.deepEqual(runs[0]?.names, { mirrored: 0, present: 2, missing: 0, failed: 0 });
});

test('daemon: the cron schedule triggers runs', async (t) => {
  const up = await refsUpstream(t);
  const dir = await tempDir(t);
  // Every second (cron's optional seconds field).
  const daemon = await startDaemon(t, dir, `upstreams:\n  - url: ${up.url}\nsync:\n  refs: [${REF_A}]\n  schedule: "* * * * * *"\n`, { syncAtStart: false });
  const scheduled = await nextRun(daemon, (r) => r.triggers.some((x) => x.kind === 'schedule'));
  assert.equal(scheduled.outcome, 'ok');
  const status = await daemon.status();
  assert.ok((status.daemon?.nextRunAt ?? 0) > Date.now() - 1000);
});

test('daemon: an upstream killed mid-sync fails the run cleanly, and the next run completes', async (t) => {
  const up = new FakeUpstream('remote-asset');
  const big = randomBytes(24 << 20);
  const bigDigest = up.add(big);
  const urn = `${URN_PREFIX}source:killed/${KEY}`;
  up.assets.set(urn, up.addDirectory({ files: [{ name: 'big', digest: bigDigest }, { name: 'small', digest: up.add('small\n') }] }));
  // Stall after 4 MiB so the kill lands mid-stream, then kill it.
  up.stallAfterBytes = 4 << 20;
  await up.start();
  const port = up.port;
  t.after(() => up.stop());
  const dir = await tempDir(t);
  const daemon = await startDaemon(t, dir, `upstreams:\n  - url: ${up.url}\n    read-idle-timeout: 20s\nsync:\n  refs: [${urn}]\n`, { syncAtStart: false });
  const first = daemon.requestSync({ kind: 'cli' });
  // Killed as soon as the stream has stalled.
  while (up.stalledReads.size === 0) await new Promise((resolve) => setImmediate(resolve));
  up.kill();
  const failed = await first;
  assert.equal(failed.record.outcome, 'partial', JSON.stringify(failed.report?.results));
  assert.equal(failed.record.names.failed, 1);
  assert.equal(failed.record.outages.length, 1, `the outage is reported once: ${JSON.stringify(failed.report?.results)}`);
  const status = await daemon.status();
  assert.equal(status.store.names, 0, 'nothing half-indexed');

  up.stallAfterBytes = undefined;
  await up.start(port);
  const second = await daemon.requestSync({ kind: 'cli' });
  assert.equal(second.record.outcome, 'ok');
  assert.equal(second.record.names.mirrored, 1);
  await daemon.stop();
  const store = await DiskContentStore.open(dir, silentLogger(), { create: false });
  try {
    const v = await verifyStore(store, { repair: false, prune: false, log: silentLogger() });
    assert.equal(v.badBlobs.length + v.brokenNames.length + v.badUnindexed.length, 0);
    assert.equal(v.unindexed.count, 0);
  } finally {
    await store.close();
  }
});

/** A TCP listener that accepts connections and never sends a byte. */
async function silentListener(t: test.TestContext): Promise<{ url: string; connections: () => number }> {
  const sockets = new Set<Socket>();
  let accepted = 0;
  const server: Server = createServer((socket) => {
    accepted += 1;
    sockets.add(socket);
    socket.on('error', () => undefined);
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await new Promise((resolve) => server.close(resolve));
  });
  const address = server.address();
  assert.ok(address && typeof address === 'object');
  return { url: `http://127.0.0.1:${address.port}`, connections: () => accepted };
}

test('daemon: an upstream that accepts TCP and never answers ends the run at its deadline, is marked offline, and then costs clients nothing, also after a restart', async (t) => {
  const silent = await silentListener(t);
  const dir = await tempDir(t);
  const yaml = `upstreams:\n  - name: dead\n    url: ${silent.url}\n    rpc-timeout: 1s\nsync:\n  refs: [${REF_A}]\n  miss-wait: 20s\nhealth:\n  failures-to-offline: 1\n  probe-interval: 1h\n  probe-max-interval: 2h\n`;
  const daemon = await startDaemon(t, dir, yaml, { syncAtStart: false });
  const run = await daemon.requestSync({ kind: 'cli' });
  assert.equal(run.record.outcome, 'partial');
  assert.equal(run.record.outages.length, 1);
  assert.match(run.record.outages[0]?.reason ?? '', /DEADLINE_EXCEEDED|offline/);
  // The run ended within its deadlines (1 s per call), not a TCP timeout.
  assert.ok(run.record.endedAt - run.record.startedAt < 15_000, `run took ${run.record.endedAt - run.record.startedAt} ms`);
  let status = await daemon.status();
  assert.equal(status.upstreams[0]?.state, 'offline');

  // A miss now answers NOT_FOUND at once: no fetch waits on the dead upstream.
  const client = fetchClient(t, daemon.addresses[0] ?? '');
  const miss = await fetchDirectory(client, `${URN_PREFIX}source:dead/${KEY}`);
  assert.equal(miss.code, grpc.status.NOT_FOUND);
  assert.ok(miss.ms < 900, `a miss took ${miss.ms} ms with the upstream offline`);
  // A sync reports the outage once; names it holds would be present.
  const again = await daemon.requestSync({ kind: 'cli' });
  assert.match(again.record.outages[0]?.reason ?? '', /dead is offline since/);
  assert.ok(again.record.endedAt - again.record.startedAt < 900);
  await daemon.stop();

  const restarted = await startDaemon(t, dir, yaml, { syncAtStart: false });
  status = await restarted.status();
  assert.equal(status.upstreams[0]?.state, 'offline', 'the offline state survives a restart');
  const client2 = fetchClient(t, restarted.addresses[0] ?? '');
  const miss2 = await fetchDirectory(client2, `${URN_PREFIX}source:dead/${'d'.repeat(64)}`);
  assert.equal(miss2.code, grpc.status.NOT_FOUND);
  assert.ok(miss2.ms < 900, `a miss took ${miss2.ms} ms after the restart`);
});

test('daemon: pull-through: N concurrent misses make one upstream fetch; names missing upstream are remembered until the next sync', async (t) => {
  const up = new FakeUpstream('remote-asset');
  const urn = `${URN_PREFIX}source:pulled/${KEY}`;
  up.assets.set(urn, up.addDirectory({ files: [{ name: 'f', digest: up.add('pulled through\n') }] }));
  await up.start();
  t.after(() => up.stop());
  const dir = await tempDir(t);
  const daemon = await startDaemon(t, dir, `upstreams:\n  - url: ${up.url}\nsync:\n  on-miss: fetch\n  miss-wait: 20s\n`, { syncAtStart: false });
  const client = fetchClient(t, daemon.addresses[0] ?? '');
  const answers = await Promise.all(Array.from({ length: 12 }, () => fetchDirectory(client, urn)));
  assert.deepEqual(answers.map((a) => a.code), Array(12).fill(grpc.status.OK));
  assert.equal(up.askedUris.filter((u) => u === urn).length, 1, 'one upstream fetch for twelve clients');

  const absent = `${URN_PREFIX}source:absent/${KEY}`;
  assert.equal((await fetchDirectory(client, absent)).code, grpc.status.NOT_FOUND);
  assert.equal((await fetchDirectory(client, absent)).code, grpc.status.NOT_FOUND);
  assert.equal(up.askedUris.filter((u) => u === absent).length, 1, 'the second miss is answered from the negative cache');
  const status = await daemon.status();
  assert.equal(status.misses.recent.find((m) => m.urn === absent)?.lastOutcome, 'missing');
  // A completed run of the selection (which includes the recorded miss) clears the negative cache.
  const run = await daemon.requestSync({ kind: 'cli' });
  assert.equal(run.record.names.missing, 1);
  const second = await daemon.requestSync({ kind: 'cli' });
  assert.equal(second.record.names.missing, 0, 'missing upstream and not asked for since: it joins no further run');
  assert.equal((await fetchDirectory(client, absent)).code, grpc.status.NOT_FOUND);
  assert.equal(up.askedUris.filter((u) => u === absent).length, 3);
});

test('daemon: on-miss record only records; the next run fetches the recorded names', async (t) => {
  const up = new FakeUpstream('remote-asset');
  const urn = `${URN_PREFIX}source:later/${KEY}`;
  up.assets.set(urn, up.addDirectory({ files: [{ name: 'f', digest: up.add('recorded, fetched later\n') }] }));
  await up.start();
  t.after(() => up.stop());
  const dir = await tempDir(t);
  const daemon = await startDaemon(t, dir, `upstreams:\n  - url: ${up.url}\nsync:\n  on-miss: record\n`, { syncAtStart: false });
  const client = fetchClient(t, daemon.addresses[0] ?? '');
  assert.equal((await fetchDirectory(client, urn)).code, grpc.status.NOT_FOUND);
  assert.equal(up.askedUris.length, 0);
  const run = await daemon.requestSync({ kind: 'cli' });
  assert.equal(run.record.names.mirrored, 1);
  assert.equal((await fetchDirectory(client, urn)).code, grpc.status.OK);
  assert.equal((await daemon.status()).misses.total, 0);
});

test('daemon: an invalid config edit is reported and the running config kept; a valid one is applied without dropping clients', async (t) => {
  const up = await refsUpstream(t);
  const dir = await tempDir(t);
  const file = join(dir, 'mirror.yaml');
  const base = `dir: ${dir}\nlisten: ["127.0.0.1:0"]\nlog-level: silent\nupstreams:\n  - url: ${up.url}\nsync:\n  refs: [${REF_A}]\n`;
  await writeFile(file, base);
  const daemon = await Daemon.start(await loadConfig(file), { configFile: file, log: silentLogger(), syncAtStart: false });
  t.after(() => daemon.stop());
  const client = fetchClient(t, daemon.addresses[0] ?? '');
  assert.equal((await fetchDirectory(client, `${URN_PREFIX}source:x/${KEY}`)).code, grpc.status.NOT_FOUND);

  await writeFile(file, `${base}  schedule: "not cron"\n`);
  await daemon.reload();
  const bad = await daemon.status();
  assert.match(bad.daemon?.configError?.message ?? '', /sync\.schedule/);
  assert.equal(bad.daemon?.schedule, undefined);
  // A file truncated half way through an editor's write is not "every default".
  await writeFile(file, '');
  await daemon.reload();
  assert.match((await daemon.status()).daemon?.configError?.message ?? '', /the file is empty/);

  // The valid edit is picked up by the file watcher (no explicit reload).
  const applied = nextRun(daemon, (r) => r.triggers.some((x) => x.kind === 'config'));
  await writeFile(file, base.replace(`refs: [${REF_A}]`, `refs: [${REF_A}, ${REF_B}]`));
  const run = await applied;
  assert.equal(run.names.mirrored, 2);
  assert.equal((await daemon.status()).daemon?.configError, undefined);
  // The same client connection still works.
  assert.equal((await fetchDirectory(client, `${URN_PREFIX}source:x/${KEY}`)).code, grpc.status.NOT_FOUND);
  assert.deepEqual(await readdir(dir).then((f) => f.includes('control.sock')), true);
});

/** `bst-cache-mirror serve --config FILE` as a child process; resolves once it prints its address. */
function serveWithConfig(t: test.TestContext, file: string): Promise<{ child: ChildProcess; address: string; exited: Promise<number | null> }> {
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, 'serve', '--config', file], { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  });
  let out = '';
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  return new Promise((resolve, reject) => {
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      const m = / on (\S+)\n/.exec(out);
      if (m?.[1]) resolve({ child, address: m[1], exited });
    });
    void exited.then((code) => reject(new Error(`serve exited with ${code}: ${err}`)));
  });
}

test('daemon: serve --config from the CLI; after kill -9 the stale control socket is detected, and a restart replaces it', async (t) => {
  const up = await refsUpstream(t);
  const dir = await tempDir(t);
  const file = join(dir, 'mirror.yaml');
  await writeFile(file, `dir: ${dir}\nlisten: ["127.0.0.1:0"]\nlog-level: warn\nupstreams:\n  - name: central\n    url: ${up.url}\nsync:\n  refs: [${REF_A}]\n`);
  // Without a daemon, --config gives sync the store and the upstreams of the file.
  const alone = await runCli(['sync', '--config', file, '--ref', REF_A]);
  assert.equal(alone.code, 0, alone.stderr);
  const first = await serveWithConfig(t, file);
  const synced = await runCli(['sync', '--dir', dir]);
  assert.equal(synced.code, 0, synced.stderr);
  // --config finds the daemon through the file's dir.
  const running = await runCli(['status', '--config', file]);
  assert.match(running.stdout, /daemon: running/);
  first.child.kill('SIGKILL');
  await first.exited;
  // The socket file is still there, but nobody answers: status reads the store itself.
  const stale = await runCli(['status', '--dir', dir]);
  assert.equal(stale.code, 0, stale.stderr);
  assert.match(stale.stdout, /daemon: not running/);
  assert.match(stale.stdout, /central: online/);
  assert.match(stale.stdout, /cli|startup/);
  const second = await serveWithConfig(t, file);
  const again = await runCli(['status', '--dir', dir, '--json']);
  assert.equal((JSON.parse(again.stdout) as StatusReport).store.names, 1);
  second.child.kill('SIGTERM');
  assert.equal(await second.exited, 0);
});

test('daemon: a data directory too long for its control socket is refused at start, and nothing is left listening', async (t) => {
  const dir = join(await tempDir(t), 'x'.repeat(100));
  await assert.rejects(
    Daemon.start(config(dir, ''), { log: silentLogger(), syncAtStart: false }),
    (err: MirrorError) => err.code === 'CONFIG_INVALID' && /too long a path for its control socket \(\d+ bytes; at most 107\)/.test(err.message),
  );
  // The store was closed on the way out: a second start gets the same answer, not a lock error.
  await assert.rejects(Daemon.start(config(dir, ''), { log: silentLogger(), syncAtStart: false }), /too long a path/);
});

test('daemon: sync --ref through a daemon without upstreams is a usage error, as without a daemon', async (t) => {
  const dir = await tempDir(t);
  await startDaemon(t, dir, '', { syncAtStart: false });
  const result = await runCli(['sync', '--dir', dir, '--ref', REF_A]);
  assert.equal(result.code, 2, result.stderr);
  assert.match(result.stderr, /give --upstream URL: the daemon on .* has no upstreams configured/);
});

test('daemon: serve --config refuses a bad file with exit 2, naming the key', async (t) => {
  const dir = await tempDir(t);
  const file = join(dir, 'mirror.yaml');
  await writeFile(file, `dir: ${dir}\nupstreams:\n  - url: http://127.0.0.1:1\n    colour: blue\nsync:\n  on-miss: maybe\n`);
  const result = await runCli(['serve', '--config', file]);
  assert.equal(result.code, 2);
  assert.match(result.stderr, /upstreams\[0\]: unknown key 'colour'/);
  assert.match(result.stderr, /sync\.on-miss/);
});

test('daemon: with every upstream down, a run reports the names the mirror holds as present and the outage once', async (t) => {
  const up = await refsUpstream(t);
  const dir = await tempDir(t);
  const daemon = await startDaemon(t, dir, `upstreams:\n  - url: ${up.url}\n    rpc-timeout: 2s\nsync:\n  refs: [${REF_A}, ${REF_B}]\n`, { syncAtStart: false });
  assert.equal((await daemon.requestSync({ kind: 'cli' })).record.names.mirrored, 2);
  up.kill();
  const down = await daemon.requestSync({ kind: 'cli' });
  assert.deepEqual(down.record.names, { mirrored: 0, present: 2, missing: 0, failed: 0 });
  assert.equal(down.record.outages.length, 1);
  assert.equal(down.record.outcome, 'ok');
  assert.match(down.report?.results[0]?.reason ?? '', /no upstream reachable/);
  // And it still serves them.
  const client = fetchClient(t, daemon.addresses[0] ?? '');
  const held = await new Promise<grpc.status>((resolve) =>
    client.fetchDirectory({ instanceName: '', uris: [`${URN_PREFIX}v1:${REF_A}`], qualifiers: [], digestFunction: 0 }, (err) => resolve(err ? err.code : grpc.status.OK)),
  );
  assert.equal(held, grpc.status.OK);
});

test('daemon: a name pushed to the push listener is queued before the push is acknowledged and replicated to the push upstream', async (t) => {
  const up = new FakeUpstream('remote-asset');
  up.acceptWrites = true;
  await up.start();
  t.after(() => up.stop());
  const dir = await tempDir(t);
  const tokenFile = join(dir, 'push.token');
  await writeFile(tokenFile, 'ci-token\n');
  const yaml = `dir: ${dir}\nlog-level: silent\nupstreams:\n  - name: central\n    url: ${up.url}\n    push: true\nlisten:\n  - 127.0.0.1:0\n  - address: 127.0.0.1:0\n    push: true\n    access-token: ${tokenFile}\n`;
  const daemon = await Daemon.start(parseConfig(yaml, join(dir, 'mirror.yaml')), { log: silentLogger(), syncAtStart: false });
  t.after(() => daemon.stop());
  const [, pushAddress] = daemon.addresses;
  assert.ok(pushAddress);
  const md = new grpc.Metadata();
  md.set('authorization', 'Bearer ci-token');
  const file = Buffer.from('built in the office\n');
  const root = Buffer.from(Directory.encode({ files: [{ name: 'f', digest: toWire(digestOf(file)), isExecutable: false }], directories: [], symlinks: [] }).finish());
  const cas = new ContentAddressableStorageClient(pushAddress, grpc.credentials.createInsecure());
  const push = new PushClient(pushAddress, grpc.credentials.createInsecure());
  t.after(() => {
    cas.close();
    push.close();
  });
  await new Promise<void>((resolve, reject) =>
    cas.batchUpdateBlobs({ instanceName: '', requests: [file, root].map((data) => ({ digest: toWire(digestOf(data)), data, compressor: 0 })), digestFunction: 0 }, md, (err) => (err ? reject(err) : resolve())),
  );
  const urn = `${URN_PREFIX}source:office/${KEY}`;
  await new Promise<void>((resolve, reject) =>
    push.pushDirectory({ instanceName: '', uris: [urn], qualifiers: [], rootDirectoryDigest: toWire(digestOf(root)), referencesBlobs: [], referencesDirectories: [], digestFunction: 0 }, md, (err) => (err ? reject(err) : resolve())),
  );
  await daemon.pushIdle();
  assert.equal(up.assets.get(urn)?.hash, digestOf(root).hash);
  assert.equal(up.writeLog.at(-1), `asset ${urn}`, 'the name is set last');
  const status = await daemon.status();
  assert.deepEqual({ depth: status.push.depth, failed: status.push.failed.length }, { depth: 0, failed: 0 });
  // The pull-only listener refuses the same write.
  const pullOnly = new PushClient(daemon.addresses[0] ?? '', grpc.credentials.createInsecure());
  t.after(() => pullOnly.close());
  const refused = await new Promise<grpc.status>((resolve) =>
    pullOnly.pushDirectory({ instanceName: '', uris: [urn], qualifiers: [], rootDirectoryDigest: toWire(digestOf(root)), referencesBlobs: [], referencesDirectories: [], digestFunction: 0 }, (err) => resolve(err ? err.code : grpc.status.OK)),
  );
  assert.equal(refused, grpc.status.PERMISSION_DENIED);
});

/** A BuildStream 1.6-layout local cache holding one ref to a one-file tree, written by hand. */
async function bst1Cache(dir: string, ref: string): Promise<{ root: Digest }> {
  const file = Buffer.from(`built locally for ${ref}\n`);
  const root = Buffer.from(Directory.encode({ files: [{ name: 'f', digest: toWire(digestOf(file)), isExecutable: false }], directories: [], symlinks: [] }).finish());
  for (const data of [file, root]) {
    const { hash } = digestOf(data);
    await mkdir(join(dir, 'artifacts/cas/objects', hash.slice(0, 2)), { recursive: true });
    await writeFile(join(dir, 'artifacts/cas/objects', hash.slice(0, 2), hash.slice(2)), data);
  }
  const refPath = join(dir, 'artifacts/cas/refs/heads', ref);
  await mkdir(join(refPath, '..'), { recursive: true });
  await writeFile(refPath, Buffer.from(DigestMessage.encode(toWire(digestOf(root))).finish()));
  return { root: digestOf(root) };
}

test('push --from CACHE_DIR: through the daemon (jobs queued there), or with --config when none runs (pushed now); --retry-failed', async (t) => {
  const up = new FakeUpstream('reference-storage');
  up.acceptWrites = true;
  await up.start();
  t.after(() => up.stop());
  const dir = await tempDir(t);
  const cache = join(dir, 'bst-cache');
  const refA = `proj/a/${KEY}`;
  const refB = `proj/b/${'b'.repeat(64)}`;
  const { root } = await bst1Cache(cache, refA);
  const file = join(dir, 'mirror.yaml');
  await writeFile(file, `dir: ${join(dir, 'store')}\nlisten: ["127.0.0.1:0"]\nlog-level: silent\nupstreams:\n  - name: central\n    url: ${up.url}\n    push: true\n`);
  // No daemon: --config pushes to its push: true upstreams now.
  // No --dir: the config's dir is the store (never the default data directory).
  const now = await runCli(['push', '--from', cache, '--config', file], { HOME: join(dir, 'home'), BST_CACHE_MIRROR_DIR: '', XDG_DATA_HOME: '' });
  assert.equal(now.code, 0, now.stderr);
  assert.equal(await stat(join(dir, 'home')).then(() => true, () => false), false);
  assert.match(now.stdout, /imported 1, already in the mirror 0, incomplete 0, failed 0 \(of 1 names\)/);
  assert.match(now.stdout, /pushed: every job done/);
  assert.equal(up.refs.get(refA)?.hash, root.hash);
  const noConfig = await runCli(['push', '--dir', join(dir, 'store'), '--from', cache]);
  assert.equal(noConfig.code, 2);
  assert.match(noConfig.stderr, /no daemon runs on .*give --config FILE/);

  // Through a running daemon: the name is queued there and replicated.
  const daemon = await Daemon.start(await loadConfig(file), { log: silentLogger(), syncAtStart: false });
  t.after(() => daemon.stop());
  const rootB = (await bst1Cache(cache, refB)).root;
  const via = await runCli(['push', '--dir', join(dir, 'store'), '--from', cache, '--ref', refB]);
  assert.equal(via.code, 0, via.stderr);
  assert.match(via.stdout, /imported 1, already in the mirror 0/);
  assert.match(via.stdout, /queued 1 names for the upstreams with push: true/);
  await daemon.pushIdle();
  assert.equal(up.refs.get(refB)?.hash, rootB.hash);
  const retry = await runCli(['push', '--dir', join(dir, 'store'), '--retry-failed']);
  assert.equal(retry.code, 0, retry.stderr);
});
