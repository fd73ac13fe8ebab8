import * as grpc from '@grpc/grpc-js';
import { isMirrorError } from '../errors.js';
import { grpcCode } from './endpoint.js';

/**
 * Statuses that say "try again later": the upstream was unreachable, overloaded, out of space for
 * now, or failed inside. (BuildStream 1.6 retries UNAVAILABLE itself and treats ABORTED and every
 * other push error as temporary; bb-storage's IsInfrastructureError draws a similar line.)
 */
const RETRY = new Set<grpc.status>([
  grpc.status.UNAVAILABLE,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.RESOURCE_EXHAUSTED,
  grpc.status.ABORTED,
  grpc.status.INTERNAL,
  grpc.status.UNKNOWN,
]);

/**
 * Statuses that an identical request will get again: no permission (a pull-only upstream), bad
 * credentials, a request the upstream rejects, or a service it does not have.
 */
const NEVER = new Set<grpc.status>([
  grpc.status.PERMISSION_DENIED,
  grpc.status.UNAUTHENTICATED,
  grpc.status.INVALID_ARGUMENT,
  grpc.status.FAILED_PRECONDITION,
  grpc.status.NOT_FOUND,
  grpc.status.UNIMPLEMENTED,
]);

/**
 * The one retry decision for calls to upstreams. The first gRPC status code found along the
 * `cause` chain (outermost first) decides when it is one of the lists above; otherwise an error
 * is retried only if it is MirrorError('UPSTREAM_UNAVAILABLE') (which Endpoint.wrap also gives a
 * CANCELLED we did not ask for, and UpstreamHealth gives the refusal of an offline upstream).
 * Everything else (local store errors, DIGEST_MISMATCH, UNSUPPORTED, programmer errors) is final.
 */
export function isRetryable(err: unknown): boolean {
  const seen = new Set<unknown>();
  for (let e: unknown = err; e !== undefined && e !== null && !seen.has(e) && seen.size < 16; e = (e as { cause?: unknown }).cause) {
    seen.add(e);
    const code = grpcCode(e);
    if (code === undefined) continue;
    if (RETRY.has(code)) return true;
    if (NEVER.has(code)) return false;
  }
  for (const e of seen) if (isMirrorError(e, 'UPSTREAM_UNAVAILABLE')) return true;
  return false;
}
