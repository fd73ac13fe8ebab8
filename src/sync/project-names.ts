/**
 * The names a BuildStream project needs, worked out from a project checkout: "keep everything
 * these targets need" for the mirror daemon.
 *
 * - Artifacts (1.x and 2.x): `bst show --deps all` with each element's full cache key, as user
 *   names `PROJECT/<element path>/<full key>` (what `parseUserName` accepts: the mirror turns
 *   them into the artifact name and, for 1.x, the ref).
 * - Sources (2.x only): the element-sources names `urn:fdc:buildstream.build:2020:source:<key>`
 *   (what `bst source fetch` asks a source cache for first) and the single-source names
 *   `…:source:<kind>/<key>` (what it asks for next, source by source). `bst show` has no format
 *   symbol for them, so for 2.x `bst show` runs through BuildStream's own CLI under the python
 *   that runs `bst` (`BST2_SHOW_SCRIPT`), with one more format symbol that prints them.
 *
 * bst runs with `--no-interactive --no-colors --strict`: keys are always the strict ones (what
 * strict-mode clients pull), whatever the user configuration says. `bst show` reads the project
 * and the local cache only: it contacts no artifact or source cache. It still needs the
 * project's junctions: 1.x fails on a junction that is not fetched yet, 2.x fetches it (which
 * may use the network, unless the junction's source is local).
 */
