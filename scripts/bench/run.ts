/**
 * Benchmarks: the mirror and BuildStream 1.6's reference server (`buildstream._artifactcache.
 * casserver`, from Debian's `buildstream`) serve the same generated blobs on 127.0.0.1; one load
 * generator (this process, grpc-js clients) measures both in the same run and prints the figures,
 * their ratio, and this machine's loopback and disk limits. Never part of `npm test`.
 *
 *   npm run bench [-- --large-mib 64 --small-blobs 20000 --index-blobs 100000 --seconds 5]
 *
 * Both servers run as child processes, so the mirror's peak RSS (VmHWM) can be read from /proc.
 * Results are printed and saved under scripts/bench/results/.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { link, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, connect } from 'node:net';
import { cpus, tmpdir, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { ContentAddressableStorageClient } from '../../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import { ByteStreamClient } from '../../src/gen/google/bytestream/bytestream.js';
import { type Digest, toWire } from '../../src/cas/digest.js';
import { DiskContentStore } from '../../src/cas/disk-store.js';
import { silentLogger } from '../../src/log.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const { values: opts } = parseArgs({
  options: {
    'large-mib': { type: 'string', default: '64' },
    'small-blobs': { type: 'string', default: '20000' },
    'index-blobs': { type: 'string', default: '100000' },
    seconds: { type: 'string', default: '5' },
  },
});
const LARGE = Number(opts['large-mib']) << 20;
const SMALL_COUNT = Number(opts['small-blobs']);
const INDEX_COUNT = Number(opts['index-blobs']);
const SECONDS = Number(opts.seconds);

interface Server {
  name: string;
  target: string;
  pid: number;
  stop(): Promise<void>;
}

function startChild(name: string, cmd: string, args: string[], ready: RegExp): Promise<Server> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      const m = ready.exec(out);
      if (m?.[1]) {
        resolve({
          name,
          target: m[1],
          pid: child.pid ?? 0,
          stop: () =>
            new Promise<void>((res) => {
              child.once('close', () => res());
              child.kill('SIGTERM');
            }),
        });
      }
    });
    child.once('close', (code) => reject(new Error(`${name} exited (${code}) before listening: ${err}`)));
  });
}

async function peakRssMiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1] ?? 0) / 1024;
}

function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** Raw loopback TCP throughput (MB/s): one socket, 1 MiB writes, for `seconds`. */
async function loopbackLimit(seconds: number): Promise<number> {
  let received = 0;
  const server = createServer((s) => s.on('data', (d: Buffer) => (received += d.byteLength)));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as { port: number }).port;
  const sock = connect(port, '127.0.0.1');
  await new Promise<void>((r) => sock.once('connect', () => r()));
  const chunk = Buffer.alloc(1 << 20, 1);
  const end = Date.now() + seconds * 1000;
  const start = Date.now();
  while (Date.now() < end) if (!sock.write(chunk)) await new Promise((r) => sock.once('drain', r));
  const elapsed = (Date.now() - start) / 1000;
  sock.destroy();
  server.close();
  return received / elapsed / 1e6;
}

async function diskReadLimit(path: string): Promise<number> {
  const start = process.hrtime.bigint();
  let n = 0;
  for await (const c of createReadStream(path, { highWaterMark: 1 << 20 }) as AsyncIterable<Buffer>) n += c.byteLength;
  return n / (Number(process.hrtime.bigint() - start) / 1e9) / 1e6;
}

async function readStream(client: ByteStreamClient, d: Digest): Promise<number> {
  let n = 0;
  const call = client.read({ resourceName: `blobs/${d.hash}/${d.sizeBytes}`, readOffset: 0n, readLimit: 0n });
  for await (const m of call as AsyncIterable<{ data: Buffer }>) n += m.data.byteLength;
  if (n !== d.sizeBytes) throw new Error(`short read ${n}`);
  return n;
}

/** ByteStream Read MB/s with `readers` concurrent readers for `SECONDS`. */
async function byteStreamThroughput(target: string, d: Digest, readers: number): Promise<number> {
  const clients = Array.from({ length: readers }, () => new ByteStreamClient(target, grpc.credentials.createInsecure(), { 'grpc.max_receive_message_length': 64 << 20 }));
  const end = Date.now() + SECONDS * 1000;
  const start = Date.now();
  let bytes = 0;
  await Promise.all(clients.map(async (c) => {
    while (Date.now() < end) bytes += await readStream(c, d);
  }));
  clients.forEach((c) => c.close());
  return bytes / ((Date.now() - start) / 1000) / 1e6;
}

