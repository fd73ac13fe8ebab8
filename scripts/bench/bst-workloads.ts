/**
 * Real-client workloads for the benchmarks, BuildStream 1.6 side: Debian's `bst` 1.6.8 builds a
 * generated project (workload-sources.ts, shared with bst2-workloads.ts) and pushes it to its own
 * reference server; then we time `bst pull` of every artifact into an empty local cache, from the
 * reference server or from the mirror (`timeBstPull`).
 *
 * Nothing runs in a sandbox. Every server binds 127.0.0.1 on an ephemeral port; `bst` runs with
 * an isolated HOME/XDG (test/helpers/buildstream.ts `runBst`).
 *
 * The functions return numbers and print nothing on stdout; progress goes to stderr.
 */
import { mkdir, mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { Digest } from '../../src/cas/digest.js';
import {
  assertBstOk,
  bstAvailable,
  bstUserConfig,
  listArtifactRefs,
  runBst,
  startReferenceServer,
} from '../../test/helpers/buildstream.js';
import {
  BST_TIMEOUT_MS,
  PROJECT_NAME,
  type WorkloadOptions,
  type WorkloadSources,
  elapsed,
  fmtBytes,
  generateSources,
  settleDisk,
  stderrLog,
  writeProject,
} from './workload-sources.js';

export { type WorkloadOptions, settleDisk } from './workload-sources.js';

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

export interface Workload {
  workDir: string;
  /**
   * The BuildStream project (run `bst` here). Its tarballs are deleted after the push (with
   * `keepSources`, by `dropSources()`): pull only.
   */
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
  /** The generated tarballs and elements, for building the same payload with BuildStream 2. */
  sources: WorkloadSources;
  /** Wall-clock seconds of the preparation phases (clean-up: deleting build inputs, `sync`). */
  timings: { generateSeconds: number; buildSeconds: number; pushSeconds: number; cleanupSeconds: number };
  /** Deletes the tarballs and flushes the disk (done by `prepareWorkload` unless `keepSources`). */
  dropSources(): Promise<void>;
  /** Stops the reference server and deletes workDir. */
  dispose(): Promise<void>;
}

/**
 * Generate a BuildStream 1.6 project in `workDir` (created if needed, should be empty), build
 * it, start the reference server with push enabled and `bst push` every element to it, and
 * write the pushed refs to `<workDir>/refs.txt`. The reference server keeps running (stop it
 * with `workload.reference.stop()` or `workload.dispose()`). Fails loudly if any step fails.
 */
export async function prepareWorkload(workDir: string, opts: WorkloadOptions & { keepSources?: boolean }): Promise<Workload> {
  const log = opts.log ?? stderrLog;
  if (!bstAvailable()) throw new Error('BuildStream 1.6 is required: apt-get install -y buildstream (bst and /usr/bin/python3)');
  const dir = resolve(workDir);
  await mkdir(dir, { recursive: true });

  // 1. Generate the tarballs and the project.
  let t0 = performance.now();
  const sources = await generateSources(dir, { ...opts, log });
  const projectDir = join(dir, 'project');
  const project = { projectDir, elements: await writeProject(projectDir, sources, 1), hugeBlob: sources.hugeBlob };
  const generateSeconds = elapsed(t0);
  log(`generated ${sources.files} files, ${fmtBytes(sources.fileBytes)} in ${opts.artifacts} elements` +
    `${project.hugeBlob ? ` + huge.bst (${fmtBytes(project.hugeBlob.sizeBytes)})` : ''} in ${generateSeconds.toFixed(1)} s`);
  const dropSources = async (): Promise<void> => {
    await rm(sources.tarballDir, { recursive: true, force: true });
    await settleDisk();
  };

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
    // With keepSources the tarballs stay for a BuildStream 2 build of the same payload.
    t0 = performance.now();
    await rm(builder, { recursive: true, force: true });
    if (opts.keepSources === true) await settleDisk();
    else await dropSources();
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
      files: sources.files,
      fileBytes: sources.fileBytes,
      casBlobs: cas.count,
      casBytes: cas.bytes,
      ...(project.hugeBlob ? { hugeBlob: project.hugeBlob } : {}),
      sources,
      timings: { generateSeconds, buildSeconds, pushSeconds, cleanupSeconds },
      dropSources,
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
// Small helpers
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

function sameList(a: string[], b: string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}
