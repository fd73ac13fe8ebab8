/**
 * projectNames against the real BuildStream 1.6 (Debian's `bst`) and 2.8 (the venv's): the
 * names it returns are the keys `bst show` prints, as names `parseUserName` accepts, plus for
 * 2.8 the element-sources and single-source names a build caches; junctions, elements of
 * junctioned projects and elements without a key are skipped; errors name the project.
 * Every bst run uses a user config whose caches are in the test's temp dir.
 */
import assert from 'node:assert/strict';
import { appendFile, chmod, mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';

import { URN_PREFIX, parseUserName } from '../src/cas/names.js';
import { isMirrorError } from '../src/errors.js';
import { type ProjectNames, projectNames } from '../src/sync/project-names.js';
import {
  type BstProject,
  type BstVersion,
  assertBstOk,
  bst2Available,
  bst2UserConfig,
  bst2Venv,
  bstAvailable,
  bstUserConfig,
  listBst2ElementSources,
  listBst2SourceProtos,
  runBst,
  writeBst2Project,
  writeBstProject,
} from './helpers/buildstream.js';
import { tempDir } from './helpers/mirror.js';

type After = { after(fn: () => Promise<void> | void): void };

const BST1 = 'bst';
const bst2Command = (): string => join(bst2Venv(), 'bin', 'bst');

function requireBst(version: BstVersion): void {
  if (version === 1) assert.ok(bstAvailable(), 'BuildStream 1.6 is required: apt-get install -y buildstream');
  else assert.ok(bst2Available(), 'BuildStream 2.8 is required: npm test installs it (scripts/test-deps.sh)');
}

interface Setup {
  root: string;
  project: BstProject;
  config: string;
  bst: string;
}

/** A project of `version` with a user config whose caches are under the test's temp dir. */
async function setup(t: After, version: BstVersion, sources: 'local' | 'tar' = 'local'): Promise<Setup> {
  requireBst(version);
  const root = await tempDir(t, `project-names-${version}-`);
  const projectDir = join(root, 'project');
  const project = version === 1 ? await writeBstProject(projectDir) : await writeBst2Project(projectDir, 'harness', { sources });
  const config = join(root, 'user.conf');
  const cache = join(root, 'cache');
  await writeFile(
    config,
    version === 1
      ? bstUserConfig({ root: cache, remotes: [], projectName: project.projectName })
      : bst2UserConfig({ root: cache, projectName: project.projectName }),
  );
  return { root, project, config, bst: version === 1 ? BST1 : bst2Command() };
}

/** `element -> full key` as `bst show` itself prints them. */
async function showKeys(s: Setup, version: BstVersion, targets: string[], extra: string[] = []): Promise<Map<string, string>> {
  const show = await runBst([...extra, 'show', '--deps', 'all', '--format', '%{name} %{full-key}', ...targets], {
    cwd: s.project.projectDir,
    config: s.config,
    bst: version,
  });
  assertBstOk(show, 'bst show');
  return new Map(
    show.stdout
      .trim()
      .split('\n')
      .map((line) => {
        const [element = '', key = ''] = line.trim().split(' ');
        return [element, key] as const;
      }),
  );
}

function artifactNames(result: ProjectNames): string[] {
  return result.names.filter((n) => !n.startsWith(URN_PREFIX));
}

function sourceNames(result: ProjectNames): string[] {
  return result.names.filter((n) => n.startsWith(URN_PREFIX));
}

/** Artifact names equal `PROJECT/<element>/<key>` for exactly the keys bst show printed, and parse as user names. */
function assertMatchesShow(result: ProjectNames, keys: Map<string, string>, project: BstProject): void {
  assert.equal(result.project, project.projectName);
  assert.deepEqual(artifactNames(result), [...keys].map(([element, key]) => `${project.projectName}/${element}/${key}`));
  assert.deepEqual([...keys.keys()].sort(), [...project.elements].sort());
  for (const name of result.names) {
    const parsed = parseUserName(name);
    if (name.startsWith(URN_PREFIX)) {
      assert.equal(parsed.length, 1);
      assert.match(parsed[0]?.kind ?? '', /^(element-sources|source)$/);
    } else {
      assert.equal(parsed[0]?.kind, 'artifact');
      assert.equal(parsed[1]?.kind, 'ref');
      assert.match(parsed[0]?.key ?? '', /^harness\/(base-tree|base-extra|compose|top)\/[0-9a-f]{64}$/);
    }
  }
  assert.equal(new Set(result.names).size, result.names.length, 'no duplicates');
}

/**
 * Adds `j.bst`, a junction to a local subproject `subproj` with one import `s.bst`,
 * `noref.bst` (a tar source without a ref) and `all.bst`, a stack of top.bst, j.bst:s.bst and noref.bst.
 */
async function addJunctionAndNoRef(s: Setup, version: BstVersion): Promise<void> {
  const dir = s.project.projectDir;
  await mkdir(join(dir, 'sub', 'elements'), { recursive: true });
  await mkdir(join(dir, 'sub', 'files', 's'), { recursive: true });
  await writeFile(join(dir, 'sub', 'files', 's', 'x'), 'from the subproject\n');
  await writeFile(
    join(dir, 'sub', 'project.conf'),
    `name: subproj\n${version === 1 ? 'format-version: 12' : 'min-version: 2.0'}\nelement-path: elements\n`,
  );
  await writeFile(join(dir, 'sub', 'elements', 's.bst'), 'kind: import\nsources:\n- kind: local\n  path: files/s\n');
  await writeFile(join(dir, 'elements', 'j.bst'), 'kind: junction\nsources:\n- kind: local\n  path: sub\n');
  await writeFile(join(dir, 'elements', 'noref.bst'), 'kind: import\nsources:\n- kind: tar\n  url: file:///nonexistent/x.tar\n');
  await writeFile(
    join(dir, 'elements', 'all.bst'),
    'kind: stack\ndepends:\n- top.bst\n- junction: j.bst\n  filename: s.bst\n- noref.bst\n',
  );
}

function assertSkippedJunctionAndNoRef(result: ProjectNames, project: BstProject): void {
  const skipped = new Map(result.skipped.map((s) => [s.element, s.reason]));
  assert.deepEqual([...skipped.keys()].sort(), ['all.bst', 'j.bst', 'j.bst:s.bst', 'noref.bst']);
  assert.match(skipped.get('j.bst') ?? '', /^junction/);
  assert.match(skipped.get('j.bst:s.bst') ?? '', /junction 'j\.bst'/);
  assert.match(skipped.get('noref.bst') ?? '', /sources have no ref/);
  assert.match(skipped.get('all.bst') ?? '', /a dependency's sources have no ref/);
  assert.deepEqual(
    artifactNames(result).map((n) => n.split('/').slice(1, -1).join('/')).sort(),
    [...project.elements].sort(),
    'only the elements of the project itself with a key',
  );
}

test('bst 1.6: the keys bst show prints, as names parseUserName accepts; an element change changes its key', { timeout: 120_000 }, async (t) => {
  const s = await setup(t, 1);
  const spec = { path: s.project.projectDir, targets: [s.project.topElement], bst: s.bst, config: s.config };
  const started = Date.now();
  const result = await projectNames(spec);
  t.diagnostic(`projectNames (bst 1.6, ${s.project.elements.length} elements): ${Date.now() - started} ms`);
  assert.equal(result.bstVersion, 1);
  assert.deepEqual(result.skipped, []);
  assert.deepEqual(sourceNames(result), [], 'no source names for 1.x');
  assertMatchesShow(result, await showKeys(s, 1, [s.project.topElement]), s.project);

  // environment is part of the cache key: top.bst's key changes, its dependencies' do not.
  await appendFile(join(s.project.projectDir, 'elements', 'top.bst'), 'environment:\n  MIRROR_TEST: changed\n');
  const changed = await projectNames(spec);
  const keyOf = (r: ProjectNames, element: string): string | undefined => r.names.find((n) => n.startsWith(`harness/${element}/`));
  assert.notEqual(keyOf(changed, 'top.bst'), keyOf(result, 'top.bst'));
  for (const element of ['base/tree.bst', 'base/extra.bst', 'compose.bst']) assert.equal(keyOf(changed, element), keyOf(result, element));
  assertMatchesShow(changed, await showKeys(s, 1, [s.project.topElement]), s.project);
});

test('bst 1.6: junctions, elements of junctioned projects and elements without a key are skipped', { timeout: 120_000 }, async (t) => {
  const s = await setup(t, 1);
  await addJunctionAndNoRef(s, 1);
  const result = await projectNames({ path: s.project.projectDir, targets: ['all.bst', 'j.bst'], bst: s.bst, config: s.config });
  assert.equal(result.bstVersion, 1);
  assertSkippedJunctionAndNoRef(result, s.project);
  const keys = await showKeys(s, 1, [s.project.topElement]);
  assert.deepEqual(artifactNames(result), [...keys].map(([element, key]) => `harness/${element}/${key}`));
});

test('bst 2.8: the keys bst show prints, and the element-sources and source names a build caches', { timeout: 300_000 }, async (t) => {
  const s = await setup(t, 2, 'tar');
  const spec = { path: s.project.projectDir, targets: [s.project.topElement], bst: s.bst, config: s.config };
  const started = Date.now();
  const result = await projectNames(spec);
  t.diagnostic(`projectNames (bst 2.8, ${s.project.elements.length} elements): ${Date.now() - started} ms`);
  assert.equal(result.bstVersion, 2);
  assert.deepEqual(result.skipped, []);
  assertMatchesShow(result, await showKeys(s, 2, [s.project.topElement]), s.project);

  // What a build stores in the local cache is exactly what projectNames named beforehand.
  const build = await runBst(['build', s.project.topElement], { cwd: s.project.projectDir, config: s.config, bst: 2 });
  assertBstOk(build, 'bst build');
  const cachedir = join(s.root, 'cache');
  const elementSources = await listBst2ElementSources(cachedir);
  const single = await listBst2SourceProtos(cachedir);
  assert.equal(elementSources.length, 3, 'two imports and the shared key of "no sources"');
  assert.equal(single.length, 2, 'two tar sources');
  assert.deepEqual(sourceNames(result).sort(), [...elementSources, ...single].map((k) => `${URN_PREFIX}source:${k}`).sort());
  assert.deepEqual(await projectNames(spec), result, 'the same after the build');

  // A changed tar ref changes the element's key, its element-sources key and its source name.
  const treeFile = join(s.project.projectDir, 'elements', 'base', 'tree.bst');
  const tree = await readFile(treeFile, 'utf8');
  await writeFile(treeFile, tree.replace(/ref: [0-9a-f]{64}/, `ref: ${'0'.repeat(64)}`));
  const changed = await projectNames(spec);
  const keyOf = (r: ProjectNames, element: string): string | undefined => r.names.find((n) => n.startsWith(`harness/${element}/`));
  assert.notEqual(keyOf(changed, 'base/tree.bst'), keyOf(result, 'base/tree.bst'));
  assert.equal(keyOf(changed, 'base/extra.bst'), keyOf(result, 'base/extra.bst'));
  const gone = sourceNames(result).filter((n) => !changed.names.includes(n));
  assert.equal(gone.length, 2, `the tree's element-sources and tar source names changed: ${gone.join(' ')}`);
  assertMatchesShow(changed, await showKeys(s, 2, [s.project.topElement]), s.project);
});

test('bst 2.8: junctions and keyless elements are skipped; sources with a key are still named', { timeout: 120_000 }, async (t) => {
  const s = await setup(t, 2);
  await addJunctionAndNoRef(s, 2);
  const result = await projectNames({ path: s.project.projectDir, targets: ['all.bst', 'j.bst'], bst: s.bst, config: s.config });
  assert.equal(result.bstVersion, 2);
  assertSkippedJunctionAndNoRef(result, s.project);
  const keys = await showKeys(s, 2, [s.project.topElement]);
  assert.deepEqual(artifactNames(result), [...keys].map(([element, key]) => `harness/${element}/${key}`));
  // The junction and the subproject's import have local sources: their names are there; noref.bst has none.
  assert.equal(sourceNames(result).filter((n) => n.includes(':source:local/')).length, 4, result.names.join('\n'));
});

test('bst 2.8: project options are passed to bst and change keys', { timeout: 120_000 }, async (t) => {
  const s = await setup(t, 2);
  await appendFile(
    join(s.project.projectDir, 'project.conf'),
    'options:\n  mirror_test:\n    type: bool\n    description: for the test\n    default: False\n',
  );
  // Public data is part of every element's key (environment only of elements that run commands, in 2.x).
  await appendFile(join(s.project.projectDir, 'elements', 'top.bst'), "(?):\n- mirror_test:\n    public:\n      mirror-test:\n        value: 'on'\n");
  const base = { path: s.project.projectDir, targets: [s.project.topElement], bst: s.bst, config: s.config };
  const off = await projectNames(base);
  const on = await projectNames({ ...base, options: { mirror_test: 'True' } });
  assertMatchesShow(on, await showKeys(s, 2, [s.project.topElement], ['-o', 'mirror_test', 'True']), s.project);
  assert.notDeepEqual(artifactNames(on), artifactNames(off));
  assert.deepEqual(artifactNames(on).slice(0, 3), artifactNames(off).slice(0, 3), 'only top.bst changes');
});

function configInvalid(pattern: RegExp): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.ok(isMirrorError(err, 'CONFIG_INVALID'), `expected CONFIG_INVALID, got ${String(err)}`);
    assert.match(err.message, pattern);
    return true;
  };
}

