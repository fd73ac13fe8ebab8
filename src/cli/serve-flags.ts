import { resolve } from 'node:path';
import type { Config } from '../config/config.js';
import { MirrorError } from '../errors.js';

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
  /** https for every listener, as bst-artifact-server's --server-cert/--server-key/--client-certs. */
  readonly serverCertFile?: string | undefined;
  readonly serverKeyFile?: string | undefined;
  readonly clientCertsFile?: string | undefined;
}

export function withServeFlags(config: Config, flags: ServeFlags): Config {
  const { serve } = config;
  const { limits } = serve;
  if ((flags.serverCertFile === undefined) !== (flags.serverKeyFile === undefined)) {
    throw new MirrorError('CONFIG_INVALID', '--server-cert and --server-key must be given together');
  }
  if (flags.clientCertsFile !== undefined && flags.serverCertFile === undefined) {
    throw new MirrorError('CONFIG_INVALID', '--client-certs needs TLS: give --server-cert and --server-key too');
  }
  const tls =
    flags.serverCertFile !== undefined && flags.serverKeyFile !== undefined
      ? { certFile: resolve(flags.serverCertFile), keyFile: resolve(flags.serverKeyFile), ...(flags.clientCertsFile !== undefined && { clientCertsFile: resolve(flags.clientCertsFile) }) }
      : undefined;
  return {
    ...config,
    listen: tls ? config.listen.map((l) => ({ ...l, tls })) : config.listen,
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
