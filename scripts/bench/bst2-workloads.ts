/**
 * Real-client workloads for the benchmarks, BuildStream 2 side: the venv's `bst` 2.x builds the
 * same payload as the 1.6 workload (the same tarballs, workload-sources.ts) in a `min-version: 2.0`
 * project, pushes it to BuildStream 2's casd-backed server, and then we time
 * `bst artifact pull --deps all` into a fresh, empty cachedir from that server or from the mirror
 * (`timeBst2Pull`).
 *
 * Artifact names are `bench/<element normal name>/<full key>` (`bst show --format
 * '%{name}||%{full-key}'`; the normal name is the element path with `/` -> `-` and `.bst` dropped).
 * `bst` runs with an isolated HOME/XDG (test/helpers/buildstream.ts `runBst` with `bst: 2`);
 * the server binds 127.0.0.1 on an ephemeral port.
 */
import { spawnSync } from 'node:child_process';
import { access, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import {
  assertBstOk,
  bst2Available,
  bst2UserConfig,
  bst2Venv,
  runBst,
  startReferenceServer,
} from '../../test/helpers/buildstream.js';
import { BST_TIMEOUT_MS, PROJECT_NAME, type SourceElement, type WorkloadSources, elapsed, settleDisk, stderrLog, writeProject } from './workload-sources.js';

export interface Bst2Workload {
  workDir: string;
  projectDir: string;
  projectName: string;
  /** Element file names (`a000.bst`, ...), as `bst` takes them. */
  elements: string[];
  /** Artifact names (`bench/a000/<full key>`), one per element, sorted. */
  names: string[];
  /** `names` one per line, for `bst-cache-mirror sync --refs-file`. */
  namesFile: string;
  /** `bst --version` of the venv, e.g. `2.8.1`. */
  version: string;
  /** The BuildStream 2 server holding the pushed artifacts (push enabled). */
  server: { url: string; repo: string; stop(): Promise<void> };
  timings: { buildSeconds: number; pushSeconds: number };
  /** Stops the server and deletes workDir. */
  dispose(): Promise<void>;
}

/** `bst --version` of the BuildStream 2 venv. */
export function bst2Version(): string {
  const r = spawnSync(join(bst2Venv(), 'bin', 'bst'), ['--version'], { encoding: 'utf8', timeout: 60_000 });
  return r.status === 0 ? r.stdout.trim() : '?';
}

/**
 * Writes a BuildStream 2 project over `elements` of `sources` (whose tarballs must still exist)
 * into `workDir`, builds it into a scratch cache with no remote, starts the 2.x server with push
 * enabled, `bst artifact push --deps all` to it, and lists the artifact names. The server keeps
 * running (`dispose()` stops it).
 */
export async function prepareBst2Workload(workDir: string, sources: WorkloadSources, elements: readonly SourceElement[], log: (line: string) => void = stderrLog): Promise<Bst2Workload> {
  if (!bst2Available()) throw new Error(`BuildStream 2 is required in ${bst2Venv()} (set BST2_VENV): bin/bst and buildstream._cas.casserver`);
  const dir = resolve(workDir);
  await mkdir(dir, { recursive: true });
  const projectDir = join(dir, 'project');
  const elementFiles = await writeProject(projectDir, sources, 2, elements);
  const version = bst2Version();

  const server = await startReferenceServer({ bst: 2, repo: join(dir, 'server-repo'), enablePush: true });
  try {
    const builder = join(dir, 'builder');
    const bst = async (what: string, args: string[], artifacts: { url: string; push: boolean }[]): Promise<string> => {
      const config = join(dir, `${what}.conf`);
      await writeFile(config, bst2UserConfig({ root: builder, projectName: PROJECT_NAME, artifacts }));
      const result = await runBst(args, { bst: 2, cwd: projectDir, config, timeoutMs: BST_TIMEOUT_MS });
      assertBstOk(result, `bst ${version} ${what}`);
      return result.stdout;
    };
    let t0 = performance.now();
    await bst('build', ['build', ...elementFiles], []);
    const buildSeconds = elapsed(t0);
    log(`bst ${version} build: ${buildSeconds.toFixed(1)} s`);
    t0 = performance.now();
    await bst('push', ['artifact', 'push', '--deps', 'all', ...elementFiles], [{ url: server.url, push: true }]);
    const pushSeconds = elapsed(t0);
    log(`bst ${version} artifact push: ${pushSeconds.toFixed(1)} s`);

    const shown = await bst('show', ['show', '--deps', 'all', '--format', '%{name}||%{full-key}', ...elementFiles], []);
    const names = shown
      .split('\n')
      .filter((l) => l.includes('||'))
      .map((l) => {
        const [element = '', key = ''] = l.trim().split('||');
        return `${PROJECT_NAME}/${element.replace(/\.bst$/, '').replaceAll('/', '-')}/${key}`;
      })
      .sort();
    if (names.length !== elementFiles.length || names.some((n) => !/\/[0-9a-f]{64}$/.test(n))) {
      throw new Error(`bst show gave ${names.length} artifact names for ${elementFiles.length} elements:\n${shown}`);
    }
    const missing = await missingArtifacts(builder, names);
    if (missing.length > 0) throw new Error(`bst build did not commit ${missing.join(' ')}`);
    const namesFile = join(dir, 'names.txt');
    await writeFile(namesFile, `${names.join('\n')}\n`);
    await rm(builder, { recursive: true, force: true });
    await settleDisk();
    return {
      workDir: dir,
      projectDir,
      projectName: PROJECT_NAME,
      elements: elementFiles,
      names,
      namesFile,
      version,
      server: { url: server.url, repo: server.repo, stop: () => server.stop() },
      timings: { buildSeconds, pushSeconds },
      dispose: async () => {
        await server.stop();
        await rm(dir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    await server.stop();
    throw err;
  }
}

/**
 * Time `bst artifact pull --deps all` of every element into a fresh cachedir with `remoteUrl` as
 * the only artifact remote (`push: false`, `override-project-caches: true`). Every artifact must
 * then be in the cache (`<cachedir>/artifacts/refs/<name>`), or this throws. `warnings` are the
 * WARNING/FAILURE/BUG lines bst printed. The cachedir is deleted afterwards.
 */
export async function timeBst2Pull(w: Bst2Workload, remoteUrl: string): Promise<{ seconds: number; warnings: string[] }> {
  const cacheRoot = await mkdtemp(join(w.workDir, 'pull-'));
  try {
    const config = join(w.workDir, `${cacheRoot.split('/').pop() ?? 'pull'}.conf`);
    await writeFile(config, bst2UserConfig({ root: cacheRoot, projectName: w.projectName, artifacts: [{ url: remoteUrl, push: false }] }));
    await settleDisk();
    const t0 = performance.now();
    const result = await runBst(['artifact', 'pull', '--deps', 'all', ...w.elements], { bst: 2, cwd: w.projectDir, config, timeoutMs: BST_TIMEOUT_MS });
    const seconds = elapsed(t0);
    assertBstOk(result, `bst ${w.version} artifact pull from ${remoteUrl}`);
    const missing = await missingArtifacts(cacheRoot, w.names);
    if (missing.length > 0) {
      throw new Error(`bst ${w.version} artifact pull from ${remoteUrl} exited 0 but did not pull ${missing.length} of ${w.names.length}: ` +
        `${missing.join(' ')}\n--- stderr ---\n${result.stderr}`);
    }
    await rm(config, { force: true });
    const warnings = `${result.stderr}\n${result.stdout}`.split('\n').filter((l) => /\]\s+(WARNING|FAILURE|BUG)\s/.test(l));
    return { seconds, warnings };
  } finally {
    await rm(cacheRoot, { recursive: true, force: true });
  }
}

/** The names not committed in a BuildStream 2 cachedir (`<cachedir>/artifacts/refs/<name>`). */
async function missingArtifacts(cachedir: string, names: readonly string[]): Promise<string[]> {
  const missing: string[] = [];
  for (const name of names) {
    if (!(await access(join(cachedir, 'artifacts', 'refs', name)).then(() => true, () => false))) missing.push(name);
  }
  return missing;
}
