import type { Logger } from 'pino';
import { DiskContentStore, type DiskStoreOptions } from '../cas/disk-store.js';
import { ControlClient } from '../control/client.js';

/**
 * Runs a command through the daemon that owns `dir` when one runs there, else on the store
 * opened by this process (as docker and systemctl do with their daemons): either way the user
 * sees the same output, and never a LevelDB lock error while a daemon runs.
 */
export async function withStoreOrDaemon<T>(
  dir: string,
  log: Logger,
  viaDaemon: (daemon: ControlClient) => Promise<T>,
  storeOptions: DiskStoreOptions,
  direct: (store: DiskContentStore) => Promise<T>,
): Promise<T> {
  const daemon = await ControlClient.connect(dir);
  if (daemon) {
    log.debug({ socket: daemon.path }, 'running through the daemon');
    try {
      return await viaDaemon(daemon);
    } finally {
      daemon.close();
    }
  }
  const store = await DiskContentStore.open(dir, log, storeOptions);
  try {
    return await direct(store);
  } finally {
    await store.close();
  }
}
