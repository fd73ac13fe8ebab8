import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import {
  type BatchReadBlobsRequest,
  ContentAddressableStorageService,
  type ContentAddressableStorageServer,
  type Directory,
} from '../gen/build/bazel/remote/execution/v2/remote_execution.js';
import type { ContentStore } from '../cas/content-store.js';
import { type Digest, digestKey, fromWire, groupBySize, toWire } from '../cas/digest.js';
import { checkMessageSize, decodeDirectory } from '../cas/closure.js';
import { MirrorError } from '../errors.js';
import { type BatchReadEntry, NO_DATA, encodeBatchReadBlobsResponse } from './batch-read-response.js';
import { type EncodedMessage, acceptingEncoded } from './encoded-message.js';
import type { PushIntake } from './push-intake.js';
import { guardedDefinition, readOnlyError, serverStream, unary } from './handler.js';
import { ResponseWriter, type SendBudget, holdForCall } from './send-budget.js';
import { checkDigestFunction, checkInstanceName } from './request-checks.js';
import { toStatus } from './status.js';

/** Directories per GetTree response message, and a byte budget that keeps messages small. */
const TREE_PAGE_DIRECTORIES = 1000;
const TREE_PAGE_BYTES = 2 << 20;
/** Pages a GetTree may have queued for HTTP/2 at once. */
const TREE_PAGES_IN_FLIGHT = 4;
/** Room a BatchReadBlobs response takes besides its blobs: per-entry digests and statuses. */
const BATCH_ENTRY_OVERHEAD_BYTES = 128;
/** Directory bytes a GetTree reads at once: one reader-thread request, a few milliseconds of its time. */
const TREE_READ_GROUP_BYTES = 4 << 20;

/** REAPI ContentAddressableStorage, read side; BatchUpdateBlobs is refused. */
export class CasService {
  constructor(
    private readonly store: ContentStore,
    private readonly maxBatchBytes: number,
    private readonly budget: SendBudget,
    private readonly log: Logger,
    /** Present on a push listener: writes are taken; otherwise refused. */
    private readonly intake?: PushIntake,
  ) {}

  addToServer(server: Pick<grpc.Server, 'addService'>): void {
    const log = this.log;
    const impl: Pick<ContentAddressableStorageServer, 'findMissingBlobs' | 'batchUpdateBlobs' | 'getTree'> = {
      findMissingBlobs: unary(log, 'FindMissingBlobs', async (req) => {
        checkInstanceName(req.instanceName);
        checkDigestFunction(req.digestFunction);
        const digests = req.blobDigests.map((d, i) => fromWire(d, `blob_digests[${i}]`));
        return { missingBlobDigests: (await this.store.findMissing(digests)).map(toWire) };
      }),
      batchUpdateBlobs: unary(log, 'BatchUpdateBlobs', async (req) => {
        if (!this.intake) throw readOnlyError('BatchUpdateBlobs');
        return this.intake.batchUpdate(req);
      }),
      getTree: serverStream(log, 'GetTree', async (req, call) => {
        checkInstanceName(req.instanceName);
        checkDigestFunction(req.digestFunction);
        const root = fromWire(req.rootDigest, 'root_digest');
        if (req.pageSize < 0) throw new MirrorError('INVALID_ARGUMENT', `page_size ${req.pageSize} is negative`);
        if (!/^\d{0,12}$/.test(req.pageToken)) throw new MirrorError('INVALID_ARGUMENT', `page_token '${req.pageToken.slice(0, 40)}' was not issued by this server`);
        const pageSize = Math.min(req.pageSize || TREE_PAGE_DIRECTORIES, TREE_PAGE_DIRECTORIES);
        await this.streamTree(root, Number(req.pageToken || '0'), pageSize, call);
      }),
    };
    const definition = guardedDefinition(ContentAddressableStorageService);
    const batchReadBlobs = unary(log, 'BatchReadBlobs', async (req: BatchReadBlobsRequest, call): Promise<EncodedMessage> => {
      checkInstanceName(req.instanceName);
      checkDigestFunction(req.digestFunction);
      const digests = req.digests.map((d, i) => fromWire(d, `digests[${i}]`));
      const total = digests.reduce((n, d) => n + d.sizeBytes, 0);
      if (total > this.maxBatchBytes) {
        throw new MirrorError('BATCH_TOO_LARGE', `BatchReadBlobs asks for ${total} bytes, over max_batch_total_size_bytes (${this.maxBatchBytes}); read large blobs with ByteStream`);
      }
      // The blobs and then the response that copies them are held until the call is over.
      if (digests.length > 0 && (await holdForCall(this.budget, call, total + digests.length * BATCH_ENTRY_OVERHEAD_BYTES)) === 0) {
        throw new MirrorError('INVALID_ARGUMENT', 'the client cancelled BatchReadBlobs');
      }
      const results = await this.store.readManyBytes(digests);
      return encodeBatchReadBlobsResponse(digests.map((digest, i) => this.batchEntry(digest, results[i])));
    });
    server.addService({ ...definition, batchReadBlobs: acceptingEncoded(definition.batchReadBlobs) }, { ...impl, batchReadBlobs });
  }

