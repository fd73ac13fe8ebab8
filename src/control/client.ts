import * as grpc from '@grpc/grpc-js';
import type { VerifyReport } from '../cas/verify.js';
import { MirrorError, type MirrorErrorCode } from '../errors.js';
import { ERROR_CODE_KEY } from '../server/status.js';
import type { SyncProgress, SyncReport } from '../sync/sync-job.js';
import { socketAnswers } from './socket.js';
import { CONTROL_CHANNEL_OPTIONS, type PushReport, type PushRequest, type StatusReport, type SyncEvent, type SyncRequest, controlService, controlSocketPath } from './protocol.js';

const CONTROL_CODES: ReadonlySet<string> = new Set<MirrorErrorCode>([
  'INVALID_ARGUMENT',
  'UNSUPPORTED',
  'BATCH_TOO_LARGE',
  'OUT_OF_RANGE',
  'BLOB_NOT_FOUND',
  'NAME_NOT_FOUND',
  'DIGEST_MISMATCH',
  'BLOB_CORRUPT',
  'READ_ONLY',
  'CLOSURE_INCOMPLETE',
  'UPSTREAM_UNAVAILABLE',
  'UPSTREAM_ERROR',
  'STORE_LOCKED',
  'CONFIG_INVALID',
]);

const ControlGrpcClient = grpc.makeGenericClientConstructor(controlService, 'Control');

const STATUS_DEADLINE_MS = 30_000;

/** The CLI's side of the control endpoint (see protocol.ts). */
export class ControlClient {
  private constructor(
    private readonly client: grpc.Client,
    readonly path: string,
  ) {}

  /** A client of the daemon that owns `dir`, or undefined when none is running there. */
  static async connect(dir: string): Promise<ControlClient | undefined> {
    const path = controlSocketPath(dir);
    // A socket file without a listener is what a killed daemon leaves: no daemon.
    const alive = await socketAnswers(path);
    if (!alive) return undefined;
    return new ControlClient(new ControlGrpcClient(`unix:${path}`, grpc.credentials.createInsecure(), CONTROL_CHANNEL_OPTIONS), path);
  }

  close(): void {
    this.client.close();
  }

  sync(request: SyncRequest, onProgress: (p: SyncProgress) => void): Promise<{ report: SyncReport; notes: readonly string[] }> {
    return new Promise((resolve, reject) => {
      const call = this.client.makeServerStreamRequest(controlService.sync.path, controlService.sync.requestSerialize, controlService.sync.responseDeserialize, request);
      let result: { report: SyncReport; notes: readonly string[] } | undefined;
      call.on('data', (event: SyncEvent) => {
        if ('progress' in event) onProgress(event.progress);
        else result = event;
      });
      call.on('error', (err: grpc.ServiceError) => reject(fromControlError(err, this.path)));
      call.on('end', () => (result ? resolve(result) : reject(new MirrorError('UPSTREAM_ERROR', `the daemon on ${this.path} ended the sync without a report`))));
    });
  }

  status(request: { version: string }): Promise<StatusReport> {
    // Status is quick in a healthy daemon; one stopped (SIGSTOP) or wedged must not hang the CLI.
    return this.unary(controlService.status, request, STATUS_DEADLINE_MS);
  }

  verify(request: { version: string; repair: boolean; prune: boolean }): Promise<VerifyReport> {
    return this.unary(controlService.verify, request);
  }

  push(request: PushRequest): Promise<PushReport> {
    return this.unary(controlService.push, request);
  }

  private unary<Res>(method: grpc.MethodDefinition<unknown, Res>, request: unknown, deadlineMs?: number): Promise<Res> {
    return new Promise((resolve, reject) => {
      const options: grpc.CallOptions = deadlineMs === undefined ? {} : { deadline: Date.now() + deadlineMs };
      this.client.makeUnaryRequest(method.path, method.requestSerialize, method.responseDeserialize, request, new grpc.Metadata(), options, (err, res) => {
        if (err?.code === grpc.status.DEADLINE_EXCEEDED) reject(new MirrorError('UPSTREAM_ERROR', `the daemon on ${this.path} did not answer within ${(deadlineMs ?? 0) / 1000} s: is it stopped or overloaded?`));
        else if (err) reject(fromControlError(err, this.path));
        else if (res === undefined) reject(new MirrorError('UPSTREAM_ERROR', `the daemon on ${this.path} sent an empty answer`));
        else resolve(res);
      });
    });
  }
}

/** The daemon's error as the CLI would have raised it running the job itself. */
function fromControlError(err: grpc.ServiceError, path: string): MirrorError {
  const code = err.metadata?.get(ERROR_CODE_KEY)[0];
  if (typeof code === 'string' && CONTROL_CODES.has(code)) return new MirrorError(code as MirrorErrorCode, err.details);
  if (err.code === grpc.status.UNAVAILABLE) return new MirrorError('UPSTREAM_ERROR', `lost the daemon on ${path}: ${err.details}`);
  return new MirrorError('UPSTREAM_ERROR', `the daemon on ${path} failed: ${err.details}`);
}
