import { constants as fsConstants } from 'node:fs';
import { type FileHandle, lstat, open, readdir, realpath, stat } from 'node:fs/promises';
import { isAbsolute, join, relative, resolve, sep } from 'node:path';
import { MAX_MESSAGE_BLOB_BYTES } from '../cas/closure.js';
import { type Digest, digestKey, isSha256Hex } from '../cas/digest.js';
import { type MirrorName, URN_PREFIX, artifactName, parseUrn, refName } from '../cas/names.js';
import { MirrorError, errorMessage } from '../errors.js';

/**
 * The on-disk layouts of a BuildStream local cache (the directory BuildStream calls its cachedir,
 * `~/.cache/buildstream` by default), as BuildStream 1.6.8 and 2.8.1 write them:
 *
 * - bst1 (`buildstream/_artifactcache/cascache.py`, under `artifactdir` = `<cachedir>/artifacts`):
 *   `artifacts/cas/refs/heads/<project>/<element>/<key>` holds a serialized REAPI `Digest` of the
 *   artifact's root Directory; blobs are `artifacts/cas/objects/<2 hex>/<62 hex>`. Refs are
 *   written in `artifacts/tmp` and renamed into place, after their objects.
 * - bst2 (`_artifactcache.py`, `_elementsourcescache.py`, `_sourcecache.py`): blobs are
 *   `cas/objects/<2 hex>/<62 hex>` (buildbox-casd's store); `artifacts/refs/<project>/<element>/<key>`
 *   holds a serialized `buildstream.v2.Artifact` (one file per strong and weak key, written by a
 *   temp file `tmpXXXXXXXX` in the same directory and renamed; the proto is not itself in the
 *   CAS until a push adds it); `elementsources/<key>` and `source_protos/<kind>/<key>` each hold
 *   a serialized `buildstream.v2.Source` whose `files` is the staged sources' Directory.
 *
 * BuildStream 2 moves a 1.6 `artifacts/cas` to `cas` (leaving a symlink), so a cachedir both used
 * may hold 1.6 refs in `cas/refs/heads`; a 1.6 `artifactdir` given directly has them there too.
 * Both are read as 1.6 refs, wherever the layout is detected as bst2.
 */
export type LocalCacheLayout = 'bst1' | 'bst2';

export interface LocalRef {
  readonly urn: string;
  /** the file holding it */
  readonly path: string;
}

/** Where 1.6 refs may be, relative to the cache dir; objects are in `../../objects` of each. */
const V1_REF_ROOTS: readonly (readonly string[])[] = [
  ['artifacts', 'cas', 'refs', 'heads'],
  ['cas', 'refs', 'heads'],
];
const V2_ARTIFACT_REFS = ['artifacts', 'refs'] as const;
const V2_ELEMENT_SOURCES = 'elementsources';
const V2_SOURCE_PROTOS = 'source_protos';
const V2_OBJECTS = ['cas', 'objects'] as const;

/**
 * Paths (as segments) that lead to ref files: a path matters when its segments are a prefix of
 * one of these (`*` is any one segment). What a file watcher descends into.
 */
export const REF_PATTERNS: readonly (readonly string[])[] = [
  [...(V1_REF_ROOTS[0] ?? []), '*', '*', '*'],
  [...(V1_REF_ROOTS[1] ?? []), '*', '*', '*'],
  [...V2_ARTIFACT_REFS, '*', '*', '*'],
  [V2_ELEMENT_SOURCES, '*'],
  [V2_SOURCE_PROTOS, '*', '*'],
];

/** Whether a path relative to the cache dir (as segments) is, or may lead to, a ref file. */
export function mayHoldRefs(segments: readonly string[]): boolean {
  return REF_PATTERNS.some((p) => segments.length <= p.length && segments.every((s, i) => p[i] === '*' || p[i] === s));
}

async function isDirectory(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isDirectory();
  } catch {
    return false;
  }
}

function configInvalid(message: string, cause?: unknown): MirrorError {
  return new MirrorError('CONFIG_INVALID', message, cause === undefined ? {} : { cause });
}

/** Throws CONFIG_INVALID unless `dir` is a directory. */
async function checkDirectory(dir: string): Promise<void> {
  let isDir: boolean;
  try {
    isDir = (await stat(dir)).isDirectory();
  } catch (err) {
    throw configInvalid(`BuildStream cache directory ${dir} cannot be read: ${errorMessage(err)}`, err);
  }
  if (!isDir) throw configInvalid(`BuildStream cache directory ${dir} is not a directory`);
}

