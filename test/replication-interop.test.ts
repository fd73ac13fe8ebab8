/**
 * Replication (issue 10) with the real BuildStream clients and reference servers: names pushed to
 * the mirror's push listener (https with client certificates) by bst 1.6 and bst 2.8, and names a
 * bst 1.6 build writes into a watched local cache, reach the upstream configured with
 * `push: true`, through durable push jobs that wait out an upstream outage and a kill -9 of the
 * daemon, and that fail once, without a retry loop, against a pull-only upstream. Every check of
 * "it arrived" is a pull from the upstream alone into a fresh cache.
 *
 * The daemon runs in this process (tests 1-4, 6; its log is tapped to await events) or as
 * `bst-cache-mirror serve --config` (test 5, which kills it). Everything binds 127.0.0.1 with
 * ephemeral ports; an upstream brought back reuses its own port (startReferenceServer `port`).
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { pino, type Logger } from 'pino';
import { artifactName, refName } from '../src/cas/names.js';
import { parseConfig } from '../src/config/load.js';
import type { StatusReport } from '../src/control/protocol.js';
import { Daemon } from '../src/daemon/daemon.js';
import {
  type Bst1Remote,
  type Bst2Remote,
  type BstProject,
  type BstResult,
  type BstVersion,
  type ReferenceServer,
  assertBstOk,
  bst2Available,
  bst2UserConfig,
  bstAvailable,
  bstUserConfig,
  compareTrees,
  listArtifactRefs,
  listBst2ArtifactRefs,
  listBst2ServerAssets,
  runBst,
  startReferenceServer,
  writeBst2Project,
  writeBstProject,
} from './helpers/buildstream.js';
import { CLI, REPO_ROOT, runCli, tempDir } from './helpers/mirror.js';
import { type Certificate, makeCertificate } from './helpers/tls.js';

type After = { after(fn: () => Promise<void> | void): void };

function requireBst(version: BstVersion): void {
  if (version === 1) assert.ok(bstAvailable(), 'BuildStream 1.6 is required for interop tests: apt-get install -y buildstream');
  else assert.ok(bst2Available(), 'BuildStream 2.8 is required for interop tests: npm test installs it (scripts/test-deps.sh)');
}

/** A reference server stopped after the test (stop() is idempotent, so a test may stop it earlier). */
async function startServer(t: After, opts: Parameters<typeof startReferenceServer>[0]): Promise<ReferenceServer> {
  const server = await startReferenceServer(opts);
  t.after(() => server.stop());
  return server;
}

// ---------------------------------------------------------------------------
// Certificates and the mirror's config
// ---------------------------------------------------------------------------

interface Certs {
  /** The mirror's push listener (self-signed, 127.0.0.1). */
  mirror: Certificate;
  /** A client certificate in the listener's client-certs. */
  office: Certificate;
  /** A client certificate that is not. */
  stranger: Certificate;
}

async function makeCerts(dir: string): Promise<Certs> {
  await mkdir(dir, { recursive: true });
  return {
    mirror: await makeCertificate(dir, 'mirror'),
    office: await makeCertificate(dir, 'office-ci'),
    stranger: await makeCertificate(dir, 'stranger'),
  };
}

const q = (value: string): string => JSON.stringify(value);

/**
 * mirror.yaml: a plain pull-only listener and an https push listener admitting `office` only,
 * one upstream with `push: true`, pull-through off (so the upstream's RPC log holds only what
 * replication sent), short health probes, and `watch` as replicate.watch.
 */
function mirrorYaml(opts: { dir: string; certs: Certs; upstream: string; watch?: string[]; logLevel?: string }): string {
  return [
    `dir: ${q(opts.dir)}`,
    `log-level: ${opts.logLevel ?? 'silent'}`,
    'listen:',
    '  - 127.0.0.1:0',
    '  - address: 127.0.0.1:0',
    `    server-cert: ${q(opts.certs.mirror.certFile)}`,
    `    server-key: ${q(opts.certs.mirror.keyFile)}`,
    `    client-certs: ${q(opts.certs.office.certFile)}`,
    '    push: true',
    'upstreams:',
    '  - name: central',
    `    url: ${opts.upstream}`,
    '    rpc-timeout: 20s',
    '    push: true',
    'sync:',
    '  on-miss: off',
    'health:',
    '  probe-interval: 200ms',
    '  probe-max-interval: 1s',
    'replicate:',
    `  watch: [${(opts.watch ?? []).map(q).join(', ')}]`,
    '',
  ].join('\n');
}

