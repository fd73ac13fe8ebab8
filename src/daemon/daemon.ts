import { isDeepStrictEqual } from 'node:util';
import { CronJob } from 'cron';
import type { Logger } from 'pino';
import { DiskContentStore } from '../cas/disk-store.js';
import { parseUserName } from '../cas/names.js';
import { type VerifyReport, verifyStore } from '../cas/verify.js';
import type { Config, ListenerConfig, UpstreamConfig } from '../config/config.js';
import { type ConfigOverrides, parseConfig, readConfigText } from '../config/load.js';
import type { PushReport, StatusReport, Trigger } from '../control/protocol.js';
import { type ControlHandlers, ControlServer, type ParsedPushRequest, type ParsedSyncRequest } from '../control/server.js';
import { MirrorError, errorMessage } from '../errors.js';
import { HealthCheckedUpstream, UpstreamHealth } from '../remote/health.js';
import { GrpcUpstream, type Upstream, type UpstreamSpec } from '../remote/upstream.js';
import { MirrorServer, type ServerTls } from '../server/server.js';
import { certificateValidityProblems, checkKeyPair, readConfigFile, readPem } from '../pem.js';
import { PushQueue, type PushRetryPolicy, type PushTarget } from '../push/push-queue.js';
import { runPushWork } from '../push/push-request.js';
import { type LocalCacheWatch, importAll, importLocalName, watchLocalCache } from '../push/local-cache.js';
import type { PushSink } from '../server/push-intake.js';
import { SendBudget } from '../server/send-budget.js';
import { projectNames } from '../sync/project-names.js';
import { readRefsPath } from '../sync/refs-file.js';
import { type SyncProgress, type SyncReport, syncNames } from '../sync/sync-job.js';
import { VERSION } from '../version.js';
import { PullThrough } from './pull-through.js';
import { type DaemonTables, daemonTables, storedStatus } from './state.js';
import { type RunRequest, type RunResult, SyncRunner } from './sync-runner.js';
import { type Watch, isProjectFile, watchPaths } from './watch.js';

export interface DaemonOptions {
  /** The config file, watched and reloaded; undefined for a daemon built from a Config alone (tests). */
  readonly configFile?: string | undefined;
  /** Flags that override the file, re-applied on every reload. */
  readonly overrides?: ConfigOverrides;
  /** Applies the serve flags to a loaded config, at start and on every reload (so an unchanged file compares equal). */
  readonly withFlags?: ((config: Config) => Config) | undefined;
  readonly log: Logger;
  /** Run the configured selection once at start-up (default: when there is anything to sync). */
  readonly syncAtStart?: boolean;
  /** Backoff of push jobs (tests shorten it). */
  readonly pushRetry?: PushRetryPolicy;
}

/** The upstreams of one config, each behind its health breaker. */
interface UpstreamSet {
  readonly configs: readonly UpstreamConfig[];
  readonly upstreams: readonly HealthCheckedUpstream[];
}

/**
 * The composition root: one process that owns the store and serves it, keeps it fresh on a
 * schedule and on file changes, fetches misses, tracks upstream health and answers the CLI. It
 * wires the parts together and decides nothing itself.
 */
export class Daemon {
  private servers: MirrorServer[] = [];
  private control: ControlServer | undefined;
  private schedule: CronJob | undefined;
  private selectionWatch: Watch | undefined;
  private configWatch: Watch | undefined;
  private cacheWatches: LocalCacheWatch[] = [];
  private readonly importRetries = new Set<NodeJS.Timeout>();
  private upstreamSet: UpstreamSet = { configs: [], upstreams: [] };
  /** Sets replaced by a reload, closed once no run or fetch uses them (see withUpstreams). */
  private retired: UpstreamSet[] = [];
  private readonly setUsers = new Map<UpstreamSet, number>();
  /** Cancels pull-through fetches at shutdown. */
  private readonly fetchAbort = new AbortController();
  private configError: { at: number; message: string } | undefined;
  private readonly startedAt = Date.now();
  private stopping: Promise<void> | undefined;
  private readonly runner: SyncRunner;
  private readonly pullThrough: PullThrough;
  private readonly pushQueue: PushQueue;

