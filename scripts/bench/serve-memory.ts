/**
 * Memory of a real `bst-cache-mirror serve` process (the built `dist/cli/main.js`) under many and
 * hostile clients (issue 8): its peak resident set (VmHWM, reset before each scenario through
 * /proc/PID/clear_refs) and its resident set after the burst, once every client is gone.
 *
 *   node --import tsx scripts/bench/serve-memory.ts [--no-build] [--quick] [--serve-arg=--flag=value …] [--cli PATH]
 *                                                    [--scenario readers|paused-grpc|paused-h2|oversized|idle …]
 *
 * Scenarios, one after another against one serve process:
 * - readers: 200 concurrent ByteStream reads of a 64 MiB blob (over 50 connections) while 4
 *   loops send FindMissingBlobs of 10,000 digests;
 * - paused (grpc-js): 300 reads opened by grpc-js clients that never consume the stream, held,
 *   then cancelled;
 * - paused (h2, zero window): 300 reads over raw HTTP/2 whose stream window is 0, so the server
 *   cannot send a byte, held, then cancelled;
 * - oversized requests: 20 concurrent FindMissingBlobs requests of 60 MiB each;
 * - idle connections: 2000 clients make one call each and stay connected; the open file
 *   descriptors of the serve process are counted then and after the settling time (pass
 *   `--serve-arg=--idle-timeout=5` to see them closed within it).
 *
 * Clients run in this process; only the serve process is measured.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import http2 from 'node:http2';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { type Digest, digestOf, toWire } from '../../src/cas/digest.js';
import { DiskContentStore } from '../../src/cas/disk-store.js';
import { FindMissingBlobsRequest } from '../../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import { ReadRequest } from '../../src/gen/google/bytestream/bytestream.js';
import { silentLogger } from '../../src/log.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const MiB = 1 << 20;

const { values: args } = parseArgs({
  options: {
    'no-build': { type: 'boolean', default: false },
    /** Another build of the CLI to measure (e.g. of an older commit); implies --no-build. */
    cli: { type: 'string' },
    quick: { type: 'boolean', default: false },
    'serve-arg': { type: 'string', multiple: true, default: [] },
    readers: { type: 'string' },
    paused: { type: 'string' },
    hold: { type: 'string' },
    settle: { type: 'string' },
    'find-missing-loops': { type: 'string' },
    /** Run only these scenarios (readers, paused-grpc, paused-h2, oversized, idle), e.g. each in a fresh process. */
    scenario: { type: 'string', multiple: true },
  },
});
const quick = args.quick;
const READERS = Number(args.readers ?? (quick ? 40 : 200));
const READER_CONNECTIONS = Math.max(1, Math.ceil(READERS / 4));
const BLOB_BYTES = (quick ? 16 : 64) * MiB;
const PAUSED = Number(args.paused ?? (quick ? 60 : 300));
const PAUSED_PER_CONNECTION = 10;
const FIND_MISSING_LOOPS = Number(args['find-missing-loops'] ?? 4);
const FIND_MISSING_DIGESTS = 10_000;
const OVERSIZED = quick ? 5 : 20;
const IDLE_CONNECTIONS = quick ? 200 : 2000;
const OVERSIZED_BYTES = 60 * MiB;
/** Seconds paused readers are held open before they cancel. */
const HOLD_S = Number(args.hold ?? (quick ? 3 : 10));
/** Seconds after a burst at which the resident set is read again. */
const SETTLE_S = Number(args.settle ?? (quick ? 3 : 10));

interface Row {
  scenario: string;
  idleBeforeMiB: number;
  peakMiB: number;
  after1sMiB: number;
  afterSettleMiB: number;
  outcome: string;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

async function procStatus(pid: number, field: 'VmRSS' | 'VmHWM'): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const kib = Number(new RegExp(`^${field}:\\s+(\\d+) kB$`, 'm').exec(status)?.[1] ?? NaN);
  return kib / 1024;
}

