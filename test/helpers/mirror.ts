import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { FetchClient, PushClient } from '../../src/gen/build/bazel/remote/asset/v1/remote_asset.js';
import { CapabilitiesClient, ContentAddressableStorageClient } from '../../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import { ReferenceStorageClient } from '../../src/gen/buildstream/v2/buildstream.js';
import { ByteStreamClient } from '../../src/gen/google/bytestream/bytestream.js';
import { DiskContentStore } from '../../src/cas/disk-store.js';
import { silentLogger } from '../../src/log.js';
import { MirrorServer } from '../../src/server/server.js';

export const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const CLI = join(REPO_ROOT, 'src/cli/main.ts');

type After = { after(fn: () => Promise<void> | void): void };

/** A fresh temp directory, removed after the test. */
export async function tempDir(t: After, prefix = 'mirror-test-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

export interface Clients {
  cas: ContentAddressableStorageClient;
  bytestream: ByteStreamClient;
  capabilities: CapabilitiesClient;
  fetch: FetchClient;
  push: PushClient;
  refs: ReferenceStorageClient;
  close(): void;
}

export function clientsFor(address: string): Clients {
  const creds = grpc.credentials.createInsecure();
  const opts = { 'grpc.max_receive_message_length': 64 << 20, 'grpc.max_send_message_length': 128 << 20 };
  const c = {
    cas: new ContentAddressableStorageClient(address, creds, opts),
    bytestream: new ByteStreamClient(address, creds, opts),
    capabilities: new CapabilitiesClient(address, creds, opts),
    fetch: new FetchClient(address, creds, opts),
    push: new PushClient(address, creds, opts),
    refs: new ReferenceStorageClient(address, creds, opts),
  };
  return { ...c, close: () => Object.values(c).forEach((x) => x.close()) };
}

/** Promisifies a generated unary client method with a 10 s deadline, so a hang fails fast. */
export function call<Req, Res>(
  client: grpc.Client,
  method: (req: Req, md: grpc.Metadata, opts: Partial<grpc.CallOptions>, cb: (err: grpc.ServiceError | null, res: Res) => void) => grpc.ClientUnaryCall,
  req: Req,
): Promise<Res> {
  return new Promise((resolve, reject) =>
    method.call(client, req, new grpc.Metadata(), { deadline: Date.now() + 10_000 }, (err, res) => (err ? reject(err) : resolve(res))),
  );
}

/** Reads a ByteStream resource to the end. */
export async function readAll(client: ByteStreamClient, resourceName: string, offset = 0n, limit = 0n): Promise<Buffer> {
  const chunks: Buffer[] = [];
  const stream = client.read({ resourceName, readOffset: offset, readLimit: limit }, new grpc.Metadata(), { deadline: Date.now() + 30_000 });
  for await (const msg of stream as AsyncIterable<{ data: Buffer }>) chunks.push(msg.data);
  return Buffer.concat(chunks);
}

export interface RunningMirror {
  store: DiskContentStore;
  server: MirrorServer;
  clients: Clients;
}

/** Opens a store in `dir` and serves it on 127.0.0.1:0 in this process. */
export async function startMirror(t: After, dir: string, maxBatchBytes = 1 << 20): Promise<RunningMirror> {
  const log = silentLogger();
  const store = await DiskContentStore.open(dir, log);
  const server = await MirrorServer.start(store, { listen: '127.0.0.1:0', maxBatchBytes, log });
  const clients = clientsFor(server.address);
  t.after(async () => {
    clients.close();
    await server.stop(1000);
    await store.close();
  });
  return { store, server, clients };
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the CLI (from source, through tsx) as a child process. */
export function runCli(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', CLI, ...args], {
      cwd: REPO_ROOT,
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

export interface ServeProcess {
  address: string;
  /** Sends SIGTERM and resolves with the exit code. */
  stop(): Promise<number>;
}

/** Starts `bst-cache-mirror serve --listen 127.0.0.1:0` and waits for its address line. */
export function startServeProcess(t: After, dir: string): Promise<ServeProcess> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', CLI, 'serve', '--dir', dir, '--listen', '127.0.0.1:0', '--log-level', 'warn'], {
      cwd: REPO_ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    const exited = new Promise<number>((res) => child.on('close', (code) => res(code ?? -1)));
    t.after(async () => {
      if (child.exitCode === null) child.kill('SIGKILL');
      await exited;
    });
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      const m = / on (\S+)\n/.exec(out);
      if (m?.[1]) {
        resolve({
          address: m[1],
          stop: async () => {
            child.kill('SIGTERM');
            return exited;
          },
        });
      }
    });
    void exited.then((code) => reject(new Error(`serve exited with ${code} before listening: ${err}`)));
  });
}
