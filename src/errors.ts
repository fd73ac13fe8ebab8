/**
 * The one error type of bst-cache-mirror. `code` is stable and documented in the README
 * ("Error codes"); messages may change. Programmer mistakes throw plain TypeErrors instead.
 * The mapping to gRPC statuses lives in one place: src/server/status.ts.
 */
export type MirrorErrorCode =
  | 'INVALID_ARGUMENT' // a malformed request field, digest, resource name or name
  | 'UNSUPPORTED' // a well-formed request for something the mirror does not do (other digest functions, qualifiers)
  | 'BATCH_TOO_LARGE' // a batch over the advertised max_batch_total_size_bytes
  | 'OUT_OF_RANGE' // a ByteStream read offset past the end of the blob
  | 'BLOB_NOT_FOUND'
  | 'NAME_NOT_FOUND'
  | 'DIGEST_MISMATCH' // content does not hash to the digest it was stored or sent under
  | 'BLOB_CORRUPT' // an object file on disk no longer matches its digest (bit rot)
  | 'READ_ONLY' // a write to the pull-only mirror
  | 'UPSTREAM_UNAVAILABLE' // an upstream could not be reached
  | 'UPSTREAM_ERROR' // an upstream answered with an unexpected error
  | 'STORE_LOCKED' // another process holds the store's index
  | 'CONFIG_INVALID';

export class MirrorError extends Error {
  readonly code: MirrorErrorCode;

  constructor(code: MirrorErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'MirrorError';
    this.code = code;
  }
}

export function isMirrorError(err: unknown, code?: MirrorErrorCode): err is MirrorError {
  return err instanceof MirrorError && (code === undefined || err.code === code);
}

/** The message of any thrown value, for logs and reports. */
export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