function unary<Res>(fn: (cb: (e: grpc.ServiceError | null, r: Res) => void) => void): Promise<Res> {
  return new Promise((res, rej) => fn((e, r) => (e ? rej(e) : res(r))));
}

/** BatchReadBlobs blobs/s: batches up to 1 MiB, 4 in flight, for `SECONDS`. */
async function batchThroughput(target: string, blobs: Digest[]): Promise<number> {
  const client = new ContentAddressableStorageClient(target, grpc.credentials.createInsecure(), { 'grpc.max_receive_message_length': 64 << 20 });
  const batches: Digest[][] = [];
  let cur: Digest[] = [];
  let size = 0;
  for (const d of blobs) {
    if (size + d.sizeBytes > (1 << 20) - 64 * 1024 && cur.length) {
      batches.push(cur);
      cur = [];
      size = 0;
    }
    cur.push(d);
    size += d.sizeBytes;
  }
  if (cur.length) batches.push(cur);
  const end = Date.now() + SECONDS * 1000;
  const start = Date.now();
  let count = 0;
  let next = 0;
  await Promise.all(Array.from({ length: 4 }, async () => {
    while (Date.now() < end) {
      const batch = batches[next++ % batches.length] ?? [];
      const res = await unary<{ responses: { status?: { code: number } }[] }>((cb) => client.batchReadBlobs({ instanceName: '', digests: batch.map(toWire), digestFunction: 0 }, cb));
      if (res.responses.some((r) => (r.status?.code ?? 0) !== 0)) throw new Error('batch read miss');
      count += batch.length;
    }
  }));
  client.close();
  return count / ((Date.now() - start) / 1000);
}

