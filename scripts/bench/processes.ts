/**
 * Child processes for the benchmarks: the mirror's CLI as users run it (the built
 * `dist/cli/main.js`, so no TypeScript loader inflates start-up or memory), the peers it is
 * measured against (BuildStream 1.6's reference server, BuildStream 2's casd-backed server,
 * buildbox-casd on its own, bazel-remote), and each child's peak resident set (VmHWM).
 * Every server binds 127.0.0.1 only.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { access, constants as fsConstants, mkdir, readFile, readdir, rm } from 'node:fs/promises';
import { createServer, connect } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CASSERVER_FIXTURE, SYSTEM_PYTHON, bst2Venv } from '../../test/helpers/buildstream.js';

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
  /**
   * Highest VmHWM seen so far (kB): polled from /proc, and the exit hook's final word. With
   * `tree`, the sum over the child and its descendants of each one's highest VmHWM (an upper
   * bound of the tree's peak: they need not peak at the same time).
   */
  peakRssKiB(): Promise<number>;
  /** What the child wrote to stderr so far. */
  stderr(): string;
}

async function vmHwmKiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => '');
  return Number(/^VmHWM:\s+(\d+) kB$/m.exec(status)?.[1] ?? 0);
}

/** The pids of `pid`'s descendants (children of any of its threads, recursively). */
async function descendants(pid: number): Promise<number[]> {
  const out: number[] = [];
  const tasks = await readdir(`/proc/${pid}/task`).catch(() => [] as string[]);
  for (const tid of tasks) {
    const children = await readFile(`/proc/${pid}/task/${tid}/children`, 'utf8').catch(() => '');
    for (const c of children.split(' ').filter((x) => x.trim() !== '').map(Number)) out.push(c, ...(await descendants(c)));
  }
  return out;
}

const live = new Set<ChildProcess>();
process.on('exit', () => {
  // A benchmark that throws must not leave servers behind.
  for (const c of live) c.kill('SIGKILL');
});

/** Spawns a child with stdout/stderr captured, killed if this process exits first. */
export function spawnTracked(cmd: string, args: string[], opts: { env?: Record<string, string>; rssFile?: string; tree?: boolean } = {}): Tracked {
  const env = { ...process.env, ...opts.env, ...(opts.rssFile ? { BST_BENCH_PEAK_RSS_FILE: opts.rssFile } : {}) };
  const child = spawn(cmd, args, { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString('utf8')));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
  let polledKiB = 0;
  const perPid = new Map<number, number>();
  let exited = false;
  const poll = async (): Promise<void> => {
    if (exited || child.pid === undefined) return;
    if (!opts.tree) {
      polledKiB = Math.max(polledKiB, await vmHwmKiB(child.pid));
      return;
    }
    for (const pid of [child.pid, ...(await descendants(child.pid))]) perPid.set(pid, Math.max(perPid.get(pid) ?? 0, await vmHwmKiB(pid)));
    polledKiB = [...perPid.values()].reduce((a, b) => a + b, 0);
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
    stderr: () => stderr,
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
  /** What the server wrote to stderr so far (logs, warnings). */
  stderr(): string;
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
    stderr: () => child.stderr(),
    stop: () => stopTracked(child),
  };
}

/** SIGTERM, then SIGKILL after 15 s; resolves once the child has exited. */
async function stopTracked(child: Tracked): Promise<void> {
  if (child.process.exitCode !== null || child.process.signalCode !== null) return;
  child.process.kill('SIGTERM');
  const killer = setTimeout(() => child.process.kill('SIGKILL'), 15_000);
  await child.done;
  clearTimeout(killer);
}

/** `bst-cache-mirror serve` on 127.0.0.1:0 from the built CLI. */
export async function startMirror(dir: string, extraArgs: string[] = []): Promise<RunningServer> {
  const t0 = performance.now();
  const child = spawnTracked(process.execPath, [BUILT_CLI, 'serve', '--dir', dir, '--listen', '127.0.0.1:0', '--log-level', 'error', ...extraArgs]);
  const target = await waitForLine(child, 'mirror', /^bst-cache-mirror serving .* on (\S+)$/m);
  return started('mirror', child, target, t0);
}

