import { Worker } from 'node:worker_threads';

/** What a worker program returns for one request: the reply, and buffers to move (not copy) back. */
export interface WorkerAnswer<Rep> {
  readonly reply: Rep;
  readonly transfer?: ArrayBuffer[];
}

/**
 * Builds a worker's request handler. It runs from source text, so it must not close over
 * anything from its module: it takes what it needs with require(), and may keep state in the
 * closure it returns.
 */
export type WorkerProgram<Req, Rep> = () => (request: Req) => WorkerAnswer<Rep>;

type Envelope<Req> = { readonly id: number; readonly request: Req };
type ReplyEnvelope<Rep> = { readonly id: number; readonly reply: Rep } | { readonly id: number; readonly error: string; readonly code?: string };

/** The worker side of the protocol: answers each request with its id, in order. */
function workerRuntime(handle: (request: unknown) => WorkerAnswer<unknown>): void {
  const { parentPort } = require('node:worker_threads') as typeof import('node:worker_threads');
  parentPort?.on('message', ({ id, request }: Envelope<unknown>) => {
    try {
      const { reply, transfer } = handle(request);
      parentPort.postMessage({ id, reply }, transfer ?? []);
    } catch (err) {
      // The errno code (ENOSPC, EIO, ...) survives the thread boundary; the stack does not.
      const code = (err as { code?: unknown }).code;
      parentPort.postMessage({ id, error: err instanceof Error ? err.message : String(err), ...(typeof code === 'string' ? { code } : {}) });
    }
  });
}

/**
 * A worker thread doing blocking file work for the store: synchronous calls there cost a third of
 * the same calls through the libuv pool for small files, and none of it runs on the event loop.
 * Started on first use; kept alive only while a request is outstanding; restarted if it dies.
 */
interface Waiter<Rep> {
  resolve(reply: Rep): void;
  reject(err: Error): void;
}

/** One running thread and the requests it owes answers to. */
interface Running<Rep> {
  readonly worker: Worker;
  readonly pending: Map<number, Waiter<Rep>>;
}

export class IoWorker<Req, Rep> {
  private running: Running<Rep> | undefined;
  private nextId = 0;

  constructor(
    private readonly name: string,
    private readonly program: WorkerProgram<Req, Rep>,
  ) {}

  /** Sends a request; its buffers are copied unless listed in `transfer`. */
  request(request: Req, transfer: ArrayBuffer[] = []): Promise<Rep> {
    const { worker, pending } = this.start();
    const id = this.nextId++;
    return new Promise<Rep>((resolve, reject) => {
      pending.set(id, { resolve, reject });
      // A thread that is waited on must keep the process alive; an idle one must not.
      worker.ref();
      try {
        worker.postMessage({ id, request } satisfies Envelope<Req>, transfer);
      } catch (err) {
        pending.delete(id);
        if (pending.size === 0) worker.unref();
        reject(err instanceof Error ? err : new Error(String(err)));
      }
    });
  }

  async close(): Promise<void> {
    const running = this.running;
    this.running = undefined;
    if (running) await running.worker.terminate();
  }

  private start(): Running<Rep> {
    if (this.running) return this.running;
    // Under tsx (the tests), esbuild wraps named inner functions in a `__name` helper that the
    // worker's fresh context lacks; an identity stand-in keeps such programs runnable.
    const source = `var __name = (fn) => fn;\n(${workerRuntime.toString()})((${this.program.toString()})())`;
    const worker = new Worker(source, { eval: true, name: this.name });
    // Each thread has its own pending map, so a dead thread's late 'exit' cannot fail requests
    // already sent to its replacement.
    const running: Running<Rep> = { worker, pending: new Map() };
    worker.on('message', (message: ReplyEnvelope<Rep>) => {
      const waiter = running.pending.get(message.id);
      running.pending.delete(message.id);
      if (running.pending.size === 0) worker.unref();
      if (!waiter) return;
      if ('error' in message) {
        waiter.reject(Object.assign(new Error(`${this.name}: ${message.error}`), message.code === undefined ? {} : { code: message.code }));
      } else {
        waiter.resolve(message.reply);
      }
    });
    // A thread's crash report travels on Node's internal port and can overtake replies it sent
    // just before; Node delivers every reply before 'exit'. So 'error' only stops new requests
    // going to the thread, and 'exit' fails the requests it never answered.
    let crash: Error | undefined;
    worker.on('error', (err) => {
      crash ??= err;
      if (this.running === running) this.running = undefined;
    });
    worker.on('exit', (code) => {
      if (this.running === running) this.running = undefined;
      const why = crash?.message ?? `exit code ${code}`;
      for (const waiter of running.pending.values()) waiter.reject(new Error(`the ${this.name} thread stopped: ${why}`));
      running.pending.clear();
    });
    worker.unref();
    this.running = running;
    return running;
  }
}
