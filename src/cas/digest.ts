import { createHash } from 'node:crypto';
import { MirrorError } from '../errors.js';

/** A REAPI SHA-256 digest as the mirror handles it: lowercase hex and a safe-integer size. */
export interface Digest {
  readonly hash: string;
  readonly sizeBytes: number;
}

/** A digest as generated protobuf code carries it (int64 as bigint). */
export interface WireDigest {
  hash: string;
  sizeBytes: bigint;
}

export const EMPTY_DIGEST: Digest = Object.freeze({
  hash: 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
  sizeBytes: 0,
});


/**
 * The largest blob the mirror accepts. Sizes are plain numbers inside the mirror; 2^53-1 bytes is
 * far beyond any disk, and anything larger is rejected at the edge instead of losing precision.
 */
export const MAX_BLOB_SIZE = Number.MAX_SAFE_INTEGER;

export function isEmptyDigest(d: Digest): boolean {
  return d.sizeBytes === 0 && d.hash === EMPTY_DIGEST.hash;
}

/** `hash/size`, the form used in logs, index records and ByteStream resource names. */
export function digestKey(d: Digest): string {
  return `${d.hash}/${d.sizeBytes}`;
}

export function parseDigestKey(key: string): Digest {
  const slash = key.indexOf('/');
  if (slash < 0) throw new MirrorError('INVALID_ARGUMENT', `'${key}' is not a digest (expected HASH/SIZE)`);
  return checkDigest(key.slice(0, slash), key.slice(slash + 1), 'digest');
}

/** Converts and validates a digest from the wire. `what` names the field in error messages. */
export function fromWire(d: WireDigest | undefined, what = 'digest'): Digest {
  if (d === undefined) throw new MirrorError('INVALID_ARGUMENT', `${what} is missing`);
  return checkDigest(d.hash, d.sizeBytes, what);
}

export function toWire(d: Digest): WireDigest {
  return { hash: d.hash, sizeBytes: BigInt(d.sizeBytes) };
}

/** 64 lowercase hex characters; a loop, as FindMissingBlobs checks 10,000 of these a call. */
export function isSha256Hex(s: string): boolean {
  if (s.length !== 64) return false;
  for (let i = 0; i < 64; i++) {
    const c = s.charCodeAt(i);
    if (!((c >= 0x30 && c <= 0x39) || (c >= 0x61 && c <= 0x66))) return false;
  }
  return true;
}

function checkDigest(hash: string, size: bigint | string, what: string): Digest {
  if (!isSha256Hex(hash)) {
    throw new MirrorError('INVALID_ARGUMENT', `${what} has hash '${truncate(hash)}': expected 64 lowercase hex characters (SHA-256)`);
  }
  let sizeBytes: bigint;
  if (typeof size === 'string') {
    if (!/^\d{1,20}$/.test(size)) throw new MirrorError('INVALID_ARGUMENT', `${what} has size '${truncate(size)}': expected a non-negative integer`);
    sizeBytes = BigInt(size);
  } else {
    sizeBytes = size;
  }
  if (sizeBytes < 0n) throw new MirrorError('INVALID_ARGUMENT', `${what} has negative size ${sizeBytes}`);
  if (sizeBytes > BigInt(MAX_BLOB_SIZE)) throw new MirrorError('INVALID_ARGUMENT', `${what} has size ${sizeBytes}, over the maximum of ${MAX_BLOB_SIZE} bytes`);
  const digest = { hash, sizeBytes: Number(sizeBytes) };
  if (digest.sizeBytes === 0 && hash !== EMPTY_DIGEST.hash) {
    throw new MirrorError('INVALID_ARGUMENT', `${what} has size 0 but is not the empty blob's hash`);
  }
  return digest;
}

export function digestOf(data: Uint8Array): Digest {
  return { hash: createHash('sha256').update(data).digest('hex'), sizeBytes: data.byteLength };
}

function truncate(s: string): string {
  return s.length > 80 ? `${s.slice(0, 80)}…` : s;
}

/** A parsed ByteStream resource name. */
export interface ResourceName {
  readonly instanceName: string;
  readonly digest: Digest;
}

