import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import type { ContentStore } from '../cas/content-store.js';
import { MirrorError, errorMessage } from '../errors.js';
import { AssetService } from './asset-service.js';
import { ByteStreamReadService } from './bytestream-service.js';
import { CapabilitiesReadService } from './capabilities-service.js';
import { CasService } from './cas-service.js';
import { HARD_RECEIVE_LIMIT_BYTES } from './handler.js';
import { ReferenceStorageReadService } from './reference-storage-service.js';

export interface ServeOptions {
  /** `host:port`; port 0 picks a free port. */
  readonly listen: string;
  /** The BatchReadBlobs limit advertised in Capabilities and enforced. */
  readonly maxBatchBytes: number;
  readonly log: Logger;
}

/** BuildStream 1.6 caps batches at 1 MiB whatever the server says; 2.x follows the server. */
export const DEFAULT_MAX_BATCH_BYTES = 1 << 20;

/** The pull-only gRPC server: every service on one port. It only ever talks to the store. */
export class MirrorServer {
  private constructor(
    private readonly server: grpc.Server,
    /** The address actually bound, e.g. `127.0.0.1:40123`. */
    readonly address: string,
    private readonly log: Logger,
  ) {}

  static async start(store: ContentStore, options: ServeOptions): Promise<MirrorServer> {
    const server = new grpc.Server({
      'grpc.max_receive_message_length': HARD_RECEIVE_LIMIT_BYTES,
      // Batch responses hold up to maxBatchBytes of data plus per-entry overhead.
      'grpc.max_send_message_length': Math.max(options.maxBatchBytes * 2, 16 << 20),
    });
    const log = options.log;
    new CapabilitiesReadService(options.maxBatchBytes, log).addToServer(server);
    new CasService(store, options.maxBatchBytes, log).addToServer(server);
    new ByteStreamReadService(store, log).addToServer(server);
    new AssetService(store, log).addToServer(server);
    new ReferenceStorageReadService(store, log).addToServer(server);
    const { host, port } = splitListen(options.listen);
    const bound = await new Promise<number>((resolve, reject) => {
      server.bindAsync(`${host.includes(':') ? `[${host}]` : host}:${port}`, grpc.ServerCredentials.createInsecure(), (err, p) => {
        if (err) reject(new MirrorError('CONFIG_INVALID', `cannot listen on ${options.listen}: ${errorMessage(err)}`, { cause: err }));
        else resolve(p);
      });
    });
    const address = `${host.includes(':') ? `[${host}]` : host}:${bound}`;
    log.info({ address }, 'serving');
    return new MirrorServer(server, address, log);
  }

  /** Stops accepting calls, lets running ones finish for up to `graceMs`, then cancels them. */
  async stop(graceMs = 5000): Promise<void> {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.log.warn('forcing shutdown: calls still running');
        this.server.forceShutdown();
        resolve();
      }, graceMs);
      this.server.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }
}

export function splitListen(listen: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(listen) ?? /^()()(\d{1,5})$/.exec(listen);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new MirrorError('CONFIG_INVALID', `--listen '${listen}' is not HOST:PORT (e.g. 0.0.0.0:11001 or 127.0.0.1:0)`);
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port };
}
