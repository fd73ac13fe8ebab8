import { createHash } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import {
  FetchService,
  type FetchServer,
  type PushBlobRequest,
  type PushDirectoryRequest,
  PushService,
  type PushServer,
} from '../../src/gen/build/bazel/remote/asset/v1/remote_asset.js';
import {
  CapabilitiesService,
  type CapabilitiesServer,
  ContentAddressableStorageService,
  type ContentAddressableStorageServer,
  Directory,
  DigestFunction_Value,
  SymlinkAbsolutePathStrategy_Value,
} from '../../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import { ReferenceStorageService, type ReferenceStorageServer, type UpdateReferenceRequest } from '../../src/gen/buildstream/v2/buildstream.js';
import { ByteStreamService, type ByteStreamServer, type WriteRequest } from '../../src/gen/google/bytestream/bytestream.js';
import type { Digest } from '../../src/cas/digest.js';

/** A UUID of version 4, which BuildStream 1.6's server requires in upload resource names. */
const UUID_V4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/i;

type Fault = Partial<grpc.ServiceError>;

/**
 * A programmable in-memory upstream cache, served over real gRPC on 127.0.0.1: either dialect
 * (`remote-asset` like Buildbarn, or `reference-storage` like BuildStream 1.x's server). Written
 * independently of the mirror's server so tests do not check the mirror against itself. Tests can
 * corrupt blobs, fail calls and read call counts.
 *
 * Writes (for push tests) follow BuildStream's servers: with `acceptWrites` (1.6's
 * `--enable-push`), BatchUpdateBlobs and ByteStream.Write store verified blobs, UpdateReference
 * sets every key without checking blobs (1.6 casserver), and Remote Asset PushBlob/PushDirectory
 * set every URI (empty `uris` is INVALID_ARGUMENT, the answer BuildStream's push probe expects).
 * Without it every write is PERMISSION_DENIED, as from 1.6's server without --enable-push and a
 * read-only Buildbarn (2.x's casserver instead leaves Push unregistered: UNIMPLEMENTED).
 */
export class FakeUpstream {
  readonly blobs = new Map<string, Buffer>();
  /** URN -> digest, answered by FetchBlob/FetchDirectory. */
  readonly assets = new Map<string, Digest>();
  /** 1.x ref -> Directory digest, answered by GetReference. */
  readonly refs = new Map<string, Digest>();
  readonly calls = new Map<string, number>();
  /** Hash -> bytes to send instead of the real content (a corrupt upstream). */
  readonly corrupt = new Map<string, Buffer>();
  maxBatchBytes = 64 * 1024;
  /** When set, ByteStream reads send this many bytes and then stall (connection healthy, call open). */
  stallAfterBytes: number | undefined;
  /** Stalled reads still open; each ends once the client cancels it. */
  readonly stalledReads = new Set<grpc.ServerWritableStream<unknown, unknown>>();
  /** The read_offset of every ByteStream read, in order (resumed downloads ask for offset > 0). */
  readonly readOffsets: number[] = [];
  /** Every URI asked for by FetchBlob/FetchDirectory, in order. */
  readonly askedUris: string[] = [];
  /** Take writes (a push-enabled server); otherwise every write is PERMISSION_DENIED. */
  acceptWrites = false;
  /**
   * A ByteStream.Write of a blob the fake already holds is answered at once, after its first
   * message, with committed_size == size (REAPI allows this; casd and bb-storage may do it).
   */
  earlyCommit = false;
  /** Every write in the order it took effect: `blob <hash>` per stored blob, `ref <key>`, `asset <uri>`. */
  readonly writeLog: string[] = [];
  /** The resource_name of every ByteStream.Write, in order. */
  readonly uploadNames: string[] = [];
  /** Every PushBlob/PushDirectory request taken, in order. */
  readonly assetPushes: { method: 'PushBlob' | 'PushDirectory'; request: PushBlobRequest | PushDirectoryRequest }[] = [];
  /** Every UpdateReference request taken, in order. */
  readonly refUpdates: UpdateReferenceRequest[] = [];
  /** Method -> the instance_name (ByteStream: resource name prefix) of its last call. */
  readonly instanceNames = new Map<string, string>();
  private readonly faults = new Map<string, { code: grpc.status; times: number }>();
  private readonly hooks = new Map<string, () => void>();
  private server: grpc.Server | undefined;
  url = '';