  private constructor(
    private config: Config,
    private readonly store: DiskContentStore,
    private readonly tables: DaemonTables,
    private readonly options: DaemonOptions,
    private readonly log: Logger,
  ) {
    this.runner = new SyncRunner((request, ctx) => this.runJob(request, ctx.signal, ctx.onProgress), tables.runs, log.child({ part: 'sync' }));
    this.pullThrough = new PullThrough({
      mode: config.sync.onMiss,
      missWaitMs: config.sync.missWaitMs,
      fetchName: (urn) => this.fetchMissed(urn),
      misses: tables.misses,
      log: log.child({ part: 'pull-through' }),
    });
    this.pushQueue = new PushQueue({
      store,
      table: tables.pushJobs,
      // Asked on every enqueue and attempt, so a reload's upstreams take effect.
      targets: () => this.pushTargets(),
      log: log.child({ part: 'push' }),
      ...(options.pushRetry && { retry: options.pushRetry }),
    });
    this.runner.onRunEnd((result, request) => {
      // A completed run of the selection is the point at which upstreams' answers are fresh.
      if (request.kind === 'configured' && result.record.outcome !== 'error') this.pullThrough.clearNegativeCache();
    });
  }

  /** Opens the store, starts listeners, the control endpoint, the schedule and the watchers. */
  static async start(config: Config, options: DaemonOptions): Promise<Daemon> {
    const log = options.log;
    // The daemon is the store's only writer: temp files a crashed process left go now.
    const store = await DiskContentStore.open(config.dir, log, { removeStaleTemp: true, recheckAfterMs: config.serve.recheckAfterMs });
    const daemon = new Daemon(config, store, daemonTables(store), options, log);
    try {
      await daemon.startParts();
    } catch (err) {
      await daemon.stop();
      throw err;
    }
    return daemon;
  }

  /** The addresses the gRPC listeners bound, in config order. */
  get addresses(): string[] {
    return this.servers.map((s) => s.address);
  }

  get controlPath(): string | undefined {
    return this.control?.path;
  }

  /** Resolves when no sync run is under way or waiting and no pull-through fetch runs. */
  async onIdle(): Promise<void> {
    await this.runner.onIdle();
    await this.pullThrough.onIdle();
  }

  /** Calls `fn` with the record of every run as it ends (tests await runs instead of sleeping). */
  onRunEnd(fn: (record: RunResult['record']) => void): void {
    this.runner.onRunEnd((result) => fn(result.record));
  }

  /** Requests a run of the configured selection, as a trigger would. */
  requestSync(trigger: Trigger): ReturnType<SyncRunner['request']> {
    return this.runner.request(trigger);
  }

  /**
   * Watches the configured local BuildStream caches: names already there are imported at start
   * (those new to the store are queued for push), and every name that appears later is imported
   * and queued. A name whose objects are not all written yet is tried again shortly.
   */
  private async watchLocalCaches(): Promise<void> {
    for (const dir of this.config.replicate.watch) {
      const watch = watchLocalCache(dir, { onName: (urn) => void this.importWatched(dir, urn, 0), log: this.log.child({ part: 'local-cache', dir }) });
      this.cacheWatches.push(watch);
      await watch.ready;
      void importAll(dir, this.store, this.log).then(
        async (results) => {
          for (const r of results) {
            // A name imported before a kill -9 may have missed its jobs: names from a local cache
            // are queued again (a job finding the upstream has it is one lookup).
            const fromCache = r.result.status === 'present' && (await this.store.getName(r.urn))?.upstream.startsWith('local cache') === true;
            if (r.result.status === 'imported' || fromCache) await this.pushQueue.enqueue(r.urn);
            else if (r.result.status === 'incomplete') void this.importWatched(dir, r.urn, 1);
          }
        },
        (err: unknown) => this.log.warn({ dir, err: errorMessage(err) }, 'could not import the local cache'),
      );
    }
  }

