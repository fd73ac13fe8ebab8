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
  | 'CLOSURE_INCOMPLETE' // a pushed name whose blobs are not all uploaded yet
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

/** The errors of a `cause` chain, outermost first (bounded, in case a chain loops). */
function causeChain(err: unknown): unknown[] {
  const chain: unknown[] = [];
  for (let e: unknown = err; e !== undefined && e !== null && chain.length < 16 && !chain.includes(e); e = (e as { cause?: unknown }).cause) {
    chain.push(e);
  }
  return chain;
}

/**
 * The message, followed by the root cause of its `cause` chain when that says something the
 * message does not (LevelDB's "Database failed to open" hides "No space left on device").
 */
export function describeError(err: unknown): string {
  const message = errorMessage(err);
  const root = causeChain(err).at(-1);
  const rootMessage = root === err ? '' : errorMessage(root);
  return rootMessage === '' || message.includes(rootMessage) ? message : `${message} (cause: ${rootMessage})`;
}

/** errno codes that mean the machine refused: a full disk, permissions, a read-only or failing file system, file limits. */
const ENVIRONMENT_ERRNOS = new Set(['ENOSPC', 'EDQUOT', 'EACCES', 'EPERM', 'EROFS', 'EIO', 'EMFILE', 'ENFILE', 'ENOMEM']);
/** The same failures as LevelDB reports them: in messages, without errno codes. */
const ENVIRONMENT_MESSAGES = /No space left on device|Disk quota exceeded|Permission denied|Operation not permitted|Read-only file system|Input\/output error|Too many open files/i;

/** Whether an error comes from the environment (disk full, permission denied, …) rather than from input or a peer. */
export function isEnvironmentFailure(err: unknown): boolean {
  return causeChain(err).some((e) => {
    const code = (e as { code?: unknown }).code;
    return (typeof code === 'string' && ENVIRONMENT_ERRNOS.has(code)) || ENVIRONMENT_MESSAGES.test(errorMessage(e));
  });
}
