import type { Config } from '../config/config.js';

/** `serve` flags that tune serving; each overrides the config file's value when given. */
export interface ServeFlags {
  readonly maxBatchBytes?: number | undefined;
  readonly recheckHours?: number | undefined;
  readonly sendBudgetMib?: number | undefined;
  readonly stallTimeoutS?: number | undefined;
  readonly idleTimeoutS?: number | undefined;
  readonly maxConnections?: number | undefined;
  readonly maxStreamsPerConnection?: number | undefined;
  readonly maxRequestBytes?: number | undefined;
}

export function withServeFlags(config: Config, flags: ServeFlags): Config {
  const { serve } = config;
  const { limits } = serve;
  return {
    ...config,
    serve: {
      maxBatchBytes: flags.maxBatchBytes ?? serve.maxBatchBytes,
      recheckAfterMs: flags.recheckHours === undefined ? serve.recheckAfterMs : flags.recheckHours * 3_600_000,
      limits: {
        sendBudgetBytes: flags.sendBudgetMib === undefined ? limits.sendBudgetBytes : Math.round(flags.sendBudgetMib * (1 << 20)),
        stallTimeoutMs: flags.stallTimeoutS === undefined ? limits.stallTimeoutMs : flags.stallTimeoutS * 1000,
        idleTimeoutMs: flags.idleTimeoutS === undefined ? limits.idleTimeoutMs : flags.idleTimeoutS * 1000,
        maxConnections: flags.maxConnections ?? limits.maxConnections,
        maxStreamsPerConnection: flags.maxStreamsPerConnection ?? limits.maxStreamsPerConnection,
        maxRequestBytes: flags.maxRequestBytes ?? limits.maxRequestBytes,
      },
    },
  };
}
