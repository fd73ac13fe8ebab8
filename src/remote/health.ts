import type { Logger } from 'pino';
import type { StateTable } from '../cas/state-table.js';
import type { NameRecord } from '../cas/content-store.js';
import type { Digest } from '../cas/digest.js';
import type { MirrorName } from '../cas/names.js';
import { MirrorError, errorMessage, isMirrorError } from '../errors.js';
import { type BatchReadResult, type BlobUpload, type Upstream, type UpstreamInfo, type UpstreamWriter, isUpstreamWriter } from './upstream.js';

/** When an upstream is taken offline and how often it is probed then. */
export interface HealthPolicy {
  /** Consecutive failures to reach it (UNAVAILABLE, deadline, stalled stream) that mark it offline. */
  readonly failuresToOffline: number;
  /** Wait before the first probe of an offline upstream; doubles after each failed probe. */
  readonly probeIntervalMs: number;
  readonly probeMaxIntervalMs: number;
}

export const DEFAULT_HEALTH_POLICY: HealthPolicy = { failuresToOffline: 3, probeIntervalMs: 30_000, probeMaxIntervalMs: 600_000 };

/** What is known about one upstream's reachability; kept in LevelDB so a restart remembers it. */
export interface HealthRecord {
  readonly state: 'online' | 'offline';
  readonly consecutiveFailures: number;
  readonly lastError?: string | undefined;
  readonly lastFailureAt?: number | undefined;
  readonly lastSuccessAt?: number | undefined;
  readonly offlineSince?: number | undefined;
  /** While offline: when the next call may go through as a probe, and the wait after that one. */
  readonly nextProbeAt?: number | undefined;
  readonly probeIntervalMs?: number | undefined;
}

const ONLINE: HealthRecord = { state: 'online', consecutiveFailures: 0 };

/**
 * A fail-count breaker for one upstream. Calls are admitted while it is online; after
 * `failuresToOffline` consecutive failures to reach it, it is offline: calls are refused at once
 * (UPSTREAM_UNAVAILABLE, so nobody waits for a dead WAN link) except one probe when the probe
 * interval has passed, which brings it back online on success or doubles the interval. Only
 * failures to reach the upstream count; a NOT_FOUND or a corrupt blob says it is alive.
 * Each transition is logged once.
 */
export class UpstreamHealth {
  private probing = false;
  /** Called after every change of the record (see onChange). */
  private readonly listeners = new Set<(record: HealthRecord) => void>();

  private constructor(
    readonly name: string,
    private record: HealthRecord,
    private readonly policy: HealthPolicy,
    private readonly table: StateTable<HealthRecord> | undefined,
    private readonly log: Logger,
    private readonly now: () => number,
  ) {}

  /** The health of `name`, as the table last recorded it (online when unknown). */
  static async load(
    name: string,
    options: { policy?: HealthPolicy; table?: StateTable<HealthRecord>; log: Logger; now?: () => number },
  ): Promise<UpstreamHealth> {
    const stored = await options.table?.get(name);
    const health = new UpstreamHealth(name, stored ?? ONLINE, options.policy ?? DEFAULT_HEALTH_POLICY, options.table, options.log, options.now ?? Date.now);
    if (stored?.state === 'offline') options.log.warn({ upstream: name, since: stored.offlineSince, lastError: stored.lastError }, 'upstream still marked offline from before the restart');
    return health;
  }

  get state(): HealthRecord {
    return this.record;
  }

  /**
   * Admits a call, or throws UPSTREAM_UNAVAILABLE saying the upstream is offline. An offline
   * upstream admits one call (the probe) once its probe time has come.
   */
  admit(): void {
    this.checkAdmissible();
    if (this.record.state === 'offline') this.probing = true;
  }

  /** Throws as admit() would, without taking the probe. */
  checkAdmissible(): void {
    const r = this.record;
    if (r.state === 'online') return;
    if (!this.probing && (r.nextProbeAt ?? 0) <= this.now()) return;
    const next = r.nextProbeAt === undefined ? '' : `; next probe in ${Math.max(0, Math.ceil((r.nextProbeAt - this.now()) / 1000))} s`;
    throw new MirrorError('UPSTREAM_UNAVAILABLE', `${this.name} is offline since ${new Date(r.offlineSince ?? 0).toISOString()} (${r.lastError ?? 'unreachable'})${next}`, {
      cause: new UpstreamOffline(),
    });
  }

