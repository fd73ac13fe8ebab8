/** What a transfer is, for TransferLimiter's order. */
export interface TransferKind {
  /** Directories and name protos: a tree walk waits for them, so they go first. */
  readonly priority: boolean;
  /** A ByteStream read of one large blob (as opposed to a BatchReadBlobs). */
  readonly stream: boolean;
}

interface Job {
  readonly kind: TransferKind;
  /** Queue order. */
  readonly seq: number;
  start(): void;
}

/**
 * Bounds the upstream transfers in flight at once, like p-limit, with two rules so a sync always
 * makes progress on a tree while its large blobs stream:
 *
 * - priority transfers (the Directory blobs a tree walk needs next) start before queued file
 *   transfers, whatever their size;
 * - large-blob streams may hold at most `concurrency - 1` of the slots (when there are two or
 *   more), so one slot is always left for batches and directories: a closure's big files no
 *   longer hold up its subdirectories and small files.
 *
 * Otherwise jobs start in the order they were queued.
 */
export class TransferLimiter {
  private active = 0;
  private activeStreams = 0;
  private readonly maxStreams: number;
  private seq = 0;
  private readonly priority: Job[] = [];
  private readonly batches: Job[] = [];
  private readonly streams: Job[] = [];

  constructor(private readonly concurrency: number) {
    if (!Number.isInteger(concurrency) || concurrency < 1) throw new TypeError(`concurrency must be a positive integer, not ${concurrency}`);
    this.maxStreams = Math.max(1, concurrency - 1);
  }

  /** Runs `fn` when a slot is free; settles as it does. */
  run<T>(kind: TransferKind, fn: () => Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const job: Job = {
        kind,
        seq: this.seq++,
        start: () => {
          void (async () => fn())()
            .then(resolve, reject)
            .finally(() => {
              this.active -= 1;
              if (kind.stream) this.activeStreams -= 1;
              this.next();
            });
        },
      };
      (kind.priority ? this.priority : kind.stream ? this.streams : this.batches).push(job);
      this.next();
    });
  }

  private next(): void {
    while (this.active < this.concurrency) {
      const job = this.take();
      if (!job) return;
      this.active += 1;
      if (job.kind.stream) this.activeStreams += 1;
      job.start();
    }
  }

  private take(): Job | undefined {
    if (this.priority.length > 0) return this.priority.shift();
    const batch = this.batches[0];
    const stream = this.activeStreams < this.maxStreams ? this.streams[0] : undefined;
    if (batch && (!stream || batch.seq < stream.seq)) return this.batches.shift();
    return stream ? this.streams.shift() : undefined;
  }
}
