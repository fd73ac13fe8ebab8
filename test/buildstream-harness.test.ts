/**
 * Proves the BuildStream 1.6 interop harness (test/helpers/buildstream.ts) against the
 * real tools only: Debian's `bst` 1.6.8 and the 1.6 reference artifact server. No mirror
 * code is involved. Needs BuildStream installed (`apt-get install buildstream`); fails without it.
 *
 * Set BST_HARNESS_KEEP_TMP=1 to keep the temp directory for inspection.
 */
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readFile, rm, stat, symlink, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import {
  assertBstOk,
  bstAvailable,
  bstUserConfig,
  compareTrees,
  listArtifactRefs,
  runBst,
  startReferenceServer,
  writeBstProject,
  type BstResult,
  type ReferenceServer,
} from './helpers/buildstream.js';

/** Interop tests never skip: CI installs BuildStream (.ci/run), and a missing bst is a failure. */
function requireBst(): void {
  assert.ok(bstAvailable(), 'BuildStream 1.6 is required for interop tests: apt-get install -y buildstream');
}

type TestContext = { after(fn: () => Promise<void>): void };

/** Cleanups run last-in first-out after the test (servers stop before their dirs go). */
function deferrer(t: TestContext): (fn: () => Promise<void>) => void {
  const stack: Array<() => Promise<void>> = [];
  t.after(async () => {
    for (const fn of stack.reverse()) await fn();
  });
  return (fn) => stack.push(fn);
}

async function tempDir(defer: (fn: () => Promise<void>) => void, prefix: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  defer(async () => {
    if (process.env['BST_HARNESS_KEEP_TMP']) console.log(`kept ${dir}`);
    else await rm(dir, { recursive: true, force: true });
  });
  return dir;
}

/** `project/element/key` -> { element: [keys] } */
function refsByElement(refs: string[]): Map<string, string[]> {
  const byElement = new Map<string, string[]>();
  for (const ref of refs) {
    const [project, element, key, ...rest] = ref.split('/');
    assert.ok(project && element && key && rest.length === 0, `malformed ref ${ref}`);
    assert.match(key, /^[0-9a-f]{64}$/, `ref key of ${ref}`);
    byElement.set(element, [...(byElement.get(element) ?? []), key]);
  }
  return byElement;
}

test('compareTrees reports every kind of difference and nothing for identical trees', async (t) => {
  const root = await tempDir(deferrer(t), 'compare-trees-');
  const make = async (dir: string): Promise<void> => {
    await mkdir(join(dir, 'd/e'), { recursive: true });
    await writeFile(join(dir, 'd/e/f.txt'), 'same\n');
    await writeFile(join(dir, 'exe'), '#!/bin/sh\n');
    await chmod(join(dir, 'exe'), 0o755);
    await writeFile(join(dir, 'content'), 'aaaa');
    await writeFile(join(dir, 'size'), 'x');
    await symlink('d/e/f.txt', join(dir, 'link'));
    await symlink('d', join(dir, 'dirlink'));
    await writeFile(join(dir, 'kind'), 'file');
  };
  const a = join(root, 'a');
  const b = join(root, 'b');
  await make(a);
  await make(b);
  assert.deepEqual(await compareTrees(a, b), []);

  await chmod(join(b, 'exe'), 0o644);
  await writeFile(join(b, 'content'), 'aaab');
  await writeFile(join(b, 'size'), 'xy');
  await rm(join(b, 'link'));
  await symlink('d/e', join(b, 'link'));
  await rm(join(b, 'kind'));
  await mkdir(join(b, 'kind'));
  await writeFile(join(b, 'kind', 'child'), 'not reported separately');
  await rm(join(b, 'd/e'), { recursive: true });
  await writeFile(join(b, 'only-b'), '');

  assert.deepEqual(await compareTrees(a, b), [
    'content: content differs',
    'd/e: only in a (dir)',
    'exe: executable bit differs (a: true, b: false)',
    'kind: type differs (a: file, b: dir)',
    'link: symlink target differs (a: d/e/f.txt, b: d/e)',
    'only-b: only in b (file)',
    'size: size differs (a: 1, b: 2)',
  ]);
});

test('writeBstProject writes the promised tree', async (t) => {
  const root = await tempDir(deferrer(t), 'bst-project-');
  const project = await writeBstProject(join(root, 'project'), 'layout');
  assert.deepEqual(project.elements, ['base/tree.bst', 'base/extra.bst', 'compose.bst', 'top.bst']);
  assert.match(await readFile(join(project.projectDir, 'project.conf'), 'utf8'), /^name: layout$/m);

  const byPath = new Map(project.expectedFiles.map((e) => [e.path, e]));
  const sizes = project.expectedFiles.flatMap((e) => (e.type === 'file' ? [e.size] : []));
  for (const size of [0, 1024 * 1024 - 1, 1024 * 1024 + 1]) assert.ok(sizes.includes(size), `a file of ${size} bytes`);
  assert.ok(sizes.some((s) => s > 5 * 1024 * 1024), 'a ~5 MiB file');
  assert.ok(project.expectedFiles.some((e) => e.type === 'file' && e.executable), 'an executable');
  assert.equal(byPath.get('usr/share/harness/level1/level2/level3')?.type, 'dir');
  assert.equal(byPath.get('usr/share/harness/level-link')?.type, 'symlink');
  assert.equal(byPath.get('usr/lib/harness/deep-link.txt')?.type, 'symlink');
  // the symlinks resolve inside the tree
  assert.ok((await stat(join(project.expectedDir, 'usr/share/harness/level-link'))).isDirectory());
  assert.ok((await stat(join(project.expectedDir, 'usr/lib/harness/deep-link.txt'))).isFile());
  // deterministic: a second project is byte-identical
  const again = await writeBstProject(join(root, 'again'), 'layout');
  assert.deepEqual(again.expectedFiles, project.expectedFiles);
  assert.deepEqual(await compareTrees(project.expectedDir, again.expectedDir), []);
});

