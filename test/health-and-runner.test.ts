import assert from 'node:assert/strict';
import test from 'node:test';
import type { StateTable } from '../src/cas/state-table.js';
import type { RunRecord } from '../src/control/protocol.js';
import { SyncRunner } from '../src/daemon/sync-runner.js';
import { MirrorError, isMirrorError } from '../src/errors.js';
import { type HealthRecord, UpstreamHealth } from '../src/remote/health.js';
import { silentLogger } from '../src/log.js';
import type { SyncReport } from '../src/sync/sync-job.js';

/** An in-memory StateTable (the real one is a LevelDB sublevel; daemon tests use that). */
class MemoryTable<V> implements StateTable<V> {
  readonly map = new Map<string, V>();
  async get(key: string) {
    return this.map.get(key);
  }
  async put(key: string, value: V) {
    this.map.set(key, value);
  }
  async del(key: string) {
    this.map.delete(key);
  }
  async batch(ops: readonly ({ type: 'put'; key: string; value: V } | { type: 'del'; key: string })[]) {
    for (const op of ops) if (op.type === 'put') this.map.set(op.key, op.value);
    else this.map.delete(op.key);
  }
  async *entries(options: { reverse?: boolean; limit?: number } = {}): AsyncIterable<[string, V]> {
    const keys = [...this.map.keys()].sort();
    if (options.reverse) keys.reverse();
    for (const key of keys.slice(0, options.limit ?? keys.length)) yield [key, this.map.get(key) as V];
  }
  async clear() {
    this.map.clear();
  }
}

const unreachable = () => new MirrorError('UPSTREAM_UNAVAILABLE', 'http://up: GetCapabilities failed (UNAVAILABLE: connect ECONNREFUSED)');

test('health: consecutive failures take an upstream offline; probes back off, and success brings it back', async () => {
  let now = 1_000_000;
  const table = new MemoryTable<HealthRecord>();
  const health = await UpstreamHealth.load('up', { policy: { failuresToOffline: 3, probeIntervalMs: 1000, probeMaxIntervalMs: 3000 }, table, log: silentLogger(), now: () => now });
  // Answers (a NOT_FOUND, a corrupt blob) are contact, not failures.
  health.failed(unreachable());
  health.failed(new MirrorError('BLOB_NOT_FOUND', 'no such blob'));
  health.failed(unreachable());
  health.failed(unreachable());
  assert.equal(health.state.state, 'online');
  health.failed(unreachable());
  assert.equal(health.state.state, 'offline');
  assert.equal(table.map.get('up')?.state, 'offline', 'recorded for the next start');
  assert.throws(() => health.admit(), (err) => isMirrorError(err, 'UPSTREAM_UNAVAILABLE') && /up is offline since .*next probe in 1 s/.test(err.message));
  // The refusal itself is not another failure.
  try {
    health.admit();
  } catch (err) {
    health.failed(err);
  }
  now += 1000;
  health.admit(); // the probe
  assert.throws(() => health.admit(), /offline/, 'one probe at a time');
  // Calls admitted before the outage was noticed end now: they are not failed probes.
  health.failed(unreachable(), { admittedOnline: true });
  health.failed(unreachable(), { admittedOnline: true });
  assert.equal(health.state.probeIntervalMs, 1000);
  health.failed(unreachable());
  assert.equal(health.state.probeIntervalMs, 2000);
  now += 2000;
  health.admit();
  health.failed(unreachable());
  assert.equal(health.state.probeIntervalMs, 3000, 'capped at probeMaxIntervalMs');
  now += 3000;
  health.admit();
  health.succeeded();
  assert.equal(health.state.state, 'online');
  health.admit();

  const restarted = await UpstreamHealth.load('up', { table, log: silentLogger(), now: () => now });
  assert.equal(restarted.state.state, 'online');
});

test('health: the offline state survives a restart', async () => {
  let now = 5_000;
  const table = new MemoryTable<HealthRecord>();
  const policy = { failuresToOffline: 1, probeIntervalMs: 60_000, probeMaxIntervalMs: 600_000 };
  const first = await UpstreamHealth.load('up', { policy, table, log: silentLogger(), now: () => now });
  first.failed(unreachable());
  const second = await UpstreamHealth.load('up', { policy, table, log: silentLogger(), now: () => now });
  assert.throws(() => second.admit(), /offline/);
  now += 60_000;
  second.admit();
});

function report(): SyncReport {
  return { results: [], blobsTransferred: 0, bytesTransferred: 0, bytesResumed: 0, durationMs: 0, outages: [] };
}

