import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import type { ContentStore } from '../cas/content-store.js';
import { MirrorError } from '../errors.js';
import { AssetService } from './asset-service.js';
import { ByteStreamReadService } from './bytestream-service.js';
import { callGuard } from './call-guard.js';
import { CapabilitiesReadService } from './capabilities-service.js';
import { CasService } from './cas-service.js';
import type { MissHandler } from './miss-handler.js';
import { PushIntake, type PushSink } from './push-intake.js';
import { requireBearerToken } from './token-auth.js';
import { IdleCollector } from './idle-gc.js';
import { LimitLog } from './limit-log.js';
import { ConnectionListener, defaultMaxConnections } from './listener.js';
import { ReferenceStorageReadService } from './reference-storage-service.js';
import { SendBudget } from './send-budget.js';

/**
 * What one server may use, whatever its clients do. Memory: response data in flight is bounded by
 * `sendBudgetBytes`; a request by `maxRequestBytes` (refused from its length prefix, before it is
 * buffered), at most `maxStreamsPerConnection` at once per connection, on at most
 * `maxConnections` connections. Time: a response no client takes is cancelled after
 * `stallTimeoutMs`, a connection without calls is closed after `idleTimeoutMs`.
 */
export interface ServeLimits {
  /** Bytes of response data held at once, across all calls (blob chunks, batches, tree pages). */
  readonly sendBudgetBytes: number;
  /** A call whose client has taken none of its response for this long is cancelled; 0: never. */
  readonly stallTimeoutMs: number;
  /**
   * A connection with no call for this long is closed (GOAWAY); one on which nothing at all is sent
   * or received for twice as long is dropped (a client that never speaks HTTP/2); 0: never.
   */
  readonly idleTimeoutMs: number;
  /** Connections open at once; more are closed as they arrive. */
  readonly maxConnections: number;
  /** Concurrent calls per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; clients queue more). */
  readonly maxStreamsPerConnection: number;
  /** Largest request message; larger ones are refused with RESOURCE_EXHAUSTED before being read. */
  readonly maxRequestBytes: number;
}

export const DEFAULT_SEND_BUDGET_BYTES = 32 << 20;
export const DEFAULT_STALL_TIMEOUT_MS = 30_000;
export const DEFAULT_IDLE_TIMEOUT_MS = 300_000;
export const DEFAULT_MAX_STREAMS_PER_CONNECTION = 100;
/**
 * The largest legitimate request to a pull-only mirror is a FindMissingBlobs: 100,000 digests are
 * about 7.5 MB (BuildStream 1.6 sends 512 per call).
 */
export const DEFAULT_MAX_REQUEST_BYTES = 8 << 20;

export function defaultLimits(): ServeLimits {
  return {
    sendBudgetBytes: DEFAULT_SEND_BUDGET_BYTES,
    stallTimeoutMs: DEFAULT_STALL_TIMEOUT_MS,
    idleTimeoutMs: DEFAULT_IDLE_TIMEOUT_MS,
    maxConnections: defaultMaxConnections(),
    maxStreamsPerConnection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
    maxRequestBytes: DEFAULT_MAX_REQUEST_BYTES,
  };
}

export interface ServeOptions {
  /** `host:port`; port 0 picks a free port. */
  readonly listen: string;
  /** The BatchReadBlobs limit advertised in Capabilities and enforced. */
  readonly maxBatchBytes: number;
  readonly log: Logger;
  /** Overrides of defaultLimits(). */
  readonly limits?: Partial<ServeLimits>;
  /** The send budget to use instead of a new one of `limits.sendBudgetBytes` (tests observe it). */
  readonly sendBudget?: SendBudget;
  /** Quiet time that ends an episode of a limit being hit (see LimitLog). */
  readonly limitEpisodeQuietMs?: number;
  /** Asked about names clients want and the store lacks (pull-through); none: plain NOT_FOUND. */
  readonly missHandler?: MissHandler;
  /** Serve https; with `clientCerts`, only to clients presenting one of those certificates. */
  readonly tls?: ServerTls | undefined;
  /**
   * Makes this a push listener: writes are taken and pushed names go to `sink`. It must
   * authenticate its clients: `tls.clientCerts`, or `accessToken` (a bearer token every call must carry).
   */
  readonly push?: { readonly sink: PushSink; readonly accessToken?: string | undefined } | undefined;
}

/** PEM contents (already read and checked) of a listener's certificate, key and allowed client certificates. */
export interface ServerTls {
  readonly cert: Buffer;
  readonly key: Buffer;
  readonly clientCerts?: Buffer | undefined;
}

/** BuildStream 1.6 caps batches at 1 MiB whatever the server says; 2.x follows the server. */
export const DEFAULT_MAX_BATCH_BYTES = 1 << 20;

