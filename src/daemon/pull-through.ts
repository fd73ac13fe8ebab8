import type { Logger } from 'pino';
import type { StateTable } from '../cas/state-table.js';
import type { MirrorName } from '../cas/names.js';
import type { OnMiss } from '../config/config.js';
import type { MissRecord } from '../control/protocol.js';
import { errorMessage } from '../errors.js';
import type { MissHandler } from '../server/miss-handler.js';
import { settlesWithin } from './within.js';
import type { NameStatus } from '../sync/sync-job.js';

/** Fetches one name's closure from the upstreams (a sync of that one name). */
export type FetchName = (urn: string) => Promise<{ status: NameStatus; reason?: string | undefined }>;

export interface PullThroughOptions {
  readonly mode: OnMiss;
  readonly missWaitMs: number;
  readonly fetchName: FetchName;
  readonly misses: StateTable<MissRecord>;
  readonly log: Logger;
  /** Fetches of missed names under way at once; more wait their turn (they all still coalesce). */
  readonly maxConcurrentFetches?: number;
  readonly now?: () => number;
}

/** Distinct missed names being fetched or waiting for a fetch slot; beyond this they are only recorded. */
const MAX_PENDING_FETCHES = 256;
/** Misses recorded at most; beyond this, new names are not recorded (but still fetched). */
const MAX_RECORDED_MISSES = 10_000;
/** Recorded misses are dropped once they have not been asked for in this long. */
const MISS_RECORD_TTL_MS = 7 * 86_400_000;
/** Names kept in the negative cache: about 10 MB of URNs. */
const MAX_KNOWN_MISSING = 50_000;

/**
 * Pull-through on miss. With `fetch`, the first request for a missing name starts that name's
 * closure fetch; every request for it (now or while it runs) waits for that one fetch, up to
 * `missWaitMs`, then gets NOT_FOUND while it goes on in the background. Names an upstream said it
 * does not have are remembered until the next completed sync run (negative cache), so they cost
 * no WAN round trip per request. With `record`, misses are only recorded; with `off`, ignored.
 */
export class PullThrough implements MissHandler {
  private readonly fetching = new Map<string, Promise<boolean>>();
  /** Names upstream said it lacks, until the next completed configured run (at most MAX_KNOWN_MISSING, oldest dropped first). */
  private readonly knownMissing = new Set<string>();
  private readonly waiting: (() => void)[] = [];
  private active = 0;
  private paused = 0;
  /** Entries in the miss table (counted on first use), so hostile clients cannot grow it without bound. */
  private recorded: number | undefined;
  private fullLogged = false;
  private closed = false;
  private options: PullThroughOptions;

  constructor(options: PullThroughOptions) {
    this.options = options;
  }

  /** Applies a reloaded config's mode and wait. */
  configure(mode: OnMiss, missWaitMs: number): void {
    this.options = { ...this.options, mode, missWaitMs };
  }

  /** Upstream fetches of missed names under way. */
  get inFlight(): number {
    return this.fetching.size;
  }

