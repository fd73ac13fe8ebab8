import v8 from 'node:v8';
import vm from 'node:vm';

/** Send budget granted since the last collection that makes one worth running once things are quiet. */
export const IDLE_GC_AFTER_BYTES = 64 << 20;
/** How often the collector looks: the budget must have stood empty and unused for one such period. */
export const IDLE_GC_QUIET_MS = 2000;

let gcFunction: (() => void) | undefined | null = null;

/**
 * V8's `gc()`, made available after start-up: `--expose-gc` installs it in contexts created from
 * then on. Undefined if this V8 does not allow it.
 */
function fullGc(): (() => void) | undefined {
  if (gcFunction !== null) return gcFunction;
  try {
    v8.setFlagsFromString('--expose-gc');
    const fn: unknown = vm.runInNewContext('gc');
    gcFunction = typeof fn === 'function' ? () => void fn() : undefined;
  } catch {
    gcFunction = undefined;
  }
  return gcFunction;
}

/** What the collector watches: the server's send budget. */
export interface BudgetGauge {
  readonly inUse: number;
  /** Bytes granted since the budget was created; only grows. */
  readonly totalGranted: number;
}

/**
 * Gives memory back after a burst. Responses are read into buffers of a MiB (and copied once more
 * by grpc-js) that outlive their use until V8 collects them; V8 collects when they add up to about
 * 64 MiB more than at its last collection, not when the process goes idle, so the buffers of the end
 * of a burst stay allocated, and glibc cannot return their pages, until the next burst. Measured:
 * 80 MiB of such buffers still held 30 s after a burst. When the send budget has stood empty and
 * unused for a whole check period after at least `afterBytes` were granted, one full collection
 * (milliseconds on this small heap) frees them.
 */
export class IdleCollector {
  private readonly timer: NodeJS.Timeout;
  private readonly gc = fullGc();
  private grantedAtGc: number;
  private grantedAtCheck: number;
  /** Collections run so far. */
  collections = 0;
  /** Periodic checks run so far. */
  checks = 0;

  constructor(
    private readonly budget: BudgetGauge,
    periodMs = IDLE_GC_QUIET_MS,
    private readonly afterBytes = IDLE_GC_AFTER_BYTES,
  ) {
    this.grantedAtGc = budget.totalGranted;
    this.grantedAtCheck = budget.totalGranted;
    this.timer = setInterval(() => this.check(), periodMs);
    this.timer.unref();
  }

  close(): void {
    clearInterval(this.timer);
  }

  private check(): void {
    this.checks += 1;
    const granted = this.budget.totalGranted;
    const quiet = granted === this.grantedAtCheck && this.budget.inUse === 0;
    this.grantedAtCheck = granted;
    if (!quiet || granted - this.grantedAtGc < this.afterBytes || this.gc === undefined) return;
    this.grantedAtGc = granted;
    this.collections += 1;
    this.gc();
  }
}
