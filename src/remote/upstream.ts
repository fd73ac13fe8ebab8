import * as grpc from '@grpc/grpc-js';
import type { MirrorName } from '../cas/names.js';
import { isDirectoryName } from '../cas/names.js';
import { type Digest, digestKey, fromWire, readResourceName, toWire } from '../cas/digest.js';
import { MirrorError, isMirrorError } from '../errors.js';
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

/** BuildStream 1.6's own cap, and a safe default when a server advertises no limit. */
const DEFAULT_MAX_BATCH_BYTES = 1 << 20;

export class GrpcUpstream implements Upstream {
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
      if (!isMirrorError(err, 'UPSTREAM_UNAVAILABLE')) throw err;
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
}

function inBandMiss(code: number, upstream: string, urn: string): undefined {
  if (code === grpc.status.NOT_FOUND) return undefined;
  throw new MirrorError('UPSTREAM_ERROR', `${upstream}: fetching ${urn} failed with in-band status ${grpc.status[code] ?? code}`);
}
