import type * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { ReferenceStorageService, type ReferenceStorageServer } from '../gen/buildstream/v2/buildstream.js';
import type { ContentStore } from '../cas/content-store.js';
import { fromWire, toWire } from '../cas/digest.js';
import { refName } from '../cas/names.js';
import { MirrorError } from '../errors.js';
import { lookupName } from './asset-service.js';
import type { MissHandler } from './miss-handler.js';
import type { PushIntake } from './push-intake.js';
import { guardedDefinition, readOnlyError, unary } from './handler.js';

/**
 * BuildStream 1.x's ReferenceStorage. A ref `R` is the record of `urn:…:v1:R`, so a 1.6 client in
 * asset mode and one using ReferenceStorage see the same Directory.
 */
export class ReferenceStorageReadService {
  constructor(
    private readonly store: ContentStore,
    private readonly log: Logger,
    private readonly missHandler?: MissHandler,
    /** Present on a push listener: UpdateReference records refs; otherwise refused. */
    private readonly intake?: PushIntake,
  ) {}

  addToServer(server: Pick<grpc.Server, 'addService'>): void {
    const impl: ReferenceStorageServer = {
      getReference: unary(this.log, 'GetReference', async (req) => {
        const name = refName(req.key);
        let record = await lookupName(this.store, name);
        if (!record && (await this.missHandler?.nameMissed(name))) record = await lookupName(this.store, name);
        if (!record) throw new MirrorError('NAME_NOT_FOUND', `ref '${req.key}' is not in the mirror`);
        return { digest: toWire(record.digest) };
      }),
      updateReference: unary(this.log, 'UpdateReference', async (req, call) => {
        if (!this.intake) throw readOnlyError('UpdateReference');
        if (req.keys.length === 0) throw new MirrorError('INVALID_ARGUMENT', 'UpdateReference needs at least one key');
        const digest = fromWire(req.digest, 'digest');
        await this.intake.recordNames(req.keys.map(refName), digest, { blobs: [], directories: [] }, call.getPeer());
        return {};
      }),
      status: unary(this.log, 'ReferenceStorage.Status', async () => ({ allowUpdates: this.intake !== undefined })),
    };
    server.addService(guardedDefinition(ReferenceStorageService), impl);
  }
}
