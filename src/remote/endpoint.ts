import { connect as connectTls } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { FetchClient, PushClient } from '../gen/build/bazel/remote/asset/v1/remote_asset.js';
import {
  CapabilitiesClient,
  ContentAddressableStorageClient,
} from '../gen/build/bazel/remote/execution/v2/remote_execution.js';
import { ReferenceStorageClient } from '../gen/buildstream/v2/buildstream.js';
import { ByteStreamClient } from '../gen/google/bytestream/bytestream.js';
import { MirrorError, errorMessage } from '../errors.js';
import { checkKeyPair, checkPem, readOptional } from '../pem.js';

/** How to reach one gRPC server: its URL, instance name, TLS and token settings. */
export interface EndpointSpec {
  /** `http://host:port` (h2c) or `https://host:port` (TLS). */
  readonly url: string;
  readonly instanceName?: string | undefined;
  /** PEM file of the CA(s) to trust for https; the system CAs when unset. */
  readonly serverCertFile?: string | undefined;
  readonly clientCertFile?: string | undefined;
  readonly clientKeyFile?: string | undefined;
  /** File holding a bearer token, sent as `authorization: Bearer …`. */
  readonly accessTokenFile?: string | undefined;
  /** Deadline of each unary call (default 60 s), connecting included: a silent peer costs no more. */
  readonly rpcTimeoutMs?: number | undefined;
}

export const DEFAULT_RPC_TIMEOUT_MS = 60_000;
const TLS_PROBE_TIMEOUT_MS = 5_000;
/**
 * HTTP/2 receive window for upstream connections and each of their streams: enough for line rate
 * on a LAN, and a bound on the data buffered per stream (a 2 GiB blob syncs in under 200 MiB RSS).
 */
const FLOW_CONTROL_WINDOW_BYTES = 8 << 20;
/** Our channel accepts messages this large, so a batch at the server's limit always fits. */
const MAX_MESSAGE_BYTES = 64 << 20;

export type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: grpc.Metadata,
  options: Partial<grpc.CallOptions>,
  callback: (error: grpc.ServiceError | null, response: Res) => void,
) => grpc.ClientUnaryCall;

/** One connection to an upstream server, with a client for each service the mirror calls. */
export class Endpoint {
  readonly url: string;
  readonly instanceName: string;
  readonly cas: ContentAddressableStorageClient;
  readonly capabilities: CapabilitiesClient;
  readonly bytestream: ByteStreamClient;
  readonly fetch: FetchClient;
  /** Remote Asset Push, for replicating names to upstreams configured with `push: true`. */
  readonly push: PushClient;
  readonly refs: ReferenceStorageClient;
  private readonly channel: grpc.Channel;
  private readonly rpcTimeoutMs: number;

  private constructor(
    spec: EndpointSpec,
    target: string,
    credentials: grpc.ChannelCredentials,
    private readonly token: string | undefined,
  ) {
    this.url = spec.url;
    this.rpcTimeoutMs = spec.rpcTimeoutMs ?? DEFAULT_RPC_TIMEOUT_MS;
    this.instanceName = spec.instanceName ?? '';
    this.channel = new grpc.Channel(target, credentials, {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
      // A dead peer (a WAN link gone, a host powered off) is noticed within about 25 s even
      // mid-stream, where no deadline applies; servers accept pings this often while a call runs.
      'grpc.keepalive_time_ms': 15_000,
      'grpc.keepalive_timeout_ms': 10_000,
      // HTTP/2's default 64 KiB window, shared by every stream on the connection, caps a
      // transfer at one window per round trip; the gRPC C core grows its windows by probing,
      // grpc-js needs telling. Measured: 8 ByteStream reads went from ~56 MB/s each to line rate.
      'grpc-node.flow_control_window': FLOW_CONTROL_WINDOW_BYTES,
    });
    const options = { channelOverride: this.channel };
    this.cas = new ContentAddressableStorageClient(target, credentials, options);
    this.capabilities = new CapabilitiesClient(target, credentials, options);
    this.bytestream = new ByteStreamClient(target, credentials, options);
    this.fetch = new FetchClient(target, credentials, options);
    this.push = new PushClient(target, credentials, options);
    this.refs = new ReferenceStorageClient(target, credentials, options);
  }