/**
 * Which layout a BuildStream cache directory has (bst1: `<dir>/artifacts/cas/refs/heads`, or
 * `<dir>/cas/refs/heads` for a 1.6 artifactdir; bst2: `<dir>/cas` with `<dir>/artifacts/refs`,
 * `elementsources` or `source_protos`); CONFIG_INVALID naming the dir if neither. A cachedir
 * that both hold is bst2 (its 1.6 refs are still listed and imported).
 */
export async function detectLayout(dir: string): Promise<LocalCacheLayout> {
  await checkDirectory(dir);
  const has = (...segments: string[]) => isDirectory(join(dir, ...segments));
  const bst2 =
    (await has('cas')) &&
    ((await has(...V2_ARTIFACT_REFS)) || (await has(V2_ELEMENT_SOURCES)) || (await has(V2_SOURCE_PROTOS)));
  if (bst2) return 'bst2';
  for (const root of V1_REF_ROOTS) if (await has(...root)) return 'bst1';
  let hint = '';
  if ((await has('refs', 'heads')) && (await has('objects'))) hint = `; it looks like a BuildStream 1.6 'cas' directory: give the directory above it`;
  else if (await has('refs')) hint = `; it looks like BuildStream 2's '<cachedir>/artifacts': give its parent, the cachedir`;
  else if (await has('buildstream')) hint = `; give ${join(dir, 'buildstream')}`;
  throw configInvalid(
    `${dir} is not a BuildStream cache directory: expected artifacts/cas/refs/heads (BuildStream 1.x) or cas and artifacts/refs (BuildStream 2) in it${hint}`,
  );
}

function childSegments(dir: string, path: string): string[] | undefined {
  const rel = relative(resolve(dir), resolve(path));
  if (rel === '' || rel === '..' || rel.startsWith(`..${sep}`) || isAbsolute(rel)) return undefined;
  return rel.split(sep);
}

function sameSegments(segments: readonly string[], prefix: readonly string[]): boolean {
  return prefix.every((s, i) => segments[i] === s);
}

/** The URN of a ref file at `segments` (relative to the cache dir) in `layout`, or undefined. */
function nameOfSegments(layout: LocalCacheLayout, segments: readonly string[]): string | undefined {
  const key = segments.at(-1) ?? '';
  // Cache keys are 64 hex; BuildStream 2's temp files (`tmpXXXXXXXX`) share the directories.
  if (!isSha256Hex(key)) return undefined;
  try {
    if (layout === 'bst1') {
      for (const root of V1_REF_ROOTS) {
        if (segments.length === root.length + 3 && sameSegments(segments, root)) return refName(segments.slice(root.length).join('/')).urn;
      }
      return undefined;
    }
    if (segments.length === V2_ARTIFACT_REFS.length + 3 && sameSegments(segments, V2_ARTIFACT_REFS)) {
      return artifactName(segments.slice(V2_ARTIFACT_REFS.length).join('/')).urn;
    }
    if (segments.length === 2 && segments[0] === V2_ELEMENT_SOURCES) return parseUrn(`${URN_PREFIX}source:${key}`).urn;
    if (segments.length === 3 && segments[0] === V2_SOURCE_PROTOS) return parseUrn(`${URN_PREFIX}source:${segments[1] ?? ''}/${key}`).urn;
  } catch {
    // A name the mirror cannot hold (characters BuildStream never writes).
  }
  return undefined;
}

/** The name a ref file path stands for, or undefined when the path is not a ref file of that layout (for a watcher). */
export function nameOfPath(dir: string, layout: LocalCacheLayout, path: string): string | undefined {
  const segments = childSegments(dir, path);
  return segments === undefined ? undefined : nameOfSegments(layout, segments);
}

/** nameOfPath in either layout: a cachedir BuildStream 2 migrated holds 1.6 refs too. */
export function nameOfAnyPath(dir: string, path: string): string | undefined {
  const segments = childSegments(dir, path);
  return segments === undefined ? undefined : (nameOfSegments('bst2', segments) ?? nameOfSegments('bst1', segments));
}

/** Whether `path` (a real path) is `root` (a real path) or below it. */
function isWithin(root: string, path: string): boolean {
  return path === root || path.startsWith(root.endsWith(sep) ? root : `${root}${sep}`);
}

function errnoCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}

/** Regular files whose path relative to `dir` has `depth` segments (`/`-joined); symlinks are not followed. */
async function filesAtDepth(dir: string, depth: number, prefix = ''): Promise<string[]> {
  let entries;
  try {
    entries = await readdir(dir, { withFileTypes: true });
  } catch (err) {
    if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return [];
    throw err;
  }
  const out: string[] = [];
  for (const entry of entries) {
    const rel = prefix === '' ? entry.name : `${prefix}/${entry.name}`;
    if (depth <= 1) {
      if (entry.isFile()) out.push(rel);
    } else if (entry.isDirectory()) {
      out.push(...(await filesAtDepth(join(dir, entry.name), depth - 1, rel)));
    }
  }
  return out;
}