  constructor(readonly dialect: 'remote-asset' | 'reference-storage') {}

  /** Adds a blob; returns its digest. */
  add(data: Buffer | string): Digest {
    const buf = typeof data === 'string' ? Buffer.from(data) : data;
    const digest = { hash: createHash('sha256').update(buf).digest('hex'), sizeBytes: buf.byteLength };
    this.blobs.set(digest.hash, buf);
    return digest;
  }

  /** Adds a Directory built from files, subdirectories and symlinks; returns its digest. */
  addDirectory(entries: {
    files?: { name: string; digest: Digest; executable?: boolean }[];
    dirs?: { name: string; digest: Digest }[];
    symlinks?: { name: string; target: string }[];
  }): Digest {
    const wire = (d: Digest) => ({ hash: d.hash, sizeBytes: BigInt(d.sizeBytes) });
    const bytes = Directory.encode({
      files: (entries.files ?? []).map((f) => ({ name: f.name, digest: wire(f.digest), isExecutable: f.executable ?? false })),
      directories: (entries.dirs ?? []).map((d) => ({ name: d.name, digest: wire(d.digest) })),
      symlinks: entries.symlinks ?? [],
    }).finish();
    return this.add(Buffer.from(bytes));
  }

  count(method: string): number {
    return this.calls.get(method) ?? 0;
  }

  private hit(method: string): void {
    this.calls.set(method, this.count(method) + 1);
  }

  /** The next `times` calls of `method` (as count() names it: 'BatchUpdateBlobs', 'ByteStream.Write', 'PushBlob', …) fail with `code`. */
  failNext(method: string, code: grpc.status, times = 1): void {
    this.faults.set(method, { code, times });
  }

  /** Runs `fn` when `method` is next called, before it is answered; if `fn` kills the fake, the call gets no answer. */
  onNextCall(method: string, fn: () => void): void {
    this.hooks.set(method, fn);
  }

  /** Counts a call and applies what was programmed: the error to answer with, 'killed', or undefined to serve it. */
  private enter(method: string, instanceName?: string): Fault | 'killed' | undefined {
    this.hit(method);
    if (instanceName !== undefined) this.instanceNames.set(method, instanceName);
    const hook = this.hooks.get(method);
    if (hook) {
      this.hooks.delete(method);
      hook();
      if (this.server === undefined) return 'killed';
    }
    const fault = this.faults.get(method);
    if (fault && fault.times > 0) {
      fault.times -= 1;
      return { code: fault.code, details: `injected ${grpc.status[fault.code]}` };
    }
    return undefined;
  }

  private denied(method: string): Fault {
    return { code: grpc.status.PERMISSION_DENIED, details: `${method}: this server does not allow push` };
  }

  /** Stores a blob whose content matched its digest, and logs the write. */
  private store(hash: string, data: Buffer): void {
    this.blobs.set(hash, data);
    this.writeLog.push(`blob ${hash}`);
  }

  /** Remote Asset Push: sets every URI to the digest. */
  private takeAsset(method: 'PushBlob' | 'PushDirectory', request: PushBlobRequest | PushDirectoryRequest, digest: { hash: string; sizeBytes: bigint } | undefined): Fault | undefined {
    if (!this.acceptWrites) return this.denied(method);
    if (request.uris.length === 0) return { code: grpc.status.INVALID_ARGUMENT, details: 'no uris' };
    if (digest === undefined) return { code: grpc.status.INVALID_ARGUMENT, details: 'no digest' };
    this.assetPushes.push({ method, request });
    for (const uri of request.uris) {
      this.assets.set(uri, { hash: digest.hash, sizeBytes: Number(digest.sizeBytes) });
      this.writeLog.push(`asset ${uri}`);
    }
    return undefined;
  }

