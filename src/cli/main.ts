#!/usr/bin/env node
import { resolve } from 'node:path';
import v8 from 'node:v8';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { DEFAULT_RECHECK_AFTER_MS } from '../cas/disk-store.js';
import { verifyStore } from '../cas/verify.js';
import type { Config } from '../config/config.js';
import { DEFAULT_LISTEN, defaultDataDir } from '../config/defaults.js';
import { type ConfigOverrides, loadConfig, parseConfig } from '../config/load.js';
import { Daemon } from '../daemon/daemon.js';
import { daemonTables, storedStatus } from '../daemon/state.js';
import { MirrorError, describeError, isEnvironmentFailure } from '../errors.js';
import { type LogLevel, createLogger } from '../log.js';
import { DEFAULT_READ_IDLE_TIMEOUT_MS } from '../remote/upstream.js';
import { DEFAULT_MAX_CONNECTIONS } from '../server/listener.js';
import {
  DEFAULT_IDLE_TIMEOUT_MS,
  DEFAULT_MAX_BATCH_BYTES,
  DEFAULT_MAX_REQUEST_BYTES,
  DEFAULT_MAX_STREAMS_PER_CONNECTION,
  DEFAULT_SEND_BUDGET_BYTES,
  DEFAULT_STALL_TIMEOUT_MS,
} from '../server/server.js';
import { VERSION } from '../version.js';
import { withStoreOrDaemon } from './daemon-or-store.js';
import { formatBytes } from './format.js';
import { type ServeFlags, withServeFlags } from './serve-flags.js';
import { formatStatus } from './status-format.js';
import { runPush } from './push-command.js';
import { runSync } from './sync-command.js';
import { UPSTREAM_OPTION_HELP, parseUpstreamOption } from './upstream-option.js';

// Serving and syncing allocate a buffer per MiB moved, and V8's incremental marking, started by
// that external-memory pressure on a heap of a few MB, costs more than the short full GCs it
// replaces: measured with --cpu-prof, ByteStream reads went from about 1.3 to 2.4 GB/s without it.
v8.setFlagsFromString('--no-incremental-marking');


/**
 * Exit codes: 0 success, 1 the job ran but something failed (names, bad blobs), 2 usage or
 * configuration, 3 the environment refused (disk full, permission denied, read-only file system).
 */
const EXIT_USAGE = 2;
const EXIT_ENVIRONMENT = 3;
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

/** A path given on the command line, made absolute against the CLI's working directory. */
function absolute(path: string | undefined): string | undefined {
  return path === undefined ? undefined : resolve(path);
}

/**
 * The data directory of a command other than serve: --dir, else the --config file's `dir`, else
 * the default. Taking it from the config means `status --config mirror.yaml` reaches the daemon
 * that `serve --config mirror.yaml` started.
 */
async function dataDir(a: { dir?: string | undefined; config?: string | undefined }): Promise<{ dir: string; config?: Config | undefined }> {
  if (a.config === undefined) return { dir: a.dir ?? defaultDataDir() };
  const config = await loadConfig(a.config, a.dir === undefined ? {} : { dir: a.dir });
  return { dir: config.dir, config };
}

