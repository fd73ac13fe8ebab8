/**
 * Interop with the real BuildStream 1.6 (Debian's `bst` and its reference server): build a
 * project, push it to the reference server, `sync` it into the mirror with the CLI, stop the
 * reference server, `serve` the mirror with the CLI, and `bst pull` + `bst checkout` from the
 * mirror into an empty cache. Never skipped: CI installs BuildStream.
 */
import assert from 'node:assert/strict';
import { readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import {
  type BstResult,
  assertBstOk,
  bstAvailable,
  bstUserConfig,
  compareTrees,
  listArtifactRefs,
  runBst,
  startReferenceServer,
  writeBstProject,
} from './helpers/buildstream.js';
import { runCli, startServeProcess, tempDir } from './helpers/mirror.js';

async function countFiles(dir: string): Promise<number> {
  let n = 0;
  for (const entry of await readdir(dir, { recursive: true, withFileTypes: true })) if (entry.isFile()) n += 1;
  return n;
}

test('bst 1.6 pulls from the mirror what it pushed to the reference server; bst push to the mirror is refused', { timeout: 300_000 }, async (t) => {
  assert.ok(bstAvailable(), 'BuildStream 1.6 is required for interop tests: apt-get install -y buildstream');
  const root = await tempDir(t, 'bst-interop-');
  const project = await writeBstProject(join(root, 'project'));
  const conf = async (name: string, remotes: { url: string; push: boolean }[], cacheRoot: string): Promise<string> => {
    const path = join(root, name);
    await writeFile(path, bstUserConfig({ root: cacheRoot, remotes, projectName: project.projectName }));
    return path;
  };
  const bst = (args: string[], config: string): Promise<BstResult> => runBst(args, { cwd: project.projectDir, config });

  // Build, and push to the real 1.x server (ReferenceStorage dialect).
  const reference = await startReferenceServer({ repo: join(root, 'reference-repo'), enablePush: true });
  let referenceStopped = false;
  t.after(async () => {
    if (!referenceStopped) await reference.stop();
  });
  const builder = join(root, 'builder');
  assertBstOk(await bst(['build', project.topElement], await conf('build.conf', [], builder)), 'bst build');
  assertBstOk(await bst(['push', '--deps', 'all', project.topElement], await conf('push.conf', [{ url: reference.url, push: true }], builder)), 'bst push');
  const refs = await listArtifactRefs(join(builder, 'artifacts'));
  assert.equal(refs.length, project.elements.length + 1, 'strong and weak refs');

  // Sync every ref (strong and weak) into the mirror with the CLI, from a refs file.
  const mirrorDir = join(root, 'mirror');
  const refsFile = join(root, 'wanted.txt');
  await writeFile(refsFile, `# refs pushed by the build\n\n${refs.join('\n')}\n`);
  const sync = await runCli(['sync', '--dir', mirrorDir, '--upstream', reference.url, '--refs-file', refsFile]);
  assert.equal(sync.code, 0, sync.stdout + sync.stderr);
  assert.match(sync.stdout, new RegExp(`mirrored ${refs.length}, already present 0, missing upstream 0, failed 0`));
  const again = await runCli(['sync', '--dir', mirrorDir, '--upstream', reference.url, '--refs-file', refsFile]);
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stdout, new RegExp(`mirrored 0, already present ${refs.length}`));
  assert.match(again.stdout, /transferred 0 blobs/);

  // The mirror alone serves the pull: the reference server is gone.
  await reference.stop();
  referenceStopped = true;
  const serve = await startServeProcess(t, mirrorDir);
  const mirrorUrl = `http://${serve.address}`;
  const puller = join(root, 'puller');
  const pullConf = await conf('pull.conf', [{ url: mirrorUrl, push: false }], puller);
  const pull = await bst(['pull', '--deps', 'all', project.topElement], pullConf);
  assertBstOk(pull, 'bst pull from the mirror');
  assert.equal(pull.stderr.match(/Pulled artifact/g)?.length, project.elements.length, pull.stderr);
  const checkout = join(root, 'checkout');
  assertBstOk(await bst(['checkout', project.topElement, checkout], pullConf), 'bst checkout');
  assert.deepEqual(await compareTrees(project.expectedDir, checkout), [], 'identical files, modes and symlinks');

  // `bst push` to the mirror fails clearly and leaves the store as it was.
  const objectsBefore = await countFiles(join(mirrorDir, 'cas'));
  const rebuilt = join(root, 'rebuilt');
  assertBstOk(await bst(['build', project.topElement], await conf('build2.conf', [], rebuilt)), 'second bst build');
  const push = await bst(['push', '--deps', 'all', project.topElement], await conf('push-mirror.conf', [{ url: mirrorUrl, push: true }], rebuilt));
  t.diagnostic(`bst push to the mirror: ${push.stderr.split('\n').filter((l) => /remote|push/i.test(l)).slice(0, 4).join(' | ')}`);
  assert.notEqual(push.code, 0, 'bst push to the pull-only mirror must fail');
  assert.match(push.stderr, /Failed to initialize remote http:\/\/[^:]+:\d+: Remote Asset server does not allow push/, push.stderr);
  assert.equal(await countFiles(join(mirrorDir, 'cas')), objectsBefore, 'no object written by the refused push');
  assert.equal(await serve.stop(), 0, 'serve exits cleanly on SIGTERM');
});