  private async importWatched(dir: string, urn: string, attempt: number): Promise<void> {
    if (this.stopping) return;
    try {
      const result = await importLocalName(dir, urn, this.store, this.log);
      if (result.status === 'imported' || result.status === 'present') {
        this.log.info({ dir, urn, status: result.status, blobs: result.blobs }, 'name from a local cache');
        await this.pushQueue.enqueue(urn);
      } else if (result.status === 'incomplete' && attempt < LOCAL_IMPORT_ATTEMPTS) {
        // BuildStream (or casd) may still be writing its objects: try again shortly.
        const timer = setTimeout(() => {
          this.importRetries.delete(timer);
          void this.importWatched(dir, urn, attempt + 1);
        }, LOCAL_IMPORT_RETRY_MS);
        timer.unref();
        this.importRetries.add(timer);
      } else {
        this.log.warn({ dir, urn, result }, 'could not import a name from a local cache');
      }
    } catch (err) {
      this.log.warn({ dir, urn, err: errorMessage(err) }, 'could not import a name from a local cache');
    }
  }

  /** The upstreams configured with `push: true`, named as in the config (push jobs carry that name). */
  private pushTargets(): PushTarget[] {
    const set = this.upstreamSet;
    return set.upstreams.flatMap((u, i) => {
      const c = set.configs[i];
      // Each attempt leases the set, so a reload meanwhile does not close the connection under it.
      return c?.push ? [{ name: c.name, writer: u, health: u.health, lease: () => this.leaseSet(set) }] : [];
    });
  }

  /** Resolves once no push job is waiting or running (tests). */
  pushIdle(): Promise<void> {
    return this.pushQueue.onIdle();
  }

  private async startParts(): Promise<void> {
    const { config, log } = this;
    this.upstreamSet = await this.buildUpstreams(config.upstreams);
    // Jobs a previous run (or a kill -9) left are resumed before anything new is accepted.
    await this.pushQueue.start();
    const sink: PushSink = {
      namePushed: async (urn, recordName) => {
        await this.pushQueue.enqueue(urn, recordName);
        // A name pushed here is no longer a miss to fetch.
        await this.pullThrough.settle([{ urn, status: 'mirrored' }]).catch((err: unknown) => this.log.warn({ err, urn }, 'could not settle the miss record of a pushed name'));
      },
    };
    const budget = new SendBudget(config.serve.limits.sendBudgetBytes);
    for (const listener of config.listen) {
      this.servers.push(
        await MirrorServer.start(this.store, {
          listen: listener.address,
          maxBatchBytes: config.serve.maxBatchBytes,
          log,
          limits: config.serve.limits,
          // All listeners share one memory budget.
          sendBudget: budget,
          missHandler: this.pullThrough,
          tls: await readListenerTls(listener, this.log),
          push: listener.push ? { sink, accessToken: await readAccessToken(listener) } : undefined,
        }),
      );
    }
    this.control = await ControlServer.start(config.dir, VERSION, this.controlHandlers(), log.child({ part: 'control' }));
    this.applySchedule();
    await this.applyWatches();
    if (this.options.configFile) {
      const file = this.options.configFile;
      this.configWatch = watchPaths({ paths: [file], debounceMs: 200, onChange: () => void this.reload(), log });
      await this.configWatch.ready;
    }
    await this.watchLocalCaches();
    log.info({ listen: this.addresses, control: this.controlPath, upstreams: config.upstreams.map((u) => u.name), schedule: config.sync.schedule }, 'daemon started');
    if (this.options.syncAtStart ?? hasSelection(config)) void this.runner.request({ kind: 'startup' });
  }

  /** Stops triggers, listeners (letting calls finish briefly), runs and fetches, then the store. */
  stop(): Promise<void> {
    this.stopping ??= this.shutdown();
    return this.stopping;
  }

  private async shutdown(): Promise<void> {
    const log = this.log;
    log.info('daemon stopping: triggers');
    await this.schedule?.stop();
    await this.selectionWatch?.close();
    await this.configWatch?.close();
    await Promise.all(this.cacheWatches.map((w) => w.close()));
    for (const timer of this.importRetries) clearTimeout(timer);
    log.info('daemon stopping: listeners');
    await Promise.all(this.servers.map((s) => s.stop()));
    await this.control?.stop();
    log.info('daemon stopping: sync runs, pull-through fetches and push jobs');
    this.fetchAbort.abort(new Error('the daemon is shutting down'));
    await this.runner.stop();
    await this.pullThrough.close();
    // Jobs stay recorded; the next start resumes them.
    await this.pushQueue.stop();
    for (const set of [this.upstreamSet, ...this.retired]) for (const u of set.upstreams) u.close();
    await this.store.close();
    log.info('daemon stopped');
  }

