/**
 * The mirror daemon (`Daemon`, in this process) with the real BuildStream clients and reference
 * servers: pull-through of artifacts only the upstream has, for bst 1.6 (ReferenceStorage
 * upstream) and bst 2.8 (Remote Asset upstream), and a watched bst 1.6 project checkout whose
 * changed element gets its new artifact mirrored by the run the watcher triggers.
 * Never skipped: `npm test` installs both BuildStreams (scripts/test-deps.sh).
 */
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { DiskContentStore } from '../src/cas/disk-store.js';
import { type MirrorName, artifactName, normalElementName, refName } from '../src/cas/names.js';
import { parseConfig } from '../src/config/load.js';
import type { RunRecord } from '../src/control/protocol.js';
import { Daemon } from '../src/daemon/daemon.js';
import { silentLogger } from '../src/log.js';
import {
  type Bst2Remote,
  type BstProject,
  type BstResult,
  type BstVersion,
  assertBstOk,
  bst2Available,
  bst2UserConfig,
  bstAvailable,
  bstUserConfig,
  compareTrees,
  listArtifactRefs,
  runBst,
  startReferenceServer,
  writeBst1Wrapper,
  writeBst2Project,
  writeBstProject,
} from './helpers/buildstream.js';
import { tempDir } from './helpers/mirror.js';

type After = { after(fn: () => Promise<void> | void): void };

function requireBst(version: BstVersion): void {
  if (version === 1) assert.ok(bstAvailable(), 'BuildStream 1.6 is required for interop tests: apt-get install -y buildstream');
  else assert.ok(bst2Available(), 'BuildStream 2.8 is required for interop tests: npm test installs it (scripts/test-deps.sh)');
}

async function startServer(t: After, opts: Parameters<typeof startReferenceServer>[0]) {
  const server = await startReferenceServer(opts);
  t.after(() => server.stop());
  return server;
}

/** A daemon on 127.0.0.1:0 with its data in `dir`, stopped after the test. */
async function startDaemon(t: After, dir: string, yaml: string, options: { syncAtStart?: boolean } = {}): Promise<Daemon> {
  const config = parseConfig(`dir: ${dir}\nlisten: ["127.0.0.1:0"]\nlog-level: silent\n${yaml}`, join(dir, 'mirror.yaml'));
  const daemon = await Daemon.start(config, { log: silentLogger(), ...options });
  t.after(() => daemon.stop());
  return daemon;
}

function mirrorUrl(daemon: Daemon): string {
  const address = daemon.addresses[0];
  assert.ok(address, 'the daemon listens');
  return `http://${address}`;
}

/** Resolves with the first run record (from now on) that `match` accepts. */
function nextRun(daemon: Daemon, match: (r: RunRecord) => boolean): Promise<RunRecord> {
  return new Promise((resolve) => daemon.onRunEnd((r) => match(r) && resolve(r)));
}

/** The record of the start-up run, whether it has ended already or not. */
async function startupRun(daemon: Daemon): Promise<RunRecord> {
  const isStartup = (r: RunRecord): boolean => r.triggers.some((x) => x.kind === 'startup');
  const next = nextRun(daemon, isStartup);
  return (await daemon.status()).runs.find(isStartup) ?? next;
}

