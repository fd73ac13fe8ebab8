import type * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import {
  CapabilitiesService,
  type CapabilitiesServer,
  DigestFunction_Value,
  SymlinkAbsolutePathStrategy_Value,
} from '../gen/build/bazel/remote/execution/v2/remote_execution.js';
import { guardedDefinition, unary } from './handler.js';
import { checkInstanceName } from './request-checks.js';

/** REAPI Capabilities: SHA-256 only, no compressors, the batch limit we enforce, no AC updates. */
export class CapabilitiesReadService {
  constructor(
    private readonly maxBatchBytes: number,
    private readonly log: Logger,
  ) {}

  addToServer(server: Pick<grpc.Server, 'addService'>): void {
    const impl: CapabilitiesServer = {
      getCapabilities: unary(this.log, 'GetCapabilities', async (req) => {
        checkInstanceName(req.instanceName);
        return {
          cacheCapabilities: {
            digestFunctions: [DigestFunction_Value.SHA256],
            actionCacheUpdateCapabilities: { updateEnabled: false },
            maxBatchTotalSizeBytes: BigInt(this.maxBatchBytes),
            symlinkAbsolutePathStrategy: SymlinkAbsolutePathStrategy_Value.ALLOWED,
          },
          deprecatedApiVersion: { major: 2, minor: 0, patch: 0, prerelease: '' },
          lowApiVersion: { major: 2, minor: 0, patch: 0, prerelease: '' },
          highApiVersion: { major: 2, minor: 0, patch: 0, prerelease: '' },
        };
      }),
    };
    server.addService(guardedDefinition(CapabilitiesService), impl);
  }
}
