import http2 from 'node:http2';
import * as grpc from '@grpc/grpc-js';
import type { LimitLog } from './limit-log.js';

export interface CallGuardOptions {
  /** A call whose response HTTP/2 has not taken any of for this long is cancelled (0: never). */
  readonly stallTimeoutMs: number;
  /** The HTTP/2 SETTINGS cap on a connection's concurrent streams (reaching it is logged). */
  readonly maxStreamsPerConnection: number;
  readonly limits: LimitLog;
  /** Closes the connection a call came on: the way to stop a call whose stream we cannot reach. */
  readonly dropConnection: (remoteAddress: string | undefined, remotePort: number | undefined) => void;
}

/**
 * What the guard needs of the call's HTTP/2 stream. grpc-js does not expose it: the base call of
 * the interceptor chain keeps it in its `stream` field, and is what the first (here: the only)
 * interceptor is given. If a grpc-js release moves it, stalled calls fall back to closing their
 * connection, and refusals of oversized requests go unlogged; test/server-limits.test.ts notices.
 */
interface CallStream {
  close(code?: number): void;
  once(event: 'close', listener: () => void): unknown;
  readonly closed: boolean;
  readonly sentHeaders: Record<string, unknown> | undefined;
}

function streamOf(call: grpc.ServerInterceptingCallInterface): CallStream | undefined {
  const stream: unknown = Reflect.get(call, 'stream');
  if (typeof stream !== 'object' || stream === null) return undefined;
  if (!('close' in stream) || typeof stream.close !== 'function' || !('once' in stream) || !('sentHeaders' in stream) || !('closed' in stream)) return undefined;
  return stream as CallStream;
}

/** grpc-js's own refusal of a request over `grpc.max_receive_message_length`, from its length prefix. */
function refusedAsTooLarge(stream: CallStream): string | undefined {
  const sent = stream.sentHeaders;
  if (sent === undefined || Number(sent['grpc-status']) !== grpc.status.RESOURCE_EXHAUSTED) return undefined;
  const message = sent['grpc-message'];
  if (typeof message !== 'string') return 'request too large';
  try {
    return decodeURIComponent(message);
  } catch {
    return message;
  }
}

/**
 * A server interceptor for every call that
 * - cancels a call whose response makes no progress: some of it is waiting for HTTP/2 and none of
 *   it has been taken for `stallTimeoutMs` (a paused or dead client), which frees the memory its
 *   queued messages hold and the send budget it holds; the stream is reset (RST_STREAM CANCEL),
 *   the client sees CANCELLED;
 * - logs requests that grpc-js refused as over the receive limit (it answers RESOURCE_EXHAUSTED
 *   from the message's length prefix, before buffering it, and before any handler runs);
 * - logs a connection reaching its concurrent-stream cap.
 */
export function callGuard(options: CallGuardOptions): grpc.ServerInterceptor {
  const streamsPerConnection = new Map<string, number>();
  return (method, next) => {
    const stream = streamOf(next);
    const { remoteAddress, remotePort } = next.getConnectionInfo();
    const connection = `${remoteAddress ?? ''}:${remotePort ?? ''}`;
    const streams = (streamsPerConnection.get(connection) ?? 0) + 1;
    streamsPerConnection.set(connection, streams);
    if (streams >= options.maxStreamsPerConnection) {
      options.limits.hit('streams-per-connection', `a connection reached its limit of ${options.maxStreamsPerConnection} concurrent calls; its further calls wait in the client`, {
        peer: connection,
      });
    }
    let received = false;
    let over = false;
    const guarded = new GuardedCall(next, {
      start: (nextStart) =>
        nextStart({
          onReceiveMessage: (message, nextMessage) => {
            received = true;
            nextMessage(message);
          },
          onCancel: () => finish(),
        }),
    });
    const finish = (): void => {
      if (over) return;
      over = true;
      guarded.stopWatching();
      const left = (streamsPerConnection.get(connection) ?? 1) - 1;
      if (left > 0) streamsPerConnection.set(connection, left);
      else streamsPerConnection.delete(connection);
      const refusal = stream && !received ? refusedAsTooLarge(stream) : undefined;
      if (refusal !== undefined) {
        options.limits.hit('request-size', `refused a request over the receive limit: ${refusal}`, { method: method.path, peer: connection });
      }
    };
    // The stream's close is certain; onCancel is not, for a stream reset before the call started.
    stream?.once('close', finish);
    if (options.stallTimeoutMs > 0) {
      guarded.watch(options.stallTimeoutMs, () => {
        options.limits.hit('stalled-call', `cancelled a call whose client took none of its response for ${options.stallTimeoutMs / 1000} s (paused or gone); its memory is freed`, {
          method: method.path,
          peer: connection,
        });
        if (stream && !stream.closed) stream.close(http2.constants.NGHTTP2_CANCEL);
        else if (!stream) options.dropConnection(remoteAddress, remotePort);
      });
    }
    return guarded;
  };
}

/** A call that knows how long its oldest untaken response message has waited for HTTP/2. */
class GuardedCall extends grpc.ServerInterceptingCall {
  private pending = 0;
  private lastProgress = 0;
  private timer: NodeJS.Timeout | undefined;
  private timeoutMs = 0;
  private onStall: (() => void) | undefined;

  watch(timeoutMs: number, onStall: () => void): void {
    this.timeoutMs = timeoutMs;
    this.onStall = onStall;
  }

  stopWatching(): void {
    this.onStall = undefined;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  override sendMessage(message: unknown, callback: () => void): void {
    if (this.pending === 0) this.lastProgress = Date.now();
    this.pending += 1;
    if (this.onStall && this.timer === undefined) {
      this.timer = setTimeout(() => this.check(), this.timeoutMs);
      this.timer.unref();
    }
    super.sendMessage(message, () => {
      this.pending -= 1;
      this.lastProgress = Date.now();
      callback();
    });
  }

  private check(): void {
    this.timer = undefined;
    if (!this.onStall || this.pending === 0) return;
    const waited = Date.now() - this.lastProgress;
    if (waited >= this.timeoutMs) {
      const onStall = this.onStall;
      this.stopWatching();
      onStall();
      return;
    }
    this.timer = setTimeout(() => this.check(), this.timeoutMs - waited);
    this.timer.unref();
  }
}
