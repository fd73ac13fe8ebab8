import type { Logger } from 'pino';

/** The limits the server enforces, as they appear in the log (`limit` field). */
export type LimitName =
  | 'send-budget' // responses wait for memory
  | 'stalled-call' // a response made no progress and was cancelled
  | 'request-size' // a request over the receive limit was refused
  | 'connections' // new connections refused at the connection cap
  | 'streams-per-connection' // a connection reached its concurrent-stream cap
  | 'accept'; // the listener could not accept (e.g. out of file descriptors)

/** After this long without a hit, an episode is over and its summary is logged. */
export const DEFAULT_EPISODE_QUIET_MS = 60_000;

interface Episode {
  hits: number;
  readonly startedAt: number;
  lastHitAt: number;
  readonly timer: NodeJS.Timeout;
}

/**
 * Logs limits being hit once per episode, not once per event: the first hit of an episode is a
 * warning with its details, and when a limit has not been hit for `quietMs`, one line says how many
 * hits the episode had and how long it lasted. Under a flood (thousands of refused connections or
 * waiting reads a second) the log stays two lines per episode.
 */
export class LimitLog {
  private readonly episodes = new Map<LimitName, Episode>();

  constructor(
    private readonly log: Logger,
    private readonly quietMs = DEFAULT_EPISODE_QUIET_MS,
  ) {}

  /** Records a hit of `limit`; logs `message` with `details` when it starts an episode. */
  hit(limit: LimitName, message: string, details: Record<string, unknown> = {}): void {
    const episode = this.episodes.get(limit);
    if (episode) {
      episode.hits += 1;
      episode.lastHitAt = Date.now();
      episode.timer.refresh();
      return;
    }
    this.log.warn({ limit, ...details }, message);
    const timer = setTimeout(() => this.end(limit), this.quietMs);
    timer.unref();
    const now = Date.now();
    this.episodes.set(limit, { hits: 1, startedAt: now, lastHitAt: now, timer });
  }

  /** Ends every episode (logging their summaries), e.g. at shutdown. */
  close(): void {
    for (const limit of [...this.episodes.keys()]) this.end(limit);
  }

  private end(limit: LimitName): void {
    const episode = this.episodes.get(limit);
    if (!episode) return;
    clearTimeout(episode.timer);
    this.episodes.delete(limit);
    const seconds = Math.round((episode.lastHitAt - episode.startedAt) / 100) / 10;
    this.log.info({ limit, hits: episode.hits, seconds }, `limit ${limit}: episode over, ${episode.hits} hit${episode.hits === 1 ? '' : 's'} in ${seconds} s`);
  }
}
