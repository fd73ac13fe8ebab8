/**
 * Real-client workloads for the benchmarks: BuildStream 1.6 (Debian's `bst` 1.6.8) builds a
 * generated project and pushes it to its own reference server; then we time
 *
 * - `bst pull` of every artifact into an empty local cache, from the reference server or from
 *   the mirror (`timeBstPull`), and
 * - `bst-cache-mirror sync` of every ref from an upstream into a mirror directory, with the sync
 *   process's peak RSS (`timeMirrorSync`).
 *
 * The project: one `import` element per artifact, each over a `tar` source (see `writeProject`
 * for why not `local`), holding ~totalBytes in ~blobCount distinct random files (mostly 1-64 KiB,
 * ~2% of 0.25-4.5 MiB); optionally one more element holding a single huge file. Nothing runs in
 * a sandbox. Every server binds 127.0.0.1 on an ephemeral port; `bst` runs with an isolated
 * HOME/XDG (test/helpers/buildstream.ts `runBst`).
 *
 * The functions return numbers and print nothing on stdout; progress goes to stderr.
 */
import { type Hash, createHash, randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { once } from 'node:events';
import { pipeline } from 'node:stream/promises';
import tar from 'tar-stream';
import { pathToFileURL } from 'node:url';
import type { Digest } from '../../src/cas/digest.js';
import { spawnTracked } from './processes.js';
import {
  assertBstOk,
  bstAvailable,
  bstUserConfig,
  listArtifactRefs,
  runBst,
  startReferenceServer,
} from '../../test/helpers/buildstream.js';


const KiB = 1024;
const MiB = 1024 * KiB;
const PROJECT_NAME = 'bench';
/** `bst build` / `bst push` / `bst pull` of a multi-GB workload take minutes on 2 cores. */
const BST_TIMEOUT_MS = 60 * 60 * 1000;

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

export interface WorkloadOptions {
  /** Payload bytes over all `artifacts` elements (file contents; excludes the huge file). */
  totalBytes: number;
  /** Number of distinct files over all `artifacts` elements (each one CAS blob). */
  blobCount: number;
  /** Number of elements (one artifact each, under one ref: imports have weak key == strong key). */
  artifacts: number;
  /** If set, one more element `huge.bst` holds a single file of this many bytes. */
  hugeBlobBytes?: number;
  /** Progress lines; default: to stderr. */
  log?: (line: string) => void;
}

export interface Workload {
  workDir: string;
  /** The BuildStream project (run `bst` here). Its tarballs are deleted after the push: pull only. */
  projectDir: string;
  projectName: string;
  /** Element file names (`a000.bst`, ..., `huge.bst`), as `bst` takes them. */
  elements: string[];
  /** Every artifact ref the push created (strong and weak; here one per element), sorted. */
  refs: string[];
  /** `refs` written one per line, for `sync --refs-file`. */
  refsFile: string;
  /** The 1.6 reference server holding the pushed artifacts (push enabled). */
  reference: {
    /** `http://127.0.0.1:PORT`, for bst configs and `sync --upstream`. */
    url: string;
    /** `127.0.0.1:PORT`, for gRPC clients. */
    target: string;
    port: number;
    /** Its repository directory (`cas/objects`, `cas/refs/heads`). */
    repo: string;
    stop(): Promise<void>;
  };
  /** Files generated into the `artifacts` elements (the huge file not included) and their bytes. */
  files: number;
  fileBytes: number;
  /** CAS objects on the reference server after the push (files, Directory protos, logs, meta). */
  casBlobs: number;
  casBytes: number;
  /** CAS digest of the huge file (sha256 and size of its content), if `hugeBlobBytes` was set. */
  hugeBlob?: Digest;
  /** Wall-clock seconds of the preparation phases (clean-up: deleting build inputs, `sync`). */
  timings: { generateSeconds: number; buildSeconds: number; pushSeconds: number; cleanupSeconds: number };
  /** Stops the reference server and deletes workDir. */
  dispose(): Promise<void>;
}

/**
 * Generate a BuildStream 1.6 project in `workDir` (created if needed, should be empty), build
 * it, start the reference server with push enabled and `bst push` every element to it, and
 * write the pushed refs to `<workDir>/refs.txt`. The reference server keeps running (stop it
 * with `workload.reference.stop()` or `workload.dispose()`). Fails loudly if any step fails.
 */
export async function prepareWorkload(workDir: string, opts: WorkloadOptions): Promise<Workload> {
  const log = opts.log ?? stderrLog;
  validateOptions(opts);
  if (!bstAvailable()) throw new Error('BuildStream 1.6 is required: apt-get install -y buildstream (bst and /usr/bin/python3)');
  const dir = resolve(workDir);
  await mkdir(dir, { recursive: true });

  // 1. Generate the project and its tarballs.
  let t0 = performance.now();
  const plan = planFiles(opts.totalBytes, opts.blobCount, opts.artifacts);
  const project = await writeProject(dir, plan, opts.hugeBlobBytes, log);
  const generateSeconds = elapsed(t0);
  log(`generated ${plan.length} files, ${fmtBytes(project.fileBytes)} in ${opts.artifacts} elements` +
    `${project.hugeBlob ? ` + huge.bst (${fmtBytes(project.hugeBlob.sizeBytes)})` : ''} in ${generateSeconds.toFixed(1)} s`);

  const reference = await startReferenceServer({ repo: join(dir, 'reference-repo'), enablePush: true });
  try {
    // 2. Build into a builder cache (no remote, so the build itself pushes nothing).
    const builder = join(dir, 'builder');
    const bst = async (what: string, args: string[], remotes: { url: string; push: boolean }[]): Promise<void> => {
      const config = join(dir, `${what}.conf`);
      await writeFile(config, bstUserConfig({ root: builder, remotes, projectName: PROJECT_NAME }));
      assertBstOk(await runBst(args, { cwd: project.projectDir, config, timeoutMs: BST_TIMEOUT_MS }), `bst ${what}`);
    };
    t0 = performance.now();
    await bst('build', ['build', ...project.elements], []);
    const buildSeconds = elapsed(t0);
    log(`bst build: ${buildSeconds.toFixed(1)} s`);

    // 3. Push every element to the reference server.
    t0 = performance.now();
    await bst('push', ['push', '--deps', 'none', ...project.elements], [{ url: reference.url, push: true }]);
    const pushSeconds = elapsed(t0);
    log(`bst push: ${pushSeconds.toFixed(1)} s`);

    // 4. The refs: what the builder committed must be exactly what the server now holds.
    const refs = await listArtifactRefs(join(builder, 'artifacts'));
    const pushed = await listArtifactRefs(reference.repo);
    if (refs.length !== project.elements.length || !sameList(refs, pushed)) {
      throw new Error(
        `expected one ref per element (${project.elements.length}) in the build cache and on the server\n` +
          `build cache: ${refs.join(' ')}\nserver: ${pushed.join(' ')}`,
      );
    }
    const refsFile = join(dir, 'refs.txt');
    await writeFile(refsFile, `# ${refs.length} refs pushed by scripts/bench/bst-workloads.ts\n${refs.join('\n')}\n`);

    const cas = await countObjects(join(reference.repo, 'cas', 'objects'));
    if (project.hugeBlob) {
      // The huge file must be one CAS object on the server, under its content digest.
      const { hash, sizeBytes } = project.hugeBlob;
      const size = (await stat(join(reference.repo, 'cas', 'objects', hash.slice(0, 2), hash.slice(2)))).size;
      if (size !== sizeBytes) throw new Error(`huge blob ${hash} has ${size} bytes on the server, expected ${sizeBytes}`);
    }

    // The builder cache, bst's source mirror and the tarballs are no longer needed: pulls only
    // need the .bst files (the tar refs give the cache keys). Free the disk and page cache, then
    // flush what is left (the server's repo), so the first timed phase does not pay for it.
    t0 = performance.now();
    await Promise.all([builder, project.tarballDir].map((d) => rm(d, { recursive: true, force: true })));
    await settleDisk();
    const cleanupSeconds = elapsed(t0);
    log(`clean-up and disk flush: ${cleanupSeconds.toFixed(1)} s`);

    return {
      workDir: dir,
      projectDir: project.projectDir,
      projectName: PROJECT_NAME,
      elements: project.elements,
      refs,
      refsFile,
      reference: {
        url: reference.url,
        target: `127.0.0.1:${reference.port}`,
        port: reference.port,
        repo: reference.repo,
        stop: () => reference.stop(),
      },
      files: plan.length,
      fileBytes: project.fileBytes,
      casBlobs: cas.count,
      casBytes: cas.bytes,
      ...(project.hugeBlob ? { hugeBlob: project.hugeBlob } : {}),
      timings: { generateSeconds, buildSeconds, pushSeconds, cleanupSeconds },
      dispose: async () => {
        await reference.stop();
        await rm(dir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    await reference.stop();
    throw err;
  }
}

/**
 * Time `bst pull` of every element of `workload` into a fresh, empty local cache, with
 * `remoteUrl` (`http://HOST:PORT`) as the only artifact remote (`push: false`). Afterwards every
 * ref of the workload must be in that cache, or this throws (bst 1.6 exits 0 even when an
 * artifact is missing on the remote: it just does not pull it). The cache is then deleted.
 *
 * `seconds` is the whole `bst` process: Python start-up and project loading included (see
 * `timeBstStartup` for that fixed part).
 */
export async function timeBstPull(workload: Workload, remoteUrl: string): Promise<{ seconds: number }> {
  const cacheRoot = await mkdtemp(join(workload.workDir, 'pull-'));
  try {
    const config = join(cacheRoot, 'pull.conf');
    await writeFile(config, bstUserConfig({ root: cacheRoot, remotes: [{ url: remoteUrl, push: false }], projectName: workload.projectName }));
    await settleDisk();
    const t0 = performance.now();
    const result = await runBst(['pull', '--deps', 'none', ...workload.elements], { cwd: workload.projectDir, config, timeoutMs: BST_TIMEOUT_MS });
    const seconds = elapsed(t0);
    assertBstOk(result, `bst pull from ${remoteUrl}`);
    const have = new Set(await listArtifactRefs(join(cacheRoot, 'artifacts')));
    const missing = workload.refs.filter((r) => !have.has(r));
    if (missing.length > 0) {
      throw new Error(`bst pull from ${remoteUrl} exited 0 but did not pull ${missing.length} of ${workload.refs.length} refs: ` +
        `${missing.join(' ')}\n--- stderr ---\n${result.stderr}`);
    }
    return { seconds };
  } finally {
    await rm(cacheRoot, { recursive: true, force: true });
  }
}

/**
 * The fixed cost inside `timeBstPull`: `bst show` of the same elements with the same kind of
 * config (fresh cache, one remote), which starts Python, loads the project and computes every
 * cache key, but contacts no remote.
 */
export async function timeBstStartup(workload: Workload): Promise<{ seconds: number }> {
  const cacheRoot = await mkdtemp(join(workload.workDir, 'show-'));
  try {
    const config = join(cacheRoot, 'show.conf');
    await writeFile(config, bstUserConfig({ root: cacheRoot, remotes: [{ url: workload.reference.url, push: false }], projectName: workload.projectName }));
    const t0 = performance.now();
    const result = await runBst(['show', '--deps', 'none', '--format', '%{name} %{state}', ...workload.elements], { cwd: workload.projectDir, config });
    const seconds = elapsed(t0);
    assertBstOk(result, 'bst show');
    return { seconds };
  } finally {
    await rm(cacheRoot, { recursive: true, force: true });
  }
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

// ---------------------------------------------------------------------------
// Project and tarballs
// ---------------------------------------------------------------------------

interface GeneratedProject {
  projectDir: string;
  tarballDir: string;
  elements: string[];
  fileBytes: number;
  hugeBlob?: Digest;
}

/**
 * Write `<dir>/project` (project.conf, elements/*.bst) and `<dir>/tarballs/*.tar`.
 *
 * Why `tar` sources and not `local` ones: a `local` source's cache key is the sha256 of every
 * file, recomputed by every `bst` invocation, so each timed `bst pull` would first re-hash the
 * whole payload (and a 2 GiB huge file) from disk; that is not pull time, and no real project
 * pays it. A `tar` source's key is its URL and ref (the tarball's sha256), so `bst pull` only
 * needs the .bst files, as with a real project. The tarballs are fetched through a project
 * alias (`tarballs:` -> file:///...), so the keys do not depend on where workDir is.
 */
async function writeProject(dir: string, plan: PlannedFile[], hugeBlobBytes: number | undefined, log: (line: string) => void): Promise<GeneratedProject> {
  const projectDir = join(dir, 'project');
  const tarballDir = join(dir, 'tarballs');
  await mkdir(join(projectDir, 'elements'), { recursive: true });
  await mkdir(tarballDir, { recursive: true });
  await writeFile(
    join(projectDir, 'project.conf'),
    [
      `name: ${PROJECT_NAME}`,
      'format-version: 12',
      'element-path: elements',
      'aliases:',
      `  tarballs: ${JSON.stringify(`${pathToFileURL(tarballDir).href}/`)}`,
      '',
    ].join('\n'),
  );

  const elementCount = plan.reduce((n, f) => Math.max(n, f.element + 1), 0);
  const elements: string[] = [];
  let fileBytes = 0;
  for (let e = 0; e < elementCount; e++) {
    const name = `a${String(e).padStart(3, '0')}`;
    // Up to 64 files per directory, so each artifact is a tree of many small Directory protos.
    const entries: TarEntry[] = plan
      .filter((f) => f.element === e)
      .map((f, i) => ({
        path: `d${String(Math.floor(i / 64)).padStart(3, '0')}/f${String(i).padStart(5, '0')}.bin`,
        size: f.size,
        chunks: () => randomChunks(f.size),
      }));
    const tar = await writeTar(join(tarballDir, `${name}.tar`), entries);
    await writeElement(projectDir, name, tar.sha256);
    elements.push(`${name}.bst`);
    fileBytes += entries.reduce((n, x) => n + x.size, 0);
    log(`  ${name}.tar: ${entries.length} files, ${fmtBytes(tar.bytes)}`);
  }

  let hugeBlob: Digest | undefined;
  if (hugeBlobBytes !== undefined) {
    // Streamed in 1 MiB chunks and hashed on the way: never held in memory.
    const content = createHash('sha256');
    const tar = await writeTar(join(tarballDir, 'huge.tar'), [{ path: 'huge.bin', size: hugeBlobBytes, chunks: () => randomChunks(hugeBlobBytes, content) }]);
    hugeBlob = { hash: content.digest('hex'), sizeBytes: hugeBlobBytes };
    await writeElement(projectDir, 'huge', tar.sha256);
    elements.push('huge.bst');
    log(`  huge.tar: 1 file, ${fmtBytes(hugeBlobBytes)}`);
  }
  return { projectDir, tarballDir, elements, fileBytes, ...(hugeBlob ? { hugeBlob } : {}) };
}

async function writeElement(projectDir: string, name: string, tarSha256: string): Promise<void> {
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

// ---------------------------------------------------------------------------
// Child processes and small helpers
// ---------------------------------------------------------------------------


/** Objects under a CAS `objects` directory (`<2 hex>/<62 hex>`) and their total size. */
async function countObjects(objectsDir: string): Promise<{ count: number; bytes: number }> {
  let count = 0;
  let bytes = 0;
  for (const prefix of await readdir(objectsDir)) {
    for (const name of await readdir(join(objectsDir, prefix))) {
      count += 1;
      bytes += (await stat(join(objectsDir, prefix, name))).size;
    }
  }
  return { count, bytes };
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

function sameList(a: string[], b: string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

function elapsed(t0: number): number {
  return (performance.now() - t0) / 1000;
}

function fmtBytes(n: number): string {
  return n >= MiB ? `${(n / MiB).toFixed(1)} MiB` : `${(n / KiB).toFixed(1)} KiB`;
}

function stderrLog(line: string): void {
  process.stderr.write(`[bst-workloads] ${line}\n`);
}
