import PQueue from 'p-queue';
import pRetry from 'p-retry';
import type { Logger } from 'pino';
import type { ContentStore } from '../cas/content-store.js';
import type { StateTable } from '../cas/state-table.js';
import { MirrorError, describeError, isMirrorError } from '../errors.js';
import { type UpstreamHealth, isOfflineRefusal } from '../remote/health.js';
import { isRetryable } from '../remote/retryable.js';
import type { UpstreamWriter } from '../remote/upstream.js';
import { type PushOutcome, pushName } from './push-job.js';

/** One durable push job: replicate `urn` to `upstream`. Kept until it succeeds (then deleted) or fails for good. */
export interface PushJobRecord {
  readonly urn: string;
  /** The PushTarget's name. */
  readonly upstream: string;
  /** When the name was (last) queued for this upstream, ms since the epoch. */
  readonly createdAt: number;
  /** Attempts that failed (a wait for an offline upstream is none). */
  readonly attempts: number;
  /** `failed`: a final error, or retries used up; stays until retryFailed() or the name is pushed again. */
  readonly state: 'pending' | 'failed';
  readonly lastError?: string;
  readonly lastAttemptAt?: number;
  /**
   * false from a push listener's enqueue until its name is recorded: a job whose name never was
   * (kill -9 in between) is dropped, while the loss of a name once acknowledged fails visibly.
   */
  readonly nameRecorded?: boolean;
}

/** An upstream names are replicated to (configured with `push: true`). */
export interface PushTarget {
  /** Stable across restarts: the jobs recorded for it carry this name. */
  readonly name: string;
  readonly writer: UpstreamWriter;
  /** The breaker, to wait while offline (no retry storm) */
  readonly health?: UpstreamHealth | undefined;
  /** Holds the writer's connection open for one attempt (a config reload may retire it meanwhile); returns the release. */
  readonly lease?: (() => () => void) | undefined;
}

export interface PushRetryPolicy {
  /** Retries of a job after its first attempt, in one run of the daemon (default 10). */
  readonly retries?: number;
  /** The first backoff (default 1 s); doubled after each retry, times a random factor of 1–2. */
  readonly minTimeoutMs?: number;
  /** The longest backoff (default 5 min). */
  readonly maxTimeoutMs?: number;
}

export interface PushQueueOptions {
  readonly store: ContentStore;
  /** Where jobs are recorded: a table in the store's LevelDB (e.g. `store.stateTable('push-jobs')`). */
  readonly table: StateTable<PushJobRecord>;
  /** The upstreams to push to, asked on every enqueue and attempt (so a config reload takes effect). */
  readonly targets: () => readonly PushTarget[];
  readonly log: Logger;
  /** Jobs running at once for each target (default 2). */
  readonly concurrency?: number;
  readonly retry?: PushRetryPolicy;
  readonly now?: () => number;
}

export interface PushQueueStats {
  /** Pending jobs (queued, running, or waiting for an upstream). */
  readonly depth: number;
  readonly oldestCreatedAt?: number;
  readonly failed: PushJobRecord[];
}

const DEFAULT_CONCURRENCY = 2;
const DEFAULT_RETRY = { retries: 10, minTimeoutMs: 1000, maxTimeoutMs: 5 * 60_000 } as const;
/** How long stop() waits for uploads under way. */
const DEFAULT_STOP_GRACE_MS = 10_000;

/** Queue depth, the oldest pending job and the failed jobs, as the table holds them (a running or a stopped daemon's). */
export async function readPushStats(table: StateTable<PushJobRecord>): Promise<PushQueueStats> {
  let depth = 0;
  let oldestCreatedAt: number | undefined;
  const failed: PushJobRecord[] = [];
  for await (const [, record] of table.entries()) {
    if (record.state === 'failed') {
      failed.push(record);
      continue;
    }
    depth += 1;
    if (oldestCreatedAt === undefined || record.createdAt < oldestCreatedAt) oldestCreatedAt = record.createdAt;
  }
  return oldestCreatedAt === undefined ? { depth, failed } : { depth, oldestCreatedAt, failed };
}

/** The table key of the job pushing `urn` to `upstream` (neither holds a newline). */
export function pushJobKey(upstream: string, urn: string): string {
  return `${upstream}\n${urn}`;
}

/** A job queued or running in this process. */
interface LiveJob {
  record: PushJobRecord;
  running: boolean;
  /** The name was queued again (or retryFailed) while the job ran: run it once more when done. */
  again: boolean;
}

