import type { RunRecord, StatusReport } from '../control/protocol.js';
import { formatBytes } from './format.js';

/** A duration for people: `45 s`, `12 min`, `3 h 5 min`, `2 d 4 h`. */
export function formatDuration(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 90) return `${s} s`;
  const min = Math.round(s / 60);
  if (min < 90) return `${min} min`;
  const h = Math.floor(min / 60);
  if (h < 48) return `${h} h ${min % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

function when(at: number | undefined, now: number): string {
  if (at === undefined) return 'never';
  const ago = now - at;
  return ago >= 0 ? `${formatDuration(ago)} ago` : `in ${formatDuration(-ago)}`;
}

function runLine(run: RunRecord): string {
  const started = new Date(run.startedAt).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  const triggers = run.triggers.map((t) => t.kind).join('+') || '-';
  const n = run.names;
  const counts = `mirrored ${n.mirrored}, present ${n.present}, missing ${n.missing}, failed ${n.failed}; ${run.blobs} blobs, ${formatBytes(run.bytes)}`;
  return `  ${started}  ${triggers.padEnd(10)} ${formatDuration(run.endedAt - run.startedAt).padStart(8)}  ${run.outcome.padEnd(7)}  ${run.outcome === 'error' ? (run.error ?? '') : counts}`;
}

/** The human-readable `status`. */
export function formatStatus(status: StatusReport, now: number): string {
  const lines: string[] = [];
  const { store, daemon } = status;
  lines.push(`store ${store.dir}: ${store.blobs} blobs, ${formatBytes(store.bytes)}, ${store.names} names`);
  if (daemon) {
    lines.push(`daemon: running (pid ${daemon.pid}, up ${formatDuration(now - daemon.startedAt)}), serving on ${daemon.listen.join(', ')}${daemon.configFile ? `; config ${daemon.configFile}` : ''}`);
    if (daemon.configError) lines.push(`  config reload FAILED ${when(daemon.configError.at, now)} (running the previous config): ${daemon.configError.message}`);
    lines.push(`  schedule: ${daemon.schedule === undefined ? 'none' : `${daemon.schedule}, next run ${when(daemon.nextRunAt, now)}`}`);
    if (daemon.watching.length > 0) lines.push(`  watching: ${daemon.watching.join(', ')}`);
    const r = daemon.running;
    if (r) {
      const p = r.progress;
      const progress = p ? `: ${p.namesDone}/${p.namesTotal} names, ${formatBytes(p.bytesTransferred + p.bytesStreaming)} of ${formatBytes(p.bytesQueued)} found missing so far` : '';
      lines.push(`  sync: running for ${formatDuration(now - r.startedAt)} (${r.triggers.map((t) => t.kind).join('+')})${progress}; ${daemon.waitingRuns} waiting`);
    } else {
      lines.push(`  sync: idle${daemon.waitingRuns > 0 ? `, ${daemon.waitingRuns} waiting` : ''}`);
    }
    lines.push(`  on a miss: ${daemon.onMiss}${daemon.pullThroughInFlight > 0 ? ` (${daemon.pullThroughInFlight} fetches under way)` : ''}`);
  } else {
    lines.push('daemon: not running (read from the store)');
  }
  lines.push(status.upstreams.length === 0 ? 'upstreams: none recorded' : 'upstreams:');
  for (const u of status.upstreams) {
    const contact = `last contact ${when(u.lastSuccessAt, now)}`;
    const state =
      u.state === 'offline'
        ? `OFFLINE since ${when(u.offlineSince, now)} (${u.consecutiveFailures ?? 0} failures; ${u.nextProbeAt !== undefined && u.nextProbeAt <= now ? 'probed at the next call' : `next probe ${when(u.nextProbeAt, now)}`}); ${contact}; last error: ${u.lastError ?? '?'}`
        : `online, ${contact}${u.consecutiveFailures ? `; ${u.consecutiveFailures} recent failures, last: ${u.lastError ?? '?'}` : ''}`;
    lines.push(`  ${u.name}${u.configured ? '' : ' (not in the running config)'}: ${state}`);
  }
  lines.push(status.runs.length === 0 ? 'sync runs: none yet' : 'sync runs (latest first):');
  for (const run of status.runs) {
    lines.push(runLine(run));
    for (const o of run.outages) lines.push(`      ${formatOutage(o)}`);
    for (const note of run.notes ?? []) lines.push(`      note: ${note}`);
  }
  const { push } = status;
  lines.push(
    `push jobs: ${push.depth} waiting${push.oldestCreatedAt === undefined ? '' : ` (oldest queued ${when(push.oldestCreatedAt, now)})`}, ${push.failed.length} failed${push.failed.length > 0 ? ' (push --retry-failed queues them again)' : ''}`,
  );
  for (const f of push.failed.slice(0, 20)) lines.push(`  failed: ${f.urn} -> ${f.upstream}, ${f.attempts} attempts: ${f.lastError ?? '?'}`);
  lines.push(`recorded misses: ${status.misses.total}`);
  for (const m of status.misses.recent.slice(0, 10)) {
    lines.push(`  ${m.urn}: asked ${m.count} time${m.count === 1 ? '' : 's'}, last ${when(m.lastAt, now)}${m.lastOutcome ? `; ${m.lastOutcome}${m.reason ? `: ${m.reason}` : ''}` : ''}`);
  }
  return `${lines.join('\n')}\n`;
}

/** `unreachable: UPSTREAM: reason`, without the upstream named twice (upstream errors start with its URL). */
export function formatOutage(o: { readonly upstream: string; readonly reason: string }): string {
  const reason = o.reason.startsWith(`${o.upstream}: `) ? o.reason.slice(o.upstream.length + 2) : o.reason;
  return `unreachable: ${o.upstream}: ${reason}`;
}
