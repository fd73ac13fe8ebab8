import type { Logger } from 'pino';
import type { Config } from '../config/config.js';
import { daemonTables } from '../daemon/state.js';
import { MirrorError, isMirrorError } from '../errors.js';
import { PushQueue, type PushQueueStats } from '../push/push-queue.js';
import { type PushReport, runPushWork } from '../push/push-request.js';
import { HealthCheckedUpstream, UpstreamHealth } from '../remote/health.js';
import { GrpcUpstream } from '../remote/upstream.js';
import { VERSION } from '../version.js';
import { openStoreOrDaemon } from './daemon-or-store.js';
import { formatDuration } from './status-format.js';

export interface PushCommandArgs {
  readonly dir: string;
  /** A BuildStream local cache to import from. */
  readonly from?: string | undefined;
  readonly refs: readonly string[];
  readonly retryFailed: boolean;
  readonly dropFailed: boolean;
  /** Without a daemon: the config whose `push: true` upstreams to push to (`dir` is already its dir). */
  readonly config?: Config | undefined;
  /** The file `config` was read from, for messages. */
  readonly configFile?: string | undefined;
  readonly json: boolean;
}

/**
 * `bst-cache-mirror push`: through the daemon when one runs (its push jobs do the rest);
 * otherwise, with --config, imports and pushes to that config's `push: true` upstreams here and
 * now, returning when every job has succeeded or failed. Exit code 1 when a name could not be
 * imported or a push job failed.
 */
export async function runPush(args: PushCommandArgs, log: Logger, out: NodeJS.WritableStream = process.stdout): Promise<number> {
  if (args.from === undefined && !args.retryFailed && !args.dropFailed) throw new MirrorError('CONFIG_INVALID', 'give --from CACHE_DIR (a BuildStream local cache), --retry-failed or --drop-failed');
  if (args.retryFailed && args.dropFailed) throw new MirrorError('CONFIG_INVALID', 'give --retry-failed or --drop-failed, not both');
  const noDaemon = (): MirrorError =>
    new MirrorError('CONFIG_INVALID', `no daemon runs on ${args.dir}: start it (serve --config FILE) and push through it, or give --config FILE to push to that config's push: true upstreams now`);
  const config = args.config;
  // Only giving failed jobs up: no upstream is needed, and the pending jobs are left for the daemon.
  const droppingOnly = args.from === undefined && !args.retryFailed;
  // Waits for a daemon that is starting, as sync and status do; without --config there is nothing to do here alone.
  const target = await openStoreOrDaemon(args.dir, log, { create: config !== undefined }).catch((err: unknown) => {
    // No daemon and no store: say what to do. Anything else (another user's socket) as it is.
    throw config === undefined && isMirrorError(err, 'CONFIG_INVALID') && /there is no bst-cache-mirror store/.test(err.message) ? noDaemon() : err;
  });
  if ('daemon' in target) {
    const { daemon } = target;
    try {
      const report = await daemon.push({ version: VERSION, from: args.from, names: [...args.refs], retryFailed: args.retryFailed, dropFailed: args.dropFailed });
      print(report, undefined, args.from, args.json, out);
      return report.imported.every((r) => r.status === 'imported' || r.status === 'present') ? 0 : 1;
    } finally {
      daemon.close();
    }
  }
  const { store } = target;
  if (config === undefined) {
    await store.close();
    throw noDaemon();
  }
  const pushing = config.upstreams.filter((u) => u.push);
  if (pushing.length === 0 && !droppingOnly) {
    await store.close();
    throw new MirrorError('CONFIG_INVALID', `${args.configFile ?? 'the config'} has no upstream with push: true`);
  }
  const tables = daemonTables(store);
  const targets = await Promise.all(
    pushing.map(async (u) => ({ name: u.name, upstream: new HealthCheckedUpstream(await GrpcUpstream.create(u.spec), await UpstreamHealth.load(u.name, { policy: config.health, table: tables.health, log })) })),
  ).catch(async (err: unknown) => {
    await store.close();
    throw err;
  });
  const queue = new PushQueue({ store, table: tables.pushJobs, targets: () => targets.map((t) => ({ name: t.name, writer: t.upstream, health: t.upstream.health })), log });
  try {
    if (!droppingOnly) await queue.start();
    const report = await runPushWork({ from: args.from, names: args.refs, retryFailed: args.retryFailed, dropFailed: args.dropFailed }, store, queue, log);
    await queue.onIdle();
    const stats = await queue.stats();
    print(report, droppingOnly ? undefined : stats, args.from, args.json, out);
    const importedAll = report.imported.every((r) => r.status === 'imported' || r.status === 'present');
    if (droppingOnly) return 0;
    return importedAll && stats.failed.length === 0 && stats.depth === 0 ? 0 : 1;
  } finally {
    await queue.stop();
    for (const t of targets) t.upstream.close();
    await store.close();
  }
}

function print(report: PushReport, stats: PushQueueStats | undefined, from: string | undefined, json: boolean, out: NodeJS.WritableStream): void {
  if (json) {
    out.write(`${JSON.stringify({ ...report, ...(stats && { jobs: stats }) }, null, 2)}\n`);
    return;
  }
  const count = (s: string): number => report.imported.filter((r) => r.status === s).length;
  if (report.imported.length > 0) {
    out.write(`imported ${count('imported')}, already in the mirror ${count('present')}, incomplete ${count('incomplete')}, failed ${count('failed')} (of ${report.imported.length} names)\n`);
  }
  for (const r of report.imported) if (r.status === 'incomplete' || r.status === 'failed') out.write(`${r.status}: ${r.urn}: ${r.reason ?? ''}\n`);
  if (from !== undefined && report.imported.length === 0) out.write(`no names in ${from}: the cache holds no artifact or source refs\n`);
  if (report.dropped > 0) out.write(`gave up ${report.dropped} failed push jobs\n`);
  if (report.retried > 0) out.write(`re-queued ${report.retried} failed push jobs\n`);
  if (stats === undefined) {
    if (report.queued > 0) out.write(`queued ${report.queued} names for the upstreams with push: true\n`);
    if (report.queued > 0 || report.retried > 0) out.write('the daemon pushes them: see status\n');
    return;
  }
  out.write(`pushed: ${stats.failed.length === 0 && stats.depth === 0 ? 'every job done' : `${stats.failed.length} jobs failed, ${stats.depth} still pending`}\n`);
  const now = Date.now();
  for (const f of stats.failed) out.write(`failed: ${f.urn} -> ${f.upstream} after ${f.attempts} attempts (${formatDuration(now - f.createdAt)} old): ${f.lastError ?? ''}\n`);
}
