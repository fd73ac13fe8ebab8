import { Artifact } from '../gen/buildstream/v2/artifact.js';
import { Source } from '../gen/buildstream/v2/source.js';
import { Directory } from '../gen/build/bazel/remote/execution/v2/remote_execution.js';
import { MirrorError, errorMessage } from '../errors.js';
import type { NameRecord } from './content-store.js';
import { parseUrn } from './names.js';
import { type Digest, type WireDigest, digestKey, fromWire, isEmptyDigest } from './digest.js';
import { ARTIFACT_SHAPE, DIRECTORY_SHAPE, type MessageShape, SOURCE_SHAPE, shapeMismatch } from './message-shape.js';

/** What a name needs besides its own digest: whole Directory trees and single blobs. */
export interface Roots {
  readonly directories: Digest[];
  readonly blobs: Digest[];
}

/** The file and subdirectory digests one Directory refers to. */
export interface DirectoryChildren {
  readonly files: Digest[];
  readonly directories: Digest[];
}

/**
 * The largest blob read as a Directory, Artifact or Source message. BuildStream's largest real
 * directories (thousands of entries) are around 1 MiB; a bound checked before reading keeps a blob
 * of any other kind (a 1 GiB file named as a tree root, say) from being read into memory to be parsed.
 */
export const MAX_MESSAGE_BLOB_BYTES = 16 << 20;

/** Throws INVALID_ARGUMENT, before anything is read, for a blob too large to be the message `what` names. */
export function checkMessageSize(digest: Digest, what: 'Directory' | 'BuildStream Artifact' | 'BuildStream Source'): void {
  if (digest.sizeBytes > MAX_MESSAGE_BLOB_BYTES) {
    throw new MirrorError('INVALID_ARGUMENT', `blob ${digestKey(digest)} is ${digest.sizeBytes} bytes, more than a ${what} may be (${MAX_MESSAGE_BLOB_BYTES}): it is not a ${what}`);
  }
}

/**
 * Decodes `data` as the message `shape` describes, refusing (INVALID_ARGUMENT) bytes that are not
 * one: undecodable, or another kind of message (which a decoder alone would accept, skipping
 * every field of the wrong wire type: an Artifact reads as an empty Directory).
 */
function decodeAs<M>(data: Uint8Array, digest: Digest, shape: MessageShape, decode: (data: Uint8Array) => M): M {
  try {
    const mismatch = shapeMismatch(data, shape);
    if (mismatch !== undefined) throw new Error(mismatch);
    return decode(data);
  } catch (err) {
    throw new MirrorError('INVALID_ARGUMENT', `blob ${digestKey(digest)} is not a ${shape.name}: ${errorMessage(err)}`, { cause: err });
  }
}

/** Decodes a Directory blob; INVALID_ARGUMENT if it is not one. */
export function decodeDirectory(data: Uint8Array, digest: Digest): Directory {
  return decodeAs(data, digest, DIRECTORY_SHAPE, (d) => Directory.decode(d));
}

export function parseDirectory(data: Uint8Array, digest: Digest): DirectoryChildren {
  const dir = decodeDirectory(data, digest);
  const where = `Directory ${digestKey(digest)}`;
  return {
    files: dir.files.map((f) => fromWire(f.digest, `${where} file '${f.name}'`)),
    directories: dir.directories.map((d) => fromWire(d.digest, `${where} directory '${d.name}'`)),
  };
}

function optional(d: WireDigest | undefined, what: string): Digest | undefined {
  if (d === undefined) return undefined;
  const digest = fromWire(d, what);
  // BuildStream leaves empty hashes unset or zero; neither needs fetching.
  return isEmptyDigest(digest) ? undefined : digest;
}

/**
 * The closure of a BuildStream 2.x Artifact proto: `files`, `public_data`, the logs and the
 * low/high diversity metadata; with `withBuildtrees` also the buildtree, sources, buildroot and
 * sandbox subtrees, which BuildStream only needs for `pull-buildtrees`.
 */