test('errors: missing project, missing project.conf, missing bst, failing bst show, a bst wrapper for 2.x, timeout, abort', { timeout: 120_000 }, async (t) => {
  const s1 = await setup(t, 1);
  const s2 = await setup(t, 2);
  const dir = s1.project.projectDir;
  const missing = join(s1.root, 'no-such-project');
  await assert.rejects(projectNames({ path: missing, targets: ['top.bst'], bst: BST1 }), configInvalid(new RegExp(`${missing} does not exist`)));
  const empty = join(s1.root, 'empty');
  await mkdir(empty);
  await assert.rejects(projectNames({ path: empty, targets: ['top.bst'], bst: BST1 }), configInvalid(new RegExp(`${empty} has no readable project.conf`)));

  await assert.rejects(
    projectNames({ path: dir, targets: ['top.bst'], bst: 'bst-cache-mirror-no-such-bst' }),
    configInvalid(new RegExp(`'bst-cache-mirror-no-such-bst' not found \\(project ${dir}\\)`)),
  );
  const absent = join(s1.root, 'bin', 'bst');
  await assert.rejects(projectNames({ path: dir, targets: ['top.bst'], bst: absent }), configInvalid(/not found/));

  for (const s of [s1, s2]) {
    await assert.rejects(
      projectNames({ path: s.project.projectDir, targets: ['no-such-element.bst'], bst: s.bst, config: s.config }),
      configInvalid(new RegExp(`^bst show failed in ${s.project.projectDir} \\(exit code \\d+\\):\\n[^]*no-such-element\\.bst`)),
    );
  }

  await assert.rejects(projectNames({ path: dir, targets: [], bst: BST1, config: s1.config }), configInvalid(/bst show listed no elements/));

  const wrapper = join(s2.root, 'bst-wrapper');
  await writeFile(wrapper, `#!/bin/sh\nexec ${JSON.stringify(bst2Command())} "$@"\n`);
  await chmod(wrapper, 0o755);
  await assert.rejects(
    projectNames({ path: s2.project.projectDir, targets: ['top.bst'], bst: wrapper, config: s2.config }),
    configInvalid(/is not a python script/),
  );

  await assert.rejects(
    projectNames({ path: dir, targets: ['top.bst'], bst: BST1, config: s1.config }, { timeoutMs: 1 }),
    configInvalid(/timed out after 1 ms/),
  );
  const controller = new AbortController();
  controller.abort();
  await assert.rejects(projectNames({ path: dir, targets: ['top.bst'], bst: BST1, config: s1.config }, { signal: controller.signal }), {
    name: 'AbortError',
  });
});
