import { createHash } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { FetchService, type FetchServer } from '../../src/gen/build/bazel/remote/asset/v1/remote_asset.js';
import {
  CapabilitiesService,
  type CapabilitiesServer,
  ContentAddressableStorageService,
  type ContentAddressableStorageServer,
  Directory,
  DigestFunction_Value,
  SymlinkAbsolutePathStrategy_Value,
} from '../../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import { ReferenceStorageService, type ReferenceStorageServer } from '../../src/gen/buildstream/v2/buildstream.js';
import { ByteStreamService, type ByteStreamServer } from '../../src/gen/google/bytestream/bytestream.js';
import type { Digest } from '../../src/cas/digest.js';

/**
 * A programmable in-memory upstream cache, served over real gRPC on 127.0.0.1: either dialect
 * (`remote-asset` like Buildbarn, or `reference-storage` like BuildStream 1.x's server). Written
 * independently of the mirror's server so tests do not check the mirror against itself. Tests can
 * corrupt blobs, fail calls and read call counts.
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

  private content(hash: string): Buffer | undefined {
    return this.corrupt.get(hash) ?? this.blobs.get(hash);
  }

  /** The first of `uris` the fake holds, as Remote Asset Fetch answers it. */
  private findAsset(method: string, uris: string[]): { uri: string; digest: { hash: string; sizeBytes: bigint } } | { error: Partial<grpc.ServiceError> } {
    this.hit(method);
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
        this.hit('FindMissingBlobs');
        cb(null, { missingBlobDigests: call.request.blobDigests.filter((d) => !this.blobs.has(d.hash)) });
      },
      batchReadBlobs: (call, cb) => {
        this.hit('BatchReadBlobs');
        cb(null, {
          responses: call.request.digests.map((d) => {
            const data = this.content(d.hash);
            return data
              ? { digest: d, data, status: { code: 0, message: '' } }
              : { digest: d, data: Buffer.alloc(0), status: { code: grpc.status.NOT_FOUND, message: 'missing' } };
          }),
        });
      },
      batchUpdateBlobs: (_call, cb) => cb({ code: grpc.status.UNIMPLEMENTED }),
      getTree: (call) => call.emit('error', { code: grpc.status.UNIMPLEMENTED }),
    };
    const bytestream: ByteStreamServer = {
      read: (call) => {
        this.hit('ByteStream.Read');
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
      write: (_call, cb) => cb({ code: grpc.status.UNIMPLEMENTED }),
    };
    const capabilities: CapabilitiesServer = {
      getCapabilities: (_call, cb) => {
        this.hit('GetCapabilities');
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
          const found = this.findAsset('FetchBlob', call.request.uris);
          if ('error' in found) return cb(found.error);
          cb(null, { status: { code: 0, message: '' }, uri: found.uri, qualifiers: [], blobDigest: found.digest, digestFunction: 0 });
        },
        fetchDirectory: (call, cb) => {
          const found = this.findAsset('FetchDirectory', call.request.uris);
          if ('error' in found) return cb(found.error);
          cb(null, { status: { code: 0, message: '' }, uri: found.uri, qualifiers: [], rootDirectoryDigest: found.digest, digestFunction: 0 });
        },
      };
      server.addService(FetchService, fetch);
    } else {
      const refs: ReferenceStorageServer = {
        getReference: (call, cb) => {
          this.hit('GetReference');
          const d = this.refs.get(call.request.key);
          if (!d) return cb(notFound('no such ref'));
          cb(null, { digest: { hash: d.hash, sizeBytes: BigInt(d.sizeBytes) } });
        },
        updateReference: (_call, cb) => cb({ code: grpc.status.PERMISSION_DENIED }),
        status: (_call, cb) => cb(null, { allowUpdates: false }),
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
