import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { DiskContentStore, type DiskStoreOptions } from '../cas/disk-store.js';
import { ControlClient } from '../control/client.js';
import { isMirrorError } from '../errors.js';

/** How long a command waits for a daemon that holds the store but does not answer yet (it is starting). */
const DAEMON_START_WAIT_MS = 10_000;
const DAEMON_POLL_MS = 200;

/** Either the running daemon's control client, or the store opened by this process. */
export type StoreOrDaemon = { readonly daemon: ControlClient } | { readonly store: DiskContentStore };

/**
 * Reaches the daemon that owns `dir`, or opens the store when none runs. A store locked by a
 * daemon that is still starting (its control socket not up yet) is waited for, so nobody sees a
 * LevelDB lock error because of a daemon; a store held by a one-off `sync` still is STORE_LOCKED.
 */
export async function openStoreOrDaemon(dir: string, log: Logger, storeOptions: DiskStoreOptions): Promise<StoreOrDaemon> {
  const deadline = Date.now() + DAEMON_START_WAIT_MS;
  for (;;) {
    const daemon = await ControlClient.connect(dir);
    if (daemon) {
      log.debug({ socket: daemon.path }, 'running through the daemon');
      return { daemon };
    }
    try {
      return { store: await DiskContentStore.open(dir, log, storeOptions) };
    } catch (err) {
      if (!isMirrorError(err, 'STORE_LOCKED') || Date.now() >= deadline) throw err;
      await sleep(DAEMON_POLL_MS);
    }
  }
}

/**
 * Runs a command through the daemon that owns `dir` when one runs there, else on the store
 * opened by this process (as docker and systemctl do with their daemons): either way the user
 * sees the same output.
 */
export async function withStoreOrDaemon<T>(
  dir: string,
  log: Logger,
  viaDaemon: (daemon: ControlClient) => Promise<T>,
  storeOptions: DiskStoreOptions,
  direct: (store: DiskContentStore) => Promise<T>,
): Promise<T> {
  const target = await openStoreOrDaemon(dir, log, storeOptions);
  if ('daemon' in target) {
    try {
      return await viaDaemon(target.daemon);
    } finally {
      target.daemon.close();
    }
  }
  try {
    return await direct(target.store);
  } finally {
    await target.store.close();
  }
}