import { type ExecFileException, execFile } from 'node:child_process';
import { constants as fsConstants } from 'node:fs';
import { access, open, readFile, stat } from 'node:fs/promises';
import { basename, delimiter, isAbsolute, join, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';

import { URN_PREFIX, parseUrn, userArtifactName } from '../cas/names.js';
import { MirrorError, errorMessage } from '../errors.js';

export interface ProjectSpec {
  /** The project directory (holding project.conf). Relative paths are from the process's cwd. */
  readonly path: string;
  /**
   * Target elements, as `bst show` takes them. None means the project's default targets (2.x);
   * 1.x has none, and a `bst show` that lists no element is CONFIG_INVALID.
   */
  readonly targets: readonly string[];
  /** The BuildStream command, e.g. `bst` (looked up in PATH) or `/opt/buildstream2/bin/bst`. */
  readonly bst: string;
  /** A BuildStream user configuration file (`bst -c FILE`); omitted means bst's default one. */
  readonly config?: string;
  /** Project options (`bst -o NAME VALUE`): they change cache keys. */
  readonly options?: Readonly<Record<string, string>>;
}

export interface ProjectNames {
  readonly bstVersion: 1 | 2;
  /** The project's name, from project.conf. */
  readonly project: string;
  /**
   * Artifact names `PROJECT/<element path>/<full key>` in `bst show` order (dependencies
   * first), then (2.x) element-sources and single-source URNs; no duplicates.
   */
  readonly names: string[];
  /**
   * Elements that have no artifact name here: junctions, elements of junctioned projects, and
   * elements whose key is unknown (sources without a ref). Their element-sources and
   * single-source names (2.x) are in `names` when their sources key is known.
   */
  readonly skipped: { element: string; reason: string }[];
}

export interface ProjectNamesOptions {
  readonly signal?: AbortSignal;
  /** For the whole call (all bst runs together); default 120 s. */
  readonly timeoutMs?: number;
}

const DEFAULT_TIMEOUT_MS = 120_000;
/** Bound of bst's stdout and of its stderr, each. */
const MAX_OUTPUT_BYTES = 64 * 1024 * 1024;
/** How much of a failing bst's stderr goes into the error message. */
const STDERR_TAIL_LINES = 15;
const STDERR_TAIL_CHARS = 4000;

const KEY = /^[0-9a-f]{64}$/;
const UNKNOWN_KEY = /^\?+$/;

/** The format symbol `BST2_SHOW_SCRIPT` adds to `bst show`: `<element-sources key>\t<kind/key,…>`, `-` for none. */
const SOURCES_SYMBOL = '%{mirror-element-sources}';

/**
 * Runs BuildStream 2's own CLI (`bst …`, the arguments after the script's first, which is the
 * path of the `bst` script) with one more `bst show` format symbol, `%{mirror-element-sources}`:
 * the element's element-sources key (`ElementSources.get_cache_key()`, the key
 * `_elementsourcescache.py` stores and pulls as `urn:…:source:<key>`), a tab, and the names
 * `<kind>/<key>` of the sources `_sourcecache.py` caches one by one (`Source._get_source_name()`;
 * not those that need previous sources), comma-separated; `-` when unknown or none.
 * BuildStream has no public API for these keys: this reads `Element.__sources` (an
 * `ElementSources`, 2.0 and later) and checks up front that what it uses exists.
 */
export const BST2_SHOW_SCRIPT = String.raw`
import os, sys
bst_script = sys.argv[1]
# As when the bst script itself runs: its directory first on sys.path, not the cwd (the project).
sys.path[0] = os.path.dirname(os.path.realpath(bst_script))
sys.argv = [bst_script] + sys.argv[2:]
SYMBOL = "${SOURCES_SYMBOL}"

def fail(why):
    sys.stderr.write("bst-cache-mirror: cannot read element-sources keys from this BuildStream: " + why + "\n")
    sys.exit(3)

try:
    from buildstream._frontend import cli
    from buildstream._frontend.widget import LogLine
    from buildstream._elementsources import ElementSources
    from buildstream.source import Source
except ImportError as e:
    fail(str(e))
for cls, attrs in ((LogLine, ("show_pipeline",)), (ElementSources, ("get_cache_key", "is_resolved", "sources")), (Source, ("_get_source_name",))):
    for attr in attrs:
        if not hasattr(cls, attr):
            fail(cls.__name__ + "." + attr + " is missing")

def element_sources(element):
    sources = getattr(element, "_Element__sources", None)
    if not isinstance(sources, ElementSources):
        fail("element " + element._get_full_name() + " has no ElementSources")
    key = sources.get_cache_key() if sources.is_resolved() else None
    if not key:
        return "-\t-"
    single = [
        source._get_source_name()
        for source in sources.sources()
        if not source.BST_REQUIRES_PREVIOUS_SOURCES_FETCH and not source.BST_REQUIRES_PREVIOUS_SOURCES_STAGE
    ]
    return key + "\t" + (",".join(single) or "-")

show_pipeline = LogLine.show_pipeline

def show_pipeline_with_sources(self, dependencies, format_):
    if SYMBOL not in format_:
        return show_pipeline(self, dependencies, format_)
    return "\n".join(show_pipeline(self, [e], format_.replace(SYMBOL, element_sources(e))) for e in dependencies)

LogLine.show_pipeline = show_pipeline_with_sources
cli.main(args=sys.argv[1:], prog_name="bst")
`;

interface RunOutput {
  error: ExecFileException | null;
  stdout: string;
  stderr: string;
}

function runFile(file: string, args: readonly string[], cwd: string, timeoutMs: number, signal: AbortSignal | undefined): Promise<RunOutput> {
  return new Promise((resolveRun) => {
    const child = execFile(
      file,
      args,
      {
        cwd,
        encoding: 'utf8',
        timeout: Math.max(1, timeoutMs),
        killSignal: 'SIGTERM',
        maxBuffer: MAX_OUTPUT_BYTES,
        windowsHide: true,
        ...(signal === undefined ? {} : { signal }),
      },
      (error, stdout, stderr) => resolveRun({ error, stdout, stderr }),
    );
    child.stdin?.end();
  });
}

function stderrTail(stderr: string): string {
  const lines = stderr.split('\n').map((l) => l.trimEnd()).filter((l) => l !== '');
  const tail = lines.slice(-STDERR_TAIL_LINES).join('\n');
  return tail.length > STDERR_TAIL_CHARS ? `…${tail.slice(-STDERR_TAIL_CHARS)}` : tail;
}

/** Throws the abort reason when `signal` is aborted (an AbortError unless the caller gave one). */
function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw signal.reason;
}

/**
 * The error for a run that did not succeed. `what` names the run for the message
 * (`bst show failed in PATH`), `program` the command that was started.
 */
