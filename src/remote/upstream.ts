import { randomUUID } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import type { NameRecord } from '../cas/content-store.js';
import type { MirrorName, NameKind } from '../cas/names.js';
import { isDirectoryName } from '../cas/names.js';
import { type Digest, digestKey, fromWire, readResourceName, toWire } from '../cas/digest.js';
import { MirrorError, isMirrorError } from '../errors.js';
import type { WriteRequest, WriteResponse } from '../gen/google/bytestream/bytestream.js';
import { Compressor_Value } from '../gen/build/bazel/remote/execution/v2/remote_execution.js';
import { Endpoint, type EndpointSpec, grpcCode } from './endpoint.js';

export { grpcCode, parseUpstreamUrl } from './endpoint.js';

/**
 * How to reach one upstream cache. Its own URL serves both names and blobs, unless `storage`
 * names a separate CAS server: then the URL is only the index (Remote Asset or
 * ReferenceStorage), as BuildStream 2's `type: index` and `type: storage` remotes.
 */
export interface UpstreamSpec extends EndpointSpec {
  readonly storage?: EndpointSpec | undefined;
  /**
   * A ByteStream read that receives nothing for this long is abandoned as stalled
   * (default 30 s). Separate from any total deadline, which no multi-GB blob could fit.
   */
  readonly readIdleTimeoutMs?: number | undefined;
}

export const DEFAULT_READ_IDLE_TIMEOUT_MS = 30_000;

/**
 * The two index protocols an upstream can speak. `reference-storage` is BuildStream 1.x's
 * bst-artifact-server (buildstream.v2.ReferenceStorage); `remote-asset` is Remote Asset Fetch
 * (2.x-era servers such as Buildbarn, and BuildStream 1.6 in asset mode).
 */
export type Dialect = 'reference-storage' | 'remote-asset';

export interface UpstreamInfo {
  readonly dialect: Dialect;
  /** The most blob bytes to ask for in one BatchReadBlobs. */
  readonly maxBatchBytes: number;
}

export type BatchReadResult =
  | { readonly digest: Digest; readonly data: Uint8Array }
  | { readonly digest: Digest; readonly missing: true };

/** An upstream cache as sync sees it. Implementations are safe for concurrent use. */
export interface Upstream {
  /** The URL, used in logs, reports and name records. */
  readonly name: string;
  /** Detects the dialect and batch limit (once; later calls return the same answer). */
  connect(): Promise<UpstreamInfo>;
  /** What a name points to upstream, or undefined when the upstream does not have it. */
  resolve(name: MirrorName): Promise<Digest | undefined>;
  /** Reads up to the batch limit of small blobs; each result says whether it was found. */
  batchRead(digests: readonly Digest[]): Promise<BatchReadResult[]>;
  /** Streams one blob with ByteStream.Read. Throws BLOB_NOT_FOUND when it is absent. */
  readStream(digest: Digest, offset?: number): AsyncIterable<Uint8Array>;
  close(): void;
}

/** One blob for BatchUpdateBlobs. */
export interface BlobUpload {
  readonly digest: Digest;
  readonly data: Uint8Array;
}

/**
 * An upstream as the pusher sees it: the write side, used to replicate names that arrive at the
 * mirror to upstreams configured with `push: true`. Blobs go to the storage endpoint, names to the
 * index endpoint (BuildStream 2's index/storage split). Safe for concurrent use. Failures are
 * MirrorErrors (UPSTREAM_UNAVAILABLE when the upstream could not be reached, UPSTREAM_ERROR for
 * any other answer) whose `cause` carries the gRPC status code, for isRetryable().
 */