/**
 * Every name `dir` holds, without checking that it is a cache. Paths are under `dir` as given,
 * sorted; a name in two places (a migrated cache's `artifacts/cas` symlink) is listed once.
 */
async function listNamesIn(dir: string): Promise<LocalRef[]> {
  const root = await realpath(dir);
  const found = new Map<string, string>();
  const walk = async (rootSegments: readonly string[], depth: number, layout: LocalCacheLayout): Promise<void> => {
    const walkRoot = join(dir, ...rootSegments);
    let real: string;
    try {
      real = await realpath(walkRoot);
    } catch {
      return;
    }
    if (!isWithin(root, real)) return; // never read through a symlink out of the cache
    for (const rel of await filesAtDepth(walkRoot, depth)) {
      const segments = [...rootSegments, ...rel.split('/')];
      const urn = nameOfSegments(layout, segments);
      if (urn !== undefined && !found.has(urn)) found.set(urn, join(dir, ...segments));
    }
  };
  await walk(V2_ARTIFACT_REFS, 3, 'bst2');
  await walk([V2_ELEMENT_SOURCES], 1, 'bst2');
  await walk([V2_SOURCE_PROTOS], 2, 'bst2');
  for (const v1 of V1_REF_ROOTS) await walk(v1, 3, 'bst1');
  return [...found].map(([urn, path]) => ({ urn, path })).sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
}

/**
 * Every name the cache holds: 1.6 refs (as the ref URN from refName(ref).urn), 2.x artifacts
 * (artifactName), element sources and single sources (URNs). CONFIG_INVALID when `dir` is not a
 * BuildStream cache.
 */
export async function listLocalNames(dir: string): Promise<LocalRef[]> {
  await detectLayout(dir);
  return listNamesIn(dir);
}

/**
 * The ref files (either layout) at or below `path` in the cache `root`, as a watcher sees them:
 * only directories that may hold refs are read, and symlinks are not followed. Missing -> [].
 */
export async function refFilesUnder(root: string, path: string): Promise<LocalRef[]> {
  const start = childSegments(root, path) ?? (resolve(path) === resolve(root) ? [] : undefined);
  if (start === undefined) return [];
  const out: LocalRef[] = [];
  const walk = async (dir: string, segments: string[]): Promise<void> => {
    let entries;
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch (err) {
      if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return;
      throw err;
    }
    for (const entry of entries) {
      const child = [...segments, entry.name];
      if (!mayHoldRefs(child)) continue;
      if (entry.isDirectory()) await walk(join(dir, entry.name), child);
      else if (entry.isFile()) {
        const urn = nameOfSegments('bst2', child) ?? nameOfSegments('bst1', child);
        if (urn !== undefined) out.push({ urn, path: join(dir, entry.name) });
      }
    }
  };
  if (start.length === 0 || mayHoldRefs(start)) await walk(resolve(path), start);
  return out;
}

/** Blobs of a cache's CAS (`…/objects/<2 hex>/<62 hex>`), read without following symlinks. */
export class CacheObjects {
  /** Fan-out directories found to be real directories (not symlinks). */
  private readonly checkedPrefixes = new Set<string>();

  constructor(readonly dir: string) {}

  pathOf(d: Digest): string {
    return join(this.dir, d.hash.slice(0, 2), d.hash.slice(2));
  }

