import cliProgress from 'cli-progress';
import type { Logger } from 'pino';
import type { DiskContentStore } from '../cas/disk-store.js';
import { parseUserName } from '../cas/names.js';
import { ControlClient } from '../control/client.js';
import { MirrorError, errorMessage } from '../errors.js';
import { GrpcUpstream, type UpstreamSpec } from '../remote/upstream.js';
import { type ProjectSpec, projectNames } from '../sync/project-names.js';
import { readRefsFile } from '../sync/refs-file.js';
import { type SyncProgress, type SyncReport, syncNames } from '../sync/sync-job.js';
import { VERSION } from '../version.js';
import { openStoreOrDaemon } from './daemon-or-store.js';
import { formatBytes } from './format.js';
import { formatDuration, formatOutage } from './status-format.js';

const DEFAULT_CONCURRENCY = 8;

export interface SyncCommandArgs {
  readonly dir: string;
  readonly upstreams: readonly UpstreamSpec[];
  /** The --config file's upstreams: used when no --upstream is given and no daemon runs. */
  readonly configUpstreams: readonly UpstreamSpec[];
  readonly refs: readonly string[];
  readonly refsFiles: readonly string[];
  readonly projects: readonly ProjectSpec[];
  readonly withBuildtrees: boolean;
  /** Unset: 8 here, or the daemon's sync.concurrency. */
  readonly concurrency?: number | undefined;
  readonly json: boolean;
}

/**
 * `bst-cache-mirror sync`: through the daemon that owns the store when one runs (with no names
 * given, a run of its configured selection), else on the store directly. Returns the exit code
 * (0 all mirrored or present, 1 some failed or missing).
 */
export async function runSync(args: SyncCommandArgs, log: Logger, out: NodeJS.WriteStream = process.stdout): Promise<number> {
  const names = [...args.refs];
  for (const file of args.refsFiles) names.push(...(await readRefsFile(file)));
  if (args.refsFiles.length > 0 && names.length === 0 && args.projects.length === 0) {
    throw new MirrorError('CONFIG_INVALID', 'no names to sync: the refs file is empty');
  }
  // A malformed name or a short key is the user's to fix, before any WAN round trip.
  const invalid = names.flatMap((name) => {
    try {
      parseUserName(name);
      return [];
    } catch (err) {
      return [errorMessage(err)];
    }
  });
  if (invalid.length > 0) throw new MirrorError('CONFIG_INVALID', `invalid name${invalid.length > 1 ? 's' : ''}:\n  ${invalid.join('\n  ')}`);
  if (args.upstreams.length === 0 && args.configUpstreams.length === 0 && !(await ControlClient.connect(args.dir).then((c) => (c?.close(), c !== undefined)))) {
    throw new MirrorError('CONFIG_INVALID', `give --upstream URL: no daemon runs on ${args.dir} to take its upstreams from`);
  }
  const progress = new ProgressDisplay(process.stderr.isTTY && !args.json);
  let result: { report: SyncReport; notes: readonly string[] };
  // sync is the store's writer: temp files a crashed run left are removed (partial downloads are
  // kept and resumed).
  const target = await openStoreOrDaemon(args.dir, log, { removeStaleTemp: true });
  try {
    if ('daemon' in target) {
      result = await target.daemon.sync(
        {
          version: VERSION,
          names,
          projects: args.projects.map((p) => ({ path: p.path, targets: [...p.targets], bst: p.bst })),
          withBuildtrees: args.withBuildtrees,
          concurrency: args.concurrency,
          ...(args.upstreams.length > 0 && { upstreams: args.upstreams.map(toWireSpec) }),
        },
        (p) => progress.update(p),
      );
    } else {
      result = await syncHere(args, names, log, (p) => progress.update(p), target.store);
    }
  } finally {
    progress.stop();
    if ('daemon' in target) target.daemon.close();
    else await target.store.close();
  }
  for (const note of result.notes) process.stderr.write(`note: ${note}\n`);
  printSummary(result.report, args.json, out);
  return result.report.results.every((r) => r.status === 'mirrored' || r.status === 'present') ? 0 : 1;
}

