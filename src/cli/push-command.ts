import type { Logger } from 'pino';
import { DiskContentStore } from '../cas/disk-store.js';
import { loadConfig } from '../config/load.js';
import { ControlClient } from '../control/client.js';
import type { PushReport } from '../control/protocol.js';
import { daemonTables } from '../daemon/state.js';
import { MirrorError } from '../errors.js';
import { importAll } from '../push/local-cache.js';
import { PushQueue, type PushQueueStats } from '../push/push-queue.js';
import { HealthCheckedUpstream, UpstreamHealth } from '../remote/health.js';
import { GrpcUpstream } from '../remote/upstream.js';
import { VERSION } from '../version.js';
import { formatDuration } from './status-format.js';

export interface PushCommandArgs {
  readonly dir: string;
  /** A BuildStream local cache to import from. */
  readonly from?: string | undefined;
  readonly refs: readonly string[];
  readonly retryFailed: boolean;
  /** Without a daemon: the config whose `push: true` upstreams to push to. */
  readonly config?: string | undefined;
  readonly json: boolean;
}

/**
 * `bst-cache-mirror push`: through the daemon when one runs (its push jobs do the rest);
 * otherwise, with --config, imports and pushes to that config's `push: true` upstreams here and
 * now, returning when every job has succeeded or failed. Exit code 1 when a name could not be
 * imported or a push job failed.
 */
export async function runPush(args: PushCommandArgs, log: Logger, out: NodeJS.WritableStream = process.stdout): Promise<number> {
  if (args.from === undefined && !args.retryFailed) throw new MirrorError('CONFIG_INVALID', 'give --from CACHE_DIR (a BuildStream local cache) or --retry-failed');
  const daemon = await ControlClient.connect(args.dir);
  if (daemon) {
    try {
      const report = await daemon.push({ version: VERSION, from: args.from, names: [...args.refs], retryFailed: args.retryFailed });
      print(report, undefined, args.json, out);
      return report.imported.every((r) => r.status === 'imported' || r.status === 'present') ? 0 : 1;
    } finally {
      daemon.close();
    }
  }
  if (args.config === undefined) {
    throw new MirrorError('CONFIG_INVALID', `no daemon runs on ${args.dir}: start it (serve --config FILE) and push through it, or give --config FILE to push to that config's push: true upstreams now`);
  }
  const config = await loadConfig(args.config, { dir: args.dir });
  const pushing = config.upstreams.filter((u) => u.push);
  if (pushing.length === 0) throw new MirrorError('CONFIG_INVALID', `${args.config} has no upstream with push: true`);
  const store = await DiskContentStore.open(config.dir, log);
  const tables = daemonTables(store);
  const targets = await Promise.all(
    pushing.map(async (u) => ({ name: u.name, upstream: new HealthCheckedUpstream(await GrpcUpstream.create(u.spec), await UpstreamHealth.load(u.name, { policy: config.health, table: tables.health, log })) })),
  );
  const queue = new PushQueue({ store, table: tables.pushJobs, targets: () => targets.map((t) => ({ name: t.name, writer: t.upstream, health: t.upstream.health })), log });
  try {
    await queue.start();
    const retried = args.retryFailed ? await queue.retryFailed() : 0;
    let imported: PushReport['imported'] = [];
    let queued = 0;
    if (args.from !== undefined) {
      const results = await importAll(args.from, store, log, args.refs.length > 0 ? args.refs : undefined);
      imported = results.map((r) => ({ urn: r.urn, status: r.result.status, reason: 'reason' in r.result ? r.result.reason : undefined }));
      for (const r of results) {
        if (r.result.status === 'imported' || r.result.status === 'present') {
          await queue.enqueue(r.urn);
          queued += 1;
        }
      }
    }
    await queue.onIdle();
    const stats = await queue.stats();
    print({ imported, queued, retried }, stats, args.json, out);
    const importedAll = imported.every((r) => r.status === 'imported' || r.status === 'present');
    return importedAll && stats.failed.length === 0 && stats.depth === 0 ? 0 : 1;
  } finally {
    await queue.stop();
    for (const t of targets) t.upstream.close();
    await store.close();
  }
}

function print(report: PushReport, stats: PushQueueStats | undefined, json: boolean, out: NodeJS.WritableStream): void {
  if (json) {
    out.write(`${JSON.stringify({ ...report, ...(stats && { jobs: stats }) }, null, 2)}\n`);
    return;
  }
  const count = (s: string): number => report.imported.filter((r) => r.status === s).length;
  if (report.imported.length > 0) {
    out.write(`imported ${count('imported')}, already in the mirror ${count('present')}, incomplete ${count('incomplete')}, failed ${count('failed')} (of ${report.imported.length} names)\n`);
  }
  for (const r of report.imported) if (r.status === 'incomplete' || r.status === 'failed') out.write(`${r.status}: ${r.urn}: ${r.reason ?? ''}\n`);
  if (report.retried > 0) out.write(`re-queued ${report.retried} failed push jobs\n`);
  if (stats === undefined) {
    out.write(`queued ${report.queued} names for the upstreams with push: true; the daemon pushes them (see status)\n`);
    return;
  }
  out.write(`pushed: ${stats.failed.length === 0 && stats.depth === 0 ? 'every job done' : `${stats.failed.length} jobs failed, ${stats.depth} still pending`}\n`);
  const now = Date.now();
  for (const f of stats.failed) out.write(`failed: ${f.urn} -> ${f.upstream} after ${f.attempts} attempts (${formatDuration(now - f.createdAt)} old): ${f.lastError ?? ''}\n`);
}
