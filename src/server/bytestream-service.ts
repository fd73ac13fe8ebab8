import type * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { ByteStreamService, type ByteStreamServer, type ReadResponse } from '../gen/google/bytestream/bytestream.js';
import type { ContentStore } from '../cas/content-store.js';
import { digestKey, parseResourceName } from '../cas/digest.js';
import { MirrorError } from '../errors.js';
import { clientStreamRefusal, guardedDefinition, onceDrainOrCancel, readOnlyError, serverStream } from './handler.js';

/** google.bytestream.ByteStream: Read with offset and limit; Write is refused (pull-only). */
export class ByteStreamReadService {
  constructor(
    private readonly store: ContentStore,
    private readonly log: Logger,
  ) {}

  addToServer(server: Pick<grpc.Server, 'addService'>): void {
    const impl: ByteStreamServer = {
      read: serverStream(this.log, 'ByteStream.Read', (req, call) => this.read(req.resourceName, req.readOffset, req.readLimit, call)),
      write: clientStreamRefusal(this.log, 'ByteStream.Write', () => readOnlyError('ByteStream.Write')),
    };
    server.addService(guardedDefinition(ByteStreamService), impl);
  }

  private async read(resourceName: string, readOffset: bigint, readLimit: bigint, call: grpc.ServerWritableStream<unknown, ReadResponse>): Promise<void> {
    const { digest } = parseResourceName(resourceName, 'read');
    if (readLimit < 0n) throw new MirrorError('INVALID_ARGUMENT', `read_limit ${readLimit} is negative`);
    if (readOffset < 0n || readOffset > BigInt(digest.sizeBytes)) {
      throw new MirrorError('OUT_OF_RANGE', `read_offset ${readOffset} is outside blob ${digestKey(digest)} (size ${digest.sizeBytes})`);
    }
    const reader = await this.store.read(digest, { offset: Number(readOffset), limit: readLimit === 0n ? undefined : Number(readLimit) });
    if (reader === undefined) throw new MirrorError('BLOB_NOT_FOUND', `blob ${digestKey(digest)} is not in the mirror`);
    const { stream } = reader;
    const cancel = (): void => {
      stream.destroy();
    };
    call.once('cancelled', cancel);
    try {
      for await (const chunk of stream as AsyncIterable<Buffer>) {
        if (call.cancelled) break;
        if (!call.write({ data: chunk })) await onceDrainOrCancel(call);
      }
    } finally {
      call.off('cancelled', cancel);
      stream.destroy();
    }
  }
}
