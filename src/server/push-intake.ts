import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import type { ContentStore, NameRecord } from '../cas/content-store.js';
import { artifactRoots, checkMessageSize, closureProblem, decodeDirectory, sourceRoots } from '../cas/closure.js';
import { type Digest, digestKey, fromWire, isEmptyDigest, parseResourceName, toWire } from '../cas/digest.js';
import { type MirrorName, isDirectoryName } from '../cas/names.js';
import { MirrorError } from '../errors.js';
import { type BatchUpdateBlobsRequest, type BatchUpdateBlobsResponse, Compressor_Value } from '../gen/build/bazel/remote/execution/v2/remote_execution.js';
import type { WriteRequest } from '../gen/google/bytestream/bytestream.js';
import { checkDecoded } from './handler.js';
import { toStatus } from './status.js';
import { checkDigestFunction, checkInstanceName } from './request-checks.js';

/**
 * Where names pushed to the mirror go once their closure is stored: the daemon records their
 * replication jobs durably, then calls `recordName` (which records the name in the store), in that
 * order, so no name is ever recorded without its jobs. Resolves once both are done; the client is
 * told OK only then.
 */
export interface PushSink {
  namePushed(urn: string, recordName: () => Promise<void>): Promise<void>;
}

/**
 * The write side of a push listener: blobs are verified as they are stored (the store's own
 * guarantee), and a name is recorded only when its whole closure is in the store, then handed to
 * the PushSink. Pull-only listeners have none of this and refuse every write.
 */
export class PushIntake {
  constructor(
    private readonly store: ContentStore,
    private readonly maxBatchBytes: number,
    private readonly sink: PushSink,
    private readonly log: Logger,
  ) {}

  /** BatchUpdateBlobs: each blob stored if it matches its digest; a per-blob status otherwise. */
  async batchUpdate(req: BatchUpdateBlobsRequest): Promise<BatchUpdateBlobsResponse> {
    checkInstanceName(req.instanceName);
    checkDigestFunction(req.digestFunction);
    const total = req.requests.reduce((n, r) => n + r.data.byteLength, 0);
    if (total > this.maxBatchBytes) {
      throw new MirrorError('BATCH_TOO_LARGE', `batch of ${total} bytes is over the ${this.maxBatchBytes}-byte limit (max_batch_total_size_bytes); send larger blobs with ByteStream.Write`);
    }
    const blobs = req.requests.map((r, i) => {
      const digest = fromWire(r.digest, `requests[${i}].digest`);
      if (r.compressor !== Compressor_Value.IDENTITY) {
        return { digest, error: new MirrorError('UNSUPPORTED', `requests[${i}]: compressor ${Compressor_Value[r.compressor] ?? r.compressor} is not supported: the mirror advertises no compressors; send IDENTITY`) };
      }
      if (r.data.byteLength !== digest.sizeBytes) {
        return { digest, error: new MirrorError('DIGEST_MISMATCH', `requests[${i}]: ${r.data.byteLength} bytes sent for a blob of size ${digest.sizeBytes}`) };
      }
      return { digest, data: r.data };
    });
    const toWrite = blobs.flatMap((b) => ('data' in b && b.data !== undefined ? [{ digest: b.digest, data: b.data }] : []));
    const errors = await this.store.writeEach(toWrite);
    let k = 0;
    return {
      responses: blobs.map((b) => {
        const error = 'error' in b ? b.error : errors[k++];
        const status = error === undefined ? { code: grpc.status.OK, details: '' } : toStatus(error);
        return { digest: toWire(b.digest), status: { code: status.code, message: status.details, details: [] } };
      }),
    };
  }