  private batchEntry(digest: Digest, result: Buffer | undefined | MirrorError): BatchReadEntry {
    const wire = toWire(digest);
    if (result instanceof MirrorError) {
      const { code, details } = toStatus(result, this.log, 'BatchReadBlobs');
      return { digest: wire, data: NO_DATA, status: { code, message: details } };
    }
    if (result === undefined) {
      return { digest: wire, data: NO_DATA, status: { code: grpc.status.NOT_FOUND, message: `blob ${digestKey(digest)} is not in the mirror` } };
    }
    return { digest: wire, data: result, status: { code: grpc.status.OK, message: '' } };
  }

  /**
   * Streams the tree breadth-first, `pageSize` directories (or ~2 MiB) per message, from the
   * position `start` in that order. Each message's next_page_token is the position to resume at.
   * Subtrees missing from the store are left out, as REAPI allows. Each level is read in groups
   * of at most TREE_READ_GROUP_BYTES, and no blob over MAX_MESSAGE_BLOB_BYTES is read at all, so
   * one call holds little memory and never holds the reader thread long.
   */
  private async streamTree(root: Digest, start: number, pageSize: number, call: grpc.ServerWritableStream<unknown, { directories: Directory[]; nextPageToken: string }>): Promise<void> {
    checkMessageSize(root, 'Directory');
    if ((await this.store.findMissing([root])).length > 0) throw new MirrorError('BLOB_NOT_FOUND', `root directory ${digestKey(root)} is not in the mirror`);
    let position = 0;
    let page: Directory[] = [];
    let pageBytes = 0;
    let level: Digest[] = [root];
    const seen = new Set<string>([digestKey(root)]);
    const out = new ResponseWriter(call, this.budget, TREE_PAGES_IN_FLIGHT);
    const flush = async (next: string): Promise<void> => {
      const directories = page;
      const bytes = pageBytes;
      page = [];
      pageBytes = 0;
      await out.send(bytes, () => ({ directories, nextPageToken: next }));
    };
    while (level.length > 0) {
      const nextLevel: Digest[] = [];
      for (const group of groupBySize(level, TREE_READ_GROUP_BYTES)) {
        // A group is counted while it is read. It is released before its directories are paged
        // (waiting for room for a page while holding a group could wait on itself).
        const held = await this.budget.acquire(group.reduce((n, d) => n + d.sizeBytes, 0), out.signal);
        if (held === 0 || out.done) {
          this.budget.release(held);
          return;
        }
        let loaded: Awaited<ReturnType<ContentStore['readManyBytes']>>;
        try {
          loaded = await this.store.readManyBytes(group);
        } finally {
          this.budget.release(held);
        }
        for (const [i, data] of loaded.entries()) {
          const digest = group[i];
          if (data instanceof MirrorError) throw data;
          if (data === undefined || digest === undefined) continue;
          const dir = decodeDirectory(data, digest);
          if (position >= start) {
            if (page.length >= pageSize || (page.length > 0 && pageBytes + data.byteLength > TREE_PAGE_BYTES)) await flush(String(position));
            page.push(dir);
            pageBytes += data.byteLength;
          }
          position += 1;
          for (const child of dir.directories) {
            const d = fromWire(child.digest, `Directory ${digestKey(digest)} entry '${child.name}'`);
            if (!seen.has(digestKey(d))) {
              checkMessageSize(d, 'Directory');
              seen.add(digestKey(d));
              nextLevel.push(d);
            }
          }
        }
      }
      level = nextLevel;
    }
    if (page.length > 0 || start >= position) await flush('');
  }
}

