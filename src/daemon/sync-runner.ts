import type { Logger } from 'pino';
import type { StateTable } from '../cas/state-table.js';
import { errorMessage } from '../errors.js';
import type { RunRecord, Trigger } from '../control/protocol.js';
import type { Upstream } from '../remote/upstream.js';
import { settlesWithin } from './within.js';
import type { NameStatus, SyncProgress, SyncReport } from '../sync/sync-job.js';

export type { RunRecord, Trigger, TriggerKind } from '../control/protocol.js';

/**
 * A run of the configured selection (coalescing: every trigger that arrives while one waits joins
 * it), or of names given once (`sync --ref` against the daemon; never merged), optionally through
 * upstreams of its own (`sync --upstream`).
 */
export type RunRequest =
  | { readonly kind: 'configured' }
  | {
      readonly kind: 'names';
      readonly names: readonly string[];
      readonly withBuildtrees?: boolean | undefined;
      readonly upstreams?: readonly Upstream[] | undefined;
      /** Transfers in flight (`sync --concurrency`); the config's when unset. */
      readonly concurrency?: number | undefined;
    };

/** The job a runner runs: resolves the selection and syncs it. */
export type SyncJob = (
  request: RunRequest,
  context: { readonly signal: AbortSignal; readonly onProgress: (p: SyncProgress) => void },
) => Promise<{ report: SyncReport; notes: string[] }>;

export interface RunResult {
  readonly record: RunRecord;
  readonly report?: SyncReport | undefined;
}

interface Pending {
  /** Not a run: a job that needs the store to itself (see exclusive()). */
  readonly exclusive?: () => Promise<void>;
  readonly request: RunRequest;
  readonly triggers: Trigger[];
  readonly listeners: ((p: SyncProgress) => void)[];
  readonly done: Promise<RunResult>;
  resolve(result: RunResult): void;
  /** A run of given names for one client: cancelled when that client goes away. */
  readonly cancel?: AbortSignal | undefined;
}

const KEEP_RUNS = 200;

/** The record of a run that failed as a whole (or never ran): no names, no bytes, its error. */
function failedRun(base: Pick<RunRecord, 'id' | 'triggers' | 'what' | 'startedAt' | 'endedAt'>, error: string): RunRecord {
  return { ...base, outcome: 'error', names: { mirrored: 0, present: 0, missing: 0, failed: 0 }, blobs: 0, bytes: 0, outages: [], error };
}

function perUpstream(report: SyncReport): NonNullable<RunRecord['upstreams']> {
  const by = new Map<string, { upstream: string; names: number; unreachable?: string }>();
  for (const r of report.results) {
    if (r.upstream === undefined || (r.status !== 'mirrored' && r.status !== 'present')) continue;
    const entry = by.get(r.upstream) ?? { upstream: r.upstream, names: 0 };
    entry.names += 1;
    by.set(r.upstream, entry);
  }
  for (const o of report.outages) by.set(o.upstream, { ...(by.get(o.upstream) ?? { upstream: o.upstream, names: 0 }), unreachable: o.reason });
  return [...by.values()];
}

/**
 * Runs sync jobs one at a time. A configured run requested while one is already waiting joins it
 * (a `git pull` touching a hundred files, the schedule and a refs file change make one follow-up
 * run, not many); a run of given names waits its turn. Every run is recorded in `runs`.
 */
export class SyncRunner {
  private readonly queue: Pending[] = [];
  private current: (Pending & { startedAt: number; progress?: SyncProgress }) | undefined;
  private readonly abort = new AbortController();
  private loop: Promise<void> | undefined;
  private sequence = 0;
  private readonly afterRun: ((result: RunResult, request: RunRequest) => void)[] = [];

  constructor(
    private readonly job: SyncJob,
    private readonly runs: StateTable<RunRecord>,
    private readonly log: Logger,
    private readonly now: () => number = Date.now,
  ) {}

  /** Queues a run (or joins the waiting configured run); resolves when it has ended. */
  request(trigger: Trigger, request: RunRequest = { kind: 'configured' }, onProgress?: (p: SyncProgress) => void, cancel?: AbortSignal): Promise<RunResult> {
    if (this.abort.signal.aborted) return Promise.reject(new Error('the daemon is shutting down'));
    const waiting = request.kind === 'configured' ? this.queue.find((p) => p.request.kind === 'configured') : undefined;
    if (waiting) {
      if (!waiting.triggers.some((t) => t.kind === trigger.kind && t.detail === trigger.detail)) waiting.triggers.push(trigger);
      if (onProgress) waiting.listeners.push(onProgress);
      this.log.debug({ trigger }, 'sync requested while one waits: joined it');
      return waiting.done;
    }
    let resolve!: (result: RunResult) => void;
    const done = new Promise<RunResult>((r) => (resolve = r));
    // Only a run of given names is one client's alone to cancel; a configured run others may have joined.
    this.queue.push({ request, triggers: [trigger], listeners: onProgress ? [onProgress] : [], done, resolve, cancel: request.kind === 'names' ? cancel : undefined });
    this.kick();
    return done;
  }

  private kick(): void {
    if (this.loop) return;
    this.loop = this.drain().finally(() => {
      this.loop = undefined;
      // A request that arrived after the loop's last look at the queue.
      if (this.queue.length > 0) this.kick();
    });
  }

