import assert from 'node:assert/strict';
import { test } from 'node:test';
import { IoWorker } from '../src/cas/io-worker.js';

type Req = { op: 'echo' | 'throw' | 'exit' | 'crash-later'; value: number };

function program(): (request: Req) => { reply: number } {
  let calls = 0;
  // A named inner function, as a program may well have: tsx wraps these in __name().
  const count = (): number => ++calls;
  return (request) => {
    count();
    if (request.op === 'throw') throw new Error(`bad value ${request.value}`);
    if (request.op === 'exit') process.exit(3);
    if (request.op === 'crash-later') {
      // An uncaught error after replying: the thread reports 'error', then 'exit', later.
      setImmediate(() => {
        throw new Error('crashed');
      });
    }
    return { reply: request.value * 10 + calls };
  };
}

test('IoWorker: answers in order, reports a thrown error, survives its thread dying', async (t) => {
  const worker = new IoWorker<Req, number>('test worker', program);
  t.after(() => worker.close());
  assert.deepEqual(await Promise.all([worker.request({ op: 'echo', value: 1 }), worker.request({ op: 'echo', value: 2 })]), [11, 22]);
  await assert.rejects(worker.request({ op: 'throw', value: 7 }), /test worker: bad value 7/);
  await assert.rejects(worker.request({ op: 'exit', value: 0 }), /the test worker thread stopped: exit code 3/);
  // A fresh thread (its state starts over) takes the next request.
  assert.equal(await worker.request({ op: 'echo', value: 5 }), 51);
});

test('IoWorker: a crashed thread\'s late exit does not fail requests sent to its replacement', async (t) => {
  const worker = new IoWorker<Req, number>('test worker', program);
  t.after(() => worker.close());
  // The thread answers, then dies of an uncaught error at a moment nothing promises: under load it
  // answered 17 more requests first. Each reply carries the thread's call count, so a count that
  // starts over shows the replacement took over.
  assert.equal(await worker.request({ op: 'crash-later', value: 1 }), 11);
  const failures: string[] = [];
  let lastCount = 1;
  let restarted = false;
  for (let i = 0; i < 100_000 && !restarted; i++) {
    try {
      const count = await worker.request({ op: 'echo', value: 0 });
      restarted = count <= lastCount;
      lastCount = count;
    } catch (err) {
      failures.push((err as Error).message);
    }
  }
  assert.ok(restarted, 'the crashed thread was replaced');
  // At most the one request the thread held when it died fails, with the reason.
  assert.ok(failures.length <= 1, failures.join('; '));
  for (const f of failures) assert.equal(f, 'the test worker thread stopped: crashed');
  // The dead thread's late 'exit' must not fail anything sent to its replacement.
  for (let i = 1; i <= 50; i++) assert.equal(await worker.request({ op: 'echo', value: 0 }), lastCount + i);
});