  private async buildUpstreams(configs: readonly UpstreamConfig[]): Promise<UpstreamSet> {
    const upstreams: HealthCheckedUpstream[] = [];
    try {
      for (const c of configs) {
        const health = await UpstreamHealth.load(c.name, {
          policy: this.config.health,
          table: this.tables.health,
          log: this.log,
        });
        upstreams.push(new HealthCheckedUpstream(await GrpcUpstream.create(c.spec), health));
      }
    } catch (err) {
      for (const u of upstreams) u.close();
      throw err;
    }
    return { configs, upstreams };
  }

  private applySchedule(): void {
    const expression = this.config.sync.schedule;
    if (this.schedule && this.schedule.cronTime.source === expression) return;
    void this.schedule?.stop();
    this.schedule = undefined;
    if (expression === undefined) return;
    this.schedule = CronJob.from({
      cronTime: expression,
      onTick: () => void this.runner.request({ kind: 'schedule', detail: expression }),
      start: true,
    });
  }

  private async applyWatches(): Promise<void> {
    await this.selectionWatch?.close();
    this.selectionWatch = undefined;
    const { sync } = this.config;
    const refsPaths = new Set(sync.refsFiles);
    const projectPaths = sync.projects.map((p) => p.path);
    if (refsPaths.size === 0 && projectPaths.length === 0) return;
    this.selectionWatch = watchPaths({
      paths: [...refsPaths, ...projectPaths],
      relevant: (path) => isUnder(path, [...refsPaths]) || isProjectFile(path),
      debounceMs: sync.watchDebounceMs,
      onChange: (changed) => {
        const first = changed[0] ?? '';
        const kind = isUnder(first, [...refsPaths]) ? 'refs-file' : 'project';
        this.log.info({ changed, trigger: kind }, 'watched files changed: syncing');
        void this.runner.request({ kind, detail: first });
      },
      log: this.log,
    });
    await this.selectionWatch.ready;
  }

  /** Reloads the config file: on success applies selection, schedule, upstreams and pull-through; on failure keeps the running config. */
  async reload(): Promise<void> {
    const file = this.options.configFile;
    if (!file) return;
    // A SIGHUP or an edit while the daemon stops changes nothing (watchers and upstreams are closing).
    if (this.stopping) return;
    let next: Config;
    try {
      // An empty file on reload is an editor's truncate-then-write caught half way, not "every default".
      const text = await readConfigText(file);
      if (text.trim() === '') throw new MirrorError('CONFIG_INVALID', `${file}: the file is empty`);
      const loaded = parseConfig(text, file, this.options.overrides);
      next = this.options.withFlags ? this.options.withFlags(loaded) : loaded;
    } catch (err) {
      this.configError = { at: Date.now(), message: errorMessage(err) };
      this.log.error({ err: errorMessage(err) }, 'config reload failed: keeping the running config');
      return;
    }
    if (this.stopping) return;
    this.configError = undefined;
    const old = this.config;
    const restartNeeded = ['dir', 'listen', 'serve', 'replicate', 'logLevel'].filter((k) => !isDeepStrictEqual(old[k as keyof Config], next[k as keyof Config]));
    if (restartNeeded.length > 0) this.log.warn({ keys: restartNeeded }, 'config reload: these keys take effect at the next restart');
    const applied: Config = { ...next, dir: old.dir, listen: old.listen, serve: old.serve, replicate: old.replicate, logLevel: old.logLevel };
    if (!isDeepStrictEqual(old.upstreams, next.upstreams) || !isDeepStrictEqual(old.health, next.health)) {
      try {
        this.config = applied;
        const fresh = await this.buildUpstreams(next.upstreams);
        if (this.stopping) {
          for (const u of fresh.upstreams) u.close();
          return;
        }
        this.retired.push(this.upstreamSet);
        this.upstreamSet = fresh;
        this.closeRetired();
      } catch (err) {
        this.config = old;
        this.configError = { at: Date.now(), message: errorMessage(err) };
        this.log.error({ err: errorMessage(err) }, 'config reload failed: keeping the running config');
        return;
      }
    }
    this.config = applied;
    this.pullThrough.configure(next.sync.onMiss, next.sync.missWaitMs);
    this.applySchedule();
    if (!isDeepStrictEqual(old.sync.refsFiles, next.sync.refsFiles) || !isDeepStrictEqual(old.sync.projects, next.sync.projects) || old.sync.watchDebounceMs !== next.sync.watchDebounceMs) {
      await this.applyWatches();
    }
    this.log.info({ upstreams: next.upstreams.map((u) => u.name), schedule: next.sync.schedule }, 'config reloaded');
    if (!isDeepStrictEqual(old.sync, next.sync) || !isDeepStrictEqual(old.upstreams, next.upstreams)) {
      // Refused once shutdown has begun; that needs no report.
      this.runner.request({ kind: 'config', detail: file }).catch((err: unknown) => this.log.debug({ err: errorMessage(err) }, 'config run not started'));
    }
  }