  /**
   * Runs `fn` in the runner's turn, when no run is under way (verify, which must see a store no
   * sync writes to). Runs requested meanwhile wait for it.
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const result = new Promise<T>((resolve, reject) => {
      const done = new Promise<RunResult>(() => undefined);
      this.queue.push({
        request: { kind: 'names', names: [] },
        triggers: [],
        listeners: [],
        done,
        resolve: () => undefined,
        exclusive: () => fn().then(resolve, reject),
      });
    });
    this.kick();
    return result;
  }

  /** Calls `fn` after every run (the daemon clears its negative cache after a configured one). */
  onRunEnd(fn: (result: RunResult, request: RunRequest) => void): void {
    this.afterRun.push(fn);
  }

  /** The run under way, if any. */
  get running(): { readonly triggers: readonly Trigger[]; readonly startedAt: number; readonly progress?: SyncProgress | undefined } | undefined {
    const c = this.current;
    return c && { triggers: c.triggers, startedAt: c.startedAt, progress: c.progress };
  }

  get waiting(): number {
    return this.queue.length;
  }

  /** Resolves once no run is under way or waiting. */
  async onIdle(): Promise<void> {
    while (this.loop) await this.loop;
  }

  /** The latest runs, newest first. */
  async recent(limit: number): Promise<RunRecord[]> {
    const out: RunRecord[] = [];
    for await (const [, record] of this.runs.entries({ reverse: true, limit })) out.push(record);
    return out;
  }

  /**
   * Cancels the run under way (it stops at its next step; its transfers clean up) and refuses new
   * ones; waits for it up to `graceMs`. A call stuck on a silent upstream can outlast that: the
   * daemon then goes on stopping, and what the run leaves is what kill -9 would (partial
   * downloads kept, nothing half-indexed).
   */
  async stop(graceMs = 10_000): Promise<void> {
    this.abort.abort(new Error('the daemon is shutting down'));
    if (!(await settlesWithin(this.onIdle(), graceMs))) this.log.warn({ graceMs }, 'a sync run (or verify) was still under way at shutdown; stopping without it');
  }

  private async drain(): Promise<void> {
    for (let next = this.queue.shift(); next; next = this.queue.shift()) {
      if (next.exclusive) {
        await next.exclusive();
        continue;
      }
      const startedAt = this.now();
      if (next.cancel?.aborted) {
        // Its client went away while it waited: nothing ran, so nothing is recorded.
        const reason = next.cancel.reason instanceof Error ? next.cancel.reason.message : 'cancelled';
        next.resolve({ record: failedRun({ id: 'cancelled', triggers: next.triggers, what: next.request.kind, startedAt, endedAt: startedAt }, `cancelled: ${reason}`) });
        continue;
      }
      const current: Pending & { startedAt: number; progress?: SyncProgress } = Object.assign(next, { startedAt });
      this.current = current;
      const result = await this.runOne(current, startedAt);
      this.current = undefined;
      current.resolve(result);
      for (const fn of this.afterRun) {
        try {
          fn(result, current.request);
        } catch (err) {
          this.log.error({ err }, 'after-run hook failed');
        }
      }
    }
  }

  private async runOne(current: Pending & { progress?: SyncProgress }, startedAt: number): Promise<RunResult> {
    const id = `${String(startedAt).padStart(15, '0')}-${String((this.sequence += 1)).padStart(6, '0')}`;
    this.log.info({ run: id, triggers: current.triggers, what: current.request.kind }, 'sync run starting');
    let record: RunRecord;
    let report: SyncReport | undefined;
    const base = () => ({ id, triggers: current.triggers, what: current.request.kind, startedAt, endedAt: this.now() });
    try {
      const out = await this.job(current.request, {
        signal: current.cancel ? AbortSignal.any([this.abort.signal, current.cancel]) : this.abort.signal,
        onProgress: (p) => {
          current.progress = p;
          for (const l of current.listeners) l(p);
        },
      });
      report = out.report;
      const names: Record<NameStatus, number> = { mirrored: 0, present: 0, missing: 0, failed: 0 };
      for (const r of report.results) names[r.status] += 1;
      record = {
        ...base(),
        outcome: names.missing + names.failed === 0 ? 'ok' : 'partial',
        names,
        blobs: report.blobsTransferred,
        bytes: report.bytesTransferred,
        outages: report.outages,
        upstreams: perUpstream(report),
        notes: out.notes.length > 0 ? out.notes : undefined,
      };
    } catch (err) {
      record = failedRun(base(), errorMessage(err));
    }
    const level = record.outcome === 'ok' ? 'info' : 'warn';
    this.log[level]({ run: id, outcome: record.outcome, names: record.names, blobs: record.blobs, bytes: record.bytes, outages: record.outages, error: record.error }, 'sync run ended');
    try {
      await this.runs.put(id, record);
      await this.trim();
    } catch (err) {
      this.log.warn({ err }, 'could not record the sync run');
    }
    return { record, report };
  }

  /** Keeps the latest KEEP_RUNS records. */
  private async trim(): Promise<void> {
    const old: string[] = [];
    let seen = 0;
    for await (const [key] of this.runs.entries({ reverse: true })) {
      seen += 1;
      if (seen > KEEP_RUNS) old.push(key);
    }
    await this.runs.batch(old.map((key) => ({ type: 'del' as const, key })));
  }
}
