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
type ReplyEnvelope<Rep> = { readonly id: number; readonly reply: Rep } | { readonly id: number; readonly error: string };

/** The worker side of the protocol: answers each request with its id, in order. */
function workerRuntime(handle: (request: unknown) => WorkerAnswer<unknown>): void {
  const { parentPort } = require('node:worker_threads') as typeof import('node:worker_threads');
  parentPort?.on('message', ({ id, request }: Envelope<unknown>) => {
    try {
      const { reply, transfer } = handle(request);
      parentPort.postMessage({ id, reply }, transfer ?? []);
    } catch (err) {
      parentPort.postMessage({ id, error: err instanceof Error ? err.message : String(err) });
    }
  });
}

/**
 * A worker thread doing blocking file work for the store: synchronous calls there cost a third of
 * the same calls through the libuv pool for small files, and none of it runs on the event loop.
 * Started on first use; kept alive only while a request is outstanding; restarted if it dies.
 */
export class IoWorker<Req, Rep> {
  private worker: Worker | undefined;
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: (reply: Rep) => void; reject: (err: Error) => void }>();

  constructor(
    private readonly name: string,
    private readonly program: WorkerProgram<Req, Rep>,
  ) {}

  /** Sends a request; its buffers are copied unless listed in `transfer`. */
  request(request: Req, transfer: ArrayBuffer[] = []): Promise<Rep> {
    const worker = this.start();
    const id = this.nextId++;
    return new Promise<Rep>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.ref();
      worker.postMessage({ id, request } satisfies Envelope<Req>, transfer);
    });
  }

  async close(): Promise<void> {
    const worker = this.worker;
    this.worker = undefined;
    if (worker) await worker.terminate();
  }

  private start(): Worker {
    if (this.worker) return this.worker;
    // Under tsx (the tests), esbuild wraps named inner functions in a `__name` helper that the
    // worker's fresh context lacks; an identity stand-in keeps such programs runnable.
    const source = `var __name = (fn) => fn;\n(${workerRuntime.toString()})((${this.program.toString()})())`;
    const worker = new Worker(source, { eval: true, name: this.name });
    worker.on('message', (message: ReplyEnvelope<Rep>) => {
      const waiter = this.pending.get(message.id);
      this.pending.delete(message.id);
      if (this.pending.size === 0) worker.unref();
      if (!waiter) return;
      if ('error' in message) waiter.reject(new Error(`${this.name}: ${message.error}`));
      else waiter.resolve(message.reply);
    });
    const fail = (err: Error): void => {
      if (this.worker === worker) this.worker = undefined;
      for (const waiter of this.pending.values()) waiter.reject(new Error(`the ${this.name} thread stopped: ${err.message}`));
      this.pending.clear();
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`exit code ${code}`)));
    worker.unref();
    this.worker = worker;
    return worker;
  }
}
