import { join } from 'node:path';
import type * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import type { VerifyReport } from '../cas/verify.js';
import type { PushQueueStats } from '../push/push-queue.js';
import type { PushReport } from '../push/push-request.js';
import type { HealthRecord } from '../remote/health.js';
import type { NameStatus, Outage, SyncProgress, SyncReport } from '../sync/sync-job.js';

/**
 * The CLI-to-daemon control endpoint: gRPC over a unix socket in the data directory (mode 0600,
 * so only the store's owner may use it). Its messages are JSON, not protobuf: both ends are this
 * package (the CLI refuses a daemon of another version), so the report types the CLI prints are
 * the wire types, and the daemon validates every request with the schemas below.
 */
export const CONTROL_SOCKET = 'control.sock';

export function controlSocketPath(dir: string): string {
  return join(dir, CONTROL_SOCKET);
}

const endpointSpec = z
  .object({
    url: z.string(),
    instanceName: z.string().optional(),
    serverCertFile: z.string().optional(),
    clientCertFile: z.string().optional(),
    clientKeyFile: z.string().optional(),
    accessTokenFile: z.string().optional(),
  })
  .strict();

export const syncRequestSchema = z
  .object({
    version: z.string(),
    /** Names to sync once; with no names and no projects, a run of the daemon's configured selection. */
    names: z.array(z.string()).max(1_000_000).default([]),
    projects: z.array(z.object({ path: z.string(), targets: z.array(z.string()).min(1), bst: z.string() }).strict()).default([]),
    withBuildtrees: z.boolean().optional(),
    /** Upstreams to use instead of the daemon's (a CLI `sync --upstream`). */
    upstreams: z
      .array(endpointSpec.extend({ storage: endpointSpec.optional(), readIdleTimeoutMs: z.number().positive().optional() }).strict())
      .optional(),
    concurrency: z.number().int().min(1).max(256).optional(),
  })
  .strict();
export type SyncRequest = z.input<typeof syncRequestSchema>;

/** Streamed back by Sync: progress while it runs, then the report (or a gRPC error). */
export type SyncEvent = { readonly progress: SyncProgress } | { readonly report: SyncReport; readonly notes: readonly string[] };

export const statusRequestSchema = z.object({ version: z.string() }).strict();
export type StatusRequest = z.input<typeof statusRequestSchema>;

export const verifyRequestSchema = z.object({ version: z.string(), repair: z.boolean(), prune: z.boolean() }).strict();
export type VerifyRequest = z.input<typeof verifyRequestSchema>;

const json = {
  serialize: (value: unknown): Buffer => Buffer.from(JSON.stringify(value)),
  deserialize: (buf: Buffer): unknown => JSON.parse(buf.toString('utf8')) as unknown,
};

function method<Req, Res>(name: string, responseStream: boolean): grpc.MethodDefinition<Req, Res> {
  return {
    path: `/bst_cache_mirror.control.v1.Control/${name}`,
    requestStream: false,
    responseStream,
    requestSerialize: json.serialize,
    requestDeserialize: json.deserialize as (buf: Buffer) => Req,
    responseSerialize: json.serialize,
    responseDeserialize: json.deserialize as (buf: Buffer) => Res,
  };
}

/** Requests arrive as unknown JSON (validated by the server); responses are the report types. */
export const controlService = {
  sync: method<unknown, SyncEvent>('Sync', true),
  status: method<unknown, StatusReport>('Status', false),
  verify: method<unknown, VerifyReport>('Verify', false),
  push: method<unknown, PushReport>('Push', false),
} satisfies grpc.ServiceDefinition;

/** What started a run. */
export type TriggerKind = 'startup' | 'schedule' | 'refs-file' | 'project' | 'config' | 'cli' | 'miss';

export interface Trigger {
  readonly kind: TriggerKind;
  /** E.g. the file that changed. */
  readonly detail?: string | undefined;
}

/** One run as recorded in LevelDB and shown by `status`. */
export interface RunRecord {
  readonly id: string;
  readonly triggers: readonly Trigger[];
  readonly what: 'configured' | 'names';
  readonly startedAt: number;
  readonly endedAt: number;
  /** ok: every name mirrored or present; partial: some missing or failed; error: the run itself failed. */
  readonly outcome: 'ok' | 'partial' | 'error';
  readonly names: Record<NameStatus, number>;
  readonly blobs: number;
  readonly bytes: number;
  readonly outages: readonly Outage[];
  /** Per upstream: how many names it supplied (mirrored or confirmed present) and, if it could not be reached, why. */
  readonly upstreams?: readonly { readonly upstream: string; readonly names: number; readonly unreachable?: string | undefined }[] | undefined;
  /** Why the run failed as a whole (e.g. a project's `bst show` failed), or a note on its selection. */
  readonly error?: string | undefined;
  readonly notes?: readonly string[] | undefined;
}


/** A name clients asked for that the mirror lacked; joined to the next configured sync run. */
export interface MissRecord {
  readonly firstAt: number;
  readonly lastAt: number;
  readonly count: number;
  /** What the last fetch of it found, if one ran. */
  readonly lastOutcome?: NameStatus | 'fetching' | undefined;
  readonly reason?: string | undefined;
  /** `count` when that outcome was recorded: asked for since if `count` is higher. */
  readonly settledCount?: number | undefined;
}


/** What `status` shows, with or without a running daemon. */
export interface StatusReport {
  readonly version: string;
  readonly store: { readonly dir: string; readonly blobs: number; readonly bytes: number; readonly names: number };
  /** Absent when no daemon runs (status then reads the store itself). */
  readonly daemon?: {
    readonly pid: number;
    readonly startedAt: number;
    readonly configFile?: string | undefined;
    readonly listen: readonly string[];
    readonly schedule?: string | undefined;
    readonly nextRunAt?: number | undefined;
    readonly onMiss: string;
    readonly pullThroughInFlight: number;
    readonly running?: { readonly triggers: readonly Trigger[]; readonly startedAt: number; readonly progress?: SyncProgress | undefined } | undefined;
    readonly waitingRuns: number;
    /** The last config reload that failed (the running config was kept), if the file is still bad. */
    readonly configError?: { readonly at: number; readonly message: string } | undefined;
    readonly watching: readonly string[];
  };
  readonly upstreams: readonly ({ readonly name: string; readonly configured: boolean } & Partial<HealthRecord>)[];
  readonly runs: readonly RunRecord[];
  readonly misses: { readonly total: number; readonly recent: readonly ({ readonly urn: string } & MissRecord)[] };
  /** Replication upstream: jobs waiting, the oldest one's age, and the jobs that failed for good. */
  readonly push: PushQueueStats;
}

/**
 * The control socket is its owner's alone, and a report holds a line per name (a sync of 100,000
 * names is tens of MB): gRPC's 4 MiB default would fail big runs after they ran.
 */
export const CONTROL_CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': 1 << 30,
  'grpc.max_send_message_length': 1 << 30,
} as const;

/** The longest unix socket path (sockaddr_un.sun_path, less its NUL). */
export const MAX_SOCKET_PATH_BYTES = 107;

export const pushRequestSchema = z
  .object({
    version: z.string(),
    /** A BuildStream local cache directory to import names from (all, or `names`). */
    from: z.string().optional(),
    names: z.array(z.string()).max(100_000).default([]),
    retryFailed: z.boolean().default(false),
    dropFailed: z.boolean().default(false),
  })
  .strict();
export type PushRequest = z.input<typeof pushRequestSchema>;
export type { PushReport };