/** Without a daemon: this process opens the store and is its writer for the run. */
async function syncHere(args: SyncCommandArgs, names: string[], log: Logger, onProgress: (p: SyncProgress) => void, store: DiskContentStore): Promise<{ report: SyncReport; notes: string[] }> {
  const specs = args.upstreams.length > 0 ? args.upstreams : args.configUpstreams;
  if (specs.length === 0) {
    throw new MirrorError('CONFIG_INVALID', `give --upstream URL: no daemon runs on ${args.dir} to take its upstreams from`);
  }
  const notes: string[] = [];
  for (const project of args.projects) {
    const found = await projectNames(project);
    names.push(...found.names);
    for (const s of found.skipped) notes.push(`project ${project.path}: skipped ${s.element}: ${s.reason}`);
  }
  if (names.length === 0) {
    throw new MirrorError('CONFIG_INVALID', 'no names to sync: give --ref NAME, --refs-file FILE or --project DIR --target ELEMENT.bst');
  }
  const upstreams = await Promise.all(specs.map((spec) => GrpcUpstream.create(spec)));
  try {
    const report = await syncNames({ store, upstreams, names, withBuildtrees: args.withBuildtrees, concurrency: args.concurrency ?? DEFAULT_CONCURRENCY, log, onProgress });
    return { report, notes };
  } finally {
    for (const u of upstreams) u.close();
  }
}

/** An UpstreamSpec as the control endpoint takes it (no undefined values in JSON). */
function toWireSpec(spec: UpstreamSpec): UpstreamSpec {
  return JSON.parse(JSON.stringify(spec)) as UpstreamSpec;
}

/**
 * The progress bar on a terminal: bytes against the total once every name's closure has been
 * walked (with an ETA), else against what has been found missing so far; it moves while a large
 * blob streams.
 */
class ProgressDisplay {
  private readonly bar: cliProgress.SingleBar | undefined;
  private readonly started = Date.now();
  private begun = false;

  constructor(enabled: boolean) {
    this.bar = enabled
      ? new cliProgress.SingleBar(
          { stream: process.stderr, format: 'sync [{bar}] {moved} of {total_bytes} | {names} names | {rate} | {eta_text}', hideCursor: true, fps: 5 },
          cliProgress.Presets.shades_classic,
        )
      : undefined;
  }

  update(p: SyncProgress): void {
    if (!this.bar) return;
    const moved = p.bytesTransferred + p.bytesStreaming;
    const known = p.namesWalked >= p.namesTotal;
    const total = Math.max(p.bytesQueued, moved, 1);
    const seconds = Math.max(0.001, (Date.now() - this.started) / 1000);
    const rate = moved / seconds;
    const eta = known && rate > 0 ? `ETA ${formatDuration(((total - moved) / rate) * 1000)}` : 'walking trees…';
    const payload = {
      moved: formatBytes(moved),
      total_bytes: `${known ? '' : '≥ '}${formatBytes(total)}`,
      names: `${p.namesDone}/${p.namesTotal}`,
      rate: `${formatBytes(rate)}/s`,
      eta_text: eta,
    };
    if (!this.begun) {
      this.bar.start(total, moved, payload);
      this.begun = true;
    } else {
      this.bar.setTotal(total);
      this.bar.update(moved, payload);
    }
  }

  stop(): void {
    if (this.begun) this.bar?.stop();
  }
}

function printSummary(report: SyncReport, json: boolean, out: NodeJS.WritableStream): void {
  if (json) {
    out.write(`${JSON.stringify(report, null, 2)}\n`);
    return;
  }
  const count = (s: string): number => report.results.filter((r) => r.status === s).length;
  const seconds = report.durationMs / 1000;
  out.write(
    `mirrored ${count('mirrored')}, already present ${count('present')}, missing upstream ${count('missing')}, failed ${count('failed')} (of ${report.results.length} names)\n` +
      `transferred ${report.blobsTransferred} blobs, ${formatBytes(report.bytesTransferred)} in ${seconds.toFixed(1)} s ` +
      // The rate is of what came over the wire: bytes resumed from partial downloads were already here.
      `(${formatBytes((report.bytesTransferred - report.bytesResumed) / Math.max(seconds, 0.001))}/s)` +
      (report.bytesResumed > 0 ? `, of which ${formatBytes(report.bytesResumed)} resumed from partial downloads of an interrupted sync` : '') +
      '\n',
  );
  // An outage is reported once, not once per name it failed.
  for (const o of report.outages) out.write(`${formatOutage(o)}\n`);
  for (const r of report.results) {
    if (r.status === 'missing' || r.status === 'failed') out.write(`${r.status}: ${r.input}: ${r.reason ?? ''}\n`);
  }
}