function fmt(mib: number): string {
  return Number.isFinite(mib) ? `${mib.toFixed(0)} MiB` : '-';
}

async function prepareStore(dir: string): Promise<{ blob: Digest; present: Digest[] }> {
  const store = await DiskContentStore.open(dir, silentLogger());
  try {
    const data = randomBytes(BLOB_BYTES);
    const blob = digestOf(data);
    await store.write(blob, data);
    const small = Array.from({ length: FIND_MISSING_DIGESTS / 2 }, (_, i) => {
      const bytes = Buffer.from(`small blob ${i}\n`);
      return { digest: digestOf(bytes), data: bytes };
    });
    for (let i = 0; i < small.length; i += 1000) await store.writeMany(small.slice(i, i + 1000));
    return { blob, present: small.map((s) => s.digest) };
  } finally {
    await store.close();
  }
}

interface Serve {
  child: ChildProcess;
  pid: number;
  address: string;
  stderr(): string;
  stop(): Promise<void>;
}

function startServe(dir: string, extra: readonly string[]): Promise<Serve> {
  const cliArgs = [args.cli ?? join(ROOT, 'dist/cli/main.js'), 'serve', '--dir', dir, '--listen', '127.0.0.1:0', '--log-level', 'info', ...extra];
  const child = spawn(process.execPath, cliArgs, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  const exited = new Promise<void>((resolve) => child.on('close', () => resolve()));
  process.on('exit', () => child.kill('SIGKILL'));
  child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  return new Promise((resolve, reject) => {
    child.stdout?.on('data', (d: Buffer) => {
      out += d.toString();
      const m = / on (\S+)\n/.exec(out);
      if (m?.[1] && child.pid !== undefined) {
        resolve({
          child,
          pid: child.pid,
          address: m[1],
          stderr: () => err,
          stop: async () => {
            child.kill('SIGTERM');
            await exited;
          },
        });
      }
    });
    void exited.then(() => reject(new Error(`serve exited before listening: ${err}`)));
  });
}

/**
 * A grpc-js client of its own connection (no subchannel sharing), with an 8 MiB HTTP/2 window as
 * the mirror's sync uses (grpc-js's 64 KiB default, shared by a connection's streams, would make
 * the client the bottleneck; C-core clients such as bst's grow theirs).
 */
function rawClient(address: string): grpc.Client {
  return new grpc.Client(address, grpc.credentials.createInsecure(), {
    'grpc.use_local_subchannel_pool': 1,
    'grpc-node.flow_control_window': 8 * MiB,
    'grpc.max_receive_message_length': 64 * MiB,
    'grpc.max_send_message_length': 128 * MiB,
  });
}

const identity = (b: Buffer): Buffer => b;

function statusName(err: unknown): string {
  const code = (err as { code?: unknown }).code;
  return typeof code === 'number' ? (grpc.status[code] ?? String(code)) : String(err);
}

function countOutcomes(outcomes: string[]): string {
  const counts = new Map<string, number>();
  for (const o of outcomes) counts.set(o, (counts.get(o) ?? 0) + 1);
  return [...counts].map(([o, n]) => `${n} ${o}`).join(', ');
}

/** Reads the blob to the end; resolves with 'OK' or the status it ended with. */
function readBlob(client: grpc.Client, blob: Digest): Promise<string> {
  return new Promise((resolve) => {
    let bytes = 0;
    const call = client.makeServerStreamRequest(
      '/google.bytestream.ByteStream/Read',
      (r: ReadRequest) => Buffer.from(ReadRequest.encode(r).finish()),
      identity,
      { resourceName: `blobs/${blob.hash}/${blob.sizeBytes}`, readOffset: 0n, readLimit: 0n },
    );
    call.on('data', (m: Buffer) => (bytes += dataLength(m)));
    call.on('error', (e) => resolve(statusName(e)));
    call.on('end', () => resolve(bytes === blob.sizeBytes ? 'OK' : `short read (${bytes} bytes)`));
  });
}

/** A ReadResponse is its data field alone: a tag byte, a varint length, then the data. */
function dataLength(message: Buffer): number {
  let length = 0;
  for (let at = 1, shift = 1; at < message.byteLength; at++, shift *= 128) {
    const byte = message[at] ?? 0;
    length += (byte & 0x7f) * shift;
    if (byte < 0x80) break;
  }
  return length;
}

function findMissing(client: grpc.Client, digests: Digest[]): Promise<string> {
  const req = FindMissingBlobsRequest.encode({ instanceName: '', blobDigests: digests.map(toWire), digestFunction: 0 }).finish();
  return rawUnary(client, '/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs', Buffer.from(req), 60_000);
}

function rawUnary(client: grpc.Client, path: string, payload: Buffer, timeoutMs: number): Promise<string> {
  return new Promise((resolve) =>
    client.makeUnaryRequest(path, identity, identity, payload, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err) => resolve(err ? statusName(err) : 'OK')),
  );
}

