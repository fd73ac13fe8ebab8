import type * as grpc from '@grpc/grpc-js';

/**
 * The bytes of response data the whole server may hold at once: blob chunks read from disk, batch
 * responses and tree pages, from the moment they are read until HTTP/2 has taken them (the write
 * callback, once the bytes are on their way to the socket) or the call is gone. Waiters are served
 * first come, first served. A request larger than the whole budget is granted the whole budget, once
 * nothing else holds any, so it runs alone instead of never.
 */
export class SendBudget {
  private used = 0;
  private peak = 0;
  private granted = 0;
  private readonly waiters: { bytes: number; grant: (granted: number) => void }[] = [];

  /** `onWait` is told each time a request has to queue (the budget is exhausted). */
  constructor(
    readonly capacity: number,
    private readonly onWait?: (waiting: number) => void,
  ) {
    if (!(capacity > 0)) throw new RangeError(`send budget must be positive, got ${capacity}`);
  }

  /** Bytes granted and not yet released. */
  get inUse(): number {
    return this.used;
  }

  /** The most ever granted at once. */
  get peakInUse(): number {
    return this.peak;
  }

  /** Bytes granted since the budget was created. */
  get totalGranted(): number {
    return this.granted;
  }

  /** Requests queued for room. */
  get waiting(): number {
    return this.waiters.length;
  }

  /**
   * Resolves with the bytes granted (`bytes`, or the capacity if that is less) once there is room,
   * or with 0 if `signal` aborts first. Every granted byte must be released exactly once.
   */
  acquire(bytes: number, signal?: AbortSignal): Promise<number> {
    const want = Math.min(Math.max(1, Math.ceil(bytes)), this.capacity);
    if (signal?.aborted) return Promise.resolve(0);
    if (this.waiters.length === 0 && this.used + want <= this.capacity) {
      this.take(want);
      return Promise.resolve(want);
    }
    return new Promise<number>((resolve) => {
      const waiter = {
        bytes: want,
        grant: (granted: number): void => {
          signal?.removeEventListener('abort', onAbort);
          resolve(granted);
        },
      };
      const onAbort = (): void => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        resolve(0);
        // The head may have been what held the others back.
        this.grantWaiting();
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.waiters.push(waiter);
      this.onWait?.(this.waiters.length);
    });
  }

  release(bytes: number): void {
    if (bytes <= 0) return;
    if (bytes > this.used) throw new RangeError(`send budget: releasing ${bytes} bytes, only ${this.used} are held`);
    this.used -= bytes;
    this.grantWaiting();
  }

  private take(bytes: number): void {
    this.used += bytes;
    this.granted += bytes;
    if (this.used > this.peak) this.peak = this.used;
  }

  private grantWaiting(): void {
    for (let head = this.waiters[0]; head !== undefined && this.used + head.bytes <= this.capacity; head = this.waiters[0]) {
      this.waiters.shift();
      this.take(head.bytes);
      head.grant(head.bytes);
    }
  }
}

/** A grpc-js server call, as far as telling when it is over goes. */
interface EndingCall {
  readonly cancelled: boolean;
  readonly destroyed?: boolean;
  once(event: 'cancelled' | 'close', listener: () => void): unknown;
}

/**
 * Holds budget for one call until the call ends: resolves with the bytes granted (released when
 * the call ends, whether it completed, failed or was cancelled; grpc-js reports the end of every
 * call as 'cancelled' once its trailers are sent or its stream is closed), or 0 if the call ended
 * while waiting. For unary responses, whose write grpc-js does not report.
 */
export async function holdForCall(budget: SendBudget, call: EndingCall, bytes: number): Promise<number> {
  if (call.cancelled || call.destroyed) return 0;
  const ended = new AbortController();
  const onEnd = (): void => ended.abort();
  call.once('cancelled', onEnd);
  call.once('close', onEnd);
  const granted = await budget.acquire(bytes, ended.signal);
  if (granted === 0) return 0;
  if (ended.signal.aborted) {
    budget.release(granted);
    return 0;
  }
  ended.signal.addEventListener('abort', () => budget.release(granted), { once: true });
  return granted;
}

/** The budget reserved for one message: given back once HTTP/2 and the producer are both done with it. */
interface Reservation {
  readonly bytes: number;
  /** HTTP/2 has taken the message (its write callback ran). */
  written: boolean;
}

/**
 * Writes a call's responses within the send budget and at most `maxInFlight` messages not yet
 * taken by HTTP/2. send() takes room for a message before the message is produced (read from
 * disk), so data is never read for a client that cannot take it. grpc-js itself would queue 16
 * messages per call before pushing back, however many calls there are.
 *
 * A message's room is given back once HTTP/2 has taken it (the write callback) and the producer no
 * longer holds its buffer, or all at once when the call ends. A producer may hold on to the last
 * message it produced until it produces the next (a suspended generator keeps its last chunk in
 * its frame), so the room of the latest message, once written, is kept and passed on to the next
 * message instead of being given back: a call waiting for room never holds room it could use.
 */