test('startReferenceServer reports the server stderr when it dies at start-up', async (t) => {
  requireBst();
  const root = await tempDir(deferrer(t), 'casserver-bad-');
  await writeFile(join(root, 'cas'), 'a file where the server wants a directory');
  await assert.rejects(startReferenceServer({ repo: root, enablePush: false }), (err: Error) => {
    assert.match(err.message, /exited before listening/);
    assert.match(err.message, /NotADirectoryError|Not a directory/);
    return true;
  });
});

test('bst 1.6: build, push to the reference server, pull into an empty cache, checkout', { timeout: 300_000 }, async (t) => {
  requireBst();
  const defer = deferrer(t);
  const root = await tempDir(defer, 'bst-harness-');
  const project = await writeBstProject(join(root, 'project'));
  const server: ReferenceServer = await startReferenceServer({
    repo: join(root, 'server-repo'),
    enablePush: true,
    logRpcs: true,
  });
  defer(() => server.stop());
  assert.match(server.url, /^http:\/\/127\.0\.0\.1:\d+$/);

  const pusherRoot = join(root, 'pusher');
  const pullerRoot = join(root, 'puller');
  const conf = async (name: string, text: string): Promise<string> => {
    const path = join(root, name);
    await writeFile(path, text);
    return path;
  };
  // Build without any remote (otherwise `bst build` already pushes), then push with one.
  const buildConf = await conf('build.conf', bstUserConfig({ root: pusherRoot, remotes: [], projectName: project.projectName }));
  const pushConf = await conf(
    'push.conf',
    bstUserConfig({ root: pusherRoot, remotes: [{ url: server.url, push: true }], projectName: project.projectName }),
  );
  const pullConf = await conf(
    'pull.conf',
    bstUserConfig({ root: pullerRoot, remotes: [{ url: server.url, push: false }], projectName: project.projectName }),
  );
  const bst = (args: string[], config: string): Promise<BstResult> => runBst(args, { cwd: project.projectDir, config });

  // --- build ---------------------------------------------------------------------------
  assertBstOk(await bst(['build', project.topElement], buildConf), 'bst build');
  const builtRefs = await listArtifactRefs(join(pusherRoot, 'artifacts'));
  const byElement = refsByElement(builtRefs);
  // import and compose: weak key == strong key (one ref); stack: strong and weak differ (two refs)
  assert.deepEqual(
    [...byElement.entries()].map(([element, keys]) => [element, keys.length]).sort(),
    [['base-extra', 1], ['base-tree', 1], ['compose', 1], ['top', 2]],
  );
  assert.ok(builtRefs.every((ref) => ref.startsWith(`${project.projectName}/`)));
  assert.deepEqual(await listArtifactRefs(server.repo), [], 'nothing reaches the server before bst push');

  // --- push ----------------------------------------------------------------------------
  const push = await bst(['push', '--deps', 'all', project.topElement], pushConf);
  assertBstOk(push, 'bst push');
  assert.equal(push.stderr.match(/Pushed artifact/g)?.length, project.elements.length, push.stderr);
  assert.deepEqual(await listArtifactRefs(server.repo), builtRefs, 'server holds every ref, strong and weak');
  for (const ref of builtRefs) {
    // a ref file is a serialized Digest of the artifact root: same tree on both sides
    assert.deepEqual(
      await readFile(join(server.repo, 'cas/refs/heads', ref)),
      await readFile(join(pusherRoot, 'artifacts/cas/refs/heads', ref)),
      `root digest of ${ref}`,
    );
  }
  const rpcsBeforePull = server.rpcs().length;

  // --- pull into an empty cache ----------------------------------------------------------
  assert.deepEqual(await listArtifactRefs(join(pullerRoot, 'artifacts')), []);
  const pull = await bst(['pull', '--deps', 'all', project.topElement], pullConf);
  assertBstOk(pull, 'bst pull');
  assert.equal(pull.stderr.match(/Pulled artifact/g)?.length, project.elements.length, pull.stderr);
  assert.deepEqual(await listArtifactRefs(join(pullerRoot, 'artifacts')), builtRefs, 'puller has every ref');

  const pullRpcs = server.rpcs().slice(rpcsBeforePull);
  const methods = new Set(pullRpcs.map((c) => c.method.split('/').pop()));
  for (const m of ['GetCapabilities', 'Status', 'GetReference', 'BatchReadBlobs', 'Read']) {
    assert.ok(methods.has(m), `pull called ${m} (saw ${[...methods].join(', ')})`);
  }
  for (const m of ['Write', 'BatchUpdateBlobs', 'UpdateReference', 'PushDirectory']) {
    assert.ok(!methods.has(m), `a push: false remote must not see ${m}`);
  }
  // only the strong ref of each element is fetched; the weak ref is linked locally
  assert.equal(pullRpcs.filter((c) => c.method.endsWith('/GetReference') && c.code === 'OK').length, project.elements.length);

  // --- checkout and compare with the original files ----------------------------------------
  const checkoutDir = join(root, 'checkout');
  assertBstOk(await bst(['checkout', project.topElement, checkoutDir], pullConf), 'bst checkout');
  assert.deepEqual(await compareTrees(project.expectedDir, checkoutDir), []);

  // The reference server logged no Python exception along the way.
  assert.doesNotMatch(server.stderr(), /Traceback|Exception/, server.stderr());
});
