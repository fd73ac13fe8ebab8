#!/usr/bin/env node
import { createRequire } from 'node:module';
import v8 from 'node:v8';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { DEFAULT_RECHECK_AFTER_MS, DiskContentStore } from '../cas/disk-store.js';
import { verifyStore } from '../cas/verify.js';
import { DEFAULT_LISTEN, defaultDataDir } from '../config/defaults.js';
import { MirrorError, describeError, errorMessage, isEnvironmentFailure } from '../errors.js';
import { DEFAULT_READ_IDLE_TIMEOUT_MS } from '../remote/upstream.js';
import { type LogLevel, createLogger } from '../log.js';
import {
  DEFAULT_IDLE_TIMEOUT_MS,
  DEFAULT_MAX_BATCH_BYTES,
  DEFAULT_MAX_REQUEST_BYTES,
  DEFAULT_MAX_STREAMS_PER_CONNECTION,
  DEFAULT_SEND_BUDGET_BYTES,
  DEFAULT_STALL_TIMEOUT_MS,
  MirrorServer,
} from '../server/server.js';
import { DEFAULT_MAX_CONNECTIONS, defaultMaxConnections } from '../server/listener.js';
import { formatBytes } from './format.js';
import { runSync } from './sync-command.js';
import { UPSTREAM_OPTION_HELP, parseUpstreamOption } from './upstream-option.js';

// Serving and syncing allocate a buffer per MiB moved, and V8's incremental marking, started by
// that external-memory pressure on a heap of a few MB, costs more than the short full GCs it
// replaces: measured with --cpu-prof, ByteStream reads went from about 1.3 to 2.4 GB/s without it.
v8.setFlagsFromString('--no-incremental-marking');

const { version } = createRequire(import.meta.url)('../../package.json') as { version: string };

/**
 * Exit codes: 0 success, 1 the job ran but something failed (names, bad blobs), 2 usage or
 * configuration, 3 the environment refused (disk full, permission denied, read-only file system).
 */
const EXIT_USAGE = 2;
const EXIT_ENVIRONMENT = 3;
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