export class ResponseWriter<Res> {
  private inFlight = 0;
  private readonly held = new Set<Reservation>();
  private latest: Reservation | undefined;
  private ended = false;
  private readonly endSignal = new AbortController();
  /** Wakes send() waiting for a message in flight to be written. */
  private wakeInFlight: (() => void) | undefined;
  /** Wakes room() waiting for budget when the latest message is written (its room can be used). */
  private wakeRoom: (() => void) | undefined;

  constructor(
    private readonly call: grpc.ServerWritableStream<unknown, Res>,
    private readonly budget: SendBudget,
    private readonly maxInFlight: number,
  ) {
    const onEnd = (): void => this.end();
    call.once('cancelled', onEnd);
    call.once('close', onEnd);
    if (call.cancelled || call.destroyed) this.end();
  }

  /** Aborted when the call is over. */
  get signal(): AbortSignal {
    return this.endSignal.signal;
  }

  /** True once the call is over (cancelled, failed, finished): nothing more will be sent. */
  get done(): boolean {
    return this.ended;
  }

  /**
   * Waits for room for a message of up to `bytes`, then produces and writes it. Resolves true once
   * the message is queued, false if the call ended first or `produce` had nothing more; `produce`
   * is not called once the call has ended.
   */
  async send(bytes: number, produce: () => Promise<Res | undefined> | Res | undefined): Promise<boolean> {
    while (this.inFlight >= this.maxInFlight && !this.ended) {
      await new Promise<void>((resolve) => (this.wakeInFlight = resolve));
    }
    const room = await this.room(bytes);
    if (room === undefined) return false;
    const previous = this.latest;
    let message: Res | undefined;
    try {
      message = await produce();
    } catch (err) {
      this.giveBack(room);
      throw err;
    }
    // The producer has let go of the previous message: it is given back once written.
    if (previous && this.latest === previous) {
      this.latest = undefined;
      if (previous.written) this.giveBack(previous);
    }
    if (message === undefined || this.ended) {
      this.giveBack(room);
      return false;
    }
    this.latest = room;
    this.inFlight += 1;
    this.call.write(message, () => {
      this.inFlight -= 1;
      room.written = true;
      if (this.latest !== room) this.giveBack(room);
      else this.wake('wakeRoom');
      this.wake('wakeInFlight');
    });
    return true;
  }

  /** Room for the next message: the latest message's, if it is written, or new room from the budget. */
  private async room(bytes: number): Promise<Reservation | undefined> {
    const want = Math.min(Math.max(1, Math.ceil(bytes)), this.budget.capacity);
    for (;;) {
      if (this.ended) return undefined;
      const latest = this.latest;
      if (latest?.written) {
        // Passed on: the producer frees the latest buffer as it produces the next.
        this.latest = undefined;
        this.held.delete(latest);
        if (latest.bytes === want) return this.hold(want);
        this.budget.release(latest.bytes);
      }
      // Wait for budget; the latest message being written meanwhile ends the wait, so its room is used.
      const contended = this.budget.waiting > 0 || this.budget.inUse + want > this.budget.capacity;
      const waiting = new AbortController();
      const stop = (): void => waiting.abort();
      this.endSignal.signal.addEventListener('abort', stop, { once: true });
      this.wakeRoom = stop;
      const granted = await this.budget.acquire(want, waiting.signal);
      this.endSignal.signal.removeEventListener('abort', stop);
      if (this.wakeRoom === stop) this.wakeRoom = undefined;
      if (granted > 0) {
        // Room freed by cancelled calls comes in bursts (a client closing many streams at once);
        // letting the events already received run first means no chunk is read for a call whose
        // cancellation is among them.
        if (contended) await new Promise((resolve) => setImmediate(resolve));
        if (!this.ended) return this.hold(granted);
        this.budget.release(granted);
        return undefined;
      }
    }
  }

  private hold(bytes: number): Reservation {
    const reservation = { bytes, written: false };
    this.held.add(reservation);
    return reservation;
  }

  private giveBack(reservation: Reservation): void {
    // Once the call has ended, end() has given back everything it held.
    if (this.held.delete(reservation)) this.budget.release(reservation.bytes);
  }

  private end(): void {
    if (this.ended) return;
    this.ended = true;
    let held = 0;
    for (const r of this.held) held += r.bytes;
    this.held.clear();
    this.latest = undefined;
    this.budget.release(held);
    this.endSignal.abort();
    this.wake('wakeInFlight');
  }

  private wake(which: 'wakeInFlight' | 'wakeRoom'): void {
    const fn = this[which];
    this[which] = undefined;
    fn?.();
  }
}