export interface UpstreamWriter {
  readonly name: string;
  connect(): Promise<UpstreamInfo>;
  resolve(name: MirrorName): Promise<Digest | undefined>;
  /** FindMissingBlobs on the storage endpoint, in requests of FIND_MISSING_CHUNK digests; the answer keeps the order of `digests`. */
  findMissing(digests: readonly Digest[]): Promise<Digest[]>;
  /**
   * BatchUpdateBlobs on the storage endpoint. The caller keeps each batch within
   * connect().maxBatchBytes. A blob the upstream refuses throws UPSTREAM_ERROR (or
   * UPSTREAM_UNAVAILABLE), with that blob's status as the cause.
   */
  batchUpdate(blobs: readonly BlobUpload[]): Promise<void>;
  /**
   * ByteStream.Write of one blob: resource `[{instance}/]uploads/{fresh uuid4}/blobs/{hash}/{size}`,
   * chunks of at most WRITE_CHUNK_BYTES, `finish_write` on the last. A server that answers
   * `committed_size == size` before the end (it already has the blob) is a success; the rest of
   * `data` is not read. `data` must yield exactly the blob's bytes.
   */
  writeStream(digest: Digest, data: AsyncIterable<Uint8Array>): Promise<void>;
  /**
   * Points the name at `record.digest` upstream, on the index endpoint; callers upload the whole
   * closure first. ReferenceStorage: UpdateReference{keys: [ref]}, for 1.x refs only (any other
   * kind throws UNSUPPORTED; see dialectHolds). Remote Asset: PushDirectory for Directory names
   * (1.x refs as v1 URNs, single sources), PushBlob for Artifact/Source proto names, with
   * `uris: [urn]` and the record's referenced blobs and directories.
   */
  setName(name: MirrorName, record: NameRecord): Promise<void>;
  /**
   * Asks, as BuildStream does when it sets up a push remote, whether the upstream takes pushes at
   * all, so a pull-only one fails a job before its closure is uploaded: ReferenceStorage.Status
   * (`allow_updates`) for 1.x, an empty PushBlob for Remote Asset (INVALID_ARGUMENT: push is
   * there; UNIMPLEMENTED or PERMISSION_DENIED: it is not). A refusal is final (PERMISSION_DENIED
   * in its cause). Asked on every call; HealthCheckedUpstream remembers a success.
   */
  checkPushAllowed(): Promise<void>;
}

/** Whether `value` has the write side (HealthCheckedUpstream wraps either kind). */
export function isUpstreamWriter(value: object): value is UpstreamWriter {
  const w = value as Partial<UpstreamWriter>;
  return typeof w.findMissing === 'function' && typeof w.batchUpdate === 'function' && typeof w.writeStream === 'function' && typeof w.setName === 'function';
}

/**
 * Whether an upstream speaking `dialect` can hold a name of `kind`: a ReferenceStorage server
 * (BuildStream 1.x's) only knows 1.x refs; Remote Asset holds every kind.
 */
export function dialectHolds(dialect: Dialect, kind: NameKind): boolean {
  return dialect === 'remote-asset' || kind === 'ref';
}

/** Digests per FindMissingBlobs request (about 80 bytes each on the wire: ~330 KB a request). */
export const FIND_MISSING_CHUNK = 4096;
/** ByteStream.Write chunk size, as BuildStream 1.6 and buildbox send. */
export const WRITE_CHUNK_BYTES = 1 << 20;

/** The status of one blob of a BatchUpdateBlobs answer, shaped as a ServiceError so Endpoint.wrap and isRetryable read its code. */
export class BlobStatusError extends Error {
  constructor(
    readonly code: grpc.status,
    readonly details: string,
  ) {
    super(`${grpc.status[code] ?? code}: ${details}`);
    this.name = 'BlobStatusError';
  }
}

/** The ByteStream resource name of an upload. */
export function uploadResourceName(instanceName: string, uuid: string, d: Digest): string {
  return `${instanceName ? `${instanceName}/` : ''}uploads/${uuid}/blobs/${d.hash}/${d.sizeBytes}`;
}