  succeeded(): void {
    const was = this.record;
    this.probing = false;
    if (was.state === 'online' && was.consecutiveFailures === 0 && was.lastSuccessAt !== undefined && this.now() - was.lastSuccessAt < 60_000) return;
    this.update({ state: 'online', consecutiveFailures: 0, lastSuccessAt: this.now(), lastError: was.lastError, lastFailureAt: was.lastFailureAt });
    if (was.state === 'offline') this.log.warn({ upstream: this.name, offlineSince: was.offlineSince }, 'upstream is back online');
  }

  /** Counts a failure if it is one of reaching the upstream; other errors count as contact. */
  failed(err: unknown, call: { readonly admittedOnline?: boolean } = {}): void {
    if (!isUnreachable(err)) {
      this.succeeded();
      return;
    }
    if (err instanceof MirrorError && err.cause instanceof UpstreamOffline) return;
    const was = this.record;
    // A call that was under way when the upstream went offline is no failed probe: it must not
    // push the next probe further out (several would double the interval at once).
    if (was.state === 'offline' && call.admittedOnline === true) return;
    const now = this.now();
    const failures = was.consecutiveFailures + 1;
    const lastError = errorMessage(err);
    if (was.state === 'offline') {
      this.probing = false;
      const interval = Math.min((was.probeIntervalMs ?? this.policy.probeIntervalMs) * 2, this.policy.probeMaxIntervalMs);
      this.update({ ...was, consecutiveFailures: failures, lastError, lastFailureAt: now, nextProbeAt: now + interval, probeIntervalMs: interval });
      this.log.debug({ upstream: this.name, nextProbeInMs: interval, err: lastError }, 'probe of offline upstream failed');
      return;
    }
    if (failures < this.policy.failuresToOffline) {
      this.update({ ...was, consecutiveFailures: failures, lastError, lastFailureAt: now });
      return;
    }
    const interval = this.policy.probeIntervalMs;
    this.update({ state: 'offline', consecutiveFailures: failures, lastError, lastFailureAt: now, lastSuccessAt: was.lastSuccessAt, offlineSince: now, nextProbeAt: now + interval, probeIntervalMs: interval });
    this.log.warn({ upstream: this.name, failures, err: lastError, probeInMs: interval }, 'upstream is offline: skipping it until a probe succeeds');
  }

  /** Forgets the offline state (an admin's reload of a changed upstream, or a test). */
  reset(): void {
    this.probing = false;
    this.update(ONLINE);
  }

  /** Calls `listener` after each change of the record (each failure, success after one, transition); returns the unsubscribe. */
  onChange(listener: (record: HealthRecord) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * Resolves once a call would be admitted: at once while online; while offline at the probe time,
   * or, while another call is the probe, when that settles. So a job waits out an outage without
   * calling (or counting failures) at all. Rejects with the signal's reason when it is aborted.
   */
  async whenAdmissible(signal?: AbortSignal): Promise<void> {
    for (;;) {
      signal?.throwIfAborted();
      try {
        this.checkAdmissible();
        return;
      } catch (err) {
        if (!isOfflineRefusal(err)) throw err;
      }
      const untilProbe = (this.record.nextProbeAt ?? 0) - this.now();
      // While a probe is out, its result is the change to wait for (the timer only bounds a probe that never reports).
      await this.changeWithin(untilProbe > 0 ? untilProbe : this.policy.probeIntervalMs, signal);
    }
  }

  /** Resolves at the next change of the record or after `ms`, whichever is first. */
  private changeWithin(ms: number, signal: AbortSignal | undefined): Promise<void> {
    return new Promise((resolve, reject) => {
      const settle = (): void => {
        clearTimeout(timer);
        unsubscribe();
        signal?.removeEventListener('abort', aborted);
      };
      const aborted = (): void => {
        settle();
        reject(signal?.reason);
      };
      const timer = setTimeout(() => {
        settle();
        resolve();
      }, ms);
      const unsubscribe = this.onChange(() => {
        settle();
        resolve();
      });
      signal?.addEventListener('abort', aborted, { once: true });
    });
  }

  private update(record: HealthRecord): void {
    this.record = record;
    for (const listener of [...this.listeners]) listener(record);
    // Health is advisory: losing a write costs at most one probe after a restart.
    void this.table?.put(this.name, record).catch((err: unknown) => this.log.warn({ err, upstream: this.name }, 'could not record upstream health'));
  }
}

/** Marks the refusal of a call to an offline upstream (not a new failure to count). */
class UpstreamOffline extends Error {
  constructor() {
    super('upstream marked offline');
  }
}

/** Whether an error means the upstream could not be reached (as opposed to an answer). */
export function isUnreachable(err: unknown): boolean {
  return isMirrorError(err, 'UPSTREAM_UNAVAILABLE');
}

/** Whether an error is the refusal of an offline upstream, which needs no retry or report of its own. */
export function isOfflineRefusal(err: unknown): boolean {
  return err instanceof MirrorError && err.cause instanceof UpstreamOffline;
}

/**
 * An Upstream whose every call is admitted by, and reported to, an UpstreamHealth. When the inner
 * upstream is also an UpstreamWriter, so is this, with every write behind the breaker too.
 */
export class HealthCheckedUpstream implements Upstream, UpstreamWriter {
  readonly name: string;
  private pushAllowed = false;