async function main(argv: string[]): Promise<number> {
  let exitCode = 0;
  await yargs(argv)
    .scriptName('bst-cache-mirror')
    .usage('$0 <command> [options]\n\nA LAN mirror of BuildStream remote artifact and source caches.')
    .version(version)
    .option('dir', { type: 'string', default: defaultDataDir(), defaultDescription: '$BST_CACHE_MIRROR_DIR or $XDG_DATA_HOME/bst-cache-mirror', describe: 'Data directory (blobs and the LevelDB index)' })
    .option('log-level', { choices: LOG_LEVELS, describe: 'Log level for the JSON log on stderr (default: info for serve, warn otherwise)' })
    .command(
      'sync',
      'Mirror names and their whole closures from upstream caches into the local store',
      (y) =>
        y
          .option('upstream', { type: 'string', array: true, demandOption: true, describe: UPSTREAM_OPTION_HELP })
          .option('ref', {
            type: 'string',
            array: true,
            default: [],
            describe:
              'A name: PROJECT/ELEMENT/KEY (1.x ref or 2.x artifact) or a full BuildStream URN. ELEMENT may be the element path ' +
              "as `bst show --deps all --format '%{name} %{full-key}'` prints it (PROJECT/sub/hello.bst/KEY is the artifact " +
              'PROJECT/sub-hello/KEY); KEY is the full 64-character cache key',
          })
          .option('refs-file', { type: 'string', array: true, default: [], describe: 'File of names, one per line (# comments and blank lines allowed)' })
          .option('with-buildtrees', { type: 'boolean', default: false, describe: "Also mirror 2.x artifacts' buildtree, sources and buildroot" })
          .option('server-cert', { type: 'string', describe: 'PEM CA certificate(s) to trust for https upstreams' })
          .option('client-cert', { type: 'string', describe: 'PEM client certificate for https upstreams' })
          .option('client-key', { type: 'string', describe: 'PEM client key for https upstreams' })
          .option('access-token', { type: 'string', describe: 'File holding a bearer token to send upstream' })
          .option('instance-name', { type: 'string', default: '', describe: 'REAPI instance name of the upstreams' })
          .option('concurrency', { type: 'number', default: 8, describe: 'Upstream transfers in flight at once' })
          .option('read-idle-timeout', {
            type: 'number',
            default: DEFAULT_READ_IDLE_TIMEOUT_MS / 1000,
            describe: 'Seconds a blob download may receive nothing before it is abandoned as stalled',
          })
          .option('json', { type: 'boolean', default: false, describe: 'Print the report as JSON instead of a summary' })
          .check((a) => {
            if (a.ref.length === 0 && a['refs-file'].length === 0) throw new Error('give at least one --ref NAME or --refs-file FILE');
            if (!Number.isInteger(a.concurrency) || a.concurrency < 1 || a.concurrency > 256) throw new Error('--concurrency must be an integer from 1 to 256');
            if (!(a['read-idle-timeout'] > 0 && a['read-idle-timeout'] <= 3600)) throw new Error('--read-idle-timeout must be a number of seconds above 0, at most 3600');
            return true;
          }),
      async (a) => {
        const log = createLogger((a['log-level'] ?? 'warn') as LogLevel);
        exitCode = await runSync(
          {
            dir: a.dir,
            upstreams: a.upstream.map((value) => ({
              ...parseUpstreamOption(value, {
                instanceName: a['instance-name'],
                serverCertFile: a['server-cert'],
                clientCertFile: a['client-cert'],
                clientKeyFile: a['client-key'],
                accessTokenFile: a['access-token'],
              }),
              readIdleTimeoutMs: a['read-idle-timeout'] * 1000,
            })),
            refs: a.ref,
            refsFiles: a['refs-file'],
            withBuildtrees: a['with-buildtrees'],
            concurrency: a.concurrency,
            json: a.json,
          },
          log,
        );
      },
    )
    .command(
      'serve',
      'Serve the mirror as a pull-only remote cache for BuildStream 1.6 and 2.x',
      (y) =>
        y
          .option('listen', { type: 'string', default: DEFAULT_LISTEN, describe: 'HOST:PORT to listen on (port 0 picks a free port)' })
          .option('max-batch-bytes', { type: 'number', default: DEFAULT_MAX_BATCH_BYTES, describe: 'BatchReadBlobs limit to advertise and enforce' })
          .option('recheck-hours', { type: 'number', default: DEFAULT_RECHECK_AFTER_MS / 3_600_000, describe: 'Rehash a blob served whole if this process has not hashed it for this long (0: on every read)' })
          .option('send-budget-mib', {
            type: 'number',
            default: DEFAULT_SEND_BUDGET_BYTES / (1 << 20),
            describe: 'MiB of response data (blob chunks, batches, tree pages) held at once for all clients together; more waits',
          })
          .option('stall-timeout', {
            type: 'number',
            default: DEFAULT_STALL_TIMEOUT_MS / 1000,
            describe: 'Seconds a response may wait for a client that takes none of it (paused or gone) before it is cancelled (0: never)',
          })
          .option('idle-timeout', { type: 'number', default: DEFAULT_IDLE_TIMEOUT_MS / 1000, describe: 'Seconds a connection without calls stays open (0: forever)' })
          .option('max-connections', {
            type: 'number',
            default: defaultMaxConnections(),
            defaultDescription: `${DEFAULT_MAX_CONNECTIONS}, or half the open-file limit if lower`,
            describe: 'Connections open at once; further ones are closed as they arrive',
          })
          .option('max-streams-per-connection', {
            type: 'number',
            default: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            describe: 'Concurrent calls per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; clients queue the rest)',
          })
          .option('max-request-bytes', {
            type: 'number',
            default: DEFAULT_MAX_REQUEST_BYTES,
            describe: 'Largest request message; larger ones are refused (RESOURCE_EXHAUSTED) before they are read',
          })
          .check((a) => {
            if (!(a['recheck-hours'] >= 0)) throw new Error('--recheck-hours must be a number >= 0');
            if (!Number.isInteger(a['max-batch-bytes']) || a['max-batch-bytes'] < 1024 || a['max-batch-bytes'] > 32 << 20) throw new Error('--max-batch-bytes must be an integer from 1024 to 33554432');
            if (!(a['send-budget-mib'] >= 4 && a['send-budget-mib'] <= 65536)) throw new Error('--send-budget-mib must be a number from 4 to 65536');
            if (!(a['stall-timeout'] >= 0 && a['stall-timeout'] <= 86400)) throw new Error('--stall-timeout must be a number of seconds from 0 (never) to 86400');
            if (!(a['idle-timeout'] >= 0 && a['idle-timeout'] <= 86400 * 7)) throw new Error('--idle-timeout must be a number of seconds from 0 (never) to 604800');
            if (!Number.isInteger(a['max-connections']) || a['max-connections'] < 1) throw new Error('--max-connections must be an integer >= 1');
            if (!Number.isInteger(a['max-streams-per-connection']) || a['max-streams-per-connection'] < 1 || a['max-streams-per-connection'] > 100_000) {
              throw new Error('--max-streams-per-connection must be an integer from 1 to 100000');
            }
            if (!Number.isInteger(a['max-request-bytes']) || a['max-request-bytes'] < 65536 || a['max-request-bytes'] > 1 << 30) throw new Error('--max-request-bytes must be an integer from 65536 to 1073741824');
            return true;
          }),
      async (a) => {
        const log = createLogger((a['log-level'] ?? 'info') as LogLevel);
        const store = await DiskContentStore.open(a.dir, log, { recheckAfterMs: a['recheck-hours'] * 3_600_000 });
        let server: MirrorServer;
        try {
          server = await MirrorServer.start(store, {
            listen: a.listen,
            maxBatchBytes: a['max-batch-bytes'],
            log,
            limits: {
              sendBudgetBytes: Math.round(a['send-budget-mib'] * (1 << 20)),
              stallTimeoutMs: a['stall-timeout'] * 1000,
              idleTimeoutMs: a['idle-timeout'] * 1000,
              maxConnections: a['max-connections'],
              maxStreamsPerConnection: a['max-streams-per-connection'],
              maxRequestBytes: a['max-request-bytes'],
            },
          });
        } catch (err) {
          await store.close();
          throw err;
        }
        process.stdout.write(`bst-cache-mirror serving ${a.dir} on ${server.address}\n`);
        await new Promise<void>((resolve) => {
          const stop = (signal: string): void => {
            log.info({ signal }, 'shutting down');
            resolve();
          };
          process.once('SIGINT', stop);
          process.once('SIGTERM', stop);
        });
        await server.stop();
        await store.close();
      },
    )
    .command(
      'verify',
      'Rehash every stored blob and check every name; --repair removes what is bad',
      (y) =>
        y
          .option('repair', {
            type: 'boolean',
            default: false,
            describe: 'Remove bad blobs and the names that need them; re-index valid unindexed objects and remove temp files an interrupted sync left',
          })
          .option('prune', {
            type: 'boolean',
            default: false,
            describe: 'Also delete blobs no name needs and partial downloads, which a later sync would otherwise resume from (implies --repair)',
          }),
      async (a) => {
        const log = createLogger((a['log-level'] ?? 'warn') as LogLevel);
        // Without --repair, verify changes nothing: the store must exist, and temp files stay.
        const store = await DiskContentStore.open(a.dir, log, { create: false });
        try {
          const r = await verifyStore(store, { repair: a.repair, prune: a.prune, log });
          const out = process.stdout;
          const done = (did: string, hint: string): string => (r.repaired ? ` (${did})` : ` (${hint})`);
          const size = (n: { count: number; bytes: number }): string => `${n.count}, ${formatBytes(n.bytes)}`;
          out.write(`checked ${r.blobsChecked} blobs and ${r.namesChecked} names\n`);
          for (const b of r.badBlobs) out.write(`bad blob ${b.digest}: ${b.problem}${r.repaired ? ' (removed)' : ''}\n`);
          for (const n of r.brokenNames) out.write(`broken name ${n.urn}: ${n.problem}${r.repaired ? ' (removed)' : ''}\n`);
          for (const f of r.badUnindexed) out.write(`bad unindexed object file ${f.path}: ${f.problem}${r.repaired ? ' (deleted)' : ''}\n`);
          // Not problems: what an interrupted sync leaves, and data the next sync resumes from.
          if (r.unindexed.count > 0) out.write(`unindexed objects left by an interrupted sync: ${size(r.unindexed)}, all valid${done('re-indexed', '--repair re-indexes them')}\n`);
          if (r.tempFiles.count > 0) out.write(`temp files left by an interrupted sync: ${size(r.tempFiles)}${done('removed', '--repair removes them')}\n`);
          const pruned = (what: string): string => (r.pruned ? ' (removed)' : ` (kept: ${what}; --prune removes them)`);
          if (r.partialDownloads.count > 0) out.write(`partial downloads: ${size(r.partialDownloads)}${pruned('the next sync of their names resumes them')}\n`);
          if (r.unreferenced.count > 0) out.write(`unreferenced blobs, needed by no name: ${size(r.unreferenced)}${pruned('a sync of the names they were fetched for will not fetch them again')}\n`);
          const problems = r.badBlobs.length + r.brokenNames.length + r.badUnindexed.length;
          out.write(problems === 0 ? 'store is consistent\n' : r.repaired ? 'repaired; run sync to fetch what was removed\n' : 'problems found; run with --repair to fix the index\n');
          exitCode = problems === 0 || r.repaired ? 0 : 1;
        } finally {
          await store.close();
        }
      },
    )
    .demandCommand(1, 'give a command: sync, serve or verify')
    .strict()
    .help()
    .wrap(Math.min(110, process.stdout.columns || 110))
    .fail((msg, err, y) => {
      if (err) throw err;
      process.stderr.write(`${y.help() && ''}bst-cache-mirror: ${msg}\nRun 'bst-cache-mirror --help' for usage.\n`);
      process.exit(EXIT_USAGE);
    })
    .parseAsync();
  return exitCode;
}

main(hideBin(process.argv)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`bst-cache-mirror: ${describeError(err)}\n`);
    if (isEnvironmentFailure(err)) process.exitCode = EXIT_ENVIRONMENT;
    else process.exitCode = err instanceof MirrorError && err.code !== 'CONFIG_INVALID' && err.code !== 'STORE_LOCKED' ? 1 : EXIT_USAGE;
  },
);
