/**
 * Child processes for the benchmarks: the mirror's CLI as users run it (the built
 * `dist/cli/main.js`, so no TypeScript loader inflates start-up or memory), the 1.6 reference
 * server, and each child's peak resident set (VmHWM).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CASSERVER_FIXTURE, SYSTEM_PYTHON } from '../../test/helpers/buildstream.js';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const BUILT_CLI = join(ROOT, 'dist/cli/main.js');
/** Preloaded into measured node children; writes their final VmHWM to $BST_BENCH_PEAK_RSS_FILE. */
const PEAK_RSS_HOOK = join(ROOT, 'scripts/bench/peak-rss-hook.mjs');

export interface Finished {
  code: number;
  stdout: string;
  stderr: string;
}

export interface Tracked {
  process: ChildProcess;
  pid: number;
  done: Promise<Finished>;
  /** Highest VmHWM seen so far (kB): polled from /proc, and the exit hook's final word. */
  peakRssKiB(): Promise<number>;
}

const live = new Set<ChildProcess>();
process.on('exit', () => {
  // A benchmark that throws must not leave servers behind.
  for (const c of live) c.kill('SIGKILL');
});

/** Spawns a child with stdout/stderr captured, killed if this process exits first. */
export function spawnTracked(cmd: string, args: string[], opts: { env?: Record<string, string>; rssFile?: string } = {}): Tracked {
  const env = { ...process.env, ...opts.env, ...(opts.rssFile ? { BST_BENCH_PEAK_RSS_FILE: opts.rssFile } : {}) };
  const child = spawn(cmd, args, { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString('utf8')));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
  let polledKiB = 0;
  let exited = false;
  const poll = async (): Promise<void> => {
    if (exited || child.pid === undefined) return;
    const status = await readFile(`/proc/${child.pid}/status`, 'utf8').catch(() => '');
    polledKiB = Math.max(polledKiB, Number(/^VmHWM:\s+(\d+) kB$/m.exec(status)?.[1] ?? 0));
  };
  // VmHWM never decreases, so a slow poll only matters for a process that exits between polls,
  // which is what the exit hook covers.
  const timer = setInterval(() => void poll(), 100);
  const done = new Promise<Finished>((resolve, reject) => {
    child.once('error', (e) => reject(new Error(`could not run ${cmd}: ${e.message}`)));
    child.once('close', (code, signal) => {
      exited = true;
      live.delete(child);
      clearInterval(timer);
      resolve({ code: code ?? (signal === 'SIGTERM' ? 143 : -1), stdout, stderr });
    });
  });
  return {
    process: child,
    pid: child.pid ?? 0,
    done,
    peakRssKiB: async () => {
      await poll();
      const fromHook = opts.rssFile ? Number((await readFile(opts.rssFile, 'utf8').catch(() => '0')).trim()) : 0;
      return Math.max(polledKiB, Number.isFinite(fromHook) ? fromHook : 0);
    },
  };
}

/** Runs the built CLI to completion; throws unless it exits 0. */
export async function runMirrorCli(args: string[], scratch: string): Promise<{ seconds: number; peakRssMiB: number; stdout: string }> {
  const rssFile = join(scratch, `rss-${process.hrtime.bigint()}`);
  const t0 = performance.now();
  const child = spawnTracked(process.execPath, ['--import', PEAK_RSS_HOOK, BUILT_CLI, ...args], { rssFile });
  const result = await child.done;
  const seconds = (performance.now() - t0) / 1000;
  const peak = await child.peakRssKiB();
  await rm(rssFile, { force: true });
  if (result.code !== 0) throw new Error(`bst-cache-mirror ${args.join(' ')} exited ${result.code}\n${result.stdout}\n${result.stderr}`);
  return { seconds, peakRssMiB: peak / 1024, stdout: result.stdout };
}

export interface RunningServer {
  name: string;
  /** 127.0.0.1:PORT, for gRPC clients. */
  target: string;
  /** http://127.0.0.1:PORT, for bst configs and `sync --upstream`. */
  url: string;
  /** From spawn to the server saying it listens. */
  startupMs: number;
  peakRssMiB(): Promise<number>;
  stop(): Promise<void>;
}

function waitForLine(child: Tracked, name: string, pattern: RegExp): Promise<string> {
  return new Promise((resolve, reject) => {
    let out = '';
    const onData = (d: Buffer): void => {
      out += d.toString('utf8');
      const m = pattern.exec(out);
      if (m?.[1]) {
        child.process.stdout?.off('data', onData);
        resolve(m[1]);
      }
    };
    child.process.stdout?.on('data', onData);
    void child.done.then((r) => reject(new Error(`${name} exited (${r.code}) before listening: ${r.stderr}`)));
  });
}

async function started(name: string, child: Tracked, target: string, t0: number): Promise<RunningServer> {
  return {
    name,
    target,
    url: `http://${target}`,
    startupMs: performance.now() - t0,
    peakRssMiB: async () => (await child.peakRssKiB()) / 1024,
    stop: async () => {
      child.process.kill('SIGTERM');
      await child.done;
    },
  };
}

/** `bst-cache-mirror serve` on 127.0.0.1:0 from the built CLI. */
export async function startMirror(dir: string, extraArgs: string[] = []): Promise<RunningServer> {
  const t0 = performance.now();
  const child = spawnTracked(process.execPath, [BUILT_CLI, 'serve', '--dir', dir, '--listen', '127.0.0.1:0', '--log-level', 'error', ...extraArgs]);
  const target = await waitForLine(child, 'mirror', /^bst-cache-mirror serving .* on (\S+)$/m);
  return started('mirror', child, target, t0);
}

/** BuildStream 1.6's reference server (`casserver.create_server`) on 127.0.0.1:0. */
export async function startReference(repo: string, opts: { enablePush?: boolean } = {}): Promise<RunningServer> {
  const t0 = performance.now();
  const child = spawnTracked(SYSTEM_PYTHON, [CASSERVER_FIXTURE, repo, ...(opts.enablePush ? ['--enable-push'] : [])]);
  const port = await waitForLine(child, 'reference server', /^LISTENING (\d+)$/m);
  return started('reference', child, `127.0.0.1:${port}`, t0);
}
