import type { Stats } from 'node:fs';
import { lstat, realpath } from 'node:fs/promises';
import { dirname, isAbsolute, relative, resolve, sep } from 'node:path';
import { type FSWatcher, watch } from 'chokidar';
import type { Logger } from 'pino';
import { MirrorError, errorMessage } from '../errors.js';
import { mayHoldRefs, nameOfAnyPath, refFilesUnder } from './local-cache-layout.js';

export interface LocalCacheWatchOptions {
  /** Called once per name that appeared or was replaced, `debounceMs` after the last sign of it. */
  onName(urn: string): void;
  readonly log: Logger;
  /** Quiet time per name before onName (default 100 ms). */
  readonly debounceMs?: number;
  /** How often every ref is checked for ones the events missed (default 120 s; 0: never). */
  readonly rescanMs?: number;
}

export interface LocalCacheWatch {
  /** Resolves once the watcher is in place (names that appear after it are reported); rejects (CONFIG_INVALID) when the cache dir cannot be watched. */
  readonly ready: Promise<void>;
  close(): Promise<void>;
}

const DEFAULT_DEBOUNCE_MS = 100;
const DEFAULT_RESCAN_MS = 120_000;
/** When a new directory is read again, after chokidar has read it and started watching it. */
const NEW_DIR_RESCAN_MS = 250;

/** What tells a replaced file from a touched one: a rename over it brings another inode (and birth time). */
function identity(st: Stats): string {
  return `${st.dev}:${st.ino}:${st.birthtimeMs}`;
}

/**
 * Watches a BuildStream cache directory (either layout) for names that appear: ref files renamed
 * into place (1.6: `artifacts/cas/refs/heads/**`; 2.x: `artifacts/refs/**`, `elementsources/*`,
 * `source_protos/*\/*`), in directories that may not exist yet, and refs replaced by another file
 * (a rename over the old one, `link_key`). Only paths that lead to refs are watched, never the
 * objects; symlinks are not followed. A ref only touched (BuildStream `utime`s the refs it uses)
 * is not reported again.
 *
 * chokidar reads a new directory before it starts watching it, so a ref renamed into a directory
 * created just before can fall between; each new directory is therefore read again shortly after,
 * a vanished temp file has its directory read again, and every `rescanMs` all refs are checked
 * (which also covers events the kernel dropped). Each ref file costs one inotify watch
 * (chokidar watches files one by one), under fs.inotify.max_user_watches.
 *
 * Names already there at the start are not reported: await `ready`, then list them
 * (listLocalNames) so nothing falls between. onName is only told; importing is the caller's job
 * (importLocalName may answer 'incomplete' while casd is still writing: retry it later).
 */
export function watchLocalCache(dir: string, options: LocalCacheWatchOptions): LocalCacheWatch {
  const { log } = options;
  const debounceMs = options.debounceMs ?? DEFAULT_DEBOUNCE_MS;
  const rescanMs = options.rescanMs ?? DEFAULT_RESCAN_MS;
  const timers = new Map<string, NodeJS.Timeout>();
  const rescans = new Set<NodeJS.Timeout>();
  let sweep: NodeJS.Timeout | undefined;
  /** Ref file path -> identity last seen. */
  const known = new Map<string, string>();
  let closed = false;
  let watcher: FSWatcher | undefined;
  let root = '';

  const report = (urn: string): void => {
    const old = timers.get(urn);
    if (old !== undefined) clearTimeout(old);
    timers.set(
      urn,
      setTimeout(() => {
        timers.delete(urn);
        if (closed) return;
        try {
          options.onName(urn);
        } catch (err) {
          log.warn({ urn, err: errorMessage(err) }, 'local cache watcher: onName failed');
        }
      }, debounceMs),
    );
  };

  /** Reports the ref at `path` unless it is the file last seen there. */
  const check = async (path: string, why: string, stats?: Stats): Promise<void> => {
    const urn = nameOfAnyPath(root, path);
    if (urn === undefined || closed) return;
    let st = stats;
    if (st === undefined) {
      try {
        st = await lstat(path);
      } catch {
        return; // gone again: nothing to import
      }
    }
    if (!st.isFile()) return;
    const id = identity(st);
    if (known.get(path) === id) return;
    known.set(path, id);
    log.debug({ why, path, urn }, 'local cache ref appeared');
    report(urn);
  };

  /** Reads `path` (a directory) again and reports the refs below it that were not seen. */
  const rescan = async (path: string, why: string): Promise<void> => {
    try {
      for (const ref of await refFilesUnder(root, path)) await check(ref.path, why);
    } catch (err) {
      log.warn({ path, err: errorMessage(err) }, 'local cache watcher: rescan failed');
    }
  };
  const rescanLater = (path: string, why: string, ms: number): void => {
    const t = setTimeout(() => {
      rescans.delete(t);
      if (!closed) void rescan(path, why);
    }, ms);
    rescans.add(t);
  };

  const start = async (): Promise<void> => {
    try {
      root = await realpath(dir);
      if (!(await lstat(root)).isDirectory()) throw new Error('not a directory');
    } catch (err) {
      throw new MirrorError('CONFIG_INVALID', `cannot watch BuildStream cache directory ${dir}: ${errorMessage(err)}`, { cause: err });
    }
    // The refs already there, taken before watching: a ref replaced from here on is another file.
    for (const ref of await refFilesUnder(root, root)) {
      try {
        known.set(ref.path, identity(await lstat(ref.path)));
      } catch {
        // gone meanwhile
      }
    }
    if (closed) return;
    const ignored = (path: string): boolean => {
      const rel = relative(root, resolve(path));
      if (rel === '') return false;
      if (rel === '..' || rel.startsWith(`..${sep}`) || isAbsolute(rel)) return true;
      return !mayHoldRefs(rel.split(sep));
    };
    const w = watch(root, { ignoreInitial: true, followSymlinks: false, ignored });
    watcher = w;
    w.on('add', (path, stats) => void check(path, 'add', stats));
    // A change event's stats may predate a rename over the file: look again.
    w.on('change', (path) => void check(path, 'change'));
    w.on('addDir', (path) => rescanLater(path, 'new directory', Math.max(debounceMs, NEW_DIR_RESCAN_MS)));
    w.on('unlink', (path) => {
      known.delete(path);
      // A temp file that vanished was most likely renamed to a ref next to it.
      if (nameOfAnyPath(root, path) === undefined) void rescan(dirname(path), 'temp file renamed');
    });
    w.on('error', (err) => log.warn({ err: errorMessage(err), cache: dir }, 'local cache watcher error'));
    await new Promise<void>((resolveReady) => w.once('ready', () => resolveReady()));
    if (rescanMs > 0 && !closed) {
      sweep = setInterval(() => void rescan(root, 'periodic rescan'), rescanMs);
      sweep.unref();
    }
    log.debug({ cache: dir }, 'watching local cache');
  };

  const ready = start();
  // close() may come before anyone awaits ready: never an unhandled rejection.
  ready.catch(() => undefined);
  return {
    ready,
    async close() {
      closed = true;
      await ready.catch(() => undefined);
      if (sweep !== undefined) clearInterval(sweep);
      for (const t of [...timers.values(), ...rescans]) clearTimeout(t);
      timers.clear();
      rescans.clear();
      await watcher?.close();
    },
  };
}
