/**
 * The tasks one piece of work (one name's closure) started. drain() returns only when every task,
 * including tasks started by tasks, has settled, and then throws the first failure: work that
 * fails never leaves writes running behind it. After a failure `failed` is set, so tasks can
 * skip what has not started yet.
 */
export class TaskScope {
  private readonly tasks = new Set<Promise<void>>();
  private firstError: unknown;
  private hasFailed = false;

  get failed(): boolean {
    return this.hasFailed;
  }

  /** Starts a task; its failure is kept for drain(), not thrown here. */
  spawn(run: () => Promise<void>): void {
    const task = (async () => run())().catch((err: unknown) => {
      if (!this.hasFailed) {
        this.hasFailed = true;
        this.firstError = err;
      }
    });
    this.tasks.add(task);
    void task.then(() => this.tasks.delete(task));
  }

  /** Waits for every task (and those they start), then throws the first failure, if any. */
  async drain(): Promise<void> {
    while (this.tasks.size > 0) await Promise.all([...this.tasks]);
    if (this.hasFailed) throw this.firstError;
  }
}

/** A part of a Backlog taken by one task, given back as the task's items get going. */
export interface BacklogShare {
  /** Gives back `n` items (at most what is left of this share). */
  release(n: number): void;
  /** Gives back whatever is left of this share. */
  releaseAll(): void;
}

/**
 * A count of queued items (file digests waiting for a transfer slot) that a producer (a tree
 * walk) waits on, so it cannot run arbitrarily far ahead of the transfers: memory stays bounded
 * however large the tree.
 */
export class Backlog {
  private count = 0;
  private waiters: { limit: number; resolve: () => void }[] = [];

  get size(): number {
    return this.count;
  }

  take(n: number): BacklogShare {
    this.count += n;
    let left = n;
    const release = (k: number): void => {
      const m = Math.min(Math.max(k, 0), left);
      if (m === 0) return;
      left -= m;
      this.count -= m;
      this.wake();
    };
    return { release, releaseAll: () => release(left) };
  }

  /** Resolves once fewer than `limit` items are queued. */
  async below(limit: number): Promise<void> {
    if (this.count < limit) return;
    await new Promise<void>((resolve) => this.waiters.push({ limit, resolve }));
  }

  private wake(): void {
    const ready = this.waiters.filter((w) => this.count < w.limit);
    if (ready.length === 0) return;
    this.waiters = this.waiters.filter((w) => this.count >= w.limit);
    for (const w of ready) w.resolve();
  }
}
