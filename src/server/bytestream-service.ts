import type * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { ByteStreamService, type ReadRequest, type ReadResponse } from '../gen/google/bytestream/bytestream.js';
import type { ContentStore } from '../cas/content-store.js';
import { digestKey, parseResourceName } from '../cas/digest.js';
import { MirrorError } from '../errors.js';
import { BYTES_FIELD_HEADROOM, type EncodedMessage, acceptingEncoded, encodeBytesField } from './encoded-message.js';
import { clientStream, clientStreamRefusal, guardedDefinition, readOnlyError, serverStream } from './handler.js';
import type { PushIntake } from './push-intake.js';
import { ResponseWriter, type SendBudget } from './send-budget.js';

/** Bytes per ReadResponse: what the 1.x reference server and bst use, well under clients' 4 MiB limit. */
export const READ_CHUNK_BYTES = 1 << 20;
/**
 * Chunks a read may have queued for HTTP/2 at once: enough to keep the socket busy, few enough
 * that one reader holds little of the send budget (a paused reader holds this many until the
 * stall timeout cancels it).
 */
const READ_CHUNKS_IN_FLIGHT = 4;
/** ReadResponse.data's field number. */
const READ_RESPONSE_DATA_FIELD = 10;

type ReadCall = grpc.ServerWritableStream<ReadRequest, ReadResponse | EncodedMessage>;

/** google.bytestream.ByteStream: Read with offset and limit; Write is refused (pull-only). */
export class ByteStreamReadService {
  constructor(
    private readonly store: ContentStore,
    private readonly budget: SendBudget,
    private readonly log: Logger,
    /** Present on a push listener: writes are taken; otherwise refused. */
    private readonly intake?: PushIntake,
  ) {}

  addToServer(server: Pick<grpc.Server, 'addService'>): void {
    const definition = guardedDefinition(ByteStreamService);
    server.addService(
      { ...definition, read: acceptingEncoded(definition.read) },
      {
        read: serverStream(this.log, 'ByteStream.Read', (req: ReadRequest, call: ReadCall) => this.read(req, call)),
        write: this.intake
          ? clientStream(this.log, 'ByteStream.Write', async (call) => ({ committedSize: BigInt(await (this.intake as PushIntake).write(call)) }))
          : clientStreamRefusal(this.log, 'ByteStream.Write', () => readOnlyError('ByteStream.Write')),
      },
    );
  }

  private async read({ resourceName, readOffset, readLimit }: ReadRequest, call: ReadCall): Promise<void> {
    const { digest } = parseResourceName(resourceName, 'read');
    if (readLimit < 0n) throw new MirrorError('INVALID_ARGUMENT', `read_limit ${readLimit} is negative`);
    if (readOffset < 0n || readOffset > BigInt(digest.sizeBytes)) {
      throw new MirrorError('OUT_OF_RANGE', `read_offset ${readOffset} is outside blob ${digestKey(digest)} (size ${digest.sizeBytes})`);
    }
    const reader = await this.store.read(digest, { offset: Number(readOffset), limit: readLimit === 0n ? undefined : Number(readLimit) });
    if (reader === undefined) throw new MirrorError('BLOB_NOT_FOUND', `blob ${digestKey(digest)} is not in the mirror`);
    const out = new ResponseWriter(call, this.budget, READ_CHUNKS_IN_FLIGHT);
    // Room in the send budget is taken before each chunk is read from disk, so nothing is read
    // for a client that cannot take it. Closing the iterator (on the way out) closes the file.
    const chunks = reader.chunks(READ_CHUNK_BYTES, BYTES_FIELD_HEADROOM)[Symbol.asyncIterator]();
    try {
      for (let left = reader.length; left > 0 && !out.done; left -= READ_CHUNK_BYTES) {
        const sent = await out.send(Math.min(left, READ_CHUNK_BYTES) + BYTES_FIELD_HEADROOM, async () => {
          const next = await chunks.next();
          return next.done ? undefined : encodeBytesField(READ_RESPONSE_DATA_FIELD, next.value);
        });
        if (!sent) break;
      }
    } finally {
      await chunks.return?.();
    }
  }
}
