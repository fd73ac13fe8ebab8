import { basename } from 'node:path';
import { type FSWatcher, watch } from 'chokidar';
import type { Logger } from 'pino';

export interface WatchOptions {
  /** Files or directories (watched recursively). */
  readonly paths: readonly string[];
  /** Whether a changed file counts (directories are always walked, except hidden ones). */
  readonly relevant?: (path: string) => boolean;
  /** Quiet time after the last change before `onChange` is called once for the whole burst. */
  readonly debounceMs: number;
  readonly onChange: (changed: readonly string[]) => void;
  readonly log: Logger;
}

export interface Watch {
  /** Resolves once the initial scan is done (changes after it are reported). */
  readonly ready: Promise<void>;
  close(): Promise<void>;
}

/** Changed paths kept per burst for the log; a `git pull` of a large checkout changes thousands. */
const MAX_REPORTED = 20;

/**
 * Watches files and trees with chokidar and reports each burst of changes once, `debounceMs`
 * after the last: a `git pull` that rewrites a hundred `.bst` files is one trigger, not a hundred.
 * Hidden directories (`.git`, BuildStream's `.bst`) are not watched.
 */
export function watchPaths(options: WatchOptions): Watch {
  const { log } = options;
  let timer: NodeJS.Timeout | undefined;
  let changed: string[] = [];
  let closed = false;
  const watcher: FSWatcher = watch([...options.paths], {
    ignoreInitial: true,
    ignored: (path, stats) => {
      if (options.paths.includes(path)) return false;
      if (basename(path).startsWith('.')) return true;
      return stats?.isFile() === true && options.relevant !== undefined && !options.relevant(path);
    },
  });
  const fire = (): void => {
    timer = undefined;
    const burst = changed;
    changed = [];
    if (!closed) options.onChange(burst);
  };
  const changedPath = (event: string, path: string): void => {
    if (options.relevant !== undefined && (event === 'add' || event === 'change' || event === 'unlink') && !options.relevant(path)) return;
    if (changed.length < MAX_REPORTED) changed.push(path);
    log.debug({ event, path }, 'watched file changed');
    if (timer) clearTimeout(timer);
    timer = setTimeout(fire, options.debounceMs);
  };
  watcher.on('all', changedPath);
  watcher.on('error', (err) => log.warn({ err }, 'file watcher error'));
  const ready = new Promise<void>((resolve) => watcher.once('ready', () => resolve()));
  return {
    ready,
    async close() {
      closed = true;
      if (timer) clearTimeout(timer);
      await watcher.close();
    },
  };
}

/** Files whose change can change a BuildStream project's cache keys. */
export function isProjectFile(path: string): boolean {
  const name = basename(path);
  return name === 'project.conf' || name.endsWith('.bst') || name.endsWith('.yml') || name.endsWith('.yaml');
}