/** The pull-only gRPC server: every service on one port. It only ever talks to the store. */
export class MirrorServer {
  private constructor(
    private readonly server: grpc.Server,
    private readonly listener: ConnectionListener,
    private readonly limitLog: LimitLog,
    private readonly collector: IdleCollector,
    /** The address actually bound, e.g. `127.0.0.1:40123`. */
    readonly address: string,
    /** Response data in flight (see ServeLimits.sendBudgetBytes). */
    readonly sendBudget: SendBudget,
    readonly limits: ServeLimits,
    private readonly log: Logger,
  ) {}

  static async start(store: ContentStore, options: ServeOptions): Promise<MirrorServer> {
    const limits: ServeLimits = { ...defaultLimits(), ...options.limits };
    const log = options.log;
    const limitLog = new LimitLog(log, options.limitEpisodeQuietMs);
    const budget =
      options.sendBudget ??
      new SendBudget(limits.sendBudgetBytes, (waiting) =>
        limitLog.hit('send-budget', `responses are waiting for memory: ${limits.sendBudgetBytes} bytes of response data are in flight (--send-budget-mib)`, { waiting }),
      );
    const push = options.push;
    if (push && options.tls?.clientCerts === undefined && !push.accessToken) {
      throw new MirrorError('CONFIG_INVALID', `the push listener ${options.listen} must authenticate its clients: give it client-certs (with server-cert and server-key) or an access-token`);
    }
    let listener: ConnectionListener | undefined;
    const server = new grpc.Server({
      // Refused from the length prefix, before the message is buffered (RESOURCE_EXHAUSTED).
      'grpc.max_receive_message_length': limits.maxRequestBytes,
      // Batch responses hold up to maxBatchBytes of data plus per-entry overhead.
      'grpc.max_send_message_length': Math.max(options.maxBatchBytes * 2, 16 << 20),
      'grpc.max_concurrent_streams': limits.maxStreamsPerConnection,
      ...(limits.idleTimeoutMs > 0 ? { 'grpc.max_connection_idle_ms': limits.idleTimeoutMs } : {}),
      interceptors: [
        ...(push?.accessToken ? [requireBearerToken(push.accessToken)] : []),
        callGuard({
          stallTimeoutMs: limits.stallTimeoutMs,
          maxStreamsPerConnection: limits.maxStreamsPerConnection,
          limits: limitLog,
          dropConnection: (address, port) => listener?.drop(address, port),
        }),
      ],
    });
    new CapabilitiesReadService(options.maxBatchBytes, log).addToServer(server);
    const intake = push ? new PushIntake(store, options.maxBatchBytes, push.sink, log) : undefined;
    new CasService(store, options.maxBatchBytes, budget, log, intake).addToServer(server);
    new ByteStreamReadService(store, budget, log, intake).addToServer(server);
    new AssetService(store, log, options.missHandler, intake).addToServer(server);
    new ReferenceStorageReadService(store, log, options.missHandler, intake).addToServer(server);
    const { host, port } = splitListen(options.listen);
    listener = await ConnectionListener.listen(server, host, port, {
      maxConnections: limits.maxConnections,
      // A connection silent for twice the idle timeout has ignored the GOAWAY (or never spoke HTTP/2).
      silentTimeoutMs: limits.idleTimeoutMs * 2,
      limits: limitLog,
      listen: options.listen,
      ...(options.tls && {
        credentials: grpc.ServerCredentials.createSsl(options.tls.clientCerts ?? null, [{ cert_chain: options.tls.cert, private_key: options.tls.key }], options.tls.clientCerts !== undefined),
      }),
    });
    log.info({ address: listener.address, limits }, 'serving');
    return new MirrorServer(server, listener, limitLog, new IdleCollector(budget), listener.address, budget, limits, log);
  }

  /** Connections open now. */
  get connections(): number {
    return this.listener.connections;
  }

  private stopped: Promise<void> | undefined;

  /**
   * Stops accepting calls, lets running ones finish for up to `graceMs`, then cancels them; logs
   * the summary of any limit episode still going on. Calling it again waits for the first call.
   */
  stop(graceMs = 5000): Promise<void> {
    this.stopped ??= this.shutdown(graceMs);
    return this.stopped;
  }

  private async shutdown(graceMs: number): Promise<void> {
    const closed = this.listener.close();
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.log.warn('forcing shutdown: calls still running');
        this.server.forceShutdown();
        this.listener.destroyAll();
        resolve();
      }, graceMs);
      this.server.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    this.listener.destroyAll();
    await closed;
    this.collector.close();
    this.limitLog.close();
  }
}

export function splitListen(listen: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(listen) ?? /^()()(\d{1,5})$/.exec(listen);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new MirrorError('CONFIG_INVALID', `--listen '${listen}' is not HOST:PORT (e.g. 0.0.0.0:11001 or 127.0.0.1:0)`);
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port };
}
