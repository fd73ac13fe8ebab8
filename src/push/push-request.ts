import type { Logger } from 'pino';
import type { ContentStore } from '../cas/content-store.js';
import { importAll } from './local-cache.js';
import type { PushQueue } from './push-queue.js';

/** What `bst-cache-mirror push` asks for, in the daemon or in the CLI's own process. */
export interface PushWork {
  /** A BuildStream local cache directory to import names from (all, or `names`). */
  readonly from?: string | undefined;
  readonly names: readonly string[];
  readonly retryFailed: boolean;
  readonly dropFailed: boolean;
}

/** What a push request did: per imported name its outcome, and how many jobs were queued, re-queued or given up. */
export interface PushReport {
  readonly imported: readonly { readonly urn: string; readonly status: string; readonly reason?: string | undefined }[];
  readonly queued: number;
  readonly retried: number;
  readonly dropped: number;
}

/**
 * Gives up or re-queues failed jobs, then imports names from a local cache and queues a job for
 * each one whole in the store. The one body of `push`, whoever owns the store.
 */
export async function runPushWork(work: PushWork, store: ContentStore, queue: PushQueue, log: Logger): Promise<PushReport> {
  const dropped = work.dropFailed ? await queue.dropFailed() : 0;
  const retried = work.retryFailed ? await queue.retryFailed() : 0;
  let imported: PushReport['imported'] = [];
  let queued = 0;
  if (work.from !== undefined) {
    const results = await importAll(work.from, store, log, work.names.length > 0 ? work.names : undefined);
    imported = results.map((r) => ({ urn: r.urn, status: r.result.status, reason: 'reason' in r.result ? r.result.reason : undefined }));
    for (const r of results) {
      if (r.result.status === 'imported' || r.result.status === 'present') {
        await queue.enqueue(r.urn);
        queued += 1;
      }
    }
  }
  return { imported, queued, retried, dropped };
}