// ---------------------------------------------------------------------------
// The in-process daemon and its log
// ---------------------------------------------------------------------------

interface LogLine {
  readonly msg?: string;
  readonly urn?: string;
  readonly [key: string]: unknown;
}

/** A pino logger whose JSON lines are kept, so a test can await what the daemon reports. */
class LogTap {
  readonly lines: LogLine[] = [];
  private readonly waiters = new Set<() => void>();
  readonly log: Logger = pino({ level: 'info', base: undefined }, { write: (text: string) => this.add(text) });

  private add(text: string): void {
    for (const line of text.split('\n')) {
      if (line.trim() === '') continue;
      try {
        this.lines.push(JSON.parse(line) as LogLine);
      } catch {
        this.lines.push({ msg: line });
      }
    }
    for (const wake of [...this.waiters]) wake();
  }

  /** URNs of the lines with message `msg`. */
  urns(msg: string): Set<string> {
    return new Set(this.lines.flatMap((l) => (l.msg === msg && typeof l.urn === 'string' ? [l.urn] : [])));
  }

  /** Resolves once `done()` holds (checked on every line); rejects after `timeoutMs`, with the log so far. */
  until(done: () => boolean, what: string, timeoutMs = 90_000): Promise<void> {
    if (done()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`${what}: not within ${timeoutMs} ms\n--- daemon log ---\n${this.lines.map((l) => JSON.stringify(l)).join('\n')}`));
      }, timeoutMs);
      const check = (): void => {
        if (!done()) return;
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve();
      };
      this.waiters.add(check);
    });
  }
}

/** Fast push retries for the in-process daemon (the CLI's daemon keeps the defaults). */
const PUSH_RETRY = { minTimeoutMs: 50, maxTimeoutMs: 500 };

interface InProcessMirror {
  daemon: Daemon;
  tap: LogTap;
  /** `http://` of the pull-only listener. */
  pullUrl: string;
  /** `https://` of the push listener. */
  pushUrl: string;
}

async function startMirror(t: After, yaml: string, dir: string): Promise<InProcessMirror> {
  const tap = new LogTap();
  const daemon = await Daemon.start(parseConfig(yaml, join(dir, 'mirror.yaml')), { log: tap.log, syncAtStart: false, pushRetry: PUSH_RETRY });
  t.after(() => daemon.stop());
  const [pull, push] = daemon.addresses;
  assert.ok(pull !== undefined && push !== undefined, 'two listeners, in config order');
  return { daemon, tap, pullUrl: `http://${pull}`, pushUrl: `https://${push}` };
}

// ---------------------------------------------------------------------------
// BuildStream
// ---------------------------------------------------------------------------

/** The bst 1.6 remote spec of the mirror's push listener, presenting `client` (none: no client certificate). */
function bst1PushRemote(url: string, certs: Certs, client: Certificate | undefined): Bst1Remote {
  return { url, push: true, serverCert: certs.mirror.certFile, ...(client && { clientCert: client.certFile, clientKey: client.keyFile }) };
}

/** A bst 1.6 runner for one project: each call writes a user config with `remotes` and its caches in `<root>/<cache>`. */
function bst1For(root: string, project: BstProject) {
  let configs = 0;
  return async (args: string[], cache: string, remotes: Bst1Remote[]): Promise<BstResult> => {
    const config = join(root, `bst1-${++configs}.conf`);
    await writeFile(config, bstUserConfig({ root: join(root, cache), remotes, projectName: project.projectName }));
    return runBst(args, { cwd: project.projectDir, config });
  };
}