  /** Closes the connections of retired upstream sets that no run or fetch uses any more. */
  private closeRetired(): void {
    this.retired = this.retired.filter((set) => {
      if ((this.setUsers.get(set) ?? 0) > 0) return true;
      for (const u of set.upstreams) u.close();
      return false;
    });
  }

  /** Marks `set` in use until the returned release is called (once); a retired set closes when its last user releases it. */
  private leaseSet(set: UpstreamSet): () => void {
    this.setUsers.set(set, (this.setUsers.get(set) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.setUsers.get(set) ?? 1) - 1;
      if (left === 0) this.setUsers.delete(set);
      else this.setUsers.set(set, left);
      this.closeRetired();
    };
  }

  /** Runs `fn` with the current upstreams, which a reload meanwhile retires but does not close under it. */
  private async withUpstreams<T>(fn: (set: UpstreamSet) => Promise<T>): Promise<T> {
    const set = this.upstreamSet;
    const release = this.leaseSet(set);
    try {
      return await fn(set);
    } finally {
      release();
    }
  }

  /** The names a configured run mirrors: refs, refs files, projects' elements and recorded misses. */
  private async selection(signal: AbortSignal): Promise<{ names: string[]; notes: string[] }> {
    const { sync } = this.config;
    const names = new Set<string>(sync.refs);
    const notes: string[] = [];
    for (const path of sync.refsFiles) {
      try {
        for (const name of await readRefsPath(path)) names.add(name);
      } catch (err) {
        notes.push(`refs file ${path}: ${errorMessage(err)}`);
      }
    }
    for (const project of sync.projects) {
      try {
        const found = await projectNames(project, { signal });
        for (const name of found.names) names.add(name);
        for (const s of found.skipped) notes.push(`project ${project.path}: skipped ${s.element}: ${s.reason}`);
      } catch (err) {
        notes.push(`project ${project.path}: ${errorMessage(err)}`);
      }
    }
    for (const urn of await this.pullThrough.namesToSync()) names.add(urn);
    // A bad line in a refs file is reported, not fatal to the rest of the selection.
    const valid: string[] = [];
    for (const name of names) {
      try {
        parseUserName(name);
        valid.push(name);
      } catch (err) {
        notes.push(errorMessage(err));
      }
    }
    return { names: valid, notes };
  }

  private runJob(request: RunRequest, signal: AbortSignal, onProgress: (p: SyncProgress) => void): Promise<{ report: SyncReport; notes: string[] }> {
    return this.withUpstreams((set) => this.runWith(set, request, signal, onProgress));
  }