type AttemptsResult = 'done' | 'failed' | 'stopped';

/**
 * Replicates names that arrive at the mirror to every push target, through durable jobs: one per
 * (name, target), recorded in LevelDB before enqueue() resolves, deleted only when the upstream
 * has the name. A restart (or kill -9 at any moment) resumes them with start(); a name already
 * pushed is not uploaded again (each attempt first asks the upstream). Each job retries
 * (isRetryable) with exponential backoff and jitter; while its target's breaker says offline it
 * waits for the probe time instead of spending retries. A final error (a pull-only upstream's
 * PERMISSION_DENIED, a closure no longer in the store) or used-up retries leave the job `failed`,
 * with its reason, until retryFailed() or the name is pushed again.
 *
 * Life cycle: construct, start() once, stop() once. enqueue() before start() only records.
 */
export class PushQueue {
  private readonly store: ContentStore;
  private readonly table: StateTable<PushJobRecord>;
  private readonly log: Logger;
  private readonly concurrency: number;
  private readonly retry: { readonly retries: number; readonly minTimeoutMs: number; readonly maxTimeoutMs: number };
  private readonly now: () => number;
  /** One queue per target: an upstream that is down holds up its own jobs only. */
  private readonly queues = new Map<string, PQueue>();
  private readonly jobs = new Map<string, LiveJob>();
  private readonly stopping = new AbortController();
  private state: 'new' | 'started' | 'stopped' = 'new';
  /** Table updates run one at a time, so a job's deletion and a new enqueue of it cannot interleave. */
  private tail: Promise<unknown> = Promise.resolve();

  constructor(private readonly options: PushQueueOptions) {
    this.store = options.store;
    this.table = options.table;
    this.log = options.log.child({ module: 'push' });
    this.concurrency = options.concurrency ?? DEFAULT_CONCURRENCY;
    this.retry = {
      retries: options.retry?.retries ?? DEFAULT_RETRY.retries,
      minTimeoutMs: options.retry?.minTimeoutMs ?? DEFAULT_RETRY.minTimeoutMs,
      maxTimeoutMs: options.retry?.maxTimeoutMs ?? DEFAULT_RETRY.maxTimeoutMs,
    };
    this.now = options.now ?? Date.now;
  }

  /**
   * Records one job per current target for `urn` (one LevelDB batch), then works on them;
   * resolves once they are recorded, so a client may be acknowledged then. A job already pending
   * for (urn, target) is not duplicated; one running is run once more afterwards (the name may
   * point elsewhere now); a failed one is queued afresh.
   *
   * `recordName`, when given, runs after the jobs are recorded and before they can start: the
   * push listener records the pushed name there, so a kill -9 can leave a job without its name
   * (dropped when it runs; the unacknowledged client pushes again) but never a name without its job.
   */
  async enqueue(urn: string, recordName?: () => Promise<void>): Promise<void> {
    const targets = this.options.targets();
    if (targets.length === 0) {
      await recordName?.();
      return;
    }
    await this.serial(async () => {
      const now = this.now();
      const puts: { type: 'put'; key: string; value: PushJobRecord }[] = [];
      let queued: PushJobRecord[] = [];
      for (const target of targets) {
        const key = pushJobKey(target.name, urn);
        const live = this.jobs.get(key);
        if (live !== undefined) {
          if (live.running) live.again = true;
          continue;
        }
        const existing = await this.table.get(key);
        if (existing?.state === 'pending') {
          queued.push(existing);
          continue;
        }
        const record: PushJobRecord = { urn, upstream: target.name, createdAt: now, attempts: 0, state: 'pending', nameRecorded: recordName === undefined };
        if (!puts.some((p) => p.key === key)) puts.push({ type: 'put', key, value: record });
        queued.push(record);
      }
      await this.table.batch(puts);
      if (recordName !== undefined) {
        await recordName();
        await this.table.batch(puts.map((p) => ({ ...p, value: { ...p.value, nameRecorded: true } })));
        queued = queued.map((q) => (q.nameRecorded === false ? { ...q, nameRecorded: true } : q));
      }
      for (const record of queued) this.schedule(record);
    });
  }