  /**
   * Opens a blob's object file, or undefined when it is not there (yet). Throws when it is not a
   * regular file or has the wrong size for its digest (DIGEST_MISMATCH).
   */
  async open(d: Digest): Promise<FileHandle | undefined> {
    const prefix = d.hash.slice(0, 2);
    if (!this.checkedPrefixes.has(prefix)) {
      let st;
      try {
        st = await lstat(join(this.dir, prefix));
      } catch (err) {
        if (errnoCode(err) === 'ENOENT') return undefined;
        throw err;
      }
      if (!st.isDirectory()) throw new MirrorError('INVALID_ARGUMENT', `${join(this.dir, prefix)} in the local cache is not a directory (a symlink?): not followed`);
      this.checkedPrefixes.add(prefix);
    }
    const path = this.pathOf(d);
    let handle: FileHandle;
    try {
      handle = await open(path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return undefined;
      if (errnoCode(err) === 'ELOOP') throw new MirrorError('INVALID_ARGUMENT', `object ${path} in the local cache is a symlink: not followed`);
      throw err;
    }
    try {
      const st = await handle.stat();
      if (!st.isFile()) throw new MirrorError('INVALID_ARGUMENT', `object ${path} in the local cache is not a regular file`);
      if (st.size !== d.sizeBytes) {
        throw new MirrorError('DIGEST_MISMATCH', `object ${path} in the local cache has ${st.size} bytes, not the ${d.sizeBytes} of blob ${digestKey(d)}`);
      }
      return handle;
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** A blob's bytes (unverified: the store verifies them), or undefined when not there (yet). */
  async read(d: Digest): Promise<Buffer | undefined> {
    const handle = await this.open(d);
    if (handle === undefined) return undefined;
    try {
      const data = Buffer.allocUnsafe(d.sizeBytes);
      let at = 0;
      while (at < data.length) {
        const { bytesRead } = await handle.read(data, at, data.length - at, at);
        if (bytesRead === 0) break;
        at += bytesRead;
      }
      if (at !== data.length) throw new MirrorError('DIGEST_MISMATCH', `object ${this.pathOf(d)} in the local cache ended after ${at} of ${d.sizeBytes} bytes`);
      return data;
    } finally {
      await handle.close();
    }
  }
}

/** Where a name's ref file and blobs are in a cache. */
export interface Located {
  readonly path: string;
  readonly objects: CacheObjects;
}

/**
 * A BuildStream cache directory opened for reading: its real path, ref files and object stores.
 * It never writes, and never follows a symlink that leads out of the cache.
 */
export class LocalCache {
  private readonly objectStores = new Map<string, CacheObjects>();

  private constructor(
    /** The directory as given (for messages and listed paths). */
    readonly dir: string,
    /** Its real path: everything read must be below it. */
    readonly root: string,
  ) {}

  /** CONFIG_INVALID when `dir` is not a readable directory. */
  static async open(dir: string): Promise<LocalCache> {
    await checkDirectory(dir);
    return new LocalCache(dir, await realpath(dir));
  }

  /** Where `name` would be; the first existing candidate, else undefined (with the paths looked at). */
  async locate(name: MirrorName): Promise<Located | { missing: string[] }> {
    const candidates: { ref: string[]; objects: string[] }[] = [];
    switch (name.kind) {
      case 'ref':
        for (const root of V1_REF_ROOTS) candidates.push({ ref: [...root, ...name.key.split('/')], objects: [...root.slice(0, -2), 'objects'] });
        break;
      case 'artifact':
        candidates.push({ ref: [...V2_ARTIFACT_REFS, ...name.key.split('/')], objects: [...V2_OBJECTS] });
        break;
      case 'element-sources':
        candidates.push({ ref: [V2_ELEMENT_SOURCES, name.key], objects: [...V2_OBJECTS] });
        break;
      case 'source':
        candidates.push({ ref: [V2_SOURCE_PROTOS, ...name.key.split('/')], objects: [...V2_OBJECTS] });
        break;
    }
    for (const c of candidates) {
      const path = join(this.dir, ...c.ref);
      try {
        await lstat(path);
      } catch (err) {
        if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') continue;
        throw err;
      }
      return { path, objects: await this.objects(c.objects) };
    }
    return { missing: candidates.map((c) => join(this.dir, ...c.ref)) };
  }

  private async objects(segments: readonly string[]): Promise<CacheObjects> {
    const key = segments.join('/');
    let store = this.objectStores.get(key);
    if (store === undefined) {
      const path = join(this.dir, ...segments);
      let real: string;
      try {
        real = await realpath(path);
      } catch (err) {
        if (errnoCode(err) !== 'ENOENT') throw err;
        real = join(this.root, ...segments); // not there (yet): every blob reads as missing
      }
      this.checkWithin(path, real);
      store = new CacheObjects(real);
      this.objectStores.set(key, store);
    }
    return store;
  }

  private checkWithin(path: string, real: string): void {
    if (!isWithin(this.root, real)) throw new MirrorError('INVALID_ARGUMENT', `${path} leads out of the local cache ${this.dir} (to ${real}): not followed`);
  }

  /** A ref file's bytes, or undefined when it is gone. Refused if it leads out of the cache or is too big to be a ref. */
  async readRef(path: string): Promise<Buffer | undefined> {
    let real: string;
    try {
      real = await realpath(path);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return undefined;
      throw err;
    }
    this.checkWithin(path, real);
    let handle: FileHandle;
    try {
      handle = await open(real, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return undefined;
      throw err;
    }
    try {
      const st = await handle.stat();
      if (!st.isFile()) throw new MirrorError('INVALID_ARGUMENT', `${path} is not a regular file`);
      if (st.size > MAX_MESSAGE_BLOB_BYTES) throw new MirrorError('INVALID_ARGUMENT', `${path} has ${st.size} bytes: too big to be a BuildStream ref`);
      return await handle.readFile();
    } finally {
      await handle.close();
    }
  }
}
