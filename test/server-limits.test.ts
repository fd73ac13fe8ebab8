import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import http2 from 'node:http2';
import net from 'node:net';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { pino, type Logger } from 'pino';
import { type Digest, digestOf, toWire } from '../src/cas/digest.js';
import { DiskContentStore } from '../src/cas/disk-store.js';
import { BatchReadBlobsRequest, Directory, FindMissingBlobsRequest } from '../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import { ReadRequest } from '../src/gen/google/bytestream/bytestream.js';
import { silentLogger } from '../src/log.js';
import { IdleCollector } from '../src/server/idle-gc.js';
import { LimitLog } from '../src/server/limit-log.js';
import { SendBudget } from '../src/server/send-budget.js';
import { MirrorServer, type ServeLimits } from '../src/server/server.js';
import { call, clientsFor, readAll, tempDir } from './helpers/mirror.js';

const MiB = 1 << 20;
type T = { after(fn: () => Promise<void> | void): void };

/** Waits, polling every 5 ms for at most `ms`, until `ok()` holds. */
async function until(ok: () => boolean, what: string, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

interface LogLine {
  level: number;
  msg: string;
  limit?: string;
  hits?: number;
}

/** A logger whose lines the test can read. */
function capturedLog(): { log: Logger; lines: LogLine[]; warnings(limit: string): LogLine[] } {
  const lines: LogLine[] = [];
  const log = pino({ level: 'info', base: undefined }, { write: (s: string) => void lines.push(JSON.parse(s) as LogLine) });
  return { log, lines, warnings: (limit) => lines.filter((l) => l.level === 40 && l.limit === limit) };
}

async function serve(t: T, blobs: Buffer[], options: { limits?: Partial<ServeLimits>; sendBudget?: SendBudget; log?: Logger; quietMs?: number } = {}) {
  const dir = await tempDir(t);
  const store = await DiskContentStore.open(dir, silentLogger());
  for (const b of blobs) await store.write(digestOf(b), b);
  const server = await MirrorServer.start(store, {
    listen: '127.0.0.1:0',
    maxBatchBytes: MiB,
    log: options.log ?? silentLogger(),
    limits: options.limits,
    sendBudget: options.sendBudget,
    limitEpisodeQuietMs: options.quietMs ?? 60_000,
  });
  const clients = clientsFor(server.address);
  t.after(async () => {
    clients.close();
    await server.stop(1000);
    await store.close();
  });
  return { server, store, clients };
}

interface RawCall {
  stream: http2.ClientHttp2Stream;
  /** The grpc-status the server ended with, or the RST_STREAM code it reset the stream with. */
  done: Promise<{ grpcStatus?: number; grpcMessage?: string; rstCode: number; bytes: number }>;
}

/**
 * A gRPC call over raw HTTP/2. With `window: 0` the client never lets the server send a byte of
 * data (a paused client); `prefix` overrides the message's length prefix.
 */
function rawCall(t: T, address: string, path: string, body: Buffer, opts: { window?: number; prefix?: number; end?: boolean } = {}): RawCall {
  const session = http2.connect(`http://${address}`, { settings: { initialWindowSize: opts.window ?? 65_535 } });
  session.on('error', () => undefined);
  t.after(() => void session.destroy());
  const frame = Buffer.alloc(5 + body.byteLength);
  frame.writeUInt32BE(opts.prefix ?? body.byteLength, 1);
  body.copy(frame, 5);
  const stream = session.request({ ':method': 'POST', ':path': path, 'content-type': 'application/grpc', te: 'trailers' });
  stream.on('error', () => undefined);
  if (opts.end === false) stream.write(frame);
  else stream.end(frame);
  const done = new Promise<{ grpcStatus?: number; grpcMessage?: string; rstCode: number; bytes: number }>((resolve) => {
    let grpcStatus: number | undefined;
    let grpcMessage: string | undefined;
    let bytes = 0;
    const status = (h: http2.IncomingHttpHeaders): void => {
      if (h['grpc-status'] !== undefined) {
        grpcStatus = Number(h['grpc-status']);
        grpcMessage = decodeURIComponent(String(h['grpc-message'] ?? ''));
        // The call is over; a request left open (opts.end false) would keep the stream from closing.
        if (opts.end === false) stream.close();
      }
    };
    stream.on('response', status);
    stream.on('trailers', status);
    stream.on('data', (d: Buffer) => (bytes += d.byteLength));
    stream.on('close', () => resolve({ grpcStatus, grpcMessage, rstCode: stream.rstCode ?? 0, bytes }));
  });
  return { stream, done };
}

const readRequest = (d: Digest): Buffer => Buffer.from(ReadRequest.encode({ resourceName: `blobs/${d.hash}/${d.sizeBytes}`, readOffset: 0n, readLimit: 0n }).finish());

/** A SendBudget that also counts the waits it saw. */
class WatchedBudget extends SendBudget {
  mostWaiting = 0;
  constructor(capacity: number) {
    super(capacity, (waiting) => (this.mostWaiting = Math.max(this.mostWaiting, waiting)));
  }
}

test('the send budget bounds response data across concurrent ByteStream reads, batch reads and GetTree; all answers exact, all bytes given back', async (t) => {
  const big = randomBytes(3 * MiB + 123);
  const smalls = Array.from({ length: 20 }, () => randomBytes(10_000));
  // A tree: a root with 40 subdirectories, each with one file entry.
  const leaves = Array.from({ length: 40 }, (_, i) => Buffer.from(Directory.encode({ files: [{ name: `f${i}`, digest: toWire(digestOf(smalls[i % 20] as Buffer)), isExecutable: false }], directories: [], symlinks: [] }).finish()));
  const root = Buffer.from(Directory.encode({ files: [], directories: leaves.map((l, i) => ({ name: `d${i}`, digest: toWire(digestOf(l)) })), symlinks: [] }).finish());
  const budget = new WatchedBudget(3 * MiB);
  const { clients: c } = await serve(t, [big, ...smalls, ...leaves, root], { sendBudget: budget });
  const d = digestOf(big);
  const resource = `blobs/${d.hash}/${d.sizeBytes}`;
  const tree = async (): Promise<number> => {
    let dirs = 0;
    const stream = c.cas.getTree({ instanceName: '', rootDigest: toWire(digestOf(root)), pageSize: 7, pageToken: '', digestFunction: 0 }, new grpc.Metadata(), { deadline: Date.now() + 30_000 });
    for await (const page of stream as AsyncIterable<{ directories: unknown[] }>) dirs += page.directories.length;
    return dirs;
  };
  const wholeReads = 8;
  await Promise.all([
    ...Array.from({ length: wholeReads }, () => readAll(c.bytestream, resource).then((b) => assert.ok(b.equals(big), 'whole read'))),
    ...[[0, MiB + 1], [MiB - 3, 2 * MiB], [3 * MiB, 0]].map(([offset = 0, limit = 0]) =>
      readAll(c.bytestream, resource, BigInt(offset), BigInt(limit)).then((b) => assert.ok(b.equals(big.subarray(offset, limit === 0 ? undefined : offset + limit)), `range ${offset}+${limit}`)),
    ),
    ...Array.from({ length: 6 }, () =>
      call(c.cas, c.cas.batchReadBlobs, { instanceName: '', digests: smalls.map((s) => toWire(digestOf(s))), digestFunction: 0 }).then((r) =>
        r.responses.forEach((e, i) => assert.ok(e.data.equals(smalls[i] as Buffer), `batch entry ${i}`)),
      ),
    ),
    ...Array.from({ length: 3 }, () => tree().then((n) => assert.equal(n, 41))),
  ]);
  assert.ok(budget.peakInUse <= budget.capacity, `peak ${budget.peakInUse} over ${budget.capacity}`);
  assert.ok(budget.mostWaiting > 0, 'the budget was contended');
  assert.ok(budget.peakInUse > budget.capacity - MiB - 64, `the budget was filled (peak ${budget.peakInUse})`);
  // Everything is given back once the last write callbacks and call ends have run.
  await until(() => budget.inUse === 0 && budget.waiting === 0, 'the budget is empty again');
});

test('a paused reader is cancelled after the stall timeout, giving back its budget; the read waiting behind it then finishes', async (t) => {
  const big = randomBytes(5 * MiB);
  const small = randomBytes(600_000);
  const budget = new WatchedBudget(2 * MiB + 64);
  const { log, warnings } = capturedLog();
  const { server, clients: c } = await serve(t, [big, small], { sendBudget: budget, limits: { stallTimeoutMs: 1000 }, log });
  // A client whose HTTP/2 window is 0: the server can send it nothing. It takes budget and stalls.
  const paused = rawCall(t, server.address, '/google.bytestream.ByteStream/Read', readRequest(digestOf(big)), { window: 0 });
  await until(() => budget.inUse >= 2 * MiB, 'the paused read holds the whole budget');
  // This read has to wait until the paused one is cancelled.
  const waiting = readAll(c.bytestream, `blobs/${digestOf(big).hash}/${big.byteLength}`);
  await until(() => budget.waiting >= 1, 'a read waits for budget');
  const ended = await paused.done;
  assert.equal(ended.rstCode, http2.constants.NGHTTP2_CANCEL, 'the server reset the paused stream');
  assert.equal(ended.bytes, 0);
  assert.ok((await waiting).equals(big), 'the waiting read completed exactly');
  // A paused BatchReadBlobs (a unary response) is cancelled the same way.
  const batch = BatchReadBlobsRequest.encode({ instanceName: '', digests: [toWire(digestOf(small))], digestFunction: 0 }).finish();
  const pausedBatch = rawCall(t, server.address, '/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs', Buffer.from(batch), { window: 0 });
  assert.equal((await pausedBatch.done).rstCode, http2.constants.NGHTTP2_CANCEL);
  await until(() => budget.inUse === 0, 'all budget is given back');
  assert.equal(warnings('stalled-call').length, 1, 'logged once for the episode');
});

test('idle connections are closed after the idle timeout, including one that never speaks HTTP/2', async (t) => {
  const { server, clients: c } = await serve(t, [], { limits: { idleTimeoutMs: 200 } });
  await call(c.capabilities, c.capabilities.getCapabilities, { instanceName: '' });
  const channel = c.capabilities.getChannel();
  assert.equal(channel.getConnectivityState(false), grpc.connectivityState.READY);
  const next = await new Promise<grpc.connectivityState>((resolve, reject) =>
    channel.watchConnectivityState(grpc.connectivityState.READY, Date.now() + 10_000, (err) => (err ? reject(err) : resolve(channel.getConnectivityState(false)))),
  );
  assert.equal(next, grpc.connectivityState.IDLE, 'the server closed the idle connection (GOAWAY)');
  const socket = net.connect(Number(server.address.split(':').pop()), '127.0.0.1');
  t.after(() => void socket.destroy());
  socket.on('error', () => undefined);
  socket.resume(); // reads (and drops) what the server sends, so the client sees the server close
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  await until(() => server.connections >= 1, 'the server has the silent connection');
  await new Promise<void>((resolve) => socket.once('close', () => resolve()));
  await until(() => server.connections === 0, 'no connection is left');
  // A closed channel reconnects on its next call.
  await call(c.capabilities, c.capabilities.getCapabilities, { instanceName: '' });
});

test('a request over the receive limit is refused from its length prefix with RESOURCE_EXHAUSTED, logged once per episode', async (t) => {
  const { log, lines, warnings } = capturedLog();
  const { server } = await serve(t, [], { limits: { maxRequestBytes: 65_536 }, log });
  const path = '/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs';
  // The prefix announces 60 MiB; 1 KiB is sent and the stream left open: the answer cannot wait for the rest.
  const announced = rawCall(t, server.address, path, Buffer.alloc(1024), { prefix: 60 * MiB, end: false });
  const refused = await announced.done;
  assert.equal(refused.grpcStatus, grpc.status.RESOURCE_EXHAUSTED);
  assert.match(refused.grpcMessage ?? '', /larger than max \(62914560 vs 65536\)/);
  const client = new grpc.Client(server.address, grpc.credentials.createInsecure());
  t.after(() => client.close());
  const raw = (payload: Buffer) =>
    new Promise<void>((resolve, reject) =>
      client.makeUnaryRequest(path, (b: Buffer) => b, (b: Buffer) => b, payload, new grpc.Metadata(), { deadline: Date.now() + 10_000 }, (err) => (err ? reject(err) : resolve())),
    );
  const tooLarge = (e: grpc.ServiceError) => e.code === grpc.status.RESOURCE_EXHAUSTED && /larger than max \(1048576 vs 65536\)/.test(e.details);
  await Promise.all(Array.from({ length: 4 }, () => assert.rejects(raw(Buffer.alloc(MiB)), tooLarge)));
  // Under the limit, the request is decoded and judged on its content.
  const fits = Buffer.from(FindMissingBlobsRequest.encode({ instanceName: 'x'.repeat(60_000), blobDigests: [], digestFunction: 0 }).finish());
  await assert.rejects(raw(fits), (e: grpc.ServiceError) => e.code === grpc.status.INVALID_ARGUMENT);
  assert.equal(warnings('request-size').length, 1, 'one warning for the episode');
  // The episode's summary comes after a quiet minute, or at shutdown.
  await server.stop(1000);
  assert.equal(lines.filter((l) => l.limit === 'request-size' && l.level === 30 && l.hits === 5).length, 1, 'one summary with the count');
});

test('connections over --max-connections are closed as they arrive, logged once; the others keep working', async (t) => {
  const { log, warnings } = capturedLog();
  const { server, clients: c } = await serve(t, [], { limits: { maxConnections: 1 }, log });
  await call(c.capabilities, c.capabilities.getCapabilities, { instanceName: '' });
  const closedAtOnce = Array.from({ length: 3 }, async () => {
    const socket = net.connect(Number(server.address.split(':').pop()), '127.0.0.1');
    socket.on('error', () => undefined);
    socket.resume();
    t.after(() => void socket.destroy());
    await new Promise<void>((resolve) => socket.once('close', () => resolve()));
  });
  await Promise.all(closedAtOnce);
  assert.equal(warnings('connections').length, 1);
  await call(c.capabilities, c.capabilities.getCapabilities, { instanceName: '' });
  assert.equal(server.connections, 1);
});

test('calls over --max-streams-per-connection wait in the client and all complete; reaching the cap is logged', async (t) => {
  const data = randomBytes(3 * MiB);
  const { log, warnings } = capturedLog();
  const { clients: c } = await serve(t, [data], { limits: { maxStreamsPerConnection: 2 }, log });
  const d = digestOf(data);
  const reads = await Promise.all(Array.from({ length: 6 }, () => readAll(c.bytestream, `blobs/${d.hash}/${d.sizeBytes}`)));
  for (const r of reads) assert.ok(r.equals(data));
  assert.equal(warnings('streams-per-connection').length, 1);
});

test('a limit is logged once per episode: a warning at the first hit, a summary after a quiet period, and again for the next episode', async () => {
  const { log, lines } = capturedLog();
  const limits = new LimitLog(log, 30);
  for (let i = 0; i < 1000; i++) limits.hit('connections', 'refusing new connections', { peer: `p${i}` });
  assert.equal(lines.length, 1);
  assert.equal(lines[0]?.level, 40);
  await until(() => lines.length === 2, 'the episode ends');
  assert.equal(lines[1]?.hits, 1000);
  assert.equal(lines[1]?.level, 30);
  limits.hit('connections', 'refusing new connections');
  assert.equal(lines.length, 3, 'a new episode starts with a new warning');
  limits.close();
  assert.equal(lines[3]?.hits, 1);
});

test('after a burst, one full collection runs once the send budget has stood empty and unused for a period', async () => {
  const gauge = { inUse: 0, totalGranted: 0 };
  const collector = new IdleCollector(gauge, 10, 64 * MiB);
  try {
    gauge.totalGranted = 10 * MiB; // a small burst: not worth a collection
    await until(() => collector.checks >= 3, 'three checks');
    assert.equal(collector.collections, 0);
    gauge.totalGranted = 200 * MiB; // a large burst, still holding the budget
    gauge.inUse = MiB;
    const checks = collector.checks;
    await until(() => collector.checks >= checks + 3, 'three more checks');
    assert.equal(collector.collections, 0, 'no collection while the budget is in use');
    gauge.inUse = 0;
    await until(() => collector.collections === 1, 'a collection once quiet');
    const after = collector.checks;
    await until(() => collector.checks >= after + 3, 'three more checks');
    assert.equal(collector.collections, 1, 'one collection per burst');
  } finally {
    collector.close();
  }
});
