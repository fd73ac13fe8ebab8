/**
 * What the real-client workloads of every BuildStream version share: the generated payload
 * (tarballs of random files, one per element), the project that imports them, and small helpers.
 * bst-workloads.ts builds it with BuildStream 1.6, bst2-workloads.ts with BuildStream 2; both
 * projects import the same tarballs, so both versions push and pull the same files.
 *
 * The payload: one `import` element per artifact, each over a `tar` source (see `writeProject`
 * for why not `local`), holding ~totalBytes in ~blobCount distinct random files (mostly 1-64 KiB,
 * ~2% of 0.25-4.5 MiB); optionally one more element holding a single huge file.
 */
import { type Hash, createHash, randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { once } from 'node:events';
import { pipeline } from 'node:stream/promises';
import { pathToFileURL } from 'node:url';
import tar from 'tar-stream';
import type { Digest } from '../../src/cas/digest.js';
import { spawnTracked } from './processes.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** The `name:` of every generated project (so artifact names are `bench/<element>/<key>`). */
export const PROJECT_NAME = 'bench';
/** `bst build` / `bst push` / `bst pull` of a multi-GB workload take minutes on 2 cores. */
export const BST_TIMEOUT_MS = 60 * 60 * 1000;

export interface WorkloadOptions {
  /** Payload bytes over all `artifacts` elements (file contents; excludes the huge file). */
  totalBytes: number;
  /** Number of distinct files over all `artifacts` elements (each one CAS blob). */
  blobCount: number;
  /** Number of elements (one artifact each). */
  artifacts: number;
  /** If set, one more element `huge.bst` holds a single file of this many bytes. */
  hugeBlobBytes?: number;
  /** Progress lines; default: to stderr. */
  log?: (line: string) => void;
}

/** One generated element: `<name>.bst` imports `<tarballDir>/<name>.tar`. */
export interface SourceElement {
  name: string;
  /** The tarball's sha256: the `tar` source's ref. */
  tarSha256: string;
}

/** The generated payload, independent of the BuildStream version that builds it. */
export interface WorkloadSources {
  /** `<name>.tar` for every element, fetched through the project alias `tarballs:`. */
  tarballDir: string;
  /** The `artifacts` elements, then `huge` if requested. */
  elements: SourceElement[];
  /** Files generated into the `artifacts` elements (the huge file not included) and their bytes. */
  files: number;
  fileBytes: number;
  /** CAS digest of the huge file (sha256 and size of its content), if `hugeBlobBytes` was set. */
  hugeBlob?: Digest;
}

/** Generates the tarballs under `<dir>/tarballs` (never held in memory). */
export async function generateSources(dir: string, opts: WorkloadOptions): Promise<WorkloadSources> {
  validateOptions(opts);
  const log = opts.log ?? stderrLog;
  const tarballDir = join(dir, 'tarballs');
  await mkdir(tarballDir, { recursive: true });
  const plan = planFiles(opts.totalBytes, opts.blobCount, opts.artifacts);
  const elements: SourceElement[] = [];
  let fileBytes = 0;
  for (let e = 0; e < opts.artifacts; e++) {
    const name = `a${String(e).padStart(3, '0')}`;
    // Up to 64 files per directory, so each artifact is a tree of many small Directory protos.
    const entries: TarEntry[] = plan
      .filter((f) => f.element === e)
      .map((f, i) => ({
        path: `d${String(Math.floor(i / 64)).padStart(3, '0')}/f${String(i).padStart(5, '0')}.bin`,
        size: f.size,
        chunks: () => randomChunks(f.size),
      }));
    const written = await writeTar(join(tarballDir, `${name}.tar`), entries);
    elements.push({ name, tarSha256: written.sha256 });
    fileBytes += entries.reduce((n, x) => n + x.size, 0);
    log(`  ${name}.tar: ${entries.length} files, ${fmtBytes(written.bytes)}`);
  }
  let hugeBlob: Digest | undefined;
  if (opts.hugeBlobBytes !== undefined) {
    const size = opts.hugeBlobBytes;
    // Streamed in 1 MiB chunks and hashed on the way.
    const content = createHash('sha256');
    const written = await writeTar(join(tarballDir, 'huge.tar'), [{ path: 'huge.bin', size, chunks: () => randomChunks(size, content) }]);
    hugeBlob = { hash: content.digest('hex'), sizeBytes: size };
    elements.push({ name: 'huge', tarSha256: written.sha256 });
    log(`  huge.tar: 1 file, ${fmtBytes(size)}`);
  }
  return { tarballDir, elements, files: plan.length, fileBytes, ...(hugeBlob ? { hugeBlob } : {}) };
}

/**
 * Writes a project importing `elements` (all of `sources` by default) into `projectDir`:
 * project.conf (`format-version: 12` for 1.6, `min-version: 2.0` for 2) and `elements/<name>.bst`.
 * Returns the element file names, as `bst` takes them.
 *
 * Why `tar` sources and not `local` ones: a `local` source's cache key is the hash of every
 * file, recomputed by every `bst` invocation (2.x imports the directory into casd to get it),
 * so each timed `bst pull` would first re-hash the whole payload from disk; that is not pull
 * time, and no real project pays it. A `tar` source's key is its URL and ref (the tarball's
 * sha256), so `bst pull` only needs the .bst files, as with a real project. The tarballs are
 * fetched through a project alias (`tarballs:` -> file:///...), so the keys do not depend on
 * where the work directory is.
 */
export async function writeProject(projectDir: string, sources: WorkloadSources, version: 1 | 2, elements: readonly SourceElement[] = sources.elements): Promise<string[]> {
  await mkdir(join(projectDir, 'elements'), { recursive: true });
  await writeFile(
    join(projectDir, 'project.conf'),
    [
      `name: ${PROJECT_NAME}`,
      version === 1 ? 'format-version: 12' : 'min-version: 2.0',
      'element-path: elements',
      'aliases:',
      `  tarballs: ${JSON.stringify(`${pathToFileURL(sources.tarballDir).href}/`)}`,
      '',
    ].join('\n'),
  );
  for (const { name, tarSha256 } of elements) {
    await writeFile(
      join(projectDir, 'elements', `${name}.bst`),
      [
        'kind: import',
        'sources:',
        '- kind: tar',
        `  url: tarballs:${name}.tar`,
        `  ref: ${tarSha256}`,
        "  base-dir: ''   # the tarball's members are the artifact's files; strip nothing",
        '',
      ].join('\n'),
    );
  }
  return elements.map((e) => `${e.name}.bst`);
}

/**
 * Flush dirty pages to disk (`sync`). Called before every timed phase: the previous phase may have
 * left a GB of writes in the page cache, and their writeback would otherwise be charged to the
 * next phase (it stalls unlinks, and the mirror's per-blob fsyncs wait for ext4 journal commits).
 */
export async function settleDisk(): Promise<void> {
  const { code, stderr } = await spawnTracked('sync', []).done;
  if (code !== 0) throw new Error(`sync exited with ${code}: ${stderr}`);
}

export function elapsed(t0: number): number {
  return (performance.now() - t0) / 1000;
}

export function fmtBytes(n: number): string {
  return n >= MiB ? `${(n / MiB).toFixed(1)} MiB` : `${(n / KiB).toFixed(1)} KiB`;
}

export function stderrLog(line: string): void {
  process.stderr.write(`[bst-workloads] ${line}\n`);
}

// ---------------------------------------------------------------------------
// File plan: how many files of which size, in which element
// ---------------------------------------------------------------------------

const SMALL_MIN = 1 * KiB;
const SMALL_MAX = 64 * KiB;
const LARGE_MIN = 256 * KiB;
/** Large files average at most this; each is 0.5x-1.5x the average, so at most ~4.5 MiB. */
const LARGE_MEAN_MAX = 3 * MiB;
const LARGE_SHARE = 0.02;

interface PlannedFile {
  element: number;
  size: number;
}

/**
 * Sizes for `count` files totalling `total` bytes: ~98% small (uniform 1-64 KiB), the rest large
 * (enough of them that they average <= 3 MiB) sharing what the small ones leave. Sizes come from
 * a fixed seed, so every run with the same options has the same shape; contents are random.
 * Files are shuffled and dealt round-robin to the elements, so each gets a similar mix.
 */
function planFiles(total: number, count: number, elements: number): PlannedFile[] {
  const rng = xorshift(0x5eed);
  const meanSmall = (SMALL_MIN + SMALL_MAX) / 2;
  let large = count > 1 ? Math.max(1, Math.round(count * LARGE_SHARE)) : 0;
  // Fewer large files if what is left would make them tiny, more if it would make them huge.
  while (large > 0 && total - (count - large) * meanSmall < large * LARGE_MIN) large -= 1;
  while (large < count && total - (count - large) * meanSmall > large * LARGE_MEAN_MAX) large += 1;

  const sizes: number[] = [];
  for (let i = 0; i < count - large; i++) sizes.push(SMALL_MIN + Math.floor(rng() * (SMALL_MAX - SMALL_MIN + 1)));
  const smallTotal = sizes.reduce((a, b) => a + b, 0);
  const left = total - smallTotal;
  if (large === 0 || left <= large) {
    // Too little left for large files (tiny totals): all files small, scaled to the total.
    for (let i = 0; i < large; i++) sizes.push(SMALL_MIN + Math.floor(rng() * (SMALL_MAX - SMALL_MIN + 1)));
    const scale = total / sizes.reduce((a, b) => a + b, 0);
    for (let i = 0; i < sizes.length; i++) sizes[i] = Math.max(1, Math.round((sizes[i] ?? 1) * scale));
  } else {
    const weights = Array.from({ length: large }, () => 0.5 + rng());
    const weightSum = weights.reduce((a, b) => a + b, 0);
    let given = 0;
    weights.forEach((w, i) => {
      const size = i === large - 1 ? left - given : Math.floor((left * w) / weightSum);
      sizes.push(size);
      given += size;
    });
  }
  for (let i = sizes.length - 1; i > 0; i--) {
    const j = Math.floor(rng() * (i + 1));
    [sizes[i], sizes[j]] = [sizes[j] ?? 0, sizes[i] ?? 0];
  }
  return sizes.map((size, i) => ({ element: i % elements, size }));
}

/** A small deterministic PRNG in [0, 1) (xorshift32); only sizes and order depend on it. */
function xorshift(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

function validateOptions(opts: WorkloadOptions): void {
  const positiveInt = (name: string, v: number): void => {
    if (!Number.isSafeInteger(v) || v < 1) throw new Error(`${name} must be a positive integer, got ${v}`);
  };
  positiveInt('totalBytes', opts.totalBytes);
  positiveInt('blobCount', opts.blobCount);
  positiveInt('artifacts', opts.artifacts);
  if (opts.hugeBlobBytes !== undefined) positiveInt('hugeBlobBytes', opts.hugeBlobBytes);
  if (opts.artifacts > opts.blobCount) throw new Error('artifacts must not exceed blobCount (every element needs a file)');
  if (opts.artifacts > 1000) throw new Error('at most 1000 artifacts (element names are a000..a999)');
  if (opts.blobCount > opts.artifacts * 100_000) throw new Error('at most 100,000 files per artifact (file names are f00000..f99999)');
}

// ---------------------------------------------------------------------------
// Tarballs
// ---------------------------------------------------------------------------

/** Random bytes, `size` in total, in chunks of at most 1 MiB; each chunk also goes to `tap`. */
async function* randomChunks(size: number, tap?: Hash): AsyncGenerator<Buffer> {
  for (let left = size; left > 0; left -= MiB) {
    const chunk = randomBytes(Math.min(MiB, left));
    tap?.update(chunk);
    yield chunk;
  }
}

interface TarEntry {
  /** Relative POSIX path. */
  path: string;
  size: number;
  chunks: () => AsyncIterable<Buffer>;
}

/** A fixed mtime: bst ignores it, and the tarball stays a function of the contents. */
const TAR_MTIME = new Date(1_700_000_000 * 1000);

/** Writes a tarball of `entries`, streaming; returns its sha256 (the `tar` source's ref) and size. */
async function writeTar(path: string, entries: TarEntry[]): Promise<{ sha256: string; bytes: number }> {
  const hash = createHash('sha256');
  let bytes = 0;
  const pack = tar.pack();
  async function* hashed(source: AsyncIterable<unknown>): AsyncGenerator<Buffer> {
    for await (const data of source) {
      const chunk = Buffer.isBuffer(data) ? data : Buffer.from(String(data));
      hash.update(chunk);
      bytes += chunk.length;
      yield chunk;
    }
  }
  const written = pipeline(hashed(pack), createWriteStream(path));
  for (const entry of entries) {
    // The entry's callback runs once its data is in the archive (or failed).
    await new Promise<void>((resolve, reject) => {
      const file = pack.entry({ name: entry.path, size: entry.size, mode: 0o644, mtime: TAR_MTIME, uname: 'root', gname: 'root' }, (err) => (err ? reject(err) : resolve()));
      void (async () => {
        for await (const chunk of entry.chunks()) if (!file.write(chunk)) await once(file, 'drain');
        file.end(() => undefined);
      })().catch(reject);
    });
  }
  pack.finalize();
  await written;
  return { sha256: hash.digest('hex'), bytes };
}
