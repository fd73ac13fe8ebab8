import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { MirrorError, type MirrorErrorCode } from '../errors.js';

export interface GrpcStatus {
  readonly code: grpc.status;
  readonly details: string;
}

/**
 * The one table from MirrorError codes to gRPC statuses, used for thrown errors and for the
 * per-entry statuses inside batch responses. Codes are chosen for what BuildStream clients do
 * with them: NOT_FOUND makes them try their next remote, anything else fails the job.
 */
const TABLE: Record<MirrorErrorCode, grpc.status> = {
  INVALID_ARGUMENT: grpc.status.INVALID_ARGUMENT,
  // REAPI: a digest function or qualifier the server does not support is INVALID_ARGUMENT.
  UNSUPPORTED: grpc.status.INVALID_ARGUMENT,
  BATCH_TOO_LARGE: grpc.status.INVALID_ARGUMENT,
  OUT_OF_RANGE: grpc.status.OUT_OF_RANGE,
  BLOB_NOT_FOUND: grpc.status.NOT_FOUND,
  NAME_NOT_FOUND: grpc.status.NOT_FOUND,
  DIGEST_MISMATCH: grpc.status.INVALID_ARGUMENT,
  // The corrupt blob has been removed, so to the client it is a miss: it falls back to its next
  // remote instead of failing the pull.
  BLOB_CORRUPT: grpc.status.NOT_FOUND,
  READ_ONLY: grpc.status.PERMISSION_DENIED,
  // REAPI and Remote Asset: a name whose referenced blobs are absent is a failed precondition.
  CLOSURE_INCOMPLETE: grpc.status.FAILED_PRECONDITION,
  UPSTREAM_UNAVAILABLE: grpc.status.UNAVAILABLE,
  UPSTREAM_ERROR: grpc.status.UNAVAILABLE,
  STORE_LOCKED: grpc.status.UNAVAILABLE,
  CONFIG_INVALID: grpc.status.INTERNAL,
};

export function toStatus(err: unknown, log?: Logger, method?: string): GrpcStatus {
  if (err instanceof MirrorError) {
    const code = TABLE[err.code];
    if (code === grpc.status.UNAVAILABLE || code === grpc.status.INTERNAL) log?.error({ err, method }, err.message);
    return { code, details: err.message };
  }
  log?.error({ err, method }, 'unexpected error while serving a request');
  return { code: grpc.status.INTERNAL, details: 'internal error in bst-cache-mirror; see its log' };
}

/** Trailing metadata key carrying a MirrorError's code, so the CLI can rebuild it from the control endpoint's answer. */
export const ERROR_CODE_KEY = 'bst-cache-mirror-error-code';

export function toServiceError(err: unknown, log?: Logger, method?: string): Partial<grpc.ServiceError> {
  const { code, details } = toStatus(err, log, method);
  const metadata = new grpc.Metadata();
  if (err instanceof MirrorError) metadata.set(ERROR_CODE_KEY, err.code);
  return { code, details, message: details, metadata, name: 'ServiceError' };
}
