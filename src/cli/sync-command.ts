import cliProgress from 'cli-progress';
import type { Logger } from 'pino';
import { DiskContentStore } from '../cas/disk-store.js';
import { GrpcUpstream, type UpstreamSpec } from '../remote/upstream.js';
import { type SyncReport, syncNames } from '../sync/sync-job.js';
import { parseUserName } from '../cas/names.js';
import { MirrorError, errorMessage } from '../errors.js';
import { formatBytes } from './format.js';
import { readRefsFile } from './refs-file.js';

export interface SyncCommandArgs {
  readonly dir: string;
  readonly upstreams: readonly UpstreamSpec[];
  readonly refs: readonly string[];
  readonly refsFiles: readonly string[];
  readonly withBuildtrees: boolean;
  readonly concurrency: number;
  readonly json: boolean;
}

/** `bst-cache-mirror sync`: returns the exit code (0 all mirrored, 1 some failed or missing). */
export async function runSync(args: SyncCommandArgs, log: Logger, out: NodeJS.WriteStream = process.stdout): Promise<number> {
  const names = [...args.refs];
  for (const file of args.refsFiles) names.push(...(await readRefsFile(file)));
  if (names.length === 0) throw new MirrorError('CONFIG_INVALID', 'no names to sync: give --ref NAME or --refs-file FILE (the refs file is empty)');
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
  const upstreams = await Promise.all(args.upstreams.map((spec) => GrpcUpstream.create(spec)));
  // sync is the store's writer: temp files a crashed run left are removed (partial downloads are
  // kept and resumed).
  const store = await DiskContentStore.open(args.dir, log, { removeStaleTemp: true });
  const bar = process.stderr.isTTY && !args.json
    ? new cliProgress.SingleBar(
        { stream: process.stderr, format: 'sync [{bar}] {value}/{total} names | {blobs} blobs | {bytes} | {rate}', hideCursor: true },
        cliProgress.Presets.shades_classic,
      )
    : undefined;
  const started = Date.now();
  bar?.start(names.length, 0, { blobs: 0, bytes: '0 B', rate: '' });
  let report: SyncReport;
  try {
    report = await syncNames({
      store,
      upstreams,
      names,
      withBuildtrees: args.withBuildtrees,
      concurrency: args.concurrency,
      log,
      onProgress: (p) =>
        bar?.update(p.namesDone, {
          blobs: p.blobsTransferred,
          bytes: formatBytes(p.bytesTransferred),
          rate: `${formatBytes(p.bytesTransferred / Math.max(0.001, (Date.now() - started) / 1000))}/s`,
        }),
    });
  } finally {
    bar?.stop();
    for (const u of upstreams) u.close();
    await store.close();
  }
  printSummary(report, args.json, out);
  return report.results.every((r) => r.status === 'mirrored' || r.status === 'present') ? 0 : 1;
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
  for (const r of report.results) {
    if (r.status === 'missing' || r.status === 'failed') out.write(`${r.status}: ${r.input}: ${r.reason ?? ''}\n`);
  }
}