function runFailure(out: RunOutput, what: string, program: string, projectDir: string, timeoutMs: number, signal: AbortSignal | undefined): MirrorError {
  throwIfAborted(signal);
  const err = out.error;
  const code = err?.code;
  if (code === 'ENOENT') return new MirrorError('CONFIG_INVALID', `BuildStream command '${program}' not found (project ${projectDir})`, { cause: err });
  if (code === 'EACCES') return new MirrorError('CONFIG_INVALID', `BuildStream command '${program}' is not executable (project ${projectDir})`, { cause: err });
  if (code === 'ERR_CHILD_PROCESS_STDIO_MAXBUFFER') {
    return new MirrorError('CONFIG_INVALID', `${what}: more than ${MAX_OUTPUT_BYTES} bytes of output`, { cause: err });
  }
  const tail = stderrTail(out.stderr);
  const detail = tail === '' ? '' : `:\n${tail}`;
  if (err?.killed === true) return new MirrorError('CONFIG_INVALID', `${what}: timed out after ${timeoutMs} ms${detail}`, { cause: err });
  if (typeof code === 'number') return new MirrorError('CONFIG_INVALID', `${what} (exit code ${code})${detail}`, { cause: err });
  if (err?.signal) return new MirrorError('CONFIG_INVALID', `${what} (killed by ${err.signal})${detail}`, { cause: err });
  return new MirrorError('CONFIG_INVALID', `${what}: ${err ? errorMessage(err) : 'unknown error'}${detail}`, { cause: err });
}

/** The project directory, resolved; CONFIG_INVALID unless it is a directory with a project.conf. */
async function readProjectConf(path: string): Promise<{ dir: string; name: string; elementPath: string }> {
  const dir = resolve(path);
  let isDir = false;
  try {
    isDir = (await stat(dir)).isDirectory();
  } catch (err) {
    throw new MirrorError('CONFIG_INVALID', `BuildStream project ${dir} does not exist`, { cause: err });
  }
  if (!isDir) throw new MirrorError('CONFIG_INVALID', `BuildStream project ${dir} is not a directory`);
  const confPath = join(dir, 'project.conf');
  let text: string;
  try {
    text = await readFile(confPath, 'utf8');
  } catch (err) {
    throw new MirrorError('CONFIG_INVALID', `BuildStream project ${dir} has no readable project.conf (${errorMessage(err)})`, { cause: err });
  }
  let conf: unknown;
  try {
    conf = parseYaml(text);
  } catch (err) {
    throw new MirrorError('CONFIG_INVALID', `${confPath} is not valid YAML: ${errorMessage(err)}`, { cause: err });
  }
  const record = typeof conf === 'object' && conf !== null ? (conf as Record<string, unknown>) : {};
  const name = record['name'];
  if (typeof name !== 'string' || name.trim() === '') throw new MirrorError('CONFIG_INVALID', `${confPath} has no project name (name:)`);
  const elementPath = record['element-path'];
  return { dir, name: name.trim(), elementPath: typeof elementPath === 'string' ? elementPath : '.' };
}

/** `bst --version` → 1 or 2. BuildStream 2's development snapshots were 1.91–1.99. */
function parseMajor(version: string): 1 | 2 | undefined {
  const m = /^\s*(\d+)\.(\d+)/.exec(version);
  if (!m) return undefined;
  const major = Number(m[1]);
  const minor = Number(m[2]);
  if (major === 2 || (major === 1 && minor >= 91)) return 2;
  if (major === 1) return 1;
  return undefined;
}

/** The command's file: `cmd` resolved from the cwd when it has a `/`, else looked up in PATH. */
async function resolveCommand(cmd: string): Promise<string | undefined> {
  if (cmd.includes('/')) return resolve(cmd);
  for (const dir of (process.env['PATH'] ?? '').split(delimiter)) {
    if (dir === '') continue;
    const candidate = join(dir, cmd);
    try {
      await access(candidate, fsConstants.X_OK);
      if ((await stat(candidate)).isFile()) return isAbsolute(candidate) ? candidate : resolve(candidate);
    } catch {
      // keep looking
    }
  }
  return undefined;
}

/**
 * The interpreter line of the `bst` script, as [program, ...args] to run python with; CONFIG_INVALID
 * when it is not a python script (a wrapper), since then BuildStream cannot be imported.
 */