/**
 * BuildStream's own artifact server on 127.0.0.1:0 through test/fixtures/casserver.py: 1.6's
 * (`buildstream._artifactcache.casserver`, under /usr/bin/python3) or, with `bst: 2`, the
 * casd-backed 2.x one (`buildstream._cas.casserver` under the BuildStream 2 venv's python, which
 * starts its own buildbox-casd on `repo` and proxies every call to it over a unix socket). For
 * the 2.x server the peak RSS covers the python process and its casd.
 */
export async function startReference(repo: string, opts: { enablePush?: boolean; bst?: 1 | 2 } = {}): Promise<RunningServer> {
  const bst2 = opts.bst === 2;
  const t0 = performance.now();
  const python = bst2 ? join(bst2Venv(), 'bin', 'python') : SYSTEM_PYTHON;
  const child = spawnTracked(python, [CASSERVER_FIXTURE, repo, ...(opts.enablePush ? ['--enable-push'] : [])], { tree: bst2 });
  const name = bst2 ? 'BuildStream 2 server' : 'reference server';
  const port = await waitForLine(child, name, /^LISTENING (\d+)$/m);
  return started(name, child, `127.0.0.1:${port}`, t0);
}

/** A TCP port free on 127.0.0.1 right now (for servers that cannot bind port 0 and report it). */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as { port: number }).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** Resolves once 127.0.0.1:`port` accepts a connection; rejects if the child exits or after `timeoutMs`. */
async function waitForPort(child: Tracked, name: string, port: number, timeoutMs = 120_000): Promise<void> {
  let exited: Finished | undefined;
  void child.done.then((r) => (exited = r));
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    if (exited) throw new Error(`${name} exited (${exited.code}) before listening: ${exited.stderr}`);
    const ok = await new Promise<boolean>((resolve) => {
      const sock = connect(port, '127.0.0.1');
      sock.once('connect', () => {
        sock.destroy();
        resolve(true);
      });
      sock.once('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  await stopTracked(child);
  throw new Error(`${name} did not listen on 127.0.0.1:${port} within ${timeoutMs} ms`);
}

/** buildbox-casd as BuildStream 2 ships it (inside the venv's `buildstream` package). */
export async function casdBinary(): Promise<string> {
  const lib = join(bst2Venv(), 'lib');
  for (const python of (await readdir(lib).catch(() => [] as string[])).filter((d) => d.startsWith('python3')).sort()) {
    const bin = join(lib, python, 'site-packages/buildstream/subprojects/buildbox/buildbox-casd');
    if (await access(bin, fsConstants.X_OK).then(() => true, () => false)) return bin;
  }
  throw new Error(`no buildbox-casd under ${lib}/python3*/site-packages/buildstream/subprojects/buildbox/ (set BST2_VENV)`);
}

/**
 * buildbox-casd serving its local CAS (`<dir>/cas/objects`) directly over gRPC on 127.0.0.1
 * (CAS, ByteStream, Capabilities, Remote Asset), with the flags BuildStream 2's server gives
 * its own casd (`--log-level=warning --cache-failures=false --quota-high=10000000000`), so the
 * difference to the 2.x server is that server's python layer.
 */
export async function startCasd(dir: string): Promise<RunningServer> {
  const bin = await casdBinary();
  await mkdir(dir, { recursive: true });
  const port = await freePort();
  const t0 = performance.now();
  const child = spawnTracked(bin, [`--bind=127.0.0.1:${port}`, '--log-level=warning', '--cache-failures=false', '--quota-high=10000000000', dir]);
  await waitForPort(child, 'buildbox-casd', port);
  return started('buildbox-casd', child, `127.0.0.1:${port}`, t0);
}

/** `buildbox-casd --version`, e.g. `1.4.25`. */
export async function casdVersion(): Promise<string> {
  const r = spawnSync(await casdBinary(), ['--version', '/'], { encoding: 'utf8', timeout: 30_000 });
  return (r.stdout || r.stderr).trim().split(/\s+/).pop() ?? '?';
}

/** Where the bench keeps what it builds (gitignored). */
export const BENCH_WORK = join(ROOT, 'scripts/bench/work');
const BAZEL_REMOTE_MODULE = 'github.com/buchgr/bazel-remote/v2';

/**
 * A bazel-remote binary: `$BAZEL_REMOTE`, else one built earlier into scripts/bench/work/gobin,
 * else `$GOPATH/bin`, else built now with `go install github.com/buchgr/bazel-remote/v2@latest`
 * (GOBIN=scripts/bench/work/gobin; Go from PATH or /usr/local/go/bin; at most 10 minutes).
 * Returns the reason instead when there is none and it does not build.
 */
export async function findOrBuildBazelRemote(log: (s: string) => void): Promise<{ bin: string } | { error: string }> {
  const executable = (p: string): Promise<boolean> => access(p, fsConstants.X_OK).then(() => true, () => false);
  const gobin = join(BENCH_WORK, 'gobin');
  const fromEnv = process.env['BAZEL_REMOTE'];
  if (fromEnv) return (await executable(fromEnv)) ? { bin: fromEnv } : { error: `$BAZEL_REMOTE=${fromEnv} is not executable` };
  if (await executable(join(gobin, 'bazel-remote'))) return { bin: join(gobin, 'bazel-remote') };
  const goCandidates = ['go', '/usr/local/go/bin/go'];
  const go = goCandidates.find((g) => spawnSync(g, ['version'], { stdio: 'ignore', timeout: 30_000 }).status === 0);
  if (!go) return { error: 'no Go toolchain (go on PATH or /usr/local/go/bin/go) to build it' };
  const gopath = spawnSync(go, ['env', 'GOPATH'], { encoding: 'utf8', timeout: 30_000 }).stdout.trim();
  if (gopath && (await executable(join(gopath, 'bin', 'bazel-remote')))) return { bin: join(gopath, 'bin', 'bazel-remote') };
  log(`building bazel-remote: ${go} install ${BAZEL_REMOTE_MODULE}@latest (GOBIN=${gobin})`);
  await mkdir(gobin, { recursive: true });
  const built = spawnSync(go, ['install', `${BAZEL_REMOTE_MODULE}@latest`], {
    cwd: BENCH_WORK,
    env: { ...process.env, GOBIN: gobin },
    encoding: 'utf8',
    timeout: 10 * 60_000,
  });
  if (built.status === 0 && (await executable(join(gobin, 'bazel-remote')))) return { bin: join(gobin, 'bazel-remote') };
  const why = built.error ? built.error.message : `${built.stderr}${built.stdout}`.trim().split('\n').map((l) => l.trim()).slice(-4).join(' / ');
  return { error: `go install ${BAZEL_REMOTE_MODULE}@latest failed (exit ${String(built.status)}): ${why}` };
}

/**
 * bazel-remote serving CAS over gRPC on 127.0.0.1 (its HTTP listener on another 127.0.0.1 port),
 * blobs stored uncompressed like everyone else's, no access log.
 */
export async function startBazelRemote(bin: string, dir: string): Promise<RunningServer> {
  await mkdir(dir, { recursive: true });
  const grpcPort = await freePort();
  const httpPort = await freePort();
  const t0 = performance.now();
  const child = spawnTracked(bin, [
    '--dir', dir, '--max_size', '64', '--storage_mode', 'uncompressed',
    '--grpc_address', `127.0.0.1:${grpcPort}`, '--http_address', `127.0.0.1:${httpPort}`, '--access_log_level', 'none',
  ]);
  await waitForPort(child, 'bazel-remote', grpcPort);
  return started('bazel-remote', child, `127.0.0.1:${grpcPort}`, t0);
}