/** FindMissingBlobs latency (ms) of 10,000 digests, half present: p50 and p99 over 50 calls. */
async function findMissingLatency(target: string, present: Digest[]): Promise<{ p50: number; p99: number }> {
  const client = new ContentAddressableStorageClient(target, grpc.credentials.createInsecure(), { 'grpc.max_receive_message_length': 64 << 20 });
  const times: number[] = [];
  for (let i = 0; i < 50; i++) {
    const query = present.slice((i * 5000) % Math.max(1, present.length - 5000)).slice(0, 5000).map(toWire);
    for (let j = 0; j < 5000; j++) query.push({ hash: sha(Buffer.from(`absent-${i}-${j}`)), sizeBytes: 100n });
    const t0 = process.hrtime.bigint();
    await unary((cb) => client.findMissingBlobs({ instanceName: '', blobDigests: query, digestFunction: 0 }, cb));
    times.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  client.close();
  times.sort((a, b) => a - b);
  return { p50: times[Math.floor(times.length * 0.5)] ?? 0, p99: times[Math.floor(times.length * 0.99)] ?? 0 };
}

async function main(): Promise<void> {
  const work = await mkdtemp(join(tmpdir(), 'bst-mirror-bench-'));
  const mirrorDir = join(work, 'mirror');
  const refRepo = join(work, 'reference');
  const lines: string[] = [];
  const say = (s: string): void => {
    lines.push(s);
    process.stdout.write(`${s}\n`);
  };
  try {
    say(`bst-cache-mirror benchmark ${new Date().toISOString()}`);
    say(`machine: ${cpus().length} x ${cpus()[0]?.model ?? '?'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, node ${process.version}`);
    say(`data: 1 large blob of ${LARGE >> 20} MiB, ${SMALL_COUNT} small blobs (1-64 KiB), ${INDEX_COUNT} tiny blobs indexed; ${SECONDS} s per throughput run`);

    // Generate the same blobs into the mirror's store and hard-link them into the reference repo.
    const store = await DiskContentStore.open(mirrorDir, silentLogger());
    const large = randomBytes(LARGE);
    const largeDigest = { hash: sha(large), sizeBytes: LARGE };
    await store.write(largeDigest, large);
    const small: Digest[] = [];
    let pending: { digest: Digest; data: Buffer }[] = [];
    for (let i = 0; i < SMALL_COUNT + INDEX_COUNT; i++) {
      const data = i < SMALL_COUNT ? randomBytes(1024 + ((i * 7919) % (63 * 1024))) : Buffer.from(`tiny blob ${i}`);
      const digest = { hash: sha(data), sizeBytes: data.byteLength };
      small.push(digest);
      pending.push({ digest, data });
      if (pending.length === 2000) {
        await store.writeMany(pending);
        pending = [];
      }
    }
    await store.writeMany(pending);
    await store.close();
    for (const d of [largeDigest, ...small]) {
      const to = join(refRepo, 'cas/objects', d.hash.slice(0, 2), d.hash.slice(2));
      await mkdir(dirname(to), { recursive: true });
      await link(join(mirrorDir, 'cas/objects', d.hash.slice(0, 2), d.hash.slice(2)), to).catch(() => undefined);
    }
    await mkdir(join(refRepo, 'cas/refs/heads'), { recursive: true });
    await writeFile(join(work, 'README'), 'scratch data for scripts/bench/run.ts\n');

    const loop = await loopbackLimit(3);
    const disk = await diskReadLimit(join(mirrorDir, 'cas/objects', largeDigest.hash.slice(0, 2), largeDigest.hash.slice(2)));
    say(`limits: loopback TCP ${loop.toFixed(0)} MB/s (1 socket); disk sequential read ${disk.toFixed(0)} MB/s (page cache warm)`);

    const t0 = Date.now();
    const mirror = await startChild('mirror', process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'serve', '--dir', mirrorDir, '--listen', '127.0.0.1:0', '--log-level', 'error'], / on (\S+)\n/);
    const startupMs = Date.now() - t0;
    const reference = await startChild('reference', '/usr/bin/python3', ['test/fixtures/casserver.py', refRepo], /LISTENING (\d+)\n/);
    reference.target = `127.0.0.1:${reference.target}`;
    const rows: [string, string, number, number, string][] = [];
    const measure = async (what: string, unit: string, fn: (target: string) => Promise<number>, higherIsBetter = true): Promise<void> => {
      const m = await fn(mirror.target);
      const r = await fn(reference.target);
      rows.push([what, unit, m, r, (higherIsBetter ? m / r : r / m).toFixed(2)]);
    };
    await measure('ByteStream Read, 1 reader', 'MB/s', (t) => byteStreamThroughput(t, largeDigest, 1));
    await measure('ByteStream Read, 8 readers', 'MB/s', (t) => byteStreamThroughput(t, largeDigest, 8));
    await measure('BatchReadBlobs (1-64 KiB blobs)', 'blobs/s', (t) => batchThroughput(t, small.slice(0, SMALL_COUNT)));
    const fmMirror = await findMissingLatency(mirror.target, small);
    const fmRef = await findMissingLatency(reference.target, small);
    rows.push(['FindMissingBlobs 10k digests, p50', 'ms', fmMirror.p50, fmRef.p50, (fmRef.p50 / fmMirror.p50).toFixed(2)]);
    rows.push(['FindMissingBlobs 10k digests, p99', 'ms', fmMirror.p99, fmRef.p99, (fmRef.p99 / fmMirror.p99).toFixed(2)]);
    const rss = await peakRssMiB(mirror.pid);
    await mirror.stop();
    await reference.stop();

    say('');
    say('| benchmark | unit | mirror | reference server | mirror advantage (x) |');
    say('| --- | --- | ---: | ---: | ---: |');
    for (const [what, unit, m, r, ratio] of rows) say(`| ${what} | ${unit} | ${m.toFixed(1)} | ${r.toFixed(1)} | ${ratio} |`);
    say('');
    say(`ByteStream Read, 1 reader, as a fraction of loopback: ${((rows[0]?.[2] ?? 0) / loop * 100).toFixed(0)}%`);
    say(`mirror peak RSS while serving: ${rss.toFixed(0)} MiB; start-up to listening with ${SMALL_COUNT + INDEX_COUNT + 1} blobs indexed: ${startupMs} ms (includes tsx start)`);
    const out = join(ROOT, 'scripts/bench/results', `${new Date().toISOString().replace(/[:.]/g, '-')}.txt`);
    await writeFile(out, `${lines.join('\n')}\n`);
    process.stdout.write(`saved ${out}\n`);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

await main();