const INSTANCE_SEGMENT = /^[A-Za-z0-9._-]+$/;
/** Words REAPI forbids as instance name segments, since resource names use them. */
const RESERVED_SEGMENTS = new Set(['blobs', 'uploads', 'compressed-blobs', 'actions', 'actionResults', 'operations', 'capabilities']);

/**
 * Parses `[{instance}/]blobs/{hash}/{size}` (read) or
 * `[{instance}/]uploads/{uuid}/blobs/{hash}/{size}[/{metadata…}]` (write). Instance names may span
 * several segments, so the keyword is located; `.`/`..` segments, empty segments and compressed
 * or non-SHA-256 forms are refused with INVALID_ARGUMENT.
 */
export function parseResourceName(name: string, kind: 'read' | 'write'): ResourceName {
  if (name.length > 4096) throw new MirrorError('INVALID_ARGUMENT', 'resource name is longer than 4096 characters');
  const parts = name.split('/');
  const keyword = kind === 'read' ? 'blobs' : 'uploads';
  const at = parts.indexOf(keyword);
  if (at < 0) {
    const hint = parts.includes('compressed-blobs') ? ': compressed blobs are not supported (no compressors are advertised)' : '';
    throw new MirrorError('INVALID_ARGUMENT', `resource name '${truncate(name)}' is not of the form [instance/]${kind === 'read' ? 'blobs/HASH/SIZE' : 'uploads/UUID/blobs/HASH/SIZE'}${hint}`);
  }
  const instanceParts = parts.slice(0, at);
  // REAPI reserves these words: `uploads/…/blobs/…` is a write's name, never an instance to read from.
  const reserved = instanceParts.find((seg) => RESERVED_SEGMENTS.has(seg));
  if (reserved !== undefined) {
    throw new MirrorError('INVALID_ARGUMENT', `resource name '${truncate(name)}' has the reserved word '${reserved}' in its instance name${reserved === 'uploads' ? `: reads take [instance/]blobs/HASH/SIZE, uploads/… is for writes` : ''}`);
  }
  for (const seg of instanceParts) {
    if (!INSTANCE_SEGMENT.test(seg) || seg === '.' || seg === '..') {
      throw new MirrorError('INVALID_ARGUMENT', `resource name '${truncate(name)}' has an invalid instance name segment '${truncate(seg)}'`);
    }
  }
  let rest = parts.slice(at + 1);
  if (kind === 'write') {
    // uploads/{uuid}/blobs/{hash}/{size}[/optional metadata]
    if (rest.length < 4 || rest[1] !== 'blobs' || !/^[A-Za-z0-9-]{1,64}$/.test(rest[0] ?? '')) {
      throw new MirrorError('INVALID_ARGUMENT', `resource name '${truncate(name)}' is not of the form [instance/]uploads/UUID/blobs/HASH/SIZE`);
    }
    rest = rest.slice(2, 4);
  } else if (rest.length !== 2) {
    throw new MirrorError('INVALID_ARGUMENT', `resource name '${truncate(name)}' must end in blobs/HASH/SIZE with nothing after the size`);
  }
  const [hash = '', size = ''] = rest;
  return { instanceName: instanceParts.join('/'), digest: checkDigest(hash, size, `resource name '${truncate(name)}'`) };
}

export function readResourceName(instanceName: string, d: Digest): string {
  return `${instanceName ? `${instanceName}/` : ''}blobs/${d.hash}/${d.sizeBytes}`;
}

/** Splits digests, in order, into groups of at most `budget` bytes (a larger blob alone). */
export function groupBySize(digests: readonly Digest[], budget: number): Digest[][] {
  const groups: Digest[][] = [];
  let current: Digest[] = [];
  let bytes = 0;
  for (const d of digests) {
    if (current.length > 0 && bytes + d.sizeBytes > budget) {
      groups.push(current);
      current = [];
      bytes = 0;
    }
    current.push(d);
    bytes += d.sizeBytes;
  }
  if (current.length > 0) groups.push(current);
  return groups;
}