async function measure(serve: Serve, scenario: string, run: () => Promise<string>): Promise<Row> {
  const idleBeforeMiB = await procStatus(serve.pid, 'VmRSS');
  await writeFile(`/proc/${serve.pid}/clear_refs`, '5'); // resets VmHWM to the current RSS
  const started = Date.now();
  const outcome = await run();
  const seconds = (Date.now() - started) / 1000;
  await sleep(1000);
  const after1sMiB = await procStatus(serve.pid, 'VmRSS');
  await sleep(Math.max(0, SETTLE_S - 1) * 1000);
  const afterSettleMiB = await procStatus(serve.pid, 'VmRSS');
  // The peak over the burst and the settling after it (cancelled calls are torn down after the clients leave).
  const peakMiB = await procStatus(serve.pid, 'VmHWM');
  const row = { scenario, idleBeforeMiB, peakMiB, after1sMiB, afterSettleMiB, outcome: `${outcome} (${seconds.toFixed(1)} s)` };
  process.stderr.write(`${JSON.stringify(row)}\n`);
  return row;
}

async function readersScenario(address: string, blob: Digest, present: Digest[]): Promise<string> {
  const clients = Array.from({ length: READER_CONNECTIONS }, () => rawClient(address));
  const fmClients = Array.from({ length: FIND_MISSING_LOOPS }, () => rawClient(address));
  try {
    const absent = Array.from({ length: FIND_MISSING_DIGESTS - present.length }, () => digestOf(randomBytes(16)));
    const digests = [...present, ...absent];
    let done = false;
    const fmOutcomes: string[] = [];
    const loops = fmClients.map(async (c) => {
      while (!done) fmOutcomes.push(await findMissing(c, digests));
    });
    const started = Date.now();
    const outcomes = await Promise.all(Array.from({ length: READERS }, (_, i) => readBlob(clients[i % clients.length] as grpc.Client, blob)));
    const seconds = (Date.now() - started) / 1000;
    done = true;
    await Promise.all(loops);
    const mbps = (READERS * blob.sizeBytes) / 1e6 / seconds;
    return `reads: ${countOutcomes(outcomes)}, ${mbps.toFixed(0)} MB/s; FindMissingBlobs: ${countOutcomes(fmOutcomes)}`;
  } finally {
    for (const c of [...clients, ...fmClients]) c.close();
  }
}

async function pausedGrpcScenario(address: string, blob: Digest): Promise<string> {
  const clients = Array.from({ length: Math.ceil(PAUSED / PAUSED_PER_CONNECTION) }, () => rawClient(address));
  const outcomes: Promise<string>[] = [];
  const calls: grpc.ClientReadableStream<Buffer>[] = [];
  for (let i = 0; i < PAUSED; i++) {
    const call = (clients[i % clients.length] as grpc.Client).makeServerStreamRequest(
      '/google.bytestream.ByteStream/Read',
      (r: ReadRequest) => Buffer.from(ReadRequest.encode(r).finish()),
      identity,
      { resourceName: `blobs/${blob.hash}/${blob.sizeBytes}`, readOffset: 0n, readLimit: 0n },
    );
    call.pause(); // never consumed: grpc-js stops reading once its buffer is full
    outcomes.push(
      new Promise((resolve) => {
        call.on('error', (e) => resolve(statusName(e)));
        call.on('end', () => resolve('ended'));
      }),
    );
    calls.push(call);
  }
  await sleep(HOLD_S * 1000);
  for (const c of calls) c.cancel();
  const result = countOutcomes(await Promise.all(outcomes));
  for (const c of clients) c.close();
  return result;
}