async function pythonOf(bstFile: string, projectDir: string): Promise<string[]> {
  let firstLine = '';
  try {
    const handle = await open(bstFile, 'r');
    try {
      const buf = Buffer.alloc(512);
      const { bytesRead } = await handle.read(buf, 0, buf.length, 0);
      firstLine = buf.subarray(0, bytesRead).toString('utf8').split('\n')[0] ?? '';
    } finally {
      await handle.close();
    }
  } catch (err) {
    throw new MirrorError('CONFIG_INVALID', `cannot read the BuildStream command ${bstFile} (project ${projectDir}): ${errorMessage(err)}`, { cause: err });
  }
  const m = /^#!\s*(\S+)(?:\s+(.*))?$/.exec(firstLine.trimEnd());
  const interpreter = m?.[1];
  let args = (m?.[2] ?? '').trim().split(/\s+/).filter((a) => a !== '');
  if (interpreter !== undefined && basename(interpreter) === 'env' && args[0] === '-S') args = args.slice(1);
  const program = interpreter !== undefined && basename(interpreter) === 'env' ? args.find((a) => !a.startsWith('-') && !a.includes('=')) : interpreter;
  if (interpreter === undefined || program === undefined || !/python|pypy/.test(basename(program))) {
    throw new MirrorError(
      'CONFIG_INVALID',
      `BuildStream 2 command ${bstFile} is not a python script (first line ${JSON.stringify(firstLine.slice(0, 120))}), so its element-sources keys cannot be read (project ${projectDir}): give the path of BuildStream's own bst script`,
    );
  }
  return [interpreter, ...args];
}

/** Whether `element` (a target of a 1.x project) is a junction, from its element file. */
async function isJunctionFile(projectDir: string, elementPath: string, element: string): Promise<boolean> {
  try {
    const parsed: unknown = parseYaml(await readFile(join(projectDir, elementPath, element), 'utf8'));
    return typeof parsed === 'object' && parsed !== null && (parsed as Record<string, unknown>)['kind'] === 'junction';
  } catch {
    return false;
  }
}

interface ShowLine {
  element: string;
  key: string;
  state: string;
  /** 2.x: the element-sources key, or undefined. */
  sourcesKey?: string;
  /** 2.x: single-source names `kind/key`. */
  singleSources: string[];
}

function parseShow(stdout: string, version: 1 | 2, what: string): ShowLine[] {
  const lines: ShowLine[] = [];
  for (const raw of stdout.split('\n')) {
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '') continue;
    const fields = line.split('\t');
    const head = version === 1 ? 3 : 5;
    const element = fields.slice(head - 1).join('\t');
    if (fields.length < head || element === '') {
      throw new MirrorError('CONFIG_INVALID', `${what}: unexpected output line ${JSON.stringify(line.slice(0, 200))}`);
    }
    const [key = '', state = '', sourcesKey = '-', single = '-'] = fields;
    if (version === 2 && sourcesKey !== '-' && !KEY.test(sourcesKey)) {
      throw new MirrorError('CONFIG_INVALID', `${what}: unexpected element-sources key in ${JSON.stringify(line.slice(0, 200))}`);
    }
    lines.push({
      element,
      key,
      state,
      ...(version === 2 && sourcesKey !== '-' ? { sourcesKey } : {}),
      singleSources: version === 2 && single !== '-' ? single.split(',') : [],
    });
  }
  return lines;
}

/**
 * The names to mirror for `spec.targets` of the project at `spec.path`: the artifacts of every
 * element they depend on (`bst show --deps all`), and for BuildStream 2 their sources. Runs
 * `<bst> --version`, then `bst show` (for 2.x through `BST2_SHOW_SCRIPT`) in the project
 * directory; builds and fetches nothing (except 2.x junctions, see the module comment).
 * Errors are MirrorError CONFIG_INVALID naming the project path: a missing directory or
 * project.conf, a bst command that is not found, a `bst show` that fails (with the end of its
 * stderr) or takes longer than `timeoutMs`. An aborted `signal` rejects with its reason.
 */