/** A bst 2.8 runner for one project, likewise (artifact remotes only). */
function bst2For(root: string, project: BstProject) {
  let configs = 0;
  return async (args: string[], cache: string, artifacts: Bst2Remote[]): Promise<BstResult> => {
    const config = join(root, `bst2-${++configs}.conf`);
    await writeFile(config, bst2UserConfig({ root: join(root, cache), projectName: project.projectName, artifacts }));
    return runBst(args, { cwd: project.projectDir, config, bst: 2 });
  };
}

const countOf = (text: string, re: RegExp): number => text.match(re)?.length ?? 0;

/** bst 1.6: a fresh cache whose only remote is `url` pulls everything, and its checkout is the expected tree. */
async function assertPullsFrom(bst: ReturnType<typeof bst1For>, project: BstProject, root: string, cache: string, url: string): Promise<void> {
  const remote = [{ url, push: false }];
  const pull = await bst(['pull', '--deps', 'all', project.topElement], cache, remote);
  assertBstOk(pull, `bst pull from ${url}`);
  assert.equal(countOf(pull.stderr, /Pulled artifact/g), project.elements.length, pull.stderr);
  const checkout = join(root, `${cache}-checkout`);
  assertBstOk(await bst(['checkout', project.topElement, checkout], cache, remote), 'bst checkout');
  assert.deepEqual(await compareTrees(project.expectedDir, checkout), [], 'identical files, modes and symlinks');
}

/** RPCs of `server` whose method ends with `/<name>`, as `CODE` strings. */
const codesOf = (server: ReferenceServer, name: string): string[] => server.rpcs().filter((r) => r.method.endsWith(`/${name}`)).map((r) => r.code);

const v1Urns = (refs: readonly string[]): string[] => refs.map((r) => refName(r).urn).sort();

// ---------------------------------------------------------------------------
// 1. bst 1.6 over https with a client certificate
// ---------------------------------------------------------------------------

test("bst 1.6 push to the mirror's push port with a client certificate reaches the 1.6 reference server upstream", { timeout: 180_000 }, async (t) => {
  requireBst(1);
  const root = await tempDir(t, 'replicate-16-');
  const certs = await makeCerts(join(root, 'certs'));
  const project = await writeBstProject(join(root, 'project'));
  const bst = bst1For(root, project);
  assertBstOk(await bst(['build', project.topElement], 'builder', []), 'bst build');
  const refs = await listArtifactRefs(join(root, 'builder', 'artifacts'));
  assert.equal(refs.length, project.elements.length + 1, 'strong refs and the stack weak ref');

  const upstream = await startServer(t, { repo: join(root, 'upstream-repo'), enablePush: true, logRpcs: true });
  const mirrorDir = join(root, 'mirror');
  const { daemon, tap, pushUrl } = await startMirror(t, mirrorYaml({ dir: mirrorDir, certs, upstream: upstream.url }), mirrorDir);

  // Refused in the TLS handshake: a certificate not in client-certs, or none. Nothing is stored.
  for (const [who, client] of [['a stranger certificate', certs.stranger], ['no client certificate', undefined]] as const) {
    const refused = await bst(['push', '--deps', 'all', project.topElement], 'builder', [bst1PushRemote(pushUrl, certs, client)]);
    t.diagnostic(`bst 1.6 push with ${who}: code ${refused.code}: ${refused.stderr.split('\n').filter((l) => /remote|push/i.test(l)).slice(0, 3).join(' | ')}`);
    assert.notEqual(refused.code, 0, `bst push with ${who} must fail`);
    assert.match(refused.stderr, /Failed to initialize remote https:\/\/127\.0\.0\.1:\d+/, refused.stderr);
    assert.doesNotMatch(refused.stderr, /Pushed artifact/);
  }
  let status = await daemon.status();
  assert.equal(status.store.names, 0, 'no name recorded from refused clients');
  assert.equal(status.store.blobs, 0, 'no blob stored from refused clients');
  assert.equal(status.push.depth, 0);

  const push = await bst(['push', '--deps', 'all', project.topElement], 'builder', [bst1PushRemote(pushUrl, certs, certs.office)]);
  assertBstOk(push, 'bst push to the mirror with the office certificate');
  assert.equal(countOf(push.stderr, /Pushed artifact/g), project.elements.length, push.stderr);
  assert.deepEqual([...tap.urns('name pushed')].sort(), v1Urns(refs), 'the mirror recorded every ref bst pushed');
  // The mirror serves them at once, over https to a client holding the certificate.
  const fromMirror = [{ ...bst1PushRemote(pushUrl, certs, certs.office), push: false }];
  const mirrorPull = await bst(['pull', '--deps', 'all', project.topElement], 'mirror-puller', fromMirror);
  assertBstOk(mirrorPull, 'bst pull from the mirror over https');
  assert.equal(countOf(mirrorPull.stderr, /Pulled artifact/g), project.elements.length, mirrorPull.stderr);

  await daemon.pushIdle();
  status = await daemon.status();
  assert.deepEqual(status.push, { depth: 0, failed: [] }, JSON.stringify(status.push));
  assert.equal(status.store.names, refs.length);
  assert.deepEqual([...tap.urns('name replicated upstream')].sort(), v1Urns(refs));
  assert.deepEqual(await listArtifactRefs(upstream.repo), refs, 'the upstream holds every ref');
  assert.deepEqual(codesOf(upstream, 'UpdateReference'), Array(refs.length).fill('OK'), 'each ref set upstream once');

  // The upstream alone serves a fresh cache the same tree as a checkout of the original build.
  await assertPullsFrom(bst, project, root, 'puller', upstream.url);
  const original = join(root, 'original-checkout');
  assertBstOk(await bst(['checkout', project.topElement, original], 'builder', []), 'bst checkout of the original build');
  assert.deepEqual(await compareTrees(original, join(root, 'puller-checkout')), []);
  assert.doesNotMatch(upstream.stderr(), /Traceback/, upstream.stderr());
});