async function pausedH2Scenario(address: string, blob: Digest): Promise<string> {
  const sessions = Array.from({ length: Math.ceil(PAUSED / PAUSED_PER_CONNECTION) }, () =>
    http2.connect(`http://${address}`, { settings: { initialWindowSize: 0, enablePush: false } }),
  );
  const body = Buffer.from(ReadRequest.encode({ resourceName: `blobs/${blob.hash}/${blob.sizeBytes}`, readOffset: 0n, readLimit: 0n }).finish());
  const frame = Buffer.alloc(5 + body.byteLength);
  frame.writeUInt32BE(body.byteLength, 1);
  body.copy(frame, 5);
  const outcomes: Promise<string>[] = [];
  const streams: http2.ClientHttp2Stream[] = [];
  for (let i = 0; i < PAUSED; i++) {
    const session = sessions[i % sessions.length] as http2.ClientHttp2Session;
    session.on('error', () => undefined);
    const stream = session.request({ ':method': 'POST', ':path': '/google.bytestream.ByteStream/Read', 'content-type': 'application/grpc', te: 'trailers' });
    stream.end(frame);
    outcomes.push(
      new Promise((resolve) => {
        let status = 'reset by server';
        stream.on('trailers', (t) => (status = grpc.status[Number(t['grpc-status'])] ?? 'trailers'));
        stream.on('response', (h) => {
          if (h['grpc-status'] !== undefined) status = grpc.status[Number(h['grpc-status'])] ?? 'trailers-only';
        });
        stream.on('error', () => undefined);
        stream.on('close', () => resolve(stream.rstCode === http2.constants.NGHTTP2_CANCEL && status === 'reset by server' ? 'cancelled by us' : status));
      }),
    );
    streams.push(stream);
  }
  await sleep(HOLD_S * 1000);
  for (const s of streams) if (!s.closed) s.close(http2.constants.NGHTTP2_CANCEL);
  const result = countOutcomes(await Promise.all(outcomes));
  for (const s of sessions) s.close();
  return result;
}

async function oversizedScenario(address: string): Promise<string> {
  const clients = Array.from({ length: OVERSIZED }, () => rawClient(address));
  try {
    // A valid FindMissingBlobs message (instance_name) of 60 MiB.
    const payload = Buffer.from(FindMissingBlobsRequest.encode({ instanceName: 'x'.repeat(OVERSIZED_BYTES), blobDigests: [], digestFunction: 0 }).finish());
    const outcomes = await Promise.all(
      clients.map((c) => rawUnary(c, '/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs', payload, 120_000)),
    );
    return countOutcomes(outcomes);
  } finally {
    for (const c of clients) c.close();
  }
}

async function openFds(pid: number): Promise<number> {
  return (await readdir(`/proc/${pid}/fd`)).length;
}

async function idleScenario(serve: Serve): Promise<string> {
  const fdsBefore = await openFds(serve.pid);
  const clients = Array.from({ length: IDLE_CONNECTIONS }, () => rawClient(serve.address));
  try {
    const empty = Buffer.alloc(0);
    const outcomes = await Promise.all(clients.map((c) => rawUnary(c, '/build.bazel.remote.execution.v2.Capabilities/GetCapabilities', empty, 60_000)));
    const fdsConnected = await openFds(serve.pid);
    await sleep(SETTLE_S * 1000);
    const fdsLater = await openFds(serve.pid);
    return `calls: ${countOutcomes(outcomes)}; serve's open fds: ${fdsBefore} before, ${fdsConnected} connected, ${fdsLater} ${SETTLE_S} s later`;
  } finally {
    for (const c of clients) c.close();
  }
}

