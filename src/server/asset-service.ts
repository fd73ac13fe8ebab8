import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import {
  FetchService,
  type FetchServer,
  PushService,
  type PushServer,
} from '../gen/build/bazel/remote/asset/v1/remote_asset.js';
import type { ContentStore, NameRecord } from '../cas/content-store.js';
import { type Digest, fromWire, toWire } from '../cas/digest.js';
import { type MirrorName, isDirectoryName, parseUrn } from '../cas/names.js';
import { closureProblem } from '../cas/closure.js';
import { MirrorError } from '../errors.js';
import type { MissHandler } from './miss-handler.js';
import type { PushIntake } from './push-intake.js';
import { guardedDefinition, readOnlyError, unary } from './handler.js';
import { checkDigestFunction, checkInstanceName, checkNoQualifiers } from './request-checks.js';

/**
 * Looks up names for the Remote Asset and ReferenceStorage services. Names are recorded only with
 * their whole closure, so normally checking the top-level digests is enough; once the store has
 * removed damaged blobs, a name is answered only after its whole closure is checked.
 */
export async function lookupName(store: ContentStore, name: MirrorName): Promise<NameRecord | undefined> {
  const record = await store.getName(name.urn);
  if (record === undefined) return undefined;
  const missing = await store.findMissing([record.digest, ...record.referencedBlobs, ...record.referencedDirectories]);
  if (missing.length > 0) return undefined;
  if (!store.hasDamagedBlobs()) return record;
  const read = (d: Digest) => store.readBytes(d).catch(() => undefined);
  const problem = await closureProblem(name.urn, record, read, (ds) => store.findMissing(ds));
  return problem === undefined ? record : undefined;
}

const MAX_URIS_PER_REQUEST = 64;

/** Remote Asset Fetch over the mirrored names; Push is refused (pull-only). */
export class AssetService {
  constructor(
    private readonly store: ContentStore,
    private readonly log: Logger,
    private readonly missHandler?: MissHandler,
    /** Present on a push listener: PushBlob/PushDirectory record names; otherwise refused. */
    private readonly intake?: PushIntake,
  ) {}

  addToServer(server: Pick<grpc.Server, 'addService'>): void {
    const fetch: FetchServer = {
      fetchBlob: unary(this.log, 'FetchBlob', async (req) => {
        const { uri, digest } = await this.fetch(req, 'blob');
        return { status: { code: grpc.status.OK, message: '' }, uri, qualifiers: [], blobDigest: toWire(digest), digestFunction: req.digestFunction };
      }),
      fetchDirectory: unary(this.log, 'FetchDirectory', async (req) => {
        const { uri, digest } = await this.fetch(req, 'directory');
        return { status: { code: grpc.status.OK, message: '' }, uri, qualifiers: [], rootDirectoryDigest: toWire(digest), digestFunction: req.digestFunction };
      }),
    };
    // Refusing (rather than not registering) Push gives `bst push` a clear message; BuildStream
    // treats PERMISSION_DENIED on its empty PushBlob/PushDirectory probe as "no push here".
    const push: PushServer = {
      pushBlob: unary(this.log, 'PushBlob', async (req, call) => {
        if (!this.intake) throw readOnlyError('PushBlob');
        const names = this.pushedNames(req, 'blob');
        const digest = fromWire(req.blobDigest, 'blob_digest');
        const referenced = {
          blobs: req.referencesBlobs.map((d, i) => fromWire(d, `references_blobs[${i}]`)),
          directories: req.referencesDirectories.map((d, i) => fromWire(d, `references_directories[${i}]`)),
        };
        await this.intake.recordNames(names, digest, referenced, call.getPeer());
        return {};
      }),
      pushDirectory: unary(this.log, 'PushDirectory', async (req, call) => {
        if (!this.intake) throw readOnlyError('PushDirectory');
        const names = this.pushedNames(req, 'directory');
        const digest = fromWire(req.rootDirectoryDigest, 'root_directory_digest');
        await this.intake.recordNames(names, digest, { blobs: [], directories: [] }, call.getPeer());
        return {};
      }),
    };
    server.addService(guardedDefinition(FetchService), fetch);
    server.addService(guardedDefinition(PushService), push);
  }

  /** The names of a push request; an empty one is INVALID_ARGUMENT, as BuildStream's push probe expects. */
  private pushedNames(
    req: { instanceName: string; uris: string[]; qualifiers: { name: string; value: string }[]; digestFunction: number },
    want: 'blob' | 'directory',
  ): MirrorName[] {
    checkInstanceName(req.instanceName);
    checkDigestFunction(req.digestFunction);
    checkNoQualifiers(req.qualifiers);
    if (req.uris.length === 0) throw new MirrorError('INVALID_ARGUMENT', 'at least one URI is required');
    if (req.uris.length > MAX_URIS_PER_REQUEST) throw new MirrorError('INVALID_ARGUMENT', `at most ${MAX_URIS_PER_REQUEST} URIs per request, got ${req.uris.length}`);
    const names = req.uris.map(parseUrn);
    for (const name of names) {
      const kind = isDirectoryName(name.kind) ? 'directory' : 'blob';
      if (kind !== want) throw new MirrorError('INVALID_ARGUMENT', `'${name.urn}' names a ${kind}; use Push${kind === 'blob' ? 'Blob' : 'Directory'}`);
    }
    return names;
  }

  private async lookupFirst(uris: readonly string[], names: readonly MirrorName[]): Promise<{ uri: string; digest: Digest } | undefined> {
    for (const [i, name] of names.entries()) {
      const record = await lookupName(this.store, name);
      if (record) return { uri: uris[i] ?? name.urn, digest: record.digest };
    }
    return undefined;
  }

  private async fetch(
    req: { instanceName: string; uris: string[]; qualifiers: { name: string; value: string }[]; digestFunction: number },
    want: 'blob' | 'directory',
  ): Promise<{ uri: string; digest: Digest }> {
    checkInstanceName(req.instanceName);
    checkDigestFunction(req.digestFunction);
    checkNoQualifiers(req.qualifiers);
    // BuildStream probes with an empty request and expects exactly this status.
    if (req.uris.length === 0) throw new MirrorError('INVALID_ARGUMENT', 'at least one URI is required');
    // BuildStream sends one or two; a bound keeps one request from holding the server.
    if (req.uris.length > MAX_URIS_PER_REQUEST) {
      throw new MirrorError('INVALID_ARGUMENT', `at most ${MAX_URIS_PER_REQUEST} URIs per request, got ${req.uris.length}`);
    }
    const names = req.uris.map(parseUrn);
    for (const name of names) {
      const kind = isDirectoryName(name.kind) ? 'directory' : 'blob';
      if (kind !== want) {
        throw new MirrorError('INVALID_ARGUMENT', `'${name.urn}' names a ${kind}; use Fetch${kind === 'blob' ? 'Blob' : 'Directory'}`);
      }
    }
    const found = await this.lookupFirst(req.uris, names);
    if (found) return found;
    if (this.missHandler) {
      const fetched = await Promise.all(names.map((name) => this.missHandler?.nameMissed(name)));
      if (fetched.some(Boolean)) {
        const late = await this.lookupFirst(req.uris, names);
        if (late) return late;
      }
    }
    throw new MirrorError('NAME_NOT_FOUND', names.length === 1 ? `'${names[0]?.urn}' is not in the mirror` : `none of the ${names.length} URIs is in the mirror`);
  }
}