  /** Builds the client; reads certificate and token files now so a bad path fails early. */
  static async create(spec: EndpointSpec): Promise<Endpoint> {
    const { target, tls } = parseUpstreamUrl(spec.url);
    let credentials: grpc.ChannelCredentials;
    if (tls) {
      const [ca, cert, key] = await Promise.all([
        readOptional(spec.serverCertFile, 'server certificate'),
        readOptional(spec.clientCertFile, 'client certificate'),
        readOptional(spec.clientKeyFile, 'client key'),
      ]);
      checkPem(spec.serverCertFile, ca, 'server certificate');
      checkPem(spec.clientCertFile, cert, 'client certificate');
      checkPem(spec.clientKeyFile, key, 'client key');
      if ((cert === undefined) !== (key === undefined)) {
        throw new MirrorError('CONFIG_INVALID', `upstream ${spec.url}: a client certificate and a client key must be given together`);
      }
      if (cert !== undefined && key !== undefined) checkKeyPair(spec.clientCertFile ?? '', cert, spec.clientKeyFile ?? '', key);
      credentials = grpc.credentials.createSsl(ca ?? null, key ?? null, cert ?? null);
    } else {
      if (spec.serverCertFile || spec.clientCertFile || spec.clientKeyFile) {
        throw new MirrorError('CONFIG_INVALID', `upstream ${spec.url}: certificates need an https:// URL`);
      }
      credentials = grpc.credentials.createInsecure();
    }
    let token: string | undefined;
    if (spec.accessTokenFile) {
      token = (await readOptional(spec.accessTokenFile, 'access token'))?.toString('utf8').trim();
      if (!token) throw new MirrorError('CONFIG_INVALID', `upstream ${spec.url}: the access token file ${spec.accessTokenFile} is empty`);
    }
    return new Endpoint(spec, target, credentials, token);
  }

  close(): void {
    this.channel.close();
  }

  metadata(): grpc.Metadata {
    const md = new grpc.Metadata();
    if (this.token) md.set('authorization', `Bearer ${this.token}`);
    return md;
  }

  call<Req, Res>(method: UnaryMethod<Req, Res>, client: grpc.Client, request: Req): Promise<Res> {
    return new Promise((resolve, reject) => {
      method.call(client, request, this.metadata(), { deadline: Date.now() + this.rpcTimeoutMs }, (err, res) => {
        if (err) reject(err);
        else resolve(res);
      });
    });
  }

  /**
   * Whether this plaintext endpoint's port answers a TLS handshake: gRPC only reports a failed
   * connection when an http:// URL names a TLS server, so the cause is checked for explicitly.
   */
  async speaksTls(): Promise<boolean> {
    const { target, tls } = parseUpstreamUrl(this.url);
    if (tls) return false;
    const colon = target.lastIndexOf(':');
    const socket = connectTls({ host: target.slice(0, colon).replace(/^\[|\]$/g, ''), port: Number(target.slice(colon + 1)), rejectUnauthorized: false, ALPNProtocols: ['h2'] });
    socket.setTimeout(TLS_PROBE_TIMEOUT_MS);
    try {
      return await new Promise<boolean>((resolve) => {
        socket.once('secureConnect', () => resolve(true));
        socket.once('error', () => resolve(false));
        socket.once('timeout', () => resolve(false));
        socket.once('close', () => resolve(false));
      });
    } finally {
      socket.destroy();
    }
  }

  /** Upstream failures never travel on as they are: they name the upstream and say what failed. */
  wrap(err: unknown, what: string): MirrorError {
    if (err instanceof MirrorError) return err;
    const code = grpcCode(err);
    const detail = code === undefined ? errorMessage(err) : `${grpc.status[code] ?? code}: ${(err as grpc.ServiceError).details}`;
    // CANCELLED that we did not ask for is the upstream dropping the call (stopped or restarted).
    const unavailable = code === grpc.status.UNAVAILABLE || code === grpc.status.DEADLINE_EXCEEDED || code === grpc.status.CANCELLED;
    return new MirrorError(unavailable ? 'UPSTREAM_UNAVAILABLE' : 'UPSTREAM_ERROR', `${this.url}: ${what} failed (${detail})`, { cause: err });
  }
}

export function grpcCode(err: unknown): grpc.status | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'number') return err.code;
  return undefined;
}

/** `http(s)://host[:port]` -> a grpc target. Default ports are BuildStream's (80 and 443). */
export function parseUpstreamUrl(url: string): { target: string; tls: boolean } {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new MirrorError('CONFIG_INVALID', `upstream '${url}' is not a URL (expected http://HOST:PORT or https://HOST:PORT)`);
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw new MirrorError('CONFIG_INVALID', `upstream '${url}' has scheme '${parsed.protocol.replace(/:$/, '')}': only http and https are supported`);
  }
  if ((parsed.pathname !== '/' && parsed.pathname !== '') || parsed.search || parsed.hash || parsed.username) {
    throw new MirrorError('CONFIG_INVALID', `upstream '${url}' must be only a scheme, host and port (use --instance-name for an instance)`);
  }
  const tls = parsed.protocol === 'https:';
  const port = parsed.port || (tls ? '443' : '80');
  return { target: `${parsed.hostname}:${port}`, tls };
}
