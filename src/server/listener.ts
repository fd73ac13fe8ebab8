import { readFileSync } from 'node:fs';
import net from 'node:net';
import * as grpc from '@grpc/grpc-js';
import { MirrorError, errorMessage } from '../errors.js';
import type { LimitLog } from './limit-log.js';

/** Connections served at once by default, unless the open-file limit calls for fewer. */
export const DEFAULT_MAX_CONNECTIONS = 1000;

/** The process's open-file limit (soft), or undefined where /proc does not say. */
export function openFileLimit(): number | undefined {
  try {
    const line = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
    return line?.[1] === undefined || line[1] === 'unlimited' ? undefined : Number(line[1]);
  } catch {
    return undefined;
  }
}

/**
 * The default connection cap: DEFAULT_MAX_CONNECTIONS, or half the open-file limit if that is
 * lower, so that blob reads and the index keep file descriptors when every connection is taken.
 */
export function defaultMaxConnections(): number {
  const files = openFileLimit();
  return files === undefined ? DEFAULT_MAX_CONNECTIONS : Math.max(1, Math.min(DEFAULT_MAX_CONNECTIONS, Math.floor(files / 2)));
}

/**
 * The TCP listener in front of the grpc-js server. grpc-js's own binding gives no say over
 * connections; here each accepted socket is handed to grpc-js (a connection injector), so that
 * connections over `maxConnections` are refused at once and logged (rather than the process running
 * out of file descriptors, when accepting fails and nothing is logged), accept errors are logged,
 * and a call's connection can be closed.
 */
export class ConnectionListener {
  private readonly sockets = new Map<string, { readonly socket: net.Socket; bytes: number; since: number }>();
  private sweeper: NodeJS.Timeout | undefined;

  private constructor(
    private readonly server: net.Server,
    private readonly injector: grpc.ConnectionInjector,
    /** The address actually bound, e.g. `127.0.0.1:40123`. */
    readonly address: string,
  ) {}

  static async listen(
    grpcServer: grpc.Server,
    host: string,
    port: number,
    options: { maxConnections: number; silentTimeoutMs: number; limits: LimitLog; listen: string; credentials?: grpc.ServerCredentials },
  ): Promise<ConnectionListener> {
    // grpc-js runs the TLS handshake itself on injected connections when the credentials are secure.
    const injector = grpcServer.createConnectionInjector(options.credentials ?? grpc.ServerCredentials.createInsecure());
    const server = net.createServer();
    server.maxConnections = options.maxConnections;
    const bound = await new Promise<number>((resolve, reject) => {
      server.once('error', (err) => reject(new MirrorError('CONFIG_INVALID', `cannot listen on ${options.listen}: ${errorMessage(err)}`, { cause: err })));
      server.listen({ host, port }, () => {
        const address = server.address();
        resolve(typeof address === 'object' && address !== null ? address.port : port);
      });
    });
    const listener = new ConnectionListener(server, injector, `${host.includes(':') ? `[${host}]` : host}:${bound}`);
    server.removeAllListeners('error');
    server.on('error', (err) => {
      // After listening, only accepting fails: out of file descriptors (EMFILE, ENFILE) or memory.
      options.limits.hit('accept', `cannot accept connections: ${errorMessage(err)}`, { code: (err as NodeJS.ErrnoException).code });
    });
    server.on('drop', (peer) => {
      options.limits.hit('connections', `refusing new connections: ${options.maxConnections} are open (--max-connections)`, {
        peer: peer ? `${peer.remoteAddress ?? ''}:${peer.remotePort ?? ''}` : undefined,
      });
    });
    server.on('connection', (socket) => listener.adopt(socket));
    if (options.silentTimeoutMs > 0) listener.sweepSilent(options.silentTimeoutMs);
    return listener;
  }

  /** Connections open now. */
  get connections(): number {
    return this.sockets.size;
  }

  /** Closes the connection from `remoteAddress:remotePort`, if it is open. */
  drop(remoteAddress: string | undefined, remotePort: number | undefined): void {
    this.sockets.get(`${remoteAddress ?? ''}:${remotePort ?? ''}`)?.socket.destroy();
  }

  /** Stops accepting; open connections are left to the grpc-js server's shutdown. */
  async close(): Promise<void> {
    clearInterval(this.sweeper);
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  /** Closes every connection at once. */
  destroyAll(): void {
    for (const { socket } of this.sockets.values()) socket.destroy();
    this.injector.destroy();
  }

  private adopt(socket: net.Socket): void {
    const key = `${socket.remoteAddress ?? ''}:${socket.remotePort ?? ''}`;
    this.sockets.set(key, { socket, bytes: 0, since: Date.now() });
    socket.once('close', () => {
      if (this.sockets.get(key)?.socket === socket) this.sockets.delete(key);
    });
    this.injector.injectConnection(socket);
  }

  /**
   * Closes connections on which nothing at all has been sent or received for `timeoutMs`. grpc-js
   * closes a connection without calls after the idle timeout with a GOAWAY, but Node then waits
   * for the peer, so a client that never speaks HTTP/2, or ignores the GOAWAY, would keep its
   * connection (and file descriptor) forever. Socket timeouts cannot tell: HTTP/2 reads and writes
   * bypass them, so the byte counters are compared instead.
   */
  private sweepSilent(timeoutMs: number): void {
    this.sweeper = setInterval(
      () => {
        const now = Date.now();
        for (const entry of this.sockets.values()) {
          const bytes = entry.socket.bytesRead + entry.socket.bytesWritten;
          if (bytes !== entry.bytes) {
            entry.bytes = bytes;
            entry.since = now;
          } else if (now - entry.since >= timeoutMs) {
            entry.socket.destroy();
          }
        }
      },
      Math.max(10, Math.min(timeoutMs / 4, 10_000)),
    );
    this.sweeper.unref();
  }
}