// ---------------------------------------------------------------------------
// 2. bst 2.8 over https with a client certificate
// ---------------------------------------------------------------------------

test('bst 2.8 artifact push to the mirror reaches the 2.x casserver upstream', { timeout: 180_000 }, async (t) => {
  requireBst(2);
  const root = await tempDir(t, 'replicate-28-');
  const certs = await makeCerts(join(root, 'certs'));
  const project = await writeBst2Project(join(root, 'project'));
  const bst2 = bst2For(root, project);
  assertBstOk(await bst2(['build', project.topElement], 'builder', []), 'bst build');
  const names = await listBst2ArtifactRefs(join(root, 'builder'));
  assert.equal(names.length, 2 * project.elements.length, 'a strong and a weak name per element');
  const urns = names.map((n) => artifactName(n).urn).sort();

  const upstream = await startServer(t, { bst: 2, repo: join(root, 'upstream-repo'), enablePush: true, logRpcs: true });
  const mirrorDir = join(root, 'mirror');
  const { daemon, tap, pushUrl } = await startMirror(t, mirrorYaml({ dir: mirrorDir, certs, upstream: upstream.url }), mirrorDir);

  const auth = { serverCert: certs.mirror.certFile, clientCert: certs.office.certFile, clientKey: certs.office.keyFile };
  const push = await bst2(['artifact', 'push', '--deps', 'all', project.topElement], 'builder', [{ url: pushUrl, push: true, auth }]);
  assertBstOk(push, 'bst artifact push to the mirror');
  assert.equal(countOf(push.stderr, /INFO\s+Pushed artifact/g), project.elements.length, push.stderr);
  assert.deepEqual([...tap.urns('name pushed')].sort(), urns, 'the mirror recorded the strong and weak name of every artifact');
  // The mirror serves them at once, over https to a client holding the certificate.
  const mirrorPull = await bst2(['artifact', 'pull', '--deps', 'all', project.topElement], 'mirror-puller', [{ url: pushUrl, push: false, auth }]);
  assertBstOk(mirrorPull, 'bst artifact pull from the mirror over https');
  assert.equal(countOf(mirrorPull.stderr, /INFO\s+Pulled artifact/g), project.elements.length, mirrorPull.stderr);

  await daemon.pushIdle();
  const status = await daemon.status();
  assert.deepEqual(status.push, { depth: 0, failed: [] }, JSON.stringify(status.push));
  assert.equal(status.store.names, urns.length);
  const held = (await listBst2ServerAssets(upstream.repo)).filter((a) => a.kind === 'blob').map((a) => a.uri);
  assert.deepEqual(held.sort(), urns, 'the upstream index holds every artifact name');
  // Each name set upstream once (PushBlob logs its URIs), after BuildStream 2's push probe (an
  // empty PushBlob, INVALID_ARGUMENT: push is there) once per upstream connection.
  const pushBlobs = upstream.rpcs().filter((r) => r.method.endsWith('/PushBlob'));
  const probes = pushBlobs.filter((r) => r.uris.length === 0);
  assert.ok(probes.length >= 1 && probes.every((r) => r.code === 'INVALID_ARGUMENT'), JSON.stringify(probes));
  const set = pushBlobs.filter((r) => r.uris.length > 0);
  assert.ok(set.every((r) => r.code === 'OK'), JSON.stringify(set));
  assert.deepEqual(set.flatMap((r) => r.uris).sort(), urns);

  // A fresh cache whose only remote is the upstream pulls and checks out the same tree.
  const fromUpstream: Bst2Remote[] = [{ url: upstream.url, push: false }];
  const pull = await bst2(['artifact', 'pull', '--deps', 'all', project.topElement], 'puller', fromUpstream);
  assertBstOk(pull, 'bst artifact pull from the upstream');
  assert.equal(countOf(pull.stderr, /INFO\s+Pulled artifact/g), project.elements.length, pull.stderr);
  const checkout = join(root, 'checkout');
  assertBstOk(await bst2(['artifact', 'checkout', '--directory', checkout, project.topElement], 'puller', fromUpstream), 'bst artifact checkout');
  assert.deepEqual(await compareTrees(project.expectedDir, checkout), [], 'identical files, modes and symlinks');
});

