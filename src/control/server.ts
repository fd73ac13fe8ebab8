import { chmod, unlink } from 'node:fs/promises';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import type { z } from 'zod';
import type { VerifyReport } from '../cas/verify.js';
import { MirrorError, describeError, errorMessage } from '../errors.js';
import { toServiceError } from '../server/status.js';
import type { SyncProgress, SyncReport } from '../sync/sync-job.js';
import { socketAnswers } from './socket.js';
import {
  type PushReport,
  pushRequestSchema,
  type StatusReport,
  type SyncEvent,
  controlService,
  CONTROL_CHANNEL_OPTIONS,
  MAX_SOCKET_PATH_BYTES,
  controlSocketPath,
  statusRequestSchema,
  syncRequestSchema,
  verifyRequestSchema,
} from './protocol.js';

export type ParsedSyncRequest = z.output<typeof syncRequestSchema>;
export type ParsedVerifyRequest = z.output<typeof verifyRequestSchema>;
export type ParsedPushRequest = z.output<typeof pushRequestSchema>;

/** What the daemon does for the CLI; the endpoint only decodes, validates and maps errors. */
export interface ControlHandlers {
  sync(request: ParsedSyncRequest, onProgress: (p: SyncProgress) => void, signal: AbortSignal): Promise<{ report: SyncReport; notes: string[] }>;
  status(): Promise<StatusReport>;
  verify(request: ParsedVerifyRequest): Promise<VerifyReport>;
  push(request: ParsedPushRequest): Promise<PushReport>;
}

/** Progress events sent at most this often; the last state is always sent before the report. */
const PROGRESS_INTERVAL_MS = 200;

/**
 * The status of the one error table, with the whole cause chain in the message: the CLI prints
 * it as it would print the error itself (and tells environment failures by it).
 */
function controlError(err: unknown, log: Logger, method: string): Partial<grpc.ServiceError> {
  const e = toServiceError(err, log, method);
  const details = describeError(err);
  return { ...e, details, message: details };
}

function parse<S extends z.ZodType>(schema: S, request: unknown, version: string): z.output<S> {
  const parsed = schema.safeParse(request);
  if (!parsed.success) throw new MirrorError('INVALID_ARGUMENT', `invalid control request: ${parsed.error.issues.map((i) => `${i.path.join('.') || '(request)'}: ${i.message}`).join('; ')}`);
  const data = parsed.data as z.output<S> & { version: string };
  if (data.version !== version) {
    throw new MirrorError('CONFIG_INVALID', `the running daemon is bst-cache-mirror ${version} and this command is ${data.version}: restart the daemon after an upgrade`);
  }
  return data;
}

/** A unary control method: validates, runs the handler, maps its error. */
function controlUnary<Res>(log: Logger, method: string, fn: (request: unknown) => Promise<Res>): grpc.handleUnaryCall<unknown, Res> {
  return (call, callback) => {
    Promise.resolve()
      .then(() => fn(call.request))
      .then(
        (res) => callback(null, res),
        (err: unknown) => callback(controlError(err, log, method)),
      );
  };
}

/** The control endpoint on `<dir>/control.sock`, readable and writable by its owner only. */
export class ControlServer {
  private constructor(
    private readonly server: grpc.Server,
    readonly path: string,
  ) {}

  static async start(dir: string, version: string, handlers: ControlHandlers, log: Logger): Promise<ControlServer> {
    const path = controlSocketPath(dir);
    // sockaddr_un holds 107 bytes; grpc would bind a truncated path elsewhere.
    if (Buffer.byteLength(path) > MAX_SOCKET_PATH_BYTES) {
      throw new MirrorError('CONFIG_INVALID', `the data directory ${dir} is too long a path for its control socket (${Buffer.byteLength(path)} bytes; at most ${MAX_SOCKET_PATH_BYTES}): use a shorter dir`);
    }
    await removeStaleSocket(path);
    const server = new grpc.Server(CONTROL_CHANNEL_OPTIONS);
    server.addService(controlService, {
      sync: (call: grpc.ServerWritableStream<unknown, SyncEvent>) => {
        const abort = new AbortController();
        // The CLI went away (Ctrl-C, killed): a run of its names stops rather than holding the runner.
        call.on('cancelled', () => abort.abort(new Error('the client that asked for it went away')));
        let last = 0;
        let pending: SyncProgress | undefined;
        const flush = (): void => {
          if (pending && !call.cancelled) call.write({ progress: pending });
          pending = undefined;
        };
        Promise.resolve()
          .then(() => parse(syncRequestSchema, call.request, version))
          .then((request) =>
            handlers.sync(
              request,
              (p) => {
                pending = p;
                const now = Date.now();
                if (now - last >= PROGRESS_INTERVAL_MS) {
                  last = now;
                  flush();
                }
              },
              abort.signal,
            ),
          )
          .then(
            ({ report, notes }) => {
              flush();
              if (call.cancelled) return;
              call.write({ report, notes });
              call.end();
            },
            (err: unknown) => {
              if (!call.cancelled) call.emit('error', controlError(err, log, 'control.Sync'));
            },
          );
      },
      status: controlUnary(log, 'control.Status', (request) => {
        parse(statusRequestSchema, request, version);
        return handlers.status();
      }),
      push: controlUnary(log, 'control.Push', (request) => handlers.push(parse(pushRequestSchema, request, version))),
      verify: controlUnary(log, 'control.Verify', (request) => handlers.verify(parse(verifyRequestSchema, request, version))),
    });
    // Created owner-only: no moment at which another user could connect.
    const umask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => server.bindAsync(`unix:${path}`, grpc.ServerCredentials.createInsecure(), (err) => (err ? reject(err) : resolve())));
    } catch (err) {
      throw new MirrorError('CONFIG_INVALID', `cannot create the control socket ${path}: ${errorMessage(err)}`, { cause: err });
    } finally {
      process.umask(umask);
    }
    try {
      await chmod(path, 0o600);
    } catch (err) {
      server.forceShutdown();
      throw new MirrorError('CONFIG_INVALID', `cannot make the control socket ${path} owner-only: ${errorMessage(err)}`, { cause: err });
    }
    log.info({ path }, 'control endpoint listening');
    return new ControlServer(server, path);
  }

  async stop(): Promise<void> {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.server.forceShutdown();
        resolve();
      }, 2000);
      this.server.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    await unlink(this.path).catch(() => undefined);
  }
}

/**
 * A socket file left by a daemon that died (kill -9) refuses connections: remove it. One that
 * answers belongs to a live daemon, but the store's lock would have stopped us before this.
 */
async function removeStaleSocket(path: string): Promise<void> {
  const alive = await socketAnswers(path);
  if (alive) throw new MirrorError('STORE_LOCKED', `another bst-cache-mirror daemon answers on ${path}`);
  await unlink(path).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== 'ENOENT') throw new MirrorError('CONFIG_INVALID', `cannot remove the stale control socket ${path}: ${err.message}`, { cause: err });
  });
}