/** A Uint8Array as a Buffer over the same memory (generated messages type `bytes` as Buffer). */
function asBuffer(data: Uint8Array): Buffer {
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

/** BuildStream 1.6's own cap, and a safe default when a server advertises no limit. */
const DEFAULT_MAX_BATCH_BYTES = 1 << 20;

export class GrpcUpstream implements Upstream, UpstreamWriter {
  readonly name: string;
  private info: Promise<UpstreamInfo> | undefined;

  private constructor(
    /** Where names are resolved. */
    private readonly index: Endpoint,
    /** Where blobs are read: the index endpoint itself unless a storage server was given. */
    private readonly storage: Endpoint,
    private readonly readIdleTimeoutMs: number,
  ) {
    this.name = index === storage ? index.url : `${index.url} (index) + ${storage.url} (storage)`;
  }

  /** Builds the clients; reads certificate and token files now so a bad path fails early. */
  static async create(spec: UpstreamSpec): Promise<GrpcUpstream> {
    const idle = spec.readIdleTimeoutMs ?? DEFAULT_READ_IDLE_TIMEOUT_MS;
    const index = await Endpoint.create(spec);
    if (spec.storage === undefined) return new GrpcUpstream(index, index, idle);
    try {
      return new GrpcUpstream(index, await Endpoint.create(spec.storage), idle);
    } catch (err) {
      index.close();
      throw err;
    }
  }

  close(): void {
    this.index.close();
    if (this.storage !== this.index) this.storage.close();
  }

  connect(): Promise<UpstreamInfo> {
    this.info ??= this.detect().catch((err: unknown) => {
      this.info = undefined;
      throw err;
    });
    return this.info;
  }

  private async detect(): Promise<UpstreamInfo> {
    try {
      const [maxBatchBytes, dialect] = await Promise.all([this.batchLimit(), this.probeDialect()]);
      return { dialect, maxBatchBytes };
    } catch (err) {
      // A TLS port refuses an h2c preface at once; a silent peer (a deadline) is no TLS server, and
      // probing it would add the probe's own timeout to the deadline just spent.
      if (!isMirrorError(err, 'UPSTREAM_UNAVAILABLE') || grpcCode(err.cause) === grpc.status.DEADLINE_EXCEEDED) throw err;
      for (const endpoint of new Set([this.index, this.storage])) {
        if (await endpoint.speaksTls()) {
          const https = endpoint.url.replace(/^http:/, 'https:');
          throw new MirrorError('CONFIG_INVALID', `${endpoint.url} speaks TLS: use ${https} (with --server-cert if its certificate is not signed by a system CA)`, { cause: err });
        }
      }
      throw err;
    }
  }

  /** The storage server's advertised batch limit; BuildStream tolerates servers without Capabilities, so do we. */
  private async batchLimit(): Promise<number> {
    const { storage } = this;
    try {
      const caps = await storage.call(storage.capabilities.getCapabilities, storage.capabilities, { instanceName: storage.instanceName });
      const advertised = Number(caps.cacheCapabilities?.maxBatchTotalSizeBytes ?? 0n);
      return advertised > 0 ? advertised : DEFAULT_MAX_BATCH_BYTES;
    } catch (err) {
      if (grpcCode(err) === grpc.status.UNIMPLEMENTED) return DEFAULT_MAX_BATCH_BYTES;
      throw storage.wrap(err, 'GetCapabilities');
    }
  }

  /**
   * BuildStream 1.6's probe: an empty FetchDirectory is INVALID_ARGUMENT on a Remote Asset
   * server; bst-artifact-server answers UNIMPLEMENTED (and 1.6 treats OK the same way).
   */
  private async probeDialect(): Promise<Dialect> {
    const { index } = this;
    try {
      await index.call(index.fetch.fetchDirectory, index.fetch, { instanceName: index.instanceName, uris: [], qualifiers: [], digestFunction: 0 });
    } catch (err) {
      const code = grpcCode(err);
      if (code === grpc.status.INVALID_ARGUMENT) return 'remote-asset';
      if (code !== grpc.status.UNIMPLEMENTED) throw index.wrap(err, 'FetchDirectory probe');
    }
    return 'reference-storage';
  }

  async resolve(name: MirrorName): Promise<Digest | undefined> {
    const { dialect } = await this.connect();
    const { index } = this;
    try {
      if (dialect === 'reference-storage') {
        // A ReferenceStorage server only knows 1.x refs, which point to Directories.
        if (name.kind !== 'ref') return undefined;
        const res = await index.call(index.refs.getReference, index.refs, { instanceName: index.instanceName, key: name.key });
        return fromWire(res.digest, `${index.url} GetReference(${name.key})`);
      }
      const request = { instanceName: index.instanceName, uris: [name.urn], qualifiers: [], digestFunction: 0 };
      if (isDirectoryName(name.kind)) {
        const res = await index.call(index.fetch.fetchDirectory, index.fetch, request);
        if (res.status && res.status.code !== grpc.status.OK) return inBandMiss(res.status.code, index.url, name.urn);
        return fromWire(res.rootDirectoryDigest, `${index.url} FetchDirectory(${name.urn})`);
      }
      const res = await index.call(index.fetch.fetchBlob, index.fetch, request);
      if (res.status && res.status.code !== grpc.status.OK) return inBandMiss(res.status.code, index.url, name.urn);
      return fromWire(res.blobDigest, `${index.url} FetchBlob(${name.urn})`);
    } catch (err) {
      if (grpcCode(err) === grpc.status.NOT_FOUND) return undefined;
      throw index.wrap(err, `resolving ${name.urn}`);
    }
  }

  async batchRead(digests: readonly Digest[]): Promise<BatchReadResult[]> {
    const { storage } = this;
    let res;
    try {
      res = await storage.call(storage.cas.batchReadBlobs, storage.cas, {
        instanceName: storage.instanceName,
        digests: digests.map(toWire),
        digestFunction: 0,
      });
    } catch (err) {
      throw storage.wrap(err, 'BatchReadBlobs');
    }
    const byKey = new Map<string, (typeof res.responses)[number]>();
    for (const r of res.responses) if (r.digest) byKey.set(`${r.digest.hash}/${r.digest.sizeBytes}`, r);
    return digests.map((digest) => {
      const r = byKey.get(digestKey(digest));
      const code = r?.status?.code ?? grpc.status.OK;
      if (r === undefined || code === grpc.status.NOT_FOUND) return { digest, missing: true };
      if (code !== grpc.status.OK) {
        throw new MirrorError('UPSTREAM_ERROR', `${storage.url}: BatchReadBlobs of ${digestKey(digest)} failed with ${grpc.status[code] ?? code}: ${r.status?.message ?? ''}`);
      }
      return { digest, data: r.data };
    });
  }

  async *readStream(digest: Digest, offset = 0): AsyncIterable<Uint8Array> {
    const { storage } = this;
    const call = storage.bytestream.read(
      { resourceName: readResourceName(storage.instanceName, digest), readOffset: BigInt(offset), readLimit: 0n },
      storage.metadata(),
    );
    const messages = (call as AsyncIterable<{ data: Uint8Array }>)[Symbol.asyncIterator]();
    try {
      for (;;) {
        // The idle clock runs only while we wait for the upstream, not while the store writes.
        const next = await this.nextWithin(messages, digest);
        if (next.done) break;
        if (next.value.data.byteLength > 0) yield next.value.data;
      }
    } catch (err) {
      if (grpcCode(err) === grpc.status.NOT_FOUND) {
        throw new MirrorError('BLOB_NOT_FOUND', `${storage.url} does not have blob ${digestKey(digest)}`, { cause: err });
      }
      throw storage.wrap(err, `ByteStream.Read of ${digestKey(digest)}`);
    } finally {
      call.cancel();
    }
  }

  /** The stream's next message, or UPSTREAM_UNAVAILABLE if none comes within the idle timeout. */
  private async nextWithin<T>(messages: AsyncIterator<T>, digest: Digest): Promise<IteratorResult<T>> {
    let timer: NodeJS.Timeout | undefined;
    const stalled = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const seconds = this.readIdleTimeoutMs / 1000;
        reject(new MirrorError('UPSTREAM_UNAVAILABLE', `${this.storage.url}: ByteStream.Read of ${digestKey(digest)} stalled: no data for ${seconds} s`));
      }, this.readIdleTimeoutMs);
    });
    try {
      return await Promise.race([messages.next(), stalled]);
    } finally {
      clearTimeout(timer);
    }
  }

  async findMissing(digests: readonly Digest[]): Promise<Digest[]> {
    const { storage } = this;
    const missing: Digest[] = [];
    for (let i = 0; i < digests.length; i += FIND_MISSING_CHUNK) {
      const chunk = digests.slice(i, i + FIND_MISSING_CHUNK);
      let res;
      try {
        res = await storage.call(storage.cas.findMissingBlobs, storage.cas, { instanceName: storage.instanceName, blobDigests: chunk.map(toWire), digestFunction: 0 });
      } catch (err) {
        throw storage.wrap(err, `FindMissingBlobs of ${chunk.length} digests`);
      }
      // The digests asked about, in order, that the answer names: a server's own digests are not trusted further.
      const absent = new Set(res.missingBlobDigests.map((d) => `${d.hash}/${d.sizeBytes}`));
      for (const d of chunk) if (absent.has(digestKey(d))) missing.push(d);
    }
    return missing;
  }

  async batchUpdate(blobs: readonly BlobUpload[]): Promise<void> {
    if (blobs.length === 0) return;
    const { storage } = this;
    let res;
    try {
      res = await storage.call(storage.cas.batchUpdateBlobs, storage.cas, {
        instanceName: storage.instanceName,
        requests: blobs.map((b) => ({ digest: toWire(b.digest), data: asBuffer(b.data), compressor: Compressor_Value.IDENTITY })),
        digestFunction: 0,
      });
    } catch (err) {
      throw storage.wrap(err, `BatchUpdateBlobs of ${blobs.length} blobs`);
    }
    const byKey = new Map<string, (typeof res.responses)[number]>();
    for (const r of res.responses) if (r.digest) byKey.set(`${r.digest.hash}/${r.digest.sizeBytes}`, r);
    const refused = blobs.flatMap((b) => {
      const r = byKey.get(digestKey(b.digest));
      // REAPI answers every blob; one left out was not stored.
      if (r === undefined) return [{ digest: b.digest, code: grpc.status.UNKNOWN, message: 'the answer has no status for it' }];
      const code = r.status?.code ?? grpc.status.OK;
      return code === grpc.status.OK ? [] : [{ digest: b.digest, code: code as grpc.status, message: r.status?.message ?? '' }];
    });
    const first = refused[0];
    if (first === undefined) return;
    const more = refused.length > 1 ? ` (and ${refused.length - 1} more of the ${blobs.length})` : '';
    throw storage.wrap(new BlobStatusError(first.code, first.message), `BatchUpdateBlobs of ${digestKey(first.digest)}${more}`);
  }

  async writeStream(digest: Digest, data: AsyncIterable<Uint8Array>): Promise<void> {
    const { storage } = this;
    const what = `ByteStream.Write of ${digestKey(digest)}`;
    // A fresh UUID per upload (REAPI); BuildStream 1.6 reuses one per process, which servers must tolerate too.
    const resourceName = uploadResourceName(storage.instanceName, randomUUID(), digest);
    const answer = new AbortController();
    // No deadline (a multi-GB upload fits none): a stalled upstream is caught by the idle timeout instead.
    let stream!: grpc.ClientWritableStream<WriteRequest>;
    const answered = new Promise<WriteResponse>((resolve, reject) => {
      stream = storage.bytestream.write(storage.metadata(), {}, (err, res) => {
        answer.abort();
        if (err) reject(err);
        else resolve(res);
      });
    });
    answered.catch(() => undefined); // read below; an early failure must not go unhandled meanwhile
    try {
      let offset = 0;
      const send = async (chunk: Buffer, finishWrite: boolean): Promise<void> => {
        const more = stream.write({ resourceName, writeOffset: BigInt(offset), finishWrite, data: chunk });
        offset += chunk.byteLength;
        if (!more && !answer.signal.aborted) await this.drained(stream, answer.signal, what);
      };
      if (digest.sizeBytes === 0) await send(Buffer.alloc(0), true);
      else {
        pieces: for await (const piece of data) {
          for (let at = 0; at < piece.byteLength; at += WRITE_CHUNK_BYTES) {
            // The upstream answered already: it failed the upload, or has the blob (committed_size == size).
            if (answer.signal.aborted) break pieces;
            const chunk = asBuffer(piece.subarray(at, Math.min(piece.byteLength, at + WRITE_CHUNK_BYTES)));
            if (offset + chunk.byteLength > digest.sizeBytes) throw new MirrorError('DIGEST_MISMATCH', `${what}: the data is longer than ${digest.sizeBytes} bytes`);
            await send(chunk, offset + chunk.byteLength === digest.sizeBytes);
          }
        }
        if (!answer.signal.aborted && offset !== digest.sizeBytes) throw new MirrorError('DIGEST_MISMATCH', `${what}: the data ended after ${offset} of ${digest.sizeBytes} bytes`);
      }
      stream.end();
      const res = await this.answerWithin(answered, what);
      const committed = Number(res.committedSize);
      if (committed !== digest.sizeBytes) {
        throw new MirrorError('UPSTREAM_ERROR', `${storage.url}: ${what} ended with committed_size ${committed} instead of ${digest.sizeBytes}`, { cause: new BlobStatusError(grpc.status.DATA_LOSS, `committed_size ${committed}`) });
      }
    } catch (err) {
      // When the upstream had answered, its answer says more than a write after it ended.
      const upstreamAnswered = answer.signal.aborted;
      stream.cancel();
      throw storage.wrap(upstreamAnswered ? await answered.then(() => err, (e: unknown) => e) : err, what);
    }
  }

  /** Waits for the call to take more data; UPSTREAM_UNAVAILABLE if it takes none within the idle timeout. */
  private drained(stream: grpc.ClientWritableStream<WriteRequest>, answered: AbortSignal, what: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer);
        stream.off('drain', done);
        answered.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(() => {
        stream.off('drain', done);
        answered.removeEventListener('abort', done);
        reject(new MirrorError('UPSTREAM_UNAVAILABLE', `${this.storage.url}: ${what} stalled: the upstream took no data for ${this.readIdleTimeoutMs / 1000} s`));
      }, this.readIdleTimeoutMs);
      stream.once('drain', done);
      answered.addEventListener('abort', done, { once: true });
    });
  }

  /** The upload's answer, or UPSTREAM_UNAVAILABLE if none comes within the idle timeout of the last byte. */
  private async answerWithin(answered: Promise<WriteResponse>, what: string): Promise<WriteResponse> {
    let timer: NodeJS.Timeout | undefined;
    const silent = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        reject(new MirrorError('UPSTREAM_UNAVAILABLE', `${this.storage.url}: ${what}: no answer ${this.readIdleTimeoutMs / 1000} s after the last byte`));
      }, this.readIdleTimeoutMs);
    });
    try {
      return await Promise.race([answered, silent]);
    } finally {
      clearTimeout(timer);
    }
  }

  async checkPushAllowed(): Promise<void> {
    const { dialect } = await this.connect();
    const { index } = this;
    if (dialect === 'reference-storage') {
      let allowUpdates: boolean;
      try {
        ({ allowUpdates } = await index.call(index.refs.status, index.refs, { instanceName: index.instanceName }));
      } catch (err) {
        // A server without Status says nothing either way: the first write will tell.
        if (grpcCode(err) !== grpc.status.UNIMPLEMENTED) throw index.wrap(err, 'ReferenceStorage.Status');
        allowUpdates = true;
      }
      if (!allowUpdates) {
        // Final, as the PERMISSION_DENIED its UpdateReference would answer (isRetryable reads the cause's code).
        const refusal = Object.assign(new Error('ReferenceStorage.Status: allow_updates is false'), { code: grpc.status.PERMISSION_DENIED, details: 'allow_updates is false' });
        throw new MirrorError('UPSTREAM_ERROR', `${index.url}: pushes refused (PERMISSION_DENIED: ReferenceStorage.Status: allow_updates is false; bst-artifact-server takes pushes with --enable-push)`, { cause: refusal });
      }
    } else {
      try {
        await index.call(index.push.pushBlob, index.push, { instanceName: index.instanceName, uris: [], qualifiers: [], referencesBlobs: [], referencesDirectories: [], digestFunction: 0 });
      } catch (err) {
        if (grpcCode(err) !== grpc.status.INVALID_ARGUMENT) throw index.wrap(err, 'PushBlob probe (does it take pushes?)');
      }
    }
  }

  async setName(name: MirrorName, record: NameRecord): Promise<void> {
    const { dialect } = await this.connect();
    const { index } = this;
    if (!dialectHolds(dialect, name.kind)) {
      throw new MirrorError('UNSUPPORTED', `${index.url} is a ReferenceStorage (BuildStream 1.x) server: it holds 1.x refs only, not ${name.urn}`);
    }
    const digest = toWire(record.digest);
    try {
      if (dialect === 'reference-storage') {
        // BuildStream 1.6 (CASCache.push): one key per call, no instance name, no check that the blobs exist.
        await index.call(index.refs.updateReference, index.refs, { instanceName: index.instanceName, keys: [name.key], digest });
        return;
      }
      // As BuildStream 2 (AssetRemote.push_blob/push_directory) and 1.6 asset mode (PushDirectory, no references).
      const request = {
        instanceName: index.instanceName,
        uris: [name.urn],
        qualifiers: [],
        referencesBlobs: record.referencedBlobs.map(toWire),
        referencesDirectories: record.referencedDirectories.map(toWire),
        digestFunction: 0,
      };
      if (isDirectoryName(name.kind)) await index.call(index.push.pushDirectory, index.push, { ...request, rootDirectoryDigest: digest });
      else await index.call(index.push.pushBlob, index.push, { ...request, blobDigest: digest });
    } catch (err) {
      const method = dialect === 'reference-storage' ? 'UpdateReference' : isDirectoryName(name.kind) ? 'PushDirectory' : 'PushBlob';
      throw index.wrap(err, `${method}(${name.urn})`);
    }
  }
}

function inBandMiss(code: number, upstream: string, urn: string): undefined {
  if (code === grpc.status.NOT_FOUND) return undefined;
  throw new MirrorError('UPSTREAM_ERROR', `${upstream}: fetching ${urn} failed with in-band status ${grpc.status[code] ?? code}`);
}