// ---------------------------------------------------------------------------
// 3. A watched local cache
// ---------------------------------------------------------------------------

test('a bst build into a watched local cache ends up upstream', { timeout: 180_000 }, async (t) => {
  requireBst(1);
  const root = await tempDir(t, 'replicate-watch-');
  const certs = await makeCerts(join(root, 'certs'));
  const project = await writeBstProject(join(root, 'project'));
  const bst = bst1For(root, project);
  const upstream = await startServer(t, { repo: join(root, 'upstream-repo'), enablePush: true, logRpcs: true });
  // The cache directory exists (empty) when the daemon starts; the build comes after.
  const cache = join(root, 'ci-cache');
  await mkdir(cache);
  const mirrorDir = join(root, 'mirror');
  const { daemon, tap } = await startMirror(t, mirrorYaml({ dir: mirrorDir, certs, upstream: upstream.url, watch: [cache] }), mirrorDir);

  // A build with no remote at all, into the watched cache.
  assertBstOk(await bst(['build', project.topElement], 'ci-cache', []), 'bst build into the watched cache');
  const refs = await listArtifactRefs(join(cache, 'artifacts'));
  assert.equal(refs.length, project.elements.length + 1);
  const expected = v1Urns(refs);

  // Imported (possibly after a retry while objects were still being written), queued, replicated.
  await tap.until(() => expected.every((urn) => tap.urns('name replicated upstream').has(urn)), 'every ref of the build replicated upstream');
  await daemon.pushIdle();
  const status = await daemon.status();
  assert.equal(status.store.names, refs.length);
  assert.deepEqual(status.push, { depth: 0, failed: [] }, JSON.stringify(status.push));
  assert.deepEqual([...tap.urns('name from a local cache')].sort(), expected);
  assert.deepEqual(await listArtifactRefs(upstream.repo), refs);
  assert.deepEqual(codesOf(upstream, 'UpdateReference'), Array(refs.length).fill('OK'), 'each ref set upstream once');

  await assertPullsFrom(bst, project, root, 'puller', upstream.url);
});

