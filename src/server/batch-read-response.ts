import { BatchReadBlobsResponse_Response, type Digest as WireDigest } from '../gen/build/bazel/remote/execution/v2/remote_execution.js';
import type { Status } from '../gen/google/rpc/status.js';
import { EncodedMessage, bytesFieldLength, writeBytesFieldHeader } from './encoded-message.js';

export interface BatchReadEntry {
  readonly digest: WireDigest;
  readonly data: Buffer;
  readonly status: Status;
}

const RESPONSES_FIELD = 1; // BatchReadBlobsResponse.responses
const DATA_FIELD = 2; // BatchReadBlobsResponse.Response.data
/** The data of an entry that has none (a miss or an error). */
export const NO_DATA = Buffer.alloc(0);

/**
 * Encodes a BatchReadBlobsResponse into one buffer, copying each blob once. A protobuf message is
 * the concatenation of its fields in any order, so each entry is its digest and status (small,
 * encoded by the generated code) followed by its data field, written here.
 */
export function encodeBatchReadBlobsResponse(entries: readonly BatchReadEntry[]): EncodedMessage {
  const heads = entries.map((e) => BatchReadBlobsResponse_Response.encode({ digest: e.digest, data: NO_DATA, status: e.status }).finish());
  const entryLengths = entries.map((e, i) => (heads[i]?.byteLength ?? 0) + (e.data.byteLength > 0 ? bytesFieldLength(e.data.byteLength) : 0));
  const out = Buffer.allocUnsafe(entryLengths.reduce((n, len) => n + bytesFieldLength(len), 0));
  let at = 0;
  entries.forEach((e, i) => {
    const head = heads[i] ?? NO_DATA;
    at = writeBytesFieldHeader(out, at, RESPONSES_FIELD, entryLengths[i] ?? 0);
    out.set(head, at);
    at += head.byteLength;
    if (e.data.byteLength > 0) {
      at = writeBytesFieldHeader(out, at, DATA_FIELD, e.data.byteLength);
      e.data.copy(out, at);
      at += e.data.byteLength;
    }
  });
  return new EncodedMessage(out);
}
