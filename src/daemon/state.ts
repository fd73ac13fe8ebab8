import type { DiskContentStore } from '../cas/disk-store.js';
import type { StateTable } from '../cas/state-table.js';
import type { MissRecord, RunRecord, StatusReport } from '../control/protocol.js';
import type { HealthRecord } from '../remote/health.js';
import { type PushJobRecord, readPushStats } from '../push/push-queue.js';
import { VERSION } from '../version.js';

/** The daemon's tables in the store's LevelDB. */
export interface DaemonTables {
  readonly runs: StateTable<RunRecord>;
  readonly health: StateTable<HealthRecord>;
  readonly misses: StateTable<MissRecord>;
  readonly pushJobs: StateTable<PushJobRecord>;
}

export function daemonTables(store: DiskContentStore): DaemonTables {
  return {
    runs: store.stateTable<RunRecord>('runs'),
    health: store.stateTable<HealthRecord>('upstream-health'),
    misses: store.stateTable<MissRecord>('misses'),
    pushJobs: store.stateTable<PushJobRecord>('push-jobs'),
  };
}

const RECENT_RUNS = 10;
const RECENT_MISSES = 50;

/**
 * The parts of `status` the store itself holds (what a stopped daemon left): store size, the
 * recorded health of every upstream, the last runs and the recorded misses. `configured` lists
 * the upstreams of the running config, which are shown even before their first contact.
 */
export async function storedStatus(store: DiskContentStore, tables: DaemonTables, configured: readonly string[] = []): Promise<StatusReport> {
  const upstreams = new Map<string, { name: string; configured: boolean } & Partial<HealthRecord>>();
  for (const name of configured) upstreams.set(name, { name, configured: true, state: 'online', consecutiveFailures: 0 });
  for await (const [name, record] of tables.health.entries()) {
    upstreams.set(name, { ...record, name, configured: configured.length === 0 || configured.includes(name) });
  }
  const runs: RunRecord[] = [];
  for await (const [, run] of tables.runs.entries({ reverse: true, limit: RECENT_RUNS })) runs.push(run);
  const misses: ({ urn: string } & MissRecord)[] = [];
  let total = 0;
  for await (const [urn, miss] of tables.misses.entries()) {
    total += 1;
    misses.push({ urn, ...miss });
  }
  misses.sort((a, b) => b.lastAt - a.lastAt);
  return {
    version: VERSION,
    store: { dir: store.dir, ...(await store.stats()) },
    upstreams: [...upstreams.values()],
    runs,
    misses: { total, recent: misses.slice(0, RECENT_MISSES) },
    push: await readPushStats(tables.pushJobs),
  };
}