  /** ByteStream.Write, as BuildStream 1.6's server checks it; answers through `answer` exactly once. */
  private takeUpload(call: grpc.ServerReadableStream<WriteRequest, unknown>, answer: (err: Fault | null, committed?: number) => void): void {
    let answered = false;
    const reply = (err: Fault | null, committed?: number): void => {
      if (answered) return;
      answered = true;
      answer(err, committed);
    };
    const failed = (details: string): void => reply({ code: grpc.status.FAILED_PRECONDITION, details });
    let resource: string | undefined;
    let digest: { hash: string; size: number } | undefined;
    const chunks: Buffer[] = [];
    let offset = 0;
    call.on('data', (req: WriteRequest) => {
      if (answered) return;
      if (resource === undefined) {
        resource = req.resourceName;
        this.uploadNames.push(resource);
        const parts = resource.split('/');
        const at = parts.indexOf('uploads');
        const [uuid = '', blobs, hash = '', size = ''] = parts.slice(at + 1);
        this.instanceNames.set('ByteStream.Write', parts.slice(0, Math.max(0, at)).join('/'));
        if (at < 0 || !UUID_V4.test(uuid) || blobs !== 'blobs' || !/^[0-9a-f]{64}$/.test(hash) || !/^\d+$/.test(size)) {
          reply({ code: grpc.status.INVALID_ARGUMENT, details: `bad upload resource name '${resource}'` });
          return;
        }
        digest = { hash, size: Number(size) };
        if (this.earlyCommit && this.blobs.has(hash)) {
          reply(null, digest.size);
          return;
        }
      } else if (req.resourceName !== '' && req.resourceName !== resource) {
        failed('resource_name changed during the upload');
        return;
      }
      if (digest === undefined) return;
      if (req.writeOffset !== BigInt(offset)) {
        failed(`write_offset ${req.writeOffset} where ${offset} was expected`);
        return;
      }
      if (offset + req.data.byteLength > digest.size) {
        failed(`more than the ${digest.size} bytes of the blob`);
        return;
      }
      chunks.push(req.data);
      offset += req.data.byteLength;
      if (!req.finishWrite) return;
      const data = Buffer.concat(chunks);
      if (data.byteLength !== digest.size || createHash('sha256').update(data).digest('hex') !== digest.hash) {
        failed('the uploaded data does not match the digest');
        return;
      }
      this.store(digest.hash, data);
      reply(null, offset);
    });
    call.on('end', () => failed('the upload ended without finish_write'));
    call.on('error', () => {
      answered = true;
    });
  }

  private content(hash: string): Buffer | undefined {
    return this.corrupt.get(hash) ?? this.blobs.get(hash);
  }

  /** The first of `uris` the fake holds, as Remote Asset Fetch answers it. */
  private findAsset(uris: string[]): { uri: string; digest: { hash: string; sizeBytes: bigint } } | { error: Partial<grpc.ServiceError> } {
    this.askedUris.push(...uris);
    if (uris.length === 0) return { error: { code: grpc.status.INVALID_ARGUMENT, details: 'no uris' } };
    for (const uri of uris) {
      const d = this.assets.get(uri);
      if (d) return { uri, digest: { hash: d.hash, sizeBytes: BigInt(d.sizeBytes) } };
    }
    return { error: { code: grpc.status.NOT_FOUND, details: 'no such asset' } };
  }