test('runner: one run at a time; triggers during a run coalesce into one follow-up; runs of given names are not merged', async () => {
  const started: string[] = [];
  let release: (() => void) | undefined;
  const runs = new MemoryTable<RunRecord>();
  const runner = new SyncRunner(async (request) => {
    started.push(request.kind === 'configured' ? 'configured' : `names:${request.names.join(',')}`);
    await new Promise<void>((resolve) => (release = resolve));
    return { report: report(), notes: [] };
  }, runs, silentLogger());
  const first = runner.request({ kind: 'schedule' });
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(started, ['configured']);
  const a = runner.request({ kind: 'refs-file', detail: 'x' });
  const b = runner.request({ kind: 'project', detail: 'y' });
  const c = runner.request({ kind: 'schedule' });
  const named = runner.request({ kind: 'cli' }, { kind: 'names', names: ['p/e/k'] });
  assert.equal(runner.waiting, 2, 'three triggers joined one waiting run; the named run waits on its own');
  release?.();
  await first;
  await new Promise((resolve) => setImmediate(resolve));
  release?.();
  const [ra, rb, rc] = await Promise.all([a, b, c]);
  assert.equal(ra.record.id, rb.record.id);
  assert.equal(rb.record.id, rc.record.id);
  assert.deepEqual(ra.record.triggers.map((t) => t.kind), ['refs-file', 'project', 'schedule']);
  await new Promise((resolve) => setImmediate(resolve));
  release?.();
  await named;
  await runner.onIdle();
  assert.deepEqual(started, ['configured', 'configured', 'names:p/e/k']);
  assert.equal(runs.map.size, 3);
});

test('runner: a run of given names stops when its client goes away; a configured run does not', async () => {
  const runs = new MemoryTable<RunRecord>();
  const seen: string[] = [];
  const runner = new SyncRunner(async (request, { signal }) => {
    // The job ends when its signal says so (as sync-job does between steps).
    await new Promise<void>((resolve) => signal.addEventListener('abort', () => resolve(), { once: true }));
    seen.push(`${request.kind}: ${signal.reason instanceof Error ? signal.reason.message : ''}`);
    return { report: report(), notes: [] };
  }, runs, silentLogger());
  const client = new AbortController();
  const named = runner.request({ kind: 'cli' }, { kind: 'names', names: ['p/e/k'] }, undefined, client.signal);
  await new Promise((resolve) => setImmediate(resolve));
  client.abort(new Error('the client that asked for it went away'));
  await named;
  assert.deepEqual(seen, ['names: the client that asked for it went away']);
  const other = new AbortController();
  const configured = runner.request({ kind: 'cli' }, { kind: 'configured' }, undefined, other.signal);
  await new Promise((resolve) => setImmediate(resolve));
  other.abort(new Error('gone'));
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(runner.running?.triggers[0]?.kind, 'cli', 'the configured run goes on');
  // A run of names whose client leaves while it waits never runs and is not recorded.
  const waiting = new AbortController();
  const queued = runner.request({ kind: 'cli' }, { kind: 'names', names: ['p/q/k'] }, undefined, waiting.signal);
  waiting.abort(new Error('the client that asked for it went away'));
  const recorded = runs.map.size;
  await runner.stop();
  await configured;
  const skipped = await queued;
  assert.equal(skipped.record.outcome, 'error');
  assert.match(skipped.record.error ?? '', /cancelled: the client that asked for it went away/);
  assert.equal(runs.map.size, recorded + 1, 'only the configured run was recorded');
  assert.deepEqual(seen, ['names: the client that asked for it went away', 'configured: the daemon is shutting down']);
});

test('runner: a failing job is recorded as an error and does not stop later runs; exclusive jobs wait their turn', async () => {
  const runs = new MemoryTable<RunRecord>();
  let fail = true;
  const order: string[] = [];
  const runner = new SyncRunner(async () => {
    order.push('run');
    if (fail) throw new MirrorError('CONFIG_INVALID', 'bst show failed');
    return { report: report(), notes: [] };
  }, runs, silentLogger());
  const failed = runner.request({ kind: 'startup' });
  const exclusive = runner.exclusive(async () => {
    order.push('verify');
    fail = false;
    return 42;
  });
  const next = runner.request({ kind: 'schedule' });
  assert.equal((await failed).record.outcome, 'error');
  assert.equal((await failed).record.error, 'bst show failed');
  assert.equal(await exclusive, 42);
  assert.equal((await next).record.outcome, 'ok');
  assert.deepEqual(order, ['run', 'verify', 'run']);
});