  /** Loads the pending jobs from the table (those a stop, restart or kill -9 left) and works on them, oldest first. */
  async start(): Promise<void> {
    if (this.state !== 'new') return;
    this.state = 'started';
    await this.serial(async () => {
      const pending: PushJobRecord[] = [];
      for await (const [, record] of this.table.entries()) if (record.state === 'pending') pending.push(record);
      pending.sort((a, b) => a.createdAt - b.createdAt);
      for (const record of pending) this.schedule(record);
      if (pending.length > 0) this.log.info({ jobs: pending.length }, 'resuming recorded push jobs');
    });
  }

  /**
   * Stops taking jobs, aborts backoff and offline waits, and waits up to `graceMs` for uploads
   * under way to settle. Every unfinished job stays recorded for the next start().
   */
  async stop(graceMs = DEFAULT_STOP_GRACE_MS): Promise<void> {
    if (this.state === 'stopped') return;
    this.state = 'stopped';
    this.stopping.abort(new Error('the push queue is stopping'));
    for (const queue of this.queues.values()) queue.clear();
    for (const [key, job] of this.jobs) if (!job.running) this.jobs.delete(key);
    let timer: NodeJS.Timeout | undefined;
    const grace = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), graceMs);
    });
    const settled = Promise.all([...this.queues.values()].map((q) => q.onIdle())).then(() => this.tail).then(() => true);
    const clean = await Promise.race([settled, grace]);
    clearTimeout(timer);
    if (!clean) this.log.warn({ running: this.jobs.size, graceMs }, 'push uploads still running at shutdown; their jobs stay recorded');
  }

  /** Resolves when no job is queued or running (jobs waiting for an offline upstream count as running). */
  async onIdle(): Promise<void> {
    for (;;) {
      await Promise.all([...this.queues.values()].map((q) => q.onIdle()));
      await this.tail;
      if ([...this.queues.values()].every((q) => q.size === 0 && q.pending === 0)) return;
    }
  }

  /** Queue depth, the oldest pending job's age, and the failed jobs (from the table, so a stopped daemon's state too). */
  stats(): Promise<PushQueueStats> {
    return readPushStats(this.table);
  }

  /** Queues every failed job again, with a fresh retry budget; returns how many. */
  retryFailed(): Promise<number> {
    return this.serial(async () => {
      const puts: { type: 'put'; key: string; value: PushJobRecord }[] = [];
      for await (const [key, record] of this.table.entries()) {
        if (record.state === 'failed') puts.push({ type: 'put', key, value: { ...record, state: 'pending', attempts: 0 } });
      }
      await this.table.batch(puts);
      for (const { key, value } of puts) {
        const live = this.jobs.get(key);
        if (live !== undefined) {
          live.record = value;
          live.again = true;
        } else {
          this.schedule(value);
        }
      }
      if (puts.length > 0) this.log.info({ jobs: puts.length }, 'failed push jobs queued again');
      return puts.length;
    });
  }

  /** Forgets every failed job (the operator gives those names up for their upstreams); returns how many. */
  dropFailed(): Promise<number> {
    return this.serial(async () => {
      const dels: { type: 'del'; key: string }[] = [];
      for await (const [key, record] of this.table.entries()) if (record.state === 'failed' && !this.jobs.has(key)) dels.push({ type: 'del', key });
      await this.table.batch(dels);
      if (dels.length > 0) this.log.warn({ jobs: dels.length }, 'failed push jobs given up');
      return dels.length;
    });
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.tail.then(fn, fn);
    this.tail = run.catch(() => undefined);
    return run;
  }

  private queueFor(upstream: string): PQueue {
    let queue = this.queues.get(upstream);
    if (queue === undefined) {
      queue = new PQueue({ concurrency: this.concurrency });
      this.queues.set(upstream, queue);
    }
    return queue;
  }

  /** Puts a recorded pending job on its target's queue, unless it is there already or the queue is not running. */
  private schedule(record: PushJobRecord): void {
    if (this.state !== 'started') return;
    const key = pushJobKey(record.upstream, record.urn);
    if (this.jobs.has(key)) return;
    const job: LiveJob = { record, running: false, again: false };
    this.jobs.set(key, job);
    this.queueFor(record.upstream)
      .add(() => this.run(key, job))
      .catch((err: unknown) => this.log.error({ err, urn: record.urn, upstream: record.upstream }, 'push job crashed'));
  }

  private async run(key: string, job: LiveJob): Promise<void> {
    job.running = true;
    try {
      for (;;) {
        job.again = false;
        const result = await this.attempts(key, job);
        if (result === 'stopped') return;
        const finished = await this.serial(async () => {
          if (job.again && this.state === 'started') {
            // Queued again while it ran: run once more, as a fresh pending job if this run failed.
            if (job.record.state === 'failed') {
              job.record = { ...job.record, state: 'pending', attempts: 0, createdAt: this.now() };
              await this.table.put(key, job.record);
            }
            return false;
          }
          if (result === 'done') await this.table.del(key);
          // Forgotten in the same step, so an enqueue from now on records the name afresh.
          this.jobs.delete(key);
          return true;
        });
        if (finished) return;
      }
    } catch (err) {
      // The table failed (disk full, store closed at shutdown): the job stays as last recorded.
      this.log.error({ err, urn: job.record.urn, upstream: job.record.upstream }, 'could not record the end of a push job');
    } finally {
      job.running = false;
      if (this.jobs.get(key) === job) this.jobs.delete(key);
    }
  }

  /** Runs one job's attempts under p-retry; records each failed attempt, and the final failure. */
  private async attempts(key: string, job: LiveJob): Promise<AttemptsResult> {
    const { urn, upstream } = job.record;
    const log = this.log.child({ urn, upstream });
    const signal = this.stopping.signal;
    let target: PushTarget | undefined;
    try {
      const outcome = await pRetry(
        async (): Promise<PushOutcome> => {
          target = this.options.targets().find((t) => t.name === upstream);
          if (target === undefined) {
            // Failed, not dropped: the name was acknowledged to a client, so losing it must show (status, --retry-failed).
            throw new MirrorError(
              'CONFIG_INVALID',
              `'${upstream}' is no longer an upstream with push: true in the config (renamed, removed or set to push: false); restore it and run push --retry-failed, or push --drop-failed to give these jobs up`,
            );
          }
          // An upstream known to be offline: wait for its probe time; no call, no attempt spent.
          await target.health?.whenAdmissible(signal);
          const at = this.now();
          const release = target.lease?.();
          try {
            return await pushName({ store: this.store, writer: target.writer, urn, log, signal });
          } catch (err) {
            // Never recorded (a kill -9 or a failed write between the job and its name): the client was not acknowledged and pushes again.
            if (isMirrorError(err, 'NAME_NOT_FOUND') && job.record.nameRecorded === false) return { status: 'dropped', reason: 'the push that queued it never recorded its name' };
            if (!signal.aborted && !isOfflineRefusal(err)) await this.recordAttempt(key, job, err, at);
            throw err;
          } finally {
            release?.();
          }
        },
        {
          retries: this.retry.retries,
          factor: 2,
          minTimeout: this.retry.minTimeoutMs,
          maxTimeout: this.retry.maxTimeoutMs,
          randomize: true,
          signal,
          shouldRetry: ({ error }) => isRetryable(error),
          // Failing while the breaker is (or just went) offline costs no retry: the next attempt waits for the probe.
          shouldConsumeRetry: ({ error }) => !isOfflineRefusal(error) && target?.health?.state.state !== 'offline',
          onFailedAttempt: ({ error, attemptNumber, retriesLeft }) => {
            if (!signal.aborted && !isOfflineRefusal(error)) log.debug({ attempt: attemptNumber, retriesLeft, err: describeError(error) }, 'push attempt failed');
          },
        },
      );
      if (outcome.status === 'dropped') log.info({ reason: outcome.reason }, 'push job dropped');
      else if (outcome.status === 'present') log.debug('upstream already has the name');
      else log.info({ blobs: outcome.blobs, bytes: outcome.bytes }, 'name replicated upstream');
      return 'done';
    } catch (err) {
      if (signal.aborted) return 'stopped';
      const reason = describeError(err);
      await this.serial(async () => {
        job.record = { ...job.record, state: 'failed', lastError: reason };
        await this.table.put(key, job.record);
      });
      log.warn({ attempts: job.record.attempts, err: reason, retryable: isRetryable(err) }, 'push job failed; it stays recorded until retried');
      return 'failed';
    }
  }

  /** Counts a failed attempt in the job's record (bookkeeping: a failure to write it is logged, not the job's failure). */
  private async recordAttempt(key: string, job: LiveJob, err: unknown, at: number): Promise<void> {
    job.record = { ...job.record, attempts: job.record.attempts + 1, lastError: describeError(err), lastAttemptAt: at };
    const record = job.record;
    await this.serial(() => this.table.put(key, record)).catch((e: unknown) => this.log.warn({ err: e, urn: record.urn, upstream: record.upstream }, 'could not record a push attempt'));
  }
}