  private async runWith(set: UpstreamSet, request: RunRequest, signal: AbortSignal, onProgress: (p: SyncProgress) => void): Promise<{ report: SyncReport; notes: string[] }> {
    const { sync } = this.config;
    if (request.kind === 'names') {
      const report = await syncNames({
        store: this.store,
        upstreams: request.upstreams ?? set.upstreams,
        names: request.names,
        withBuildtrees: request.withBuildtrees ?? sync.withBuildtrees,
        concurrency: request.concurrency ?? sync.concurrency,
        log: this.log,
        onProgress,
        signal,
      });
      return { report, notes: [] };
    }
    const { names, notes } = await this.selection(signal);
    if (set.upstreams.length === 0 && names.length > 0) throw new MirrorError('CONFIG_INVALID', 'no upstreams configured: nothing to sync from');
    const report = await syncNames({
      store: this.store,
      upstreams: set.upstreams,
      names,
      withBuildtrees: sync.withBuildtrees,
      concurrency: sync.concurrency,
      log: this.log,
      onProgress,
      signal,
    });
    await this.pullThrough.settle(report.results.map((r) => ({ urn: r.urn ?? r.input, status: r.status, reason: r.reason }))).catch((err: unknown) => {
      this.log.warn({ err }, 'could not update recorded misses');
    });
    return { report, notes };
  }

  /** Pull-through: a sync of one name, beside the runs (it only adds blobs and that name). */
  private fetchMissed(urn: string): Promise<{ status: SyncReport['results'][number]['status']; reason?: string | undefined }> {
    return this.withUpstreams(async (set) => {
      if (set.upstreams.length === 0) return { status: 'missing', reason: 'no upstreams configured' };
      const report = await syncNames({ store: this.store, upstreams: set.upstreams, names: [urn], concurrency: this.config.sync.concurrency, log: this.log, signal: this.fetchAbort.signal });
      const result = report.results[0];
      return { status: result?.status ?? 'failed', reason: result?.reason };
    });
  }

  private controlHandlers(): ControlHandlers {
    return {
      sync: (request, onProgress, signal) => this.cliSync(request, onProgress, signal),
      status: () => this.status(),
      verify: (request) => this.verify(request.repair, request.prune),
      push: (request) => this.cliPush(request),
    };
  }

  /** `push` from the CLI: give up or re-queue failed jobs, and/or import names from a local cache and queue them. */
  private cliPush(request: ParsedPushRequest): Promise<PushReport> {
    return runPushWork(request, this.store, this.pushQueue, this.log);
  }

  /** `sync` from the CLI: names (or projects) given once, or a run of the configured selection. */
  private async cliSync(request: ParsedSyncRequest, onProgress: (p: SyncProgress) => void, signal: AbortSignal): Promise<{ report: SyncReport; notes: string[] }> {
    if ((request.upstreams ?? []).length === 0 && this.config.upstreams.length === 0 && (request.names.length > 0 || request.projects.length > 0)) {
      // As without a daemon: nothing to sync from is a usage error, not every name "missing upstream".
      throw new MirrorError('CONFIG_INVALID', `give --upstream URL: the daemon on ${this.config.dir} has no upstreams configured`);
    }
    const names = [...request.names];
    const notes: string[] = [];
    for (const project of request.projects) {
      const found = await projectNames(project, { signal });
      names.push(...found.names);
      for (const s of found.skipped) notes.push(`project ${project.path}: skipped ${s.element}: ${s.reason}`);
    }
    if (request.upstreams !== undefined && request.upstreams.length > 0) {
      // The CLI named its own upstreams: a one-off run through them, in the runner's turn.
      const upstreams: Upstream[] = [];
      try {
        for (const spec of request.upstreams) upstreams.push(await GrpcUpstream.create(spec as UpstreamSpec));
        const result = await this.runner.request({ kind: 'cli' }, { kind: 'names', names, withBuildtrees: request.withBuildtrees, upstreams, concurrency: request.concurrency }, onProgress, signal);
        return this.cliResult(result, notes);
      } finally {
        for (const u of upstreams) u.close();
      }
    }
    const run: RunRequest = names.length > 0 || request.projects.length > 0 ? { kind: 'names', names, withBuildtrees: request.withBuildtrees, concurrency: request.concurrency } : { kind: 'configured' };
    const result = await this.runner.request({ kind: 'cli' }, run, onProgress, signal);
    return this.cliResult(result, notes);
  }