  /**
   * ByteStream.Write of one blob, streamed into the store (verified there; nothing is kept if it
   * does not match). Returns the committed size.
   */
  async write(call: grpc.ServerReadableStream<WriteRequest, unknown>): Promise<number> {
    const messages = call[Symbol.asyncIterator]() as AsyncIterator<WriteRequest>;
    const first = await messages.next();
    if (first.done) throw new MirrorError('INVALID_ARGUMENT', 'ByteStream.Write with no request');
    checkDecoded(first.value);
    const { instanceName, digest } = parseResourceName(first.value.resourceName, 'write');
    checkInstanceName(instanceName);
    if (first.value.writeOffset !== 0n) throw new MirrorError('INVALID_ARGUMENT', `write_offset ${first.value.writeOffset}: the mirror takes whole uploads from offset 0 (it never reports a partial committed_size)`);
    let received = 0;
    let finished = false;
    async function* data(): AsyncIterable<Uint8Array> {
      let message: WriteRequest | undefined = first.value as WriteRequest;
      while (message !== undefined) {
        checkDecoded(message);
        if (finished) throw new MirrorError('INVALID_ARGUMENT', 'ByteStream.Write sent data after finish_write');
        if (message.writeOffset !== BigInt(received)) throw new MirrorError('INVALID_ARGUMENT', `write_offset ${message.writeOffset} where ${received} was expected`);
        received += message.data.byteLength;
        if (received > digest.sizeBytes) throw new MirrorError('DIGEST_MISMATCH', `ByteStream.Write sent more than the ${digest.sizeBytes} bytes of ${digestKey(digest)}`);
        finished = message.finishWrite;
        if (message.data.byteLength > 0) yield message.data;
        const next = await messages.next();
        message = next.done ? undefined : next.value;
      }
      if (!finished) throw new MirrorError('INVALID_ARGUMENT', `ByteStream.Write of ${digestKey(digest)} ended without finish_write`);
    }
    if ((await this.store.findMissing([digest])).length === 0) {
      // Already stored: take (and drop) the rest of the upload, then report it whole.
      for await (const _ of data());
      return digest.sizeBytes;
    }
    await this.store.write(digest, data());
    return digest.sizeBytes;
  }

  /**
   * Records `names` as pointing at `digest`, once its whole closure is in the store (else
   * FAILED-style CLOSURE_INCOMPLETE, nothing recorded), then hands each to the sink.
   */
  async recordNames(names: readonly MirrorName[], digest: Digest, referenced: { blobs: readonly Digest[]; directories: readonly Digest[] }, peer: string): Promise<void> {
    // The names' own blob, read once for every name and for each closure check.
    let ownBytes: Promise<Buffer | undefined> | undefined;
    const ownBlob = (): Promise<Buffer | undefined> => (ownBytes ??= this.store.readBytes(digest));
    const read = (d: Digest): Promise<Buffer | undefined> => (digestKey(d) === digestKey(digest) ? ownBlob() : this.store.readBytes(d)).catch(() => undefined);
    for (const name of names) {
      const type = isDirectoryName(name.kind) ? 'directory' : 'blob';
      let roots = { blobs: [...referenced.blobs], directories: [...referenced.directories] };
      if (type === 'blob') {
        if (isEmptyDigest(digest)) throw new MirrorError('INVALID_ARGUMENT', `'${name.urn}' cannot point at the empty blob`);
        const data = await ownBlob();
        if (data === undefined) throw new MirrorError('CLOSURE_INCOMPLETE', `'${name.urn}': blob ${digestKey(digest)} is not in the mirror; upload it first`);
        // What the name needs is what its proto says, whatever references the client listed.
        const own = name.kind === 'artifact' ? artifactRoots(data, digest, true) : sourceRoots(data, digest);
        roots = { blobs: [...own.blobs], directories: [...own.directories] };
      } else {
        // A root that is not a Directory is the client's mistake (INVALID_ARGUMENT), not a closure still uploading.
        checkMessageSize(digest, 'Directory');
        const data = await ownBlob();
        if (data !== undefined) decodeDirectory(data, digest);
      }
      const record: NameRecord = { type, digest, referencedBlobs: roots.blobs, referencedDirectories: roots.directories, upstream: `push from ${peer}`, fetchedAt: Date.now() };
      const problem = await closureProblem(name.urn, record, read, (ds) => this.store.findMissing(ds));
      if (problem !== undefined) throw new MirrorError('CLOSURE_INCOMPLETE', `'${name.urn}' not recorded: ${problem}; upload every blob it needs first`);
      await this.sink.namePushed(name.urn, () => this.store.putName(name.urn, record));
      this.log.info({ urn: name.urn, digest: digestKey(digest), peer }, 'name pushed');
    }
  }
}