/** The serve process's log lines at warn and above, counted by message. */
function logSummary(stderr: string): string[] {
  const counts = new Map<string, number>();
  for (const line of stderr.split('\n')) {
    if (line.trim() === '') continue;
    try {
      const entry = JSON.parse(line) as { level?: number; msg?: string };
      if ((entry.level ?? 0) < 40) continue;
      const msg = (entry.msg ?? '').slice(0, 140);
      counts.set(msg, (counts.get(msg) ?? 0) + 1);
    } catch {
      counts.set(line.slice(0, 140), (counts.get(line.slice(0, 140)) ?? 0) + 1);
    }
  }
  return [...counts].map(([msg, n]) => `${String(n).padStart(5)} x ${msg}`);
}

async function main(): Promise<void> {
  if (!args['no-build'] && args.cli === undefined) execFileSync('npm', ['run', 'build'], { cwd: ROOT, stdio: ['ignore', 'ignore', 'inherit'] });
  const dir = await mkdtemp(join(tmpdir(), 'serve-memory-'));
  try {
    const { blob, present } = await prepareStore(dir);
    const extra = args['serve-arg'] ?? [];
    const serve = await startServe(dir, extra);
    const rows: Row[] = [];
    try {
      await sleep(1000);
      const wanted = (name: string): boolean => args.scenario === undefined || args.scenario.includes(name);
      if (wanted('readers')) {
        rows.push(await measure(serve, `${READERS} readers of ${BLOB_BYTES / MiB} MiB + FindMissingBlobs`, () => readersScenario(serve.address, blob, present)));
      }
      if (wanted('paused-grpc')) rows.push(await measure(serve, `${PAUSED} paused readers (grpc-js)`, () => pausedGrpcScenario(serve.address, blob)));
      if (wanted('paused-h2')) rows.push(await measure(serve, `${PAUSED} paused readers (h2, zero window)`, () => pausedH2Scenario(serve.address, blob)));
      if (wanted('oversized')) rows.push(await measure(serve, `${OVERSIZED} requests of ${OVERSIZED_BYTES / MiB} MiB`, () => oversizedScenario(serve.address)));
      if (wanted('idle')) rows.push(await measure(serve, `${IDLE_CONNECTIONS} idle connections`, () => idleScenario(serve)));
    } finally {
      await serve.stop();
    }
    const out = process.stdout;
    out.write(`\nserve memory (node ${process.version}; serve ${extra.join(' ') || 'with default flags'}; after = ${SETTLE_S} s after the burst)\n\n`);
    out.write('| scenario | RSS before | peak RSS | RSS after 1 s | RSS after | outcome |\n| --- | ---: | ---: | ---: | ---: | --- |\n');
    for (const r of rows) {
      out.write(`| ${r.scenario} | ${fmt(r.idleBeforeMiB)} | ${fmt(r.peakMiB)} | ${fmt(r.after1sMiB)} | ${fmt(r.afterSettleMiB)} | ${r.outcome} |\n`);
    }
    // Issue 8's budget: serving stays under 300 MB with 200 readers and with 300 paused readers.
    const budgeted = rows.filter((r) => /readers/.test(r.scenario));
    if (budgeted.length > 0) {
      const worst = Math.max(...budgeted.map((r) => r.peakMiB));
      const limit = 300e6 / MiB;
      out.write(`\ntarget: peak RSS under 300 MB (${limit.toFixed(0)} MiB) with readers and paused readers: ${worst < limit ? 'met' : 'MISSED'} (worst peak ${fmt(worst)})\n`);
    }
    const logs = logSummary(serve.stderr());
    out.write(`\nserve log, warn and above (${logs.length === 0 ? 'none' : 'count x message'}):\n${logs.join('\n')}\n`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`serve-memory: ${err instanceof Error ? err.stack : String(err)}\n`);
    process.exit(1);
  },
);