  constructor(
    private readonly inner: Upstream,
    readonly health: UpstreamHealth,
  ) {
    this.name = inner.name;
  }

  private async guarded<T>(call: () => Promise<T>): Promise<T> {
    const admittedOnline = this.health.state.state === 'online';
    this.health.admit();
    try {
      const result = await call();
      this.health.succeeded();
      return result;
    } catch (err) {
      this.health.failed(err, { admittedOnline });
      throw err;
    }
  }

  async connect(): Promise<UpstreamInfo> {
    // Neither a probe nor contact: after the first detection, connect() answers from memory.
    this.health.checkAdmissible();
    try {
      return await this.inner.connect();
    } catch (err) {
      this.health.failed(err);
      throw err;
    }
  }

  resolve(name: MirrorName): Promise<Digest | undefined> {
    return this.guarded(() => this.inner.resolve(name));
  }

  batchRead(digests: readonly Digest[]): Promise<BatchReadResult[]> {
    return this.guarded(() => this.inner.batchRead(digests));
  }

  async *readStream(digest: Digest, offset?: number): AsyncIterable<Uint8Array> {
    const admittedOnline = this.health.state.state === 'online';
    this.health.admit();
    let first = true;
    try {
      for await (const chunk of this.inner.readStream(digest, offset)) {
        if (first) this.health.succeeded();
        first = false;
        yield chunk;
      }
      if (first) this.health.succeeded();
    } catch (err) {
      this.health.failed(err, { admittedOnline });
      throw err;
    }
  }

  async findMissing(digests: readonly Digest[]): Promise<Digest[]> {
    const writer = this.writer();
    return this.guarded(() => writer.findMissing(digests));
  }

  async batchUpdate(blobs: readonly BlobUpload[]): Promise<void> {
    const writer = this.writer();
    return this.guarded(() => writer.batchUpdate(blobs));
  }

  async writeStream(digest: Digest, data: AsyncIterable<Uint8Array>): Promise<void> {
    const writer = this.writer();
    return this.guarded(() => writer.writeStream(digest, data));
  }

  async setName(name: MirrorName, record: NameRecord): Promise<void> {
    const writer = this.writer();
    return this.guarded(() => writer.setName(name, record));
  }

  async checkPushAllowed(): Promise<void> {
    // Once allowed it is answered from memory, and a success from memory is no sign of contact
    // (counting it would mark a dead upstream online at every probe and spend retries). Until
    // then it is a real call, under the breaker like any other (one probe at a time).
    if (this.pushAllowed) return;
    const writer = this.writer();
    await this.guarded(() => writer.checkPushAllowed());
    this.pushAllowed = true;
  }

  private writer(): UpstreamWriter {
    if (!isUpstreamWriter(this.inner)) throw new TypeError(`upstream ${this.name} has no write side`);
    return this.inner;
  }

  close(): void {
    this.inner.close();
  }
}
