import type * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { MirrorError } from '../errors.js';
import { toServiceError } from './status.js';

/**
 * Stands in for a request that could not be decoded. grpc-js answers INTERNAL when a deserializer
 * throws; decoding into this marker instead lets the handler answer INVALID_ARGUMENT with a
 * message that says what was wrong. (Requests over the receive limit never get here: grpc-js
 * refuses them from their length prefix, before buffering them; see server.ts.)
 */
class RejectedRequest {
  constructor(readonly reason: string) {}
}

/** A copy of a generated service definition whose request decoders never throw. */
export function guardedDefinition<D extends grpc.ServiceDefinition>(definition: D): D {
  const guarded: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const [method, def] of Object.entries(definition) as [string, grpc.MethodDefinition<unknown, unknown>][]) {
    guarded[method] = {
      ...def,
      requestDeserialize: (buf: Buffer): unknown => {
        try {
          return def.requestDeserialize(buf);
        } catch (err) {
          return new RejectedRequest(`request is not a valid ${def.path} message: ${err instanceof Error ? err.message : String(err)}`);
        }
      },
    };
  }
  return guarded as unknown as D;
}

/** Throws INVALID_ARGUMENT for a request message that could not be decoded (see RejectedRequest). */
export function checkDecoded(request: unknown): void {
  if (request instanceof RejectedRequest) throw new MirrorError('INVALID_ARGUMENT', request.reason);
}

/** Adapts `async (request) => response` to grpc-js; the only place unary errors are mapped. */
export function unary<Req, Res>(
  log: Logger,
  method: string,
  fn: (request: Req, call: grpc.ServerUnaryCall<Req, Res>) => Promise<Res>,
): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    Promise.resolve()
      .then(() => {
        checkDecoded(call.request);
        return fn(call.request, call);
      })
      .then(
        (res) => callback(null, res),
        (err: unknown) => callback(toServiceError(err, log, method)),
      );
  };
}

/** Adapts an async server-streaming handler; it writes to the call and resolves when done. */
export function serverStream<Req, Res>(
  log: Logger,
  method: string,
  fn: (request: Req, call: grpc.ServerWritableStream<Req, Res>) => Promise<void>,
): grpc.handleServerStreamingCall<Req, Res> {
  return (call) => {
    Promise.resolve()
      .then(() => {
        checkDecoded(call.request);
        return fn(call.request, call);
      })
      .then(
        () => call.end(),
        (err: unknown) => {
          if (!call.cancelled) call.emit('error', toServiceError(err, log, method));
        },
      );
  };
}

/** Adapts an async client-streaming handler: it reads the call and resolves with the response. */
export function clientStream<Req, Res>(
  log: Logger,
  method: string,
  fn: (call: grpc.ServerReadableStream<Req, Res>) => Promise<Res>,
): grpc.handleClientStreamingCall<Req, Res> {
  return (call, callback) => {
    call.on('error', () => undefined);
    Promise.resolve()
      .then(() => fn(call))
      .then(
        (res) => callback(null, res),
        (err: unknown) => {
          callback(toServiceError(err, log, method));
          call.destroy();
        },
      );
  };
}

/** Adapts a client-streaming handler that answers without reading (the refused writes). */
export function clientStreamRefusal<Req, Res>(
  log: Logger,
  method: string,
  refuse: () => MirrorError,
): grpc.handleClientStreamingCall<Req, Res> {
  return (call, callback) => {
    call.on('error', () => undefined);
    callback(toServiceError(refuse(), log, method));
    call.destroy();
  };
}

/** The one refusal every write RPC of the pull-only mirror gives (PERMISSION_DENIED). */
export function readOnlyError(what: string): MirrorError {
  return new MirrorError('READ_ONLY', `${what} refused: bst-cache-mirror is a pull-only mirror. List it with push: false (with push: true BuildStream drops it, for pulls too) and push to the upstream cache`);
}