export function artifactRoots(data: Uint8Array, digest: Digest, withBuildtrees: boolean): Roots {
  const artifact = decodeAs(data, digest, ARTIFACT_SHAPE, (d) => Artifact.decode(d));
  const where = `Artifact ${digestKey(digest)}`;
  const directories = [optional(artifact.files, `${where} files`)];
  const blobs = [
    optional(artifact.publicData, `${where} public_data`),
    optional(artifact.lowDiversityMeta, `${where} low_diversity_meta`),
    optional(artifact.highDiversityMeta, `${where} high_diversity_meta`),
    ...artifact.logs.map((l) => optional(l.digest, `${where} log '${l.name}'`)),
  ];
  if (withBuildtrees) {
    directories.push(
      optional(artifact.buildtree, `${where} buildtree`),
      optional(artifact.sources, `${where} sources`),
      optional(artifact.buildroot, `${where} buildroot`),
      ...(artifact.buildsandbox?.subsandboxDigests ?? []).map((d) => optional(d, `${where} subsandbox`)),
    );
  }
  return { directories: present(directories), blobs: present(blobs) };
}

/** The closure of a BuildStream 2.x Source proto: its `files` tree. */
export function sourceRoots(data: Uint8Array, digest: Digest): Roots {
  const source = decodeAs(data, digest, SOURCE_SHAPE, (d) => Source.decode(d));
  return { directories: present([optional(source.files, `Source ${digestKey(digest)} files`)]), blobs: [] };
}

function present(ds: (Digest | undefined)[]): Digest[] {
  return ds.filter((d): d is Digest => d !== undefined);
}

/** Removes duplicate digests, keeping the first of each. */
export function uniqueDigests(ds: Iterable<Digest>): Digest[] {
  const seen = new Set<string>();
  const out: Digest[] = [];
  for (const d of ds) {
    const key = `${d.hash}/${d.sizeBytes}`;
    if (!seen.has(key)) {
      seen.add(key);
      out.push(d);
    }
  }
  return out;
}

/**
 * Why a recorded name's closure is incomplete, or undefined when every blob it needs is there.
 * `read` returns a blob's bytes or undefined when it is missing or unusable; `findMissing`
 * returns the digests (of those given) that are unusable.
 */
export async function closureProblem(
  urn: string,
  record: Pick<NameRecord, 'type' | 'digest' | 'referencedBlobs' | 'referencedDirectories'>,
  read: (d: Digest) => Promise<Buffer | undefined>,
  findMissing: (ds: readonly Digest[]) => Promise<Digest[]>,
): Promise<string | undefined> {
  try {
    const trees = [...record.referencedDirectories];
    const files = [...record.referencedBlobs];
    if (record.type === 'directory') trees.push(record.digest);
    else {
      const data = await read(record.digest);
      if (!data) return `its ${digestKey(record.digest)} blob is missing or bad`;
      const roots = parseUrn(urn).kind === 'artifact' ? artifactRoots(data, record.digest, false) : sourceRoots(data, record.digest);
      trees.push(...roots.directories);
      files.push(...roots.blobs);
    }
    let level = uniqueDigests(trees);
    const seen = new Set<string>();
    while (level.length > 0) {
      const next: Digest[] = [];
      for (const d of level) {
        seen.add(digestKey(d));
        const data = await read(d);
        if (!data) return `directory ${digestKey(d)} is missing or bad`;
        const children = parseDirectory(data, d);
        files.push(...children.files);
        next.push(...children.directories.filter((c) => !seen.has(digestKey(c))));
      }
      level = uniqueDigests(next);
    }
    const missing = await findMissing(uniqueDigests(files));
    return missing[0] ? `blob ${digestKey(missing[0])} is missing or bad` : undefined;
  } catch (err) {
    return errorMessage(err);
  }
}