  async nameMissed(name: MirrorName): Promise<boolean> {
    const { mode, log } = this.options;
    if (mode === 'off' || this.closed) return false;
    try {
      const fetching = mode === 'fetch' && this.paused === 0 && !this.knownMissing.has(name.urn);
      await this.record(name.urn, fetching ? 'fetching' : undefined);
    } catch (err) {
      log.warn({ err, urn: name.urn }, 'could not record a miss');
    }
    if (mode === 'record' || this.paused > 0 || this.knownMissing.has(name.urn)) return false;
    let fetch = this.fetching.get(name.urn);
    if (!fetch && this.fetching.size >= MAX_PENDING_FETCHES) {
      // Bounded whatever clients ask: the name stays recorded for the next sync run.
      log.warn({ urn: name.urn, pending: this.fetching.size }, 'too many pull-through fetches waiting: miss recorded for the next sync');
      return false;
    }
    if (!fetch) {
      fetch = this.fetch(name.urn);
      this.fetching.set(name.urn, fetch);
      void fetch.finally(() => this.fetching.delete(name.urn));
    }
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), this.options.missWaitMs);
      timer.unref();
    });
    try {
      return await Promise.race([fetch, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Starts no fetches until the returned function is called (misses answer NOT_FOUND meanwhile). */
  pause(): () => void {
    this.paused += 1;
    let resumed = false;
    return () => {
      if (!resumed) this.paused -= 1;
      resumed = true;
    };
  }

  /** Forgets which names upstreams lacked: called when a sync run completes. */
  clearNegativeCache(): void {
    this.knownMissing.clear();
  }

  /** Waits for the fetches under way (tests, shutdown). */
  async onIdle(): Promise<void> {
    while (this.fetching.size > 0) await Promise.allSettled([...this.fetching.values()]);
  }

  /** Refuses new fetches and waits up to `graceMs` for those under way (the daemon aborts their signal first). */
  async close(graceMs = 5000): Promise<void> {
    this.closed = true;
    for (const wake of this.waiting.splice(0)) wake();
    if (!(await settlesWithin(this.onIdle(), graceMs))) this.options.log.warn({ graceMs }, 'pull-through fetches still under way at shutdown; stopping without them');
  }

  /** Recorded misses a configured run should try (not yet mirrored, asked for recently, not found missing since last asked). */
  async namesToSync(): Promise<string[]> {
    const now = (this.options.now ?? Date.now)();
    const names: string[] = [];
    const expired: string[] = [];
    for await (const [urn, miss] of this.options.misses.entries()) {
      if (now - miss.lastAt > MISS_RECORD_TTL_MS) expired.push(urn);
      // One that no upstream had when last tried waits until a client asks again (which resets
      // its outcome), so misses nobody wants any more cannot make every run partial for a week.
      else if (miss.lastOutcome !== 'missing' || miss.count > (miss.settledCount ?? 0)) names.push(urn);
    }
    await this.options.misses.batch(expired.map((key) => ({ type: 'del' as const, key })));
    this.recorded = undefined;
    return names;
  }

  /** After a run: mirrored names leave the miss table, the others keep their outcome. */
  async settle(outcomes: readonly { urn: string; status: NameStatus; reason?: string | undefined }[]): Promise<void> {
    const ops: ({ type: 'put'; key: string; value: MissRecord } | { type: 'del'; key: string })[] = [];
    for (const o of outcomes) {
      const miss = await this.options.misses.get(o.urn);
      if (!miss) continue;
      if (o.status === 'mirrored' || o.status === 'present') ops.push({ type: 'del', key: o.urn });
      else ops.push({ type: 'put', key: o.urn, value: { ...miss, lastOutcome: o.status, reason: o.reason, settledCount: miss.count } });
    }
    await this.options.misses.batch(ops);
    if (ops.some((op) => op.type === 'del')) {
      this.recorded = undefined;
      this.fullLogged = false;
    }
  }

  private async record(urn: string, outcome: MissRecord['lastOutcome']): Promise<void> {
    const now = (this.options.now ?? Date.now)();
    const old = await this.options.misses.get(urn);
    if (!old) {
      this.recorded ??= await this.countRecorded();
      if (this.recorded >= MAX_RECORDED_MISSES) {
        if (!this.fullLogged) this.options.log.warn({ recorded: this.recorded }, 'the miss table is full: further names are not recorded until a sync run settles it');
        this.fullLogged = true;
        return;
      }
      this.recorded += 1;
    }
    await this.options.misses.put(urn, {
      firstAt: old?.firstAt ?? now,
      lastAt: now,
      count: (old?.count ?? 0) + 1,
      lastOutcome: outcome ?? old?.lastOutcome,
      reason: old?.reason,
      settledCount: old?.settledCount,
    });
  }

  private async countRecorded(): Promise<number> {
    let n = 0;
    for await (const _ of this.options.misses.entries()) n += 1;
    return n;
  }

  private async fetch(urn: string): Promise<boolean> {
    await this.slot();
    if (this.closed) return false;
    const { log } = this.options;
    try {
      const result = await this.options.fetchName(urn);
      log.info({ urn, status: result.status, reason: result.reason }, 'pull-through fetch ended');
      if (result.status === 'missing') {
        // Bounded whatever clients ask for: past the cap the oldest entry goes (a Set iterates in insertion order).
        if (this.knownMissing.size >= MAX_KNOWN_MISSING) this.knownMissing.delete(this.knownMissing.values().next().value as string);
        this.knownMissing.add(urn);
      }
      await this.settle([{ urn, status: result.status, reason: result.reason }]).catch((err: unknown) => log.warn({ err, urn }, 'could not record a miss'));
      return result.status === 'mirrored' || result.status === 'present';
    } catch (err) {
      log.warn({ urn, err: errorMessage(err) }, 'pull-through fetch failed');
      return false;
    } finally {
      this.release();
    }
  }

  private async slot(): Promise<void> {
    const max = this.options.maxConcurrentFetches ?? 4;
    while (this.active >= max && !this.closed) await new Promise<void>((resolve) => this.waiting.push(resolve));
    this.active += 1;
  }

  private release(): void {
    this.active -= 1;
    this.waiting.shift()?.();
  }
}