async function main(argv: string[]): Promise<number> {
  let exitCode = 0;
  await yargs(argv)
    .scriptName('bst-cache-mirror')
    .usage('$0 <command> [options]\n\nA LAN mirror of BuildStream remote artifact and source caches.')
    .version(VERSION)
    .option('dir', { type: 'string', defaultDescription: '$BST_CACHE_MIRROR_DIR or $XDG_DATA_HOME/bst-cache-mirror', describe: 'Data directory (blobs and the LevelDB index)' })
    .option('config', {
      type: 'string',
      describe: "The daemon config file (YAML; see config/example.yaml). serve runs it; the other commands use its dir (unless --dir is given), and so reach its daemon",
    })
    .option('log-level', { choices: LOG_LEVELS, describe: 'Log level for the JSON log on stderr (default: info for serve, warn otherwise)' })
    .command(
      'sync',
      'Mirror names and their whole closures from upstream caches into the local store (through the daemon when one runs)',
      (y) =>
        y
          .option('upstream', { type: 'string', array: true, describe: `${UPSTREAM_OPTION_HELP}. Required unless a daemon runs on --dir (then its upstreams are used) or --config names upstreams` })
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
          .option('project', { type: 'string', describe: 'A BuildStream project checkout: mirror what --target needs (artifacts; with BuildStream 2 also sources)' })
          .option('target', { type: 'string', array: true, default: [], describe: 'Target element of --project (repeat for several)' })
          .option('bst', { type: 'string', default: 'bst', describe: 'The BuildStream command that runs `bst show` in --project (1.x or 2.x)' })
          .option('with-buildtrees', { type: 'boolean', default: false, describe: "Also mirror 2.x artifacts' buildtree, sources and buildroot" })
          .option('server-cert', { type: 'string', describe: 'PEM CA certificate(s) to trust for https upstreams' })
          .option('client-cert', { type: 'string', describe: 'PEM client certificate for https upstreams' })
          .option('client-key', { type: 'string', describe: 'PEM client key for https upstreams' })
          .option('access-token', { type: 'string', describe: 'File holding a bearer token to send upstream' })
          .option('instance-name', { type: 'string', default: '', describe: 'REAPI instance name of the upstreams' })
          .option('concurrency', { type: 'number', defaultDescription: "8, or the daemon's sync.concurrency", describe: 'Upstream transfers in flight at once' })
          .option('read-idle-timeout', {
            type: 'number',
            default: DEFAULT_READ_IDLE_TIMEOUT_MS / 1000,
            describe: 'Seconds a blob download may receive nothing before it is abandoned as stalled',
          })
          .option('json', { type: 'boolean', default: false, describe: 'Print the report as JSON instead of a summary' })
          .check((a) => {
            if (a.project !== undefined && a.target.length === 0) throw new Error('--project needs at least one --target ELEMENT.bst');
            if (a.target.length > 0 && a.project === undefined) throw new Error('--target needs --project DIR');
            if (a.concurrency !== undefined && (!Number.isInteger(a.concurrency) || a.concurrency < 1 || a.concurrency > 256)) throw new Error('--concurrency must be an integer from 1 to 256');
            if (!(a['read-idle-timeout'] > 0 && a['read-idle-timeout'] <= 3600)) throw new Error('--read-idle-timeout must be a number of seconds above 0, at most 3600');
            return true;
          }),
      async (a) => {
        const log = createLogger((a['log-level'] ?? 'warn') as LogLevel);
        const { dir, config } = await dataDir(a);
        exitCode = await runSync(
          {
            dir,
            configUpstreams: config?.upstreams.map((u) => u.spec) ?? [],
            upstreams: (a.upstream ?? []).map((value) => ({
              // Absolute: a running daemon opens these files from its own working directory.
              ...parseUpstreamOption(value, {
                instanceName: a['instance-name'],
                serverCertFile: absolute(a['server-cert']),
                clientCertFile: absolute(a['client-cert']),
                clientKeyFile: absolute(a['client-key']),
                accessTokenFile: absolute(a['access-token']),
              }),
              readIdleTimeoutMs: a['read-idle-timeout'] * 1000,
            })),
            refs: a.ref,
            refsFiles: a['refs-file'],
            // A bst given as a path (./venv/bin/bst) is resolved here; a bare command is looked up on PATH.
            projects: a.project === undefined ? [] : [{ path: resolve(a.project), targets: a.target, bst: a.bst.includes('/') ? resolve(a.bst) : a.bst }],
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
      'Run the mirror: serve it to BuildStream 1.6 and 2.x (pull-only unless a listener is marked push), and (with --config) keep it fresh from its upstreams',
      (y) =>
        y
          .option('listen', { type: 'string', array: true, defaultDescription: DEFAULT_LISTEN, describe: 'HOST:PORT to listen on (port 0 picks a free port); repeat for several' })
          .option('max-batch-bytes', { type: 'number', defaultDescription: String(DEFAULT_MAX_BATCH_BYTES), describe: 'BatchReadBlobs limit to advertise and enforce' })
          .option('recheck-hours', { type: 'number', defaultDescription: String(DEFAULT_RECHECK_AFTER_MS / 3_600_000), describe: 'Rehash a blob served whole if this process has not hashed it for this long (0: on every read)' })
          .option('send-budget-mib', {
            type: 'number',
            defaultDescription: String(DEFAULT_SEND_BUDGET_BYTES / (1 << 20)),
            describe: 'MiB of response data (blob chunks, batches, tree pages) held at once for all clients together; more waits',
          })
          .option('stall-timeout', {
            type: 'number',
            defaultDescription: String(DEFAULT_STALL_TIMEOUT_MS / 1000),
            describe: 'Seconds a response may wait for a client that takes none of it (paused or gone) before it is cancelled (0: never)',
          })
          .option('idle-timeout', { type: 'number', defaultDescription: String(DEFAULT_IDLE_TIMEOUT_MS / 1000), describe: 'Seconds a connection without calls stays open (0: forever)' })
          .option('max-connections', {
            type: 'number',
            defaultDescription: `${DEFAULT_MAX_CONNECTIONS}, or half the open-file limit if lower`,
            describe: 'Connections open at once; further ones are closed as they arrive',
          })
          .option('max-streams-per-connection', {
            type: 'number',
            defaultDescription: String(DEFAULT_MAX_STREAMS_PER_CONNECTION),
            describe: 'Concurrent calls per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; clients queue the rest)',
          })
          .option('max-request-bytes', {
            type: 'number',
            defaultDescription: String(DEFAULT_MAX_REQUEST_BYTES),
            describe: 'Largest request message; larger ones are refused (RESOURCE_EXHAUSTED) before they are read',
          })
          .option('server-cert', { type: 'string', describe: 'PEM certificate to serve https with (every --listen address), with --server-key' })
          .option('server-key', { type: 'string', describe: 'PEM private key of --server-cert' })
          .option('client-certs', { type: 'string', describe: 'PEM bundle of client certificates allowed in; clients without one are refused' })
          .check((a) => {
            const given = (v: number | undefined): v is number => v !== undefined;
            if (given(a['recheck-hours']) && !(a['recheck-hours'] >= 0)) throw new Error('--recheck-hours must be a number >= 0');
            if (given(a['max-batch-bytes']) && (!Number.isInteger(a['max-batch-bytes']) || a['max-batch-bytes'] < 1024 || a['max-batch-bytes'] > 32 << 20)) throw new Error('--max-batch-bytes must be an integer from 1024 to 33554432');
            if (given(a['send-budget-mib']) && !(a['send-budget-mib'] >= 4 && a['send-budget-mib'] <= 65536)) throw new Error('--send-budget-mib must be a number from 4 to 65536');
            if (given(a['stall-timeout']) && !(a['stall-timeout'] >= 0 && a['stall-timeout'] <= 86400)) throw new Error('--stall-timeout must be a number of seconds from 0 (never) to 86400');
            if (given(a['idle-timeout']) && !(a['idle-timeout'] >= 0 && a['idle-timeout'] <= 86400 * 7)) throw new Error('--idle-timeout must be a number of seconds from 0 (never) to 604800');
            if (given(a['max-connections']) && (!Number.isInteger(a['max-connections']) || a['max-connections'] < 1)) throw new Error('--max-connections must be an integer >= 1');
            if (given(a['max-streams-per-connection']) && (!Number.isInteger(a['max-streams-per-connection']) || a['max-streams-per-connection'] < 1 || a['max-streams-per-connection'] > 100_000)) {
              throw new Error('--max-streams-per-connection must be an integer from 1 to 100000');
            }
            if (given(a['max-request-bytes']) && (!Number.isInteger(a['max-request-bytes']) || a['max-request-bytes'] < 65536 || a['max-request-bytes'] > 1 << 30)) throw new Error('--max-request-bytes must be an integer from 65536 to 1073741824');
            return true;
          }),
      async (a) => {
        const overrides: ConfigOverrides = {
          ...(a.dir !== undefined && { dir: a.dir }),
          ...(a.listen !== undefined && a.listen.length > 0 && { listen: a.listen }),
          ...(a['log-level'] !== undefined && { logLevel: a['log-level'] as LogLevel }),
        };
        const flags: ServeFlags = {
          maxBatchBytes: a['max-batch-bytes'],
          recheckHours: a['recheck-hours'],
          sendBudgetMib: a['send-budget-mib'],
          stallTimeoutS: a['stall-timeout'],
          idleTimeoutS: a['idle-timeout'],
          maxConnections: a['max-connections'],
          maxStreamsPerConnection: a['max-streams-per-connection'],
          maxRequestBytes: a['max-request-bytes'],
          serverCertFile: a['server-cert'],
          serverKeyFile: a['server-key'],
          clientCertsFile: a['client-certs'],
        };
        const base = a.config === undefined ? parseConfig('', '(command line)', { ...overrides, dir: a.dir ?? defaultDataDir() }) : await loadConfig(a.config, overrides);
        const config = withServeFlags(base, flags);
        const log = createLogger(config.logLevel);
        const daemon = await Daemon.start(config, { configFile: a.config === undefined ? undefined : resolve(a.config), overrides, log, withFlags: (c) => withServeFlags(c, flags) });
        const [first, ...more] = daemon.addresses;
        process.stdout.write(`bst-cache-mirror serving ${config.dir} on ${first ?? ''}\n`);
        for (const address of more) process.stdout.write(`bst-cache-mirror also serving on ${address}\n`);
        // SIGHUP reloads the config, as daemons do (the file watcher does too).
        const reload = (): void => {
          log.info({ signal: 'SIGHUP' }, 'reloading the config');
          void daemon.reload();
        };
        process.on('SIGHUP', reload);
        await new Promise<void>((resolve) => {
          const stop = (signal: string): void => {
            log.info({ signal }, 'shutting down');
            resolve();
          };
          process.once('SIGINT', stop);
          process.once('SIGTERM', stop);
        });
        // The SIGHUP handler stays (reload() does nothing once stopping): without one, SIGHUP would kill the process mid-shutdown.
        await daemon.stop();
        // A call stuck on a silent upstream must not keep the process alive once the daemon has stopped.
        setTimeout(() => process.exit(process.exitCode ?? 0), 1000).unref();
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
        const { dir } = await dataDir(a);
        const r = await withStoreOrDaemon(
          dir,
          log,
          (daemon) => daemon.verify({ version: VERSION, repair: a.repair || a.prune, prune: a.prune }),
          // Without --repair, verify changes nothing: the store must exist, and temp files stay.
          { create: false },
          (store) => verifyStore(store, { repair: a.repair, prune: a.prune, log }),
        );
        {
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
        }
      },
    )
    .command(
      'push',
      "Import names from a BuildStream local cache and replicate them (or failed push jobs) to the upstreams with push: true: through the daemon, or with --config when none runs, here and now",
      (y) =>
        y
          .option('from', { type: 'string', describe: 'A BuildStream local cache directory (1.6 or 2.x layout) to import names from' })
          .option('ref', { type: 'string', array: true, default: [], describe: 'Only these names of --from (URNs, or 1.x refs PROJECT/ELEMENT/KEY)' })
          .option('retry-failed', { type: 'boolean', default: false, describe: 'Queue the push jobs that failed again' })
          .option('drop-failed', { type: 'boolean', default: false, describe: 'Give up the push jobs that failed (status lists them): their names stay in the mirror, unreplicated' })
          .option('json', { type: 'boolean', default: false, describe: 'Print the report as JSON' }),
      async (a) => {
        const log = createLogger((a['log-level'] ?? 'warn') as LogLevel);
        exitCode = await runPush(
          { ...(await dataDir(a)), configFile: a.config, from: a.from === undefined ? undefined : resolve(a.from), refs: a.ref, retryFailed: a['retry-failed'], dropFailed: a['drop-failed'], json: a.json },
          log,
        );
      },
    )
    .command(
      'status',
      "The store's size, each upstream's health, the last sync runs, the next scheduled one and recorded misses (from the daemon, or the store when none runs)",
      (y) => y.option('json', { type: 'boolean', default: false, describe: 'Print the status as JSON' }),
      async (a) => {
        const log = createLogger((a['log-level'] ?? 'warn') as LogLevel);
        const { dir } = await dataDir(a);
        const status = await withStoreOrDaemon(dir, log, (daemon) => daemon.status({ version: VERSION }), { create: false }, (store) => storedStatus(store, daemonTables(store)));
        process.stdout.write(a.json ? `${JSON.stringify(status, null, 2)}\n` : formatStatus(status, Date.now()));
      },
    )
    .demandCommand(1, 'give a command: serve, sync, push, status or verify')
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