// ---------------------------------------------------------------------------
// 4. An upstream outage
// ---------------------------------------------------------------------------

/** What UpstreamHealth logs when its breaker opens, and when a probe closes it (src/remote/health.ts). */
const OFFLINE = 'upstream is offline: skipping it until a probe succeeds';
const BACK_ONLINE = 'upstream is back online';

test('the upstream stopped during replication: jobs wait, retry and complete once it is back', { timeout: 180_000 }, async (t) => {
  requireBst(1);
  const root = await tempDir(t, 'replicate-outage-');
  const certs = await makeCerts(join(root, 'certs'));
  const project = await writeBstProject(join(root, 'project'));
  const bst = bst1For(root, project);
  assertBstOk(await bst(['build', project.topElement], 'builder', []), 'bst build');
  const refs = await listArtifactRefs(join(root, 'builder', 'artifacts'));

  const repo = join(root, 'upstream-repo');
  const first = await startServer(t, { repo, enablePush: true });
  const mirrorDir = join(root, 'mirror');
  const { daemon, tap, pushUrl } = await startMirror(t, mirrorYaml({ dir: mirrorDir, certs, upstream: first.url }), mirrorDir);
  await first.stop();

  const push = await bst(['push', '--deps', 'all', project.topElement], 'builder', [bst1PushRemote(pushUrl, certs, certs.office)]);
  assertBstOk(push, 'bst push to the mirror while the upstream is down');
  assert.equal(countOf(push.stderr, /Pushed artifact/g), project.elements.length, push.stderr);
  // Acknowledged means recorded: every job is there, none has failed.
  let status = await daemon.status();
  assert.equal(status.push.depth, refs.length, JSON.stringify(status.push));
  assert.deepEqual(status.push.failed, []);
  assert.equal(status.store.names, refs.length);
  // The jobs try (and fail) until the breaker marks the upstream offline, then wait for its probes.
  await tap.until(() => tap.lines.some((l) => l.msg === OFFLINE), 'the upstream marked offline', 30_000);
  status = await daemon.status();
  assert.equal(status.upstreams[0]?.state, 'offline', JSON.stringify(status.upstreams));
  assert.equal(status.push.depth, refs.length);
  assert.deepEqual(status.push.failed, [], 'an unreachable upstream fails no job');

  // Back on the same port, with the same repository.
  const second = await startServer(t, { repo, enablePush: true, logRpcs: true, port: first.port });
  assert.equal(second.url, first.url);
  await daemon.pushIdle();
  status = await daemon.status();
  assert.deepEqual(status.push, { depth: 0, failed: [] }, JSON.stringify(status.push));
  assert.equal(status.upstreams[0]?.state, 'online', JSON.stringify(status.upstreams));
  assert.ok(tap.lines.some((l) => l.msg === BACK_ONLINE), 'a probe found it back');
  assert.deepEqual(await listArtifactRefs(repo), refs);
  assert.deepEqual(codesOf(second, 'UpdateReference'), Array(refs.length).fill('OK'), 'each ref set upstream once');

  await assertPullsFrom(bst, project, root, 'puller', second.url);
});

// ---------------------------------------------------------------------------
// 5. kill -9 of the daemon while it drains
// ---------------------------------------------------------------------------

interface ServeChild {
  child: ChildProcess;
  /** Listener addresses in config order. */
  addresses: string[];
  exited: Promise<number | null>;
  /** JSON log lines the daemon wrote to stderr so far. */
  log: LogLine[];
  /** Resolves at the first log line `match` accepts (from now or earlier). */
  logged(match: (line: LogLine) => boolean, what: string): Promise<LogLine>;
  stderr(): string;
}

