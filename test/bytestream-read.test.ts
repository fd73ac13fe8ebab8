import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readdir, readlink } from 'node:fs/promises';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { digestOf } from '../src/cas/digest.js';
import { DiskContentStore } from '../src/cas/disk-store.js';
import { silentLogger } from '../src/log.js';
import { readAll, startMirror, tempDir } from './helpers/mirror.js';

const MiB = 1 << 20;

async function storeWith(t: { after(fn: () => Promise<void>): void }, data: Buffer): Promise<string> {
  const dir = await tempDir(t);
  const store = await DiskContentStore.open(dir, silentLogger());
  await store.write(digestOf(data), data);
  await store.close();
  return dir;
}

/** Files under `dir` this process has open. */
async function openFilesUnder(dir: string): Promise<number> {
  const targets = await Promise.all((await readdir('/proc/self/fd')).map((fd) => readlink(`/proc/self/fd/${fd}`).catch(() => '')));
  return targets.filter((path) => path.startsWith(`${dir}/`)).length;
}

test('ByteStream: many concurrent whole and ranged reads of a multi-chunk blob are all exact', async (t) => {
  const data = randomBytes(5 * MiB + 12345);
  const d = digestOf(data);
  const { clients: c } = await startMirror(t, await storeWith(t, data));
  const resource = `blobs/${d.hash}/${d.sizeBytes}`;
  const ranges: [number, number][] = [[0, 0], [1, 0], [MiB - 1, 2], [MiB, MiB], [3 * MiB + 7, 0], [d.sizeBytes, 0], [d.sizeBytes - 1, 5]];
  const reads = [
    ...Array.from({ length: 6 }, () => readAll(c.bytestream, resource).then((b) => assert.ok(b.equals(data)))),
    ...ranges.map(([offset, limit]) =>
      readAll(c.bytestream, resource, BigInt(offset), BigInt(limit)).then((b) => {
        const end = limit === 0 ? data.byteLength : Math.min(data.byteLength, offset + limit);
        assert.ok(b.equals(data.subarray(offset, end)), `range ${offset}+${limit}`);
      }),
    ),
  ];
  await Promise.all(reads);
});

test('ByteStream: a client that cancels mid-read leaves no open file and the server keeps serving', async (t) => {
  const data = randomBytes(24 * MiB);
  const d = digestOf(data);
  const dir = await storeWith(t, data);
  const { clients: c } = await startMirror(t, dir);
  const objects = `${dir}/cas/objects`;
  const stream = c.bytestream.read({ resourceName: `blobs/${d.hash}/${d.sizeBytes}`, readOffset: 0n, readLimit: 0n });
  const ended = new Promise<grpc.ServiceError | undefined>((resolve) => {
    stream.on('error', (e: grpc.ServiceError) => resolve(e));
    stream.on('end', () => resolve(undefined));
  });
  await new Promise<void>((resolve) => stream.once('data', () => resolve()));
  assert.equal(await openFilesUnder(objects), 1, 'the read holds its object file');
  stream.cancel();
  assert.equal((await ended)?.code, grpc.status.CANCELLED);
  // The server learns of the cancel asynchronously; a following read on the same channel is
  // ordered after it, and must succeed in full.
  assert.ok((await readAll(c.bytestream, `blobs/${d.hash}/${d.sizeBytes}`)).equals(data));
  // Closing is asynchronous too: give it a bounded number of event-loop turns.
  for (let i = 0; (await openFilesUnder(objects)) > 0 && i < 1000; i++) await new Promise((r) => setImmediate(r));
  assert.equal(await openFilesUnder(objects), 0, 'the cancelled read closed its file');
});