/** A bst 1.6 runner for one project: each call writes a user config with `remotes` and its caches in `<root>/<cache>`. */
function bst1For(root: string, project: BstProject) {
  let configs = 0;
  return async (args: string[], cache: string, remotes: { url: string; push: boolean }[]): Promise<BstResult> => {
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

/** Artifact names `PROJECT/<normal name>/<full key>` from `bst show` output in the `'%{name} %{full-key}'` format. */
function shownNames(show: BstResult, project: BstProject): string[] {
  assertBstOk(show, 'bst show');
  const names = show.stdout
    .trim()
    .split('\n')
    .map((line) => {
      const [element = '', key = ''] = line.trim().split(' ');
      assert.match(key, /^[0-9a-f]{64}$/, line);
      return `${project.projectName}/${normalElementName(element)}/${key}`;
    });
  assert.equal(names.length, project.elements.length, show.stdout);
  return names;
}

const SHOW = ['show', '--deps', 'all', '--format', '%{name} %{full-key}'];

/** The URNs of the names a stopped daemon's store holds, sorted. */
async function storedUrns(dir: string): Promise<string[]> {
  const store = await DiskContentStore.open(dir, silentLogger(), { create: false });
  try {
    const urns: string[] = [];
    for await (const [urn] of store.names()) urns.push(urn);
    return urns.sort();
  } finally {
    await store.close();
  }
}

const urnsOf = (names: string[], kind: (name: string) => MirrorName): string[] => names.map((n) => kind(n).urn).sort();

test('daemon interop: bst 1.6 pulls through the mirror an artifact only the upstream has', { timeout: 300_000 }, async (t) => {
  requireBst(1);
  const root = await tempDir(t, 'daemon-interop-16-');
  const project = await writeBstProject(join(root, 'project'));
  const bst = bst1For(root, project);
  const upstream = await startServer(t, { repo: join(root, 'upstream-repo'), enablePush: true, logRpcs: true });
  assertBstOk(await bst(['build', project.topElement], 'builder', []), 'bst build');
  assertBstOk(await bst(['push', '--deps', 'all', project.topElement], 'builder', [{ url: upstream.url, push: true }]), 'bst push');
  assert.equal((await listArtifactRefs(upstream.repo)).length, project.elements.length + 1, 'the upstream holds strong and weak refs');
  const names = shownNames(await bst([...SHOW, project.topElement], 'builder', []), project);

  const mirrorDir = join(root, 'mirror');
  const daemon = await startDaemon(t, mirrorDir, `upstreams:\n  - url: ${upstream.url}\nsync:\n  on-miss: fetch\n  miss-wait: 30s\n`, { syncAtStart: false });
  assert.equal((await daemon.status()).store.names, 0, 'the mirror starts empty');
  const rpcsBefore = upstream.rpcs().length;

  // A fresh cache whose only artifact remote is the mirror.
  const mirror = [{ url: mirrorUrl(daemon), push: false }];
  const pull = await bst(['pull', '--deps', 'all', project.topElement], 'puller', mirror);
  assertBstOk(pull, 'bst pull through the mirror');
  assert.equal(pull.stderr.match(/Pulled artifact/g)?.length, project.elements.length, pull.stderr);
  const checkout = join(root, 'checkout');
  assertBstOk(await bst(['checkout', project.topElement, checkout], 'puller', mirror), 'bst checkout');
  assert.deepEqual(await compareTrees(project.expectedDir, checkout), [], 'identical files, modes and symlinks');

  await daemon.onIdle();
  const status = await daemon.status();
  assert.equal(status.store.names, project.elements.length, 'the mirror now holds one name per element');
  assert.equal(status.misses.total, 0, `mirrored misses are settled: ${JSON.stringify(status.misses.recent)}`);
  assert.equal(status.runs.length, 0, 'no sync run: every name came through pull-through');
  assert.equal(status.daemon?.pullThroughInFlight, 0);

  // Each name was resolved upstream once (ReferenceStorage logs no keys: four distinct names held, four lookups).
  const lookups = upstream.rpcs().slice(rpcsBefore).filter((c) => c.method.endsWith('/GetReference'));
  assert.deepEqual(lookups.map((c) => c.code), Array(project.elements.length).fill('OK'), JSON.stringify(lookups));

  await daemon.stop();
  assert.deepEqual(await storedUrns(mirrorDir), urnsOf(names, refName), 'the strong refs bst show prints');
  assert.doesNotMatch(upstream.stderr(), /Traceback/, upstream.stderr());
});

test('daemon interop: bst 2.8 pulls through the mirror an artifact only the upstream has', { timeout: 300_000 }, async (t) => {
  requireBst(2);
  const root = await tempDir(t, 'daemon-interop-28-');
  const project = await writeBst2Project(join(root, 'project'));
  const bst2 = bst2For(root, project);
  const upstream = await startServer(t, { bst: 2, repo: join(root, 'upstream-repo'), enablePush: true, logRpcs: true });
  // bst 2.8 pushes by itself when its remote has push: true.
  const build = await bst2(['build', project.topElement], 'builder', [{ url: upstream.url, push: true }]);
  assertBstOk(build, 'bst build with push');
  assert.match(build.stderr, /Push Queue:\s+processed 4, skipped 0, failed 0/, build.stderr);
  const names = shownNames(await bst2([...SHOW, project.topElement], 'builder', []), project);

  const mirrorDir = join(root, 'mirror');
  const daemon = await startDaemon(t, mirrorDir, `upstreams:\n  - url: ${upstream.url}\nsync:\n  on-miss: fetch\n  miss-wait: 30s\n`, { syncAtStart: false });
  const rpcsBefore = upstream.rpcs().length;

  const mirror: Bst2Remote[] = [{ url: mirrorUrl(daemon), push: false }];
  const pull = await bst2(['artifact', 'pull', '--deps', 'all', project.topElement], 'puller', mirror);
  assertBstOk(pull, 'bst artifact pull through the mirror');
  assert.equal(pull.stderr.match(/INFO\s+Pulled artifact/g)?.length, project.elements.length, pull.stderr);
  const checkout = join(root, 'checkout');
  assertBstOk(await bst2(['artifact', 'checkout', '--directory', checkout, project.topElement], 'puller', mirror), 'bst artifact checkout');
  assert.deepEqual(await compareTrees(project.expectedDir, checkout), [], 'identical files, modes and symlinks');

  await daemon.onIdle();
  const status = await daemon.status();
  assert.equal(status.store.names, project.elements.length, 'the mirror now holds one name per element');
  assert.equal(status.misses.total, 0, `mirrored misses are settled: ${JSON.stringify(status.misses.recent)}`);
  assert.equal(status.runs.length, 0, 'no sync run: every name came through pull-through');

  // The upstream was asked for each artifact exactly once, by name.
  const asked = upstream
    .rpcs()
    .slice(rpcsBefore)
    .filter((c) => c.method.endsWith('/FetchBlob'));
  assert.deepEqual(asked.map((c) => c.code), Array(project.elements.length).fill('OK'), JSON.stringify(asked));
  assert.deepEqual(asked.flatMap((c) => c.uris).sort(), urnsOf(names, artifactName));

  await daemon.stop();
  assert.deepEqual(await storedUrns(mirrorDir), urnsOf(names, artifactName), 'the artifacts bst show names');
});

test('daemon interop: a changed element in a watched bst 1.6 project checkout gets its new artifact mirrored', { timeout: 300_000 }, async (t) => {
  requireBst(1);
  const root = await tempDir(t, 'daemon-interop-watch-');
  // Two identical checkouts: the daemon watches one; builds happen in the other, so the
  // upstream already has a changed element's artifact when the watched checkout changes.
  const watched = await writeBstProject(join(root, 'watched'));
  const work = await writeBstProject(join(root, 'work'));
  const bst = bst1For(root, work);
  const upstream = await startServer(t, { repo: join(root, 'upstream-repo'), enablePush: true });
  const up = [{ url: upstream.url, push: true }];
  assertBstOk(await bst(['build', work.topElement], 'builder', []), 'bst build');
  assertBstOk(await bst(['push', '--deps', 'all', work.topElement], 'builder', up), 'bst push');
  const before = shownNames(await bst([...SHOW, work.topElement], 'builder', []), work);

  // The daemon's `bst show` runs through a wrapper with its own user config and home.
  const daemonBstConfig = join(root, 'daemon-bst.conf');
  await writeFile(daemonBstConfig, bstUserConfig({ root: join(root, 'daemon-bst'), remotes: [], projectName: watched.projectName }));
  const wrapper = await writeBst1Wrapper(join(root, 'bst-wrapper'), { config: daemonBstConfig, home: join(root, 'daemon-home') });
  const mirrorDir = join(root, 'mirror');
  const yaml = [
    'upstreams:',
    `  - url: ${upstream.url}`,
    'sync:',
    // Off: a pull from the mirror below proves what the runs mirrored, not what a miss fetched.
    '  on-miss: off',
    '  watch-debounce: 500ms',
    '  projects:',
    `    - path: ${JSON.stringify(watched.projectDir)}`,
    `      targets: [${watched.topElement}]`,
    `      bst: ${JSON.stringify(wrapper)}`,
    '',
  ].join('\n');
  const daemon = await startDaemon(t, mirrorDir, yaml, { syncAtStart: true });
  const startup = await startupRun(daemon);
  assert.equal(startup.outcome, 'ok', JSON.stringify(startup));
  assert.deepEqual(startup.names, { mirrored: before.length, present: 0, missing: 0, failed: 0 }, JSON.stringify(startup));
  await daemon.onIdle();

  // Change base/extra.bst (public data is part of its key, so extra, compose and top get new
  // keys), build and push it from the work checkout, then bring the change to the watched one.
  const extraBst = join(work.projectDir, 'elements', 'base', 'extra.bst');
  await writeFile(extraBst, `${await readFile(extraBst, 'utf8')}public:\n  harness:\n    revision: '2'\n`);
  assertBstOk(await bst(['build', work.topElement], 'builder', []), 'bst build of the changed project');
  assertBstOk(await bst(['push', '--deps', 'all', work.topElement], 'builder', up), 'bst push of the changed project');
  const after = shownNames(await bst([...SHOW, work.topElement], 'builder', []), work);
  const changed = after.filter((n) => !before.includes(n));
  assert.equal(changed.length, 3, `extra, compose and top have new keys: ${after.join(' ')}`);

  const fromProject = nextRun(daemon, (r) => r.triggers.some((x) => x.kind === 'project'));
  await writeFile(join(watched.projectDir, 'elements', 'base', 'extra.bst'), await readFile(extraBst));
  const run = await fromProject;
  assert.equal(run.outcome, 'ok', JSON.stringify(run));
  assert.deepEqual(run.names, { mirrored: changed.length, present: before.length - changed.length, missing: 0, failed: 0 }, JSON.stringify(run));
  await daemon.onIdle();
  const status = await daemon.status();
  assert.equal(status.store.names, before.length + changed.length);

  // The changed project pulls from the mirror alone (misses fetch nothing here).
  const pull = await bst(['pull', '--deps', 'all', work.topElement], 'puller', [{ url: mirrorUrl(daemon), push: false }]);
  assertBstOk(pull, 'bst pull of the changed project from the mirror');
  assert.equal(pull.stderr.match(/Pulled artifact/g)?.length, work.elements.length, pull.stderr);

  await daemon.stop();
  assert.deepEqual(await storedUrns(mirrorDir), urnsOf([...before, ...changed], refName), 'the old and the new strong refs');
});