  private cliResult(result: Awaited<ReturnType<SyncRunner['request']>>, notes: string[]): { report: SyncReport; notes: string[] } {
    if (!result.report) throw new MirrorError('UPSTREAM_ERROR', `the sync run failed: ${result.record.error ?? 'unknown error'}`);
    return { report: result.report, notes: [...notes, ...(result.record.notes ?? [])] };
  }

  private async verify(repair: boolean, prune: boolean): Promise<VerifyReport> {
    // Verify needs the store still: no run or fetch may write while it looks (or repairs).
    return this.runner.exclusive(async () => {
      const resume = this.pullThrough.pause();
      try {
        await this.pullThrough.onIdle();
        return await verifyStore(this.store, { repair, prune, log: this.log });
      } finally {
        resume();
      }
    });
  }

  async status(): Promise<StatusReport> {
    const stored = await storedStatus(this.store, this.tables, this.config.upstreams.map((u) => u.name));
    const running = this.runner.running;
    return {
      ...stored,
      upstreams: stored.upstreams.map((u) => {
        const set = this.upstreamSet;
        const live = set.upstreams[set.configs.findIndex((c) => c.name === u.name)];
        return live ? { ...u, ...live.health.state } : u;
      }),
      daemon: {
        pid: process.pid,
        startedAt: this.startedAt,
        configFile: this.options.configFile,
        // Each address with what it serves: `0.0.0.0:11002 (https, client certificates, push)`.
        listen: this.addresses.map((address, i) => {
          const l = this.config.listen[i];
          const traits = [l?.tls ? 'https' : 'http', ...(l?.tls?.clientCertsFile ? ['client certificates'] : []), ...(l?.accessTokenFile ? ['access token'] : []), l?.push ? 'push' : 'pull-only'];
          return `${address} (${traits.join(', ')})`;
        }),
        schedule: this.config.sync.schedule,
        nextRunAt: this.schedule?.nextDate().toMillis(),
        onMiss: this.config.sync.onMiss,
        pullThroughInFlight: this.pullThrough.inFlight,
        running,
        waitingRuns: this.runner.waiting,
        configError: this.configError,
        watching: [...this.config.sync.refsFiles, ...this.config.sync.projects.map((p) => p.path), ...this.config.replicate.watch],
      },
    };
  }
}

async function readAccessToken(listener: ListenerConfig): Promise<string | undefined> {
  if (listener.accessTokenFile === undefined) return undefined;
  const token = (await readConfigFile(listener.accessTokenFile, 'access token')).toString('utf8').trim();
  if (!token) throw new MirrorError('CONFIG_INVALID', `listener ${listener.address}: the access token file ${listener.accessTokenFile} is empty`);
  return token;
}

/** A listener's certificate, key and client certificates, each checked; expired certificates are a warning (clients will refuse them). */
async function readListenerTls(listener: ListenerConfig, log: Logger): Promise<ServerTls | undefined> {
  const { tls } = listener;
  if (!tls) return undefined;
  const cert = await readPem(tls.certFile, 'server certificate');
  const key = await readPem(tls.keyFile, 'server key');
  checkKeyPair(tls.certFile, cert, tls.keyFile, key);
  const clientCerts = tls.clientCertsFile === undefined ? undefined : await readPem(tls.clientCertsFile, 'client certificates');
  const problems = [...certificateValidityProblems(tls.certFile, cert), ...(clientCerts && tls.clientCertsFile ? certificateValidityProblems(tls.clientCertsFile, clientCerts) : [])];
  for (const problem of problems) log.warn({ listener: listener.address }, `${problem}: TLS handshakes with it will fail`);
  return { cert, key, clientCerts };
}

/** A local-cache name whose objects are incomplete is tried this many times, this far apart (a minute in all). */
const LOCAL_IMPORT_ATTEMPTS = 60;
const LOCAL_IMPORT_RETRY_MS = 1000;

function hasSelection(config: Config): boolean {
  return config.upstreams.length > 0 && (config.sync.refs.length > 0 || config.sync.refsFiles.length > 0 || config.sync.projects.length > 0);
}

function isUnder(path: string, roots: readonly string[]): boolean {
  return roots.some((root) => path === root || path.startsWith(`${root}/`));
}