export async function projectNames(spec: ProjectSpec, options: ProjectNamesOptions = {}): Promise<ProjectNames> {
  const { signal } = options;
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const deadline = Date.now() + timeoutMs;
  throwIfAborted(signal);
  const project = await readProjectConf(spec.path);
  const dir = project.dir;
  if (spec.bst.trim() === '') throw new MirrorError('CONFIG_INVALID', `no BuildStream command given for project ${dir}`);
  const bstFile = (await resolveCommand(spec.bst)) ?? spec.bst;

  const versionRun = await runFile(bstFile, ['--version'], dir, deadline - Date.now(), signal);
  if (versionRun.error) throw runFailure(versionRun, `${spec.bst} --version failed in ${dir}`, spec.bst, dir, timeoutMs, signal);
  const bstVersion = parseMajor(versionRun.stdout);
  if (bstVersion === undefined) {
    throw new MirrorError('CONFIG_INVALID', `${spec.bst} --version printed ${JSON.stringify(versionRun.stdout.trim().slice(0, 80))}: not BuildStream 1.x or 2.x (project ${dir})`);
  }

  const bstArgs = ['--no-interactive', '--no-colors', '--strict'];
  if (spec.config !== undefined) bstArgs.push('-c', resolve(spec.config));
  for (const [name, value] of Object.entries(spec.options ?? {})) bstArgs.push('-o', name, value);
  const format = bstVersion === 1 ? '%{full-key}\t%{state}\t%{name}' : `%{full-key}\t%{state}\t${SOURCES_SYMBOL}\t%{name}`;
  bstArgs.push('show', '--deps', 'all', '--format', format, '--', ...spec.targets);

  let program = bstFile;
  let args = bstArgs;
  if (bstVersion === 2) {
    const [python = '', ...pythonArgs] = await pythonOf(bstFile, dir);
    program = python;
    args = [...pythonArgs, '-c', BST2_SHOW_SCRIPT, bstFile, ...bstArgs];
  }
  const what = `bst show failed in ${dir}`;
  const show = await runFile(program, args, dir, deadline - Date.now(), signal);
  if (show.error) throw runFailure(show, what, program, dir, timeoutMs, signal);
  throwIfAborted(signal);

  const names: string[] = [];
  const sourceNames: string[] = [];
  const skipped: { element: string; reason: string }[] = [];
  const targets = new Set(spec.targets);
  const shown = parseShow(show.stdout, bstVersion, what);
  // 1.x shows nothing without targets; an empty list must not read as "this project needs nothing".
  if (shown.length === 0) throw new MirrorError('CONFIG_INVALID', `bst show listed no elements in ${dir} (targets: ${spec.targets.join(' ') || 'none'})`);
  for (const line of shown) {
    const { element } = line;
    if (line.sourcesKey !== undefined) sourceNames.push(`${URN_PREFIX}source:${line.sourcesKey}`);
    for (const single of line.singleSources) {
      const urn = `${URN_PREFIX}source:${single}`;
      try {
        if (parseUrn(urn).kind === 'source') sourceNames.push(urn);
      } catch (err) {
        skipped.push({ element, reason: `source name '${single}' is not one the mirror accepts: ${errorMessage(err)}` });
      }
    }
    const junction = element.lastIndexOf(':');
    if (line.state === 'junction' || (bstVersion === 1 && targets.has(element) && junction < 0 && (await isJunctionFile(dir, project.elementPath, element)))) {
      skipped.push({ element, reason: 'junction: it is not built and has no artifact' });
    } else if (junction >= 0) {
      skipped.push({
        element,
        reason: `element of the project behind junction '${element.slice(0, junction)}': its artifact is named under that project's own name, which bst show does not print; give that project as a project of its own`,
      });
    } else if (UNKNOWN_KEY.test(line.key) || line.key === '') {
      skipped.push({
        element,
        reason:
          line.state === 'no reference'
            ? 'no cache key: its sources have no ref (bst source track)'
            : `no cache key (state '${line.state}'): a dependency's sources have no ref`,
      });
    } else if (!KEY.test(line.key)) {
      skipped.push({ element, reason: `bst show printed an unexpected key '${line.key.slice(0, 80)}'` });
    } else {
      const name = `${project.name}/${element}/${line.key}`;
      try {
        userArtifactName(name);
        names.push(name);
      } catch (err) {
        skipped.push({ element, reason: errorMessage(err) });
      }
    }
  }
  return { bstVersion, project: project.name, names: [...new Set([...names, ...sourceNames])], skipped };
}
