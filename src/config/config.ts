import type { LogLevel } from '../log.js';
import type { UpstreamSpec } from '../remote/upstream.js';
import type { ServeLimits } from '../server/server.js';

/**
 * The daemon's validated configuration, as `loadConfig` returns it from `mirror.yaml` (kebab-case
 * keys there, camelCase here; durations in milliseconds, sizes in bytes, relative paths resolved
 * against the config file's directory). The schema in schema.ts is the only source of defaults.
 */
export interface Config {
  /** Data directory (blobs, LevelDB index, control socket). */
  readonly dir: string;
  readonly logLevel: LogLevel;
  /** gRPC listeners, each `host:port` (port 0 picks a free one). */
  readonly listen: readonly ListenerConfig[];
  readonly serve: ServeConfig;
  /** Tried in order for each name. */
  readonly upstreams: readonly UpstreamConfig[];
  readonly sync: SyncConfig;
  readonly health: HealthConfig;
  readonly replicate: ReplicateConfig;
}

export interface ReplicateConfig {
  /** BuildStream local cache directories on this host (1.6 or 2.x layout) whose new names are imported and pushed upstream. */
  readonly watch: readonly string[];
}

export interface ListenerConfig {
  /** `host:port`. */
  readonly address: string;
  /** Serve https with this certificate and key; with `clientCertsFile`, only to clients holding one of those certificates. */
  readonly tls?: ListenerTls | undefined;
  /** Accept pushes here (needs client certificates or an access token). */
  readonly push: boolean;
  /** File holding the bearer token push clients must send. */
  readonly accessTokenFile?: string | undefined;
}

export interface ListenerTls {
  readonly certFile: string;
  readonly keyFile: string;
  /** PEM bundle of the client certificates allowed in (like bst-artifact-server --client-certs). */
  readonly clientCertsFile?: string | undefined;
}

export interface ServeConfig {
  readonly maxBatchBytes: number;
  readonly recheckAfterMs: number;
  readonly limits: ServeLimits;
}

export interface UpstreamConfig {
  /** For logs and status; defaults to the URL (or `index + storage`). */
  readonly name: string;
  /** What GrpcUpstream.create takes (url or index/storage pair, TLS, token, instance name). */
  readonly spec: UpstreamSpec;
  /** Replicate names pushed to the mirror (or imported from local caches) to this upstream. */
  readonly push: boolean;
}

export type OnMiss = 'fetch' | 'record' | 'off';

export interface ProjectConfig {
  /** A BuildStream project checkout (the directory holding project.conf). */
  readonly path: string;
  readonly targets: readonly string[];
  /** The command that runs `bst show` there (BuildStream 1.x or 2.x). */
  readonly bst: string;
}

export interface SyncConfig {
  /** Cron expression (5 or 6 fields, `cron` package); undefined: no schedule. */
  readonly schedule: string | undefined;
  readonly refs: readonly string[];
  /** Files or directories of refs files; watched. */
  readonly refsFiles: readonly string[];
  readonly projects: readonly ProjectConfig[];
  readonly onMiss: OnMiss;
  /** How long a pull-through miss waits for its fetch before answering NOT_FOUND. */
  readonly missWaitMs: number;
  readonly withBuildtrees: boolean;
  /** Upstream transfers in flight at once. */
  readonly concurrency: number;
  /** Quiet time after the last change to a watched file before a run starts (a `git pull` is one run). */
  readonly watchDebounceMs: number;
}

export interface HealthConfig {
  /** Consecutive failures (unreachable, deadline) that mark an upstream offline. */
  readonly failuresToOffline: number;
  /** First wait before an offline upstream is probed again; doubles up to probeMaxIntervalMs. */
  readonly probeIntervalMs: number;
  readonly probeMaxIntervalMs: number;
}