/** `bst-cache-mirror serve --config FILE`; resolves once it printed all `listeners` addresses. */
function serveWithConfig(t: After, file: string, listeners: number): Promise<ServeChild> {
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, 'serve', '--config', file], { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  });
  let out = '';
  let err = '';
  let partial = '';
  const log: LogLine[] = [];
  const watchers = new Set<() => void>();
  child.stderr.on('data', (d: Buffer) => {
    const text = d.toString();
    err += text;
    const lines = (partial + text).split('\n');
    partial = lines.pop() ?? '';
    for (const line of lines) {
      try {
        log.push(JSON.parse(line) as LogLine);
      } catch {
        // not a log line
      }
    }
    for (const w of [...watchers]) w();
  });
  const logged = (match: (line: LogLine) => boolean, what: string): Promise<LogLine> =>
    new Promise((resolve, reject) => {
      const check = (): boolean => {
        const found = log.find(match);
        if (found === undefined) return false;
        watchers.delete(check);
        resolve(found);
        return true;
      };
      if (check()) return;
      watchers.add(check);
      void exited.then(() => {
        if (watchers.delete(check)) reject(new Error(`the daemon exited before logging ${what}:\n${err}`));
      });
    });
  return new Promise((resolve, reject) => {
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      const addresses = [...out.matchAll(/ on (\S+)\n/g)].map((m) => m[1] ?? '');
      if (addresses.length === listeners) resolve({ child, addresses, exited, log, logged, stderr: () => err });
    });
    void exited.then((code) => reject(new Error(`serve exited with ${code}: ${err}`)));
  });
}

async function cliStatus(dir: string): Promise<StatusReport> {
  const result = await runCli(['status', '--dir', dir, '--json']);
  assert.equal(result.code, 0, result.stderr);
  return JSON.parse(result.stdout) as StatusReport;
}