  /** Serves on 127.0.0.1:`port` (0: a free one; a stopped fake's port to come back where it was). */
  async start(port = 0): Promise<string> {
    const server = new grpc.Server();
    const notFound = (details: string) => ({ code: grpc.status.NOT_FOUND, details });
    const cas: ContentAddressableStorageServer = {
      findMissingBlobs: (call, cb) => {
        const stop = this.enter('FindMissingBlobs', call.request.instanceName);
        if (stop === 'killed') return;
        if (stop) return cb(stop);
        cb(null, { missingBlobDigests: call.request.blobDigests.filter((d) => !this.blobs.has(d.hash)) });
      },
      batchReadBlobs: (call, cb) => {
        const stop = this.enter('BatchReadBlobs', call.request.instanceName);
        if (stop === 'killed') return;
        if (stop) return cb(stop);
        cb(null, {
          responses: call.request.digests.map((d) => {
            const data = this.content(d.hash);
            return data
              ? { digest: d, data, status: { code: 0, message: '' } }
              : { digest: d, data: Buffer.alloc(0), status: { code: grpc.status.NOT_FOUND, message: 'missing' } };
          }),
        });
      },
      batchUpdateBlobs: (call, cb) => {
        const stop = this.enter('BatchUpdateBlobs', call.request.instanceName);
        if (stop === 'killed') return;
        if (stop) return cb(stop);
        if (!this.acceptWrites) return cb(this.denied('BatchUpdateBlobs'));
        // As both BuildStream servers: the whole batch is refused over the advertised limit.
        const total = call.request.requests.reduce((n, r) => n + Number(r.digest?.sizeBytes ?? 0n), 0);
        if (total > this.maxBatchBytes) return cb({ code: grpc.status.INVALID_ARGUMENT, details: `batch of ${total} bytes is over ${this.maxBatchBytes}` });
        cb(null, {
          responses: call.request.requests.map((r) => {
            const d = r.digest ?? { hash: '', sizeBytes: 0n };
            const matches = r.data.byteLength === Number(d.sizeBytes) && createHash('sha256').update(r.data).digest('hex') === d.hash;
            if (!matches) return { digest: d, status: { code: grpc.status.INVALID_ARGUMENT, message: 'content does not match the digest', details: [] } };
            this.store(d.hash, r.data);
            return { digest: d, status: { code: grpc.status.OK, message: '', details: [] } };
          }),
        });
      },
      getTree: (call) => call.emit('error', { code: grpc.status.UNIMPLEMENTED }),
    };
    const bytestream: ByteStreamServer = {
      read: (call) => {
        const stop = this.enter('ByteStream.Read');
        if (stop === 'killed') return;
        if (stop) {
          call.emit('error', stop);
          return;
        }
        const hash = call.request.resourceName.split('/').at(-2) ?? '';
        const data = this.content(hash);
        if (!data) {
          call.emit('error', notFound('missing'));
          return;
        }
        const offset = Number(call.request.readOffset);
        this.readOffsets.push(offset);
        if (offset > data.byteLength) {
          call.emit('error', { code: grpc.status.OUT_OF_RANGE, details: `read_offset ${offset} is past the end` });
          return;
        }
        // A stalled upstream: sends the first `stallAfterBytes` of a large blob, then nothing, with the call left open.
        const end = this.stallAfterBytes === undefined ? data.byteLength : Math.min(this.stallAfterBytes, data.byteLength);
        for (let off = offset; off < end; off += 256 * 1024) call.write({ data: data.subarray(off, Math.min(end, off + 256 * 1024)) });
        if (end === data.byteLength) call.end();
        else {
          this.stalledReads.add(call);
          call.on('cancelled', () => this.stalledReads.delete(call));
        }
      },
      write: (call, cb) => {
        const stop = this.enter('ByteStream.Write');
        if (stop === 'killed') return;
        if (stop) return cb(stop);
        // 1.6's server refuses before reading anything.
        if (!this.acceptWrites) return cb(this.denied('ByteStream.Write'));
        this.takeUpload(call, (err, committed) => (err ? cb(err) : cb(null, { committedSize: BigInt(committed ?? 0) })));
      },
    };
    const capabilities: CapabilitiesServer = {
      getCapabilities: (call, cb) => {
        const stop = this.enter('GetCapabilities', call.request.instanceName);
        if (stop === 'killed') return;
        if (stop) return cb(stop);
        cb(null, {
          cacheCapabilities: {
            digestFunctions: [DigestFunction_Value.SHA256],
            actionCacheUpdateCapabilities: { updateEnabled: false },
            maxBatchTotalSizeBytes: BigInt(this.maxBatchBytes),
            symlinkAbsolutePathStrategy: SymlinkAbsolutePathStrategy_Value.ALLOWED,
          },
          // As BuildStream's own servers (1.6 and 2.x casserver) answer.
          deprecatedApiVersion: { major: 2, minor: 0, patch: 0, prerelease: '' },
          lowApiVersion: { major: 2, minor: 0, patch: 0, prerelease: '' },
          highApiVersion: { major: 2, minor: 0, patch: 0, prerelease: '' },
        });
      },
    };
    server.addService(ContentAddressableStorageService, cas);
    server.addService(ByteStreamService, bytestream);
    server.addService(CapabilitiesService, capabilities);
    if (this.dialect === 'remote-asset') {
      const fetch: FetchServer = {
        fetchBlob: (call, cb) => {
          const stop = this.enter('FetchBlob', call.request.instanceName);
          if (stop === 'killed') return;
          if (stop) return cb(stop);
          const found = this.findAsset(call.request.uris);
          if ('error' in found) return cb(found.error);
          cb(null, { status: { code: 0, message: '' }, uri: found.uri, qualifiers: [], blobDigest: found.digest, digestFunction: 0 });
        },
        fetchDirectory: (call, cb) => {
          const stop = this.enter('FetchDirectory', call.request.instanceName);
          if (stop === 'killed') return;
          if (stop) return cb(stop);
          const found = this.findAsset(call.request.uris);
          if ('error' in found) return cb(found.error);
          cb(null, { status: { code: 0, message: '' }, uri: found.uri, qualifiers: [], rootDirectoryDigest: found.digest, digestFunction: 0 });
        },
      };
      server.addService(FetchService, fetch);
      const push: PushServer = {
        pushBlob: (call, cb) => {
          const stop = this.enter('PushBlob', call.request.instanceName);
          if (stop === 'killed') return;
          const err = stop ?? this.takeAsset('PushBlob', call.request, call.request.blobDigest);
          if (err) return cb(err);
          cb(null, {});
        },
        pushDirectory: (call, cb) => {
          const stop = this.enter('PushDirectory', call.request.instanceName);
          if (stop === 'killed') return;
          const err = stop ?? this.takeAsset('PushDirectory', call.request, call.request.rootDirectoryDigest);
          if (err) return cb(err);
          cb(null, {});
        },
      };
      server.addService(PushService, push);
    } else {
      const refs: ReferenceStorageServer = {
        getReference: (call, cb) => {
          const stop = this.enter('GetReference', call.request.instanceName);
          if (stop === 'killed') return;
          if (stop) return cb(stop);
          const d = this.refs.get(call.request.key);
          if (!d) return cb(notFound('no such ref'));
          cb(null, { digest: { hash: d.hash, sizeBytes: BigInt(d.sizeBytes) } });
        },
        updateReference: (call, cb) => {
          const stop = this.enter('UpdateReference', call.request.instanceName);
          if (stop === 'killed') return;
          if (stop) return cb(stop);
          if (!this.acceptWrites) return cb(this.denied('UpdateReference'));
          // As 1.6's server: every key is set, with no check that the blobs are there.
          const d = call.request.digest ?? { hash: '', sizeBytes: 0n };
          this.refUpdates.push(call.request);
          for (const key of call.request.keys) {
            this.refs.set(key, { hash: d.hash, sizeBytes: Number(d.sizeBytes) });
            this.writeLog.push(`ref ${key}`);
          }
          cb(null, {});
        },
        status: (call, cb) => {
          const stop = this.enter('Status', call.request.instanceName);
          if (stop === 'killed') return;
          if (stop) return cb(stop);
          cb(null, { allowUpdates: this.acceptWrites });
        },
      };
      server.addService(ReferenceStorageService, refs);
    }
    const bound = await new Promise<number>((resolve, reject) =>
      server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    this.server = server;
    this.url = `http://127.0.0.1:${bound}`;
    return this.url;
  }

  async stop(): Promise<void> {
    const server = this.server;
    if (!server) return;
    await new Promise<void>((resolve) => server.tryShutdown(() => resolve()));
  }

  /** Drops every connection and call at once, as a crashed or unplugged upstream would. */
  kill(): void {
    this.server?.forceShutdown();
    this.server = undefined;
  }

  /** The port it serves on. */
  get port(): number {
    return Number(new URL(this.url).port);
  }
}
