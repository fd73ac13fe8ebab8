import { homedir } from 'node:os';
import { join } from 'node:path';

/**
 * The embedded default data directory: `$BST_CACHE_MIRROR_DIR`, else
 * `$XDG_DATA_HOME/bst-cache-mirror`, else `~/.local/share/bst-cache-mirror`. It holds the blobs
 * and the LevelDB index; no other service is needed.
 */
export function defaultDataDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.BST_CACHE_MIRROR_DIR) return env.BST_CACHE_MIRROR_DIR;
  const dataHome = env.XDG_DATA_HOME || join(homedir(), '.local', 'share');
  return join(dataHome, 'bst-cache-mirror');
}

/** BuildStream's own default artifact server port. */
export const DEFAULT_LISTEN = '0.0.0.0:11001';