test('the daemon killed with SIGKILL while draining: after restart every job completes, none twice', { timeout: 180_000 }, async (t) => {
  requireBst(1);
  const root = await tempDir(t, 'replicate-kill-');
  const certs = await makeCerts(join(root, 'certs'));
  const project = await writeBstProject(join(root, 'project'));
  const bst = bst1For(root, project);
  assertBstOk(await bst(['build', project.topElement], 'builder', []), 'bst build');
  const refs = await listArtifactRefs(join(root, 'builder', 'artifacts'));

  const repo = join(root, 'upstream-repo');
  const down = await startServer(t, { repo, enablePush: true });
  await down.stop();
  const mirrorDir = join(root, 'mirror');
  const file = join(root, 'mirror.yaml');
  await writeFile(file, mirrorYaml({ dir: mirrorDir, certs, upstream: down.url, logLevel: 'info' }));
  const first = await serveWithConfig(t, file, 2);

  // Pushed while the upstream is down: the jobs are recorded and wait.
  const push = await bst(['push', '--deps', 'all', project.topElement], 'builder', [bst1PushRemote(`https://${first.addresses[1] ?? ''}`, certs, certs.office)]);
  assertBstOk(push, 'bst push to the mirror');
  const queued = await cliStatus(mirrorDir);
  assert.ok(queued.daemon, 'status came from the running daemon');
  assert.equal(queued.push.depth, refs.length, JSON.stringify(queued.push));
  assert.deepEqual(queued.push.failed, []);

  // The upstream comes back (same port and repository); the daemon starts draining and is
  // killed with SIGKILL the moment it reports its first replicated name.
  const upstream = await startServer(t, { repo, enablePush: true, logRpcs: true, port: down.port });
  await first.logged((l) => l.msg === 'name replicated upstream', 'a replicated name');
  first.child.kill('SIGKILL');
  await first.exited;
  const left = await cliStatus(mirrorDir);
  assert.equal(left.daemon, undefined, 'status read the store of the killed daemon');
  t.diagnostic(`jobs left at the kill: ${left.push.depth} of ${refs.length}; upstream RPCs so far: ${upstream.rpcs().length}`);
  // Usually one job fewer; all of them if the kill came between a name set upstream and its job's
  // deletion (the restarted daemon must then find it there and not set it again).
  assert.ok(left.push.depth >= 1, `killed while draining: ${left.push.depth} of ${refs.length} jobs left`);
  assert.deepEqual(left.push.failed, []);

  const second = await serveWithConfig(t, file, 2);
  // The one place this file polls: a daemon in another process reports nothing else we could await.
  // `status` (a CLI process, ~1 s) is asked at most every 200 ms, until the queue is empty or the deadline.
  const deadline = Date.now() + 90_000;
  let status = await cliStatus(mirrorDir);
  while (status.push.depth > 0 && status.push.failed.length === 0) {
    assert.ok(Date.now() < deadline, `push jobs still pending after 90 s: ${JSON.stringify(status.push)}\n${second.stderr()}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
    status = await cliStatus(mirrorDir);
  }
  assert.deepEqual(status.push, { depth: 0, failed: [] }, JSON.stringify(status.push));
  assert.equal(status.store.names, refs.length);

  assert.deepEqual(await listArtifactRefs(repo), refs, 'the upstream holds every ref');
  // The reference server logs no keys: as many UpdateReference calls as distinct refs means none was set twice.
  assert.deepEqual(codesOf(upstream, 'UpdateReference'), Array(refs.length).fill('OK'), upstream.rpcs().map((r) => `${r.method} ${r.code}`).join('\n'));
  second.child.kill('SIGTERM');
  assert.equal(await second.exited, 0, 'the restarted daemon exits cleanly');
  await assertPullsFrom(bst, project, root, 'puller', upstream.url);
});

// ---------------------------------------------------------------------------
// 6. A pull-only upstream
// ---------------------------------------------------------------------------

test('a pull-only upstream: jobs fail once with PERMISSION_DENIED, no retry loop', { timeout: 180_000 }, async (t) => {
  requireBst(1);
  const root = await tempDir(t, 'replicate-denied-');
  const certs = await makeCerts(join(root, 'certs'));
  const project = await writeBstProject(join(root, 'project'));
  const bst = bst1For(root, project);
  assertBstOk(await bst(['build', project.topElement], 'builder', []), 'bst build');
  const refs = await listArtifactRefs(join(root, 'builder', 'artifacts'));

  const upstream = await startServer(t, { repo: join(root, 'upstream-repo'), enablePush: false, logRpcs: true });
  const mirrorDir = join(root, 'mirror');
  const { daemon, pushUrl } = await startMirror(t, mirrorYaml({ dir: mirrorDir, certs, upstream: upstream.url }), mirrorDir);
  assertBstOk(await bst(['push', '--deps', 'all', project.topElement], 'builder', [bst1PushRemote(pushUrl, certs, certs.office)]), 'bst push to the mirror');

  await daemon.pushIdle();
  const status = await daemon.status();
  assert.equal(status.store.names, refs.length, 'the mirror keeps what it was pushed');
  assert.equal(status.push.depth, 0);
  const failed = [...status.push.failed].sort((a, b) => (a.urn < b.urn ? -1 : 1));
  assert.deepEqual(failed.map((f) => f.urn), v1Urns(refs), JSON.stringify(status.push));
  for (const job of failed) {
    assert.equal(job.state, 'failed');
    assert.equal(job.upstream, 'central');
    assert.equal(job.attempts, 1, JSON.stringify(job));
    assert.match(job.lastError ?? '', /PERMISSION_DENIED/, JSON.stringify(job));
  }
  // One attempt per name: Status says allow_updates: false before anything is asked or uploaded
  // (as bst 1.6 asks before it pushes), and no ref is ever set.
  const rpcs = upstream.rpcs().map((r) => `${r.method} ${r.code}`).join('\n');
  assert.deepEqual(codesOf(upstream, 'Status'), Array(refs.length).fill('OK'), rpcs);
  for (const method of ['GetReference', 'FindMissingBlobs', 'BatchUpdateBlobs', 'Write', 'UpdateReference']) assert.deepEqual(codesOf(upstream, method), [], rpcs);
  assert.deepEqual(await listArtifactRefs(upstream.repo), []);
});
