import assert from 'node:assert/strict';
import test from 'node:test';
import { ControlClient } from '../src/control/client.js';
import { ControlServer, type ControlHandlers } from '../src/control/server.js';
import { silentLogger } from '../src/log.js';
import type { NameResult } from '../src/sync/sync-job.js';
import { VERSION } from '../src/version.js';
import { tempDir } from './helpers/mirror.js';

test('control endpoint: a sync of 60,000 names and its report pass the socket whole (both well over gRPC\'s 4 MiB default)', async (t) => {
  const dir = await tempDir(t);
  const names = Array.from({ length: 60_000 }, (_, i) => `project/element-${i}/${i.toString(16).padStart(64, '0')}`);
  let asked = 0;
  const handlers: ControlHandlers = {
    sync: async (request) => {
      asked = request.names.length;
      const results: NameResult[] = request.names.map((input) => ({ input, status: 'missing', reason: 'no upstream has it (NOT_FOUND from every upstream tried)', blobsTransferred: 0, bytesTransferred: 0 }));
      return { report: { results, blobsTransferred: 0, bytesTransferred: 0, bytesResumed: 0, durationMs: 1, outages: [] }, notes: [] };
    },
    status: () => Promise.reject(new Error('not used')),
    verify: () => Promise.reject(new Error('not used')),
    push: () => Promise.reject(new Error('not used')),
  };
  const server = await ControlServer.start(dir, VERSION, handlers, silentLogger());
  t.after(() => server.stop());
  const client = await ControlClient.connect(dir);
  assert.ok(client);
  t.after(() => client.close());
  const request = { version: VERSION, names, projects: [], withBuildtrees: false };
  assert.ok(JSON.stringify(request).length > 4 << 20, 'the request alone is over 4 MiB');
  const { report } = await client.sync(request, () => undefined);
  assert.equal(asked, names.length);
  assert.equal(report.results.length, names.length);
  assert.equal(report.results.at(-1)?.input, names.at(-1));
});
