import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import type { Config } from '../src/config/config.js';
import { defaultDataDir } from '../src/config/defaults.js';
import { loadConfig, parseConfig } from '../src/config/load.js';
import { isMirrorError } from '../src/errors.js';
import { defaultMaxConnections } from '../src/server/listener.js';

const FILE = '/etc/mirror/mirror.yaml';
const KEY = 'a'.repeat(64);
const EXAMPLE = fileURLToPath(new URL('../config/example.yaml', import.meta.url));

const DEFAULTS: Config = {
  dir: defaultDataDir(),
  logLevel: 'info',
  listen: [{ address: '0.0.0.0:11001', push: false }],
  serve: {
    maxBatchBytes: 1 << 20,
    recheckAfterMs: 24 * 3_600_000,
    limits: {
      sendBudgetBytes: 32 << 20,
      stallTimeoutMs: 30_000,
      idleTimeoutMs: 300_000,
      maxConnections: defaultMaxConnections(),
      maxStreamsPerConnection: 100,
      maxRequestBytes: 8 << 20,
    },
  },
  upstreams: [],
  sync: {
    schedule: undefined,
    refs: [],
    refsFiles: [],
    projects: [],
    onMiss: 'fetch',
    missWaitMs: 10_000,
    withBuildtrees: false,
    concurrency: 8,
    watchDebounceMs: 2_000,
  },
  health: { failuresToOffline: 3, probeIntervalMs: 30_000, probeMaxIntervalMs: 600_000 },
  replicate: { watch: [] },
};

const FULL = `
dir: data
log-level: debug
listen: ["127.0.0.1:0", { address: "[::1]:11001" }]
serve:
  max-batch-bytes: 2097152
  recheck-hours: 0.5
  send-budget-mib: 4.5
  stall-timeout: 1m
  idle-timeout: 0
  max-connections: 50
  max-streams-per-connection: 10
  max-request-bytes: 65536
upstreams:
  - name: central
    url: https://cache.example.com:11002
    server-cert: certs/ca.pem
    client-cert: /abs/client.crt
    client-key: client.key
    access-token: ../token.txt
    instance-name: main
    read-idle-timeout: 45s
  - index: http://index:1
    storage: http://storage:2
    instance-name: i
sync:
  schedule: "0 */2 * * *"
  refs: ["p/e/${KEY}"]
  refs-files: [refs.txt, /srv/refs.d]
  projects:
    - path: checkouts/x
      targets: [core.bst, extra.bst]
    - path: /srv/y
      targets: [y.bst]
      bst: bst2
  on-miss: record
  miss-wait: 1.5s
  with-buildtrees: true
  concurrency: 256
  watch-debounce: 500ms
health:
  failures-to-offline: 5
  probe-interval: 10s
  probe-max-interval: 1h
`;

const FULL_CONFIG: Config = {
  dir: '/etc/mirror/data',
  logLevel: 'debug',
  listen: [{ address: '127.0.0.1:0', push: false }, { address: '[::1]:11001', push: false }],
  serve: {
    maxBatchBytes: 2 << 20,
    recheckAfterMs: 1_800_000,
    limits: {
      sendBudgetBytes: 4.5 * (1 << 20),
      stallTimeoutMs: 60_000,
      idleTimeoutMs: 0,
      maxConnections: 50,
      maxStreamsPerConnection: 10,
      maxRequestBytes: 65536,
    },
  },
  upstreams: [
    {
      name: 'central',
      spec: {
        url: 'https://cache.example.com:11002',
        serverCertFile: '/etc/mirror/certs/ca.pem',
        clientCertFile: '/abs/client.crt',
        clientKeyFile: '/etc/mirror/client.key',
        accessTokenFile: '/etc/token.txt',
        instanceName: 'main',
        rpcTimeoutMs: 60_000,
        readIdleTimeoutMs: 45_000,
      },
      push: false,
    },
    {
      name: 'http://index:1 (index) + http://storage:2 (storage)',
      spec: { url: 'http://index:1', instanceName: 'i', rpcTimeoutMs: 60_000, storage: { url: 'http://storage:2', instanceName: 'i', rpcTimeoutMs: 60_000 }, readIdleTimeoutMs: 30_000 },
      push: false,
    },
  ],
  sync: {
    schedule: '0 */2 * * *',
    refs: [`p/e/${KEY}`],
    refsFiles: ['/etc/mirror/refs.txt', '/srv/refs.d'],
    projects: [
      { path: '/etc/mirror/checkouts/x', targets: ['core.bst', 'extra.bst'], bst: 'bst' },
      { path: '/srv/y', targets: ['y.bst'], bst: 'bst2' },
    ],
    onMiss: 'record',
    missWaitMs: 1_500,
    withBuildtrees: true,
    concurrency: 256,
    watchDebounceMs: 500,
  },
  health: { failuresToOffline: 5, probeIntervalMs: 10_000, probeMaxIntervalMs: 3_600_000 },
  replicate: { watch: [] },
};

test('valid documents give whole Config objects', () => {
  const cases: { name: string; yaml: string; file?: string; expected: Config }[] = [
    { name: 'empty file', yaml: '', expected: DEFAULTS },
    { name: 'only comments', yaml: '# nothing\n', expected: DEFAULTS },
    { name: 'empty mappings and keys without values', yaml: 'serve: {}\nsync:\nupstreams:\nhealth:\n  probe-interval:\n', expected: DEFAULTS },
    { name: 'every key', yaml: FULL, expected: FULL_CONFIG },
    {
      name: 'durations: seconds as numbers, every unit',
      yaml: 'serve: { stall-timeout: 0.25, idle-timeout: 7d }\nsync: { miss-wait: 2m, watch-debounce: 0s }\nhealth: { probe-interval: 2h, probe-max-interval: 1d }\n',
      expected: {
        ...DEFAULTS,
        serve: { ...DEFAULTS.serve, limits: { ...DEFAULTS.serve.limits, stallTimeoutMs: 250, idleTimeoutMs: 7 * 86_400_000 } },
        sync: { ...DEFAULTS.sync, missWaitMs: 120_000, watchDebounceMs: 0 },
        health: { ...DEFAULTS.health, probeIntervalMs: 7_200_000, probeMaxIntervalMs: 86_400_000 },
      },
    },
    {
      name: 'relative paths against the directory of a relative config file',
      yaml: 'dir: ./data\nsync: { refs-files: [r.txt] }\n',
      file: 'conf/mirror.yaml',
      expected: { ...DEFAULTS, dir: join(process.cwd(), 'conf/data'), sync: { ...DEFAULTS.sync, refsFiles: [join(process.cwd(), 'conf/r.txt')] } },
    },
    {
      name: 'url upstream: name defaults to the url',
      yaml: 'upstreams: [{ url: "http://a:1" }]\n',
      expected: { ...DEFAULTS, upstreams: [{ name: 'http://a:1', spec: { url: 'http://a:1', instanceName: '', rpcTimeoutMs: 60_000, readIdleTimeoutMs: 30_000 }, push: false }] },
    },
    {
      name: 'index/storage pair: both endpoints share TLS, token and instance',
      yaml: 'upstreams:\n  - { storage: "https://s:2", index: "https://i:1", server-cert: ca.pem, access-token: t }\n',
      expected: {
        ...DEFAULTS,
        upstreams: [
          {
            name: 'https://i:1 (index) + https://s:2 (storage)',
            spec: {
              url: 'https://i:1',
              instanceName: '',
              rpcTimeoutMs: 60_000,
              serverCertFile: '/etc/mirror/ca.pem',
              accessTokenFile: '/etc/mirror/t',
              storage: { url: 'https://s:2', instanceName: '', rpcTimeoutMs: 60_000, serverCertFile: '/etc/mirror/ca.pem', accessTokenFile: '/etc/mirror/t' },
              readIdleTimeoutMs: 30_000,
            },
            push: false,
          },
        ],
      },
    },
  ];
  for (const c of cases) {
    assert.deepEqual(parseConfig(c.yaml, c.file ?? FILE), c.expected, c.name);
  }
});

test('flags override the file', () => {
  const yaml = 'dir: /data\nlog-level: warn\nlisten: ["0.0.0.0:1"]\n';
  assert.deepEqual(parseConfig(yaml, FILE, { dir: 'flag-dir', listen: ['127.0.0.1:0', '[::]:2'], logLevel: 'trace' }), {
    ...DEFAULTS,
    dir: 'flag-dir',
    logLevel: 'trace',
    listen: [{ address: '127.0.0.1:0', push: false }, { address: '[::]:2', push: false }],
  });
  // Absent (or empty) overrides leave the file's values.
  assert.deepEqual(parseConfig(yaml, FILE, { listen: [] }), { ...DEFAULTS, dir: '/data', logLevel: 'warn', listen: [{ address: '0.0.0.0:1', push: false }] });
  assert.throws(() => parseConfig(yaml, FILE, { listen: ['nope'] }), (e: unknown) => isMirrorError(e, 'CONFIG_INVALID') && /--listen 'nope'/.test(e.message));
});

/** The message of the CONFIG_INVALID error parseConfig throws. */
function problems(yaml: string, file = FILE): string {
  try {
    parseConfig(yaml, file);
  } catch (err) {
    assert.ok(isMirrorError(err, 'CONFIG_INVALID'), String(err));
    assert.ok(err.message.startsWith(`${file}: `), err.message);
    return err.message;
  }
  assert.fail(`no error for:\n${yaml}`);
}

test('every problem names its key', () => {
  const cases: [string, string, RegExp][] = [
    ['unknown top-level key', 'foo: 1\n', /^\/etc\/mirror\/mirror\.yaml: unknown key 'foo'$/],
    ['unknown nested key', 'sync:\n  refz: []\n', /: sync: unknown key 'refz'$/],
    ['unknown key in a list item', 'upstreams: [{ url: "http://a:1", token: x }]\n', /: upstreams\[0\]: unknown key 'token'$/],
    ['url and index/storage', 'upstreams:\n  - url: http://a:1\n  - { url: "http://a:1", index: "http://b:1", storage: "http://c:1" }\n', /: upstreams\[1\]: give either url or an index\/storage pair, not both$/],
    ['neither url nor index/storage', 'upstreams: [{ name: x }]\n', /: upstreams\[0\]: give url, or an index\/storage pair/],
    ['index without storage', 'upstreams: [{ index: "http://b:1" }]\n', /: upstreams\[0\]: an index\/storage pair needs storage too$/],
    ['client cert without key', 'upstreams: [{ url: "https://a:1", client-cert: c }]\n', /: upstreams\[0\]: client-cert and client-key must be given together$/],
    ['bad url', 'upstreams: [{ url: "http://a:1" }, { url: "ftp://a:1" }]\n', /: upstreams\[1\]\.url: upstream 'ftp:\/\/a:1' has scheme 'ftp'/],
    ['url with a path', 'upstreams: [{ index: "http://a:1/x", storage: "http://b:1" }]\n', /: upstreams\[0\]\.index: .*must be only a scheme, host and port \(use instance-name/],
    ['certificates for an http upstream', 'upstreams: [{ url: "http://a:1", server-cert: ca.pem }]\n', /: upstreams\[0\]: server-cert, client-cert and client-key need https:\/\/ URLs$/],
    ['two upstreams with one name', 'upstreams: [{ url: "http://a:1" }, { url: "http://b:1", name: "http://a:1" }]\n', /: upstreams\[1\]\.name: 'http:\/\/a:1' is the name of upstreams\[0\] already/],
    ['an address listed twice', 'listen: ["127.0.0.1:11001", { address: "127.0.0.1:11001" }]\n', /: listen\[1\]\.address: 127\.0\.0\.1:11001 is listed already \(listen\[0\]\)$/],
    ['bad cron expression', 'sync: { schedule: "61 * * * *" }\n', /: sync\.schedule: '61 \* \* \* \*' is not a cron expression: Field value \(61\) is out of range$/],
    ['bad name in refs', `sync: { refs: ["p/e/${KEY}", "p/e/${KEY}", "p/e/short"] }\n`, /: sync\.refs\[2\]: 'p\/e\/short' does not end in a cache key/],
    ['bad duration', 'sync: { miss-wait: 10 sec }\n', /: sync\.miss-wait: '10 sec' is not a duration/],
    ['duration of the wrong type', 'serve: { stall-timeout: true }\n', /: serve\.stall-timeout: expected a duration/],
    ['duration out of range', 'upstreams: [{ url: "http://a:1", read-idle-timeout: 0 }]\n', /: upstreams\[0\]\.read-idle-timeout: must be a duration above 0, at most 1h$/],
    ['negative duration', 'serve: { idle-timeout: -1 }\n', /: serve\.idle-timeout: must be a duration from 0 \(never\) to 7d$/],
    ['bad listen string', 'listen: ["0.0.0.0:1", "nope"]\n', /: listen\[1\]\.address: 'nope' is not HOST:PORT/],
    ['bad listen port', 'listen: [{ address: "h:70000" }]\n', /: listen\[0\]\.address: 'h:70000' is not HOST:PORT/],
    ['listen item of the wrong type', 'listen: [11001]\n', /: listen\[0\]: expected 'HOST:PORT' or a mapping/],
    ['empty listen', 'listen: []\n', /: listen: give at least one address$/],
    ['concurrency out of range', 'sync: { concurrency: 257 }\n', /: sync\.concurrency: must be an integer from 1 to 256$/],
    ['concurrency not an integer', 'sync: { concurrency: 1.5 }\n', /: sync\.concurrency: must be an integer from 1 to 256$/],
    ['serve ranges as the CLI', 'serve: { max-batch-bytes: 1023 }\n', /: serve\.max-batch-bytes: must be an integer from 1024 to 33554432$/],
    ['send budget range', 'serve: { send-budget-mib: 3.9 }\n', /: serve\.send-budget-mib: must be a number from 4 to 65536$/],
    ['log level', 'log-level: loud\n', /: log-level: .*"info"/],
    ['on-miss', 'sync: { on-miss: maybe }\n', /: sync\.on-miss: .*"fetch"\|"record"\|"off"/],
    ['project without targets', 'sync: { projects: [{ path: x, targets: [] }] }\n', /: sync\.projects\[0\]\.targets: give at least one target element$/],
    ['probe intervals', 'health: { probe-interval: 1m, probe-max-interval: 30s }\n', /: health\.probe-max-interval: must be at least probe-interval$/],
    ['not a mapping', '- a\n- b\n', /: the document must be a mapping/],
    ['YAML syntax error names the line', 'sync:\n  refs: [a\nhealth: {}\n', /^\/etc\/mirror\/mirror\.yaml: YAML syntax error: line 3, column 1: /],
    ['duplicate key', 'dir: a\ndir: b\n', /: YAML syntax error: line 2, column 1: Map keys must be unique$/],
  ];
  for (const [name, yaml, expected] of cases) assert.match(problems(yaml), expected, name);
});

test('all problems are reported together, one a line', () => {
  const message = problems('foo: 1\nsync: { concurrency: 0, schedule: "* * *" }\nupstreams: [{ url: "http://a:1", bar: 2, baz: 3 }]\n');
  assert.deepEqual(message.split('\n').slice(1).sort(), [
    "  sync.concurrency: must be an integer from 1 to 256",
    "  sync.schedule: '* * *' is not a cron expression: Too few fields",
    "  unknown key 'foo'",
    "  upstreams[0]: unknown key 'bar'",
    "  upstreams[0]: unknown key 'baz'",
  ]);
  assert.match(message, /^\/etc\/mirror\/mirror\.yaml: 5 problems:\n/);
});

test('loadConfig reads the file, and names it when it cannot', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'config-test-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = join(dir, 'mirror.yaml');
  await writeFile(file, 'sync:\n  refs-files: [refs]\n');
  assert.deepEqual(await loadConfig(file, { logLevel: 'silent' }), { ...DEFAULTS, logLevel: 'silent', sync: { ...DEFAULTS.sync, refsFiles: [join(dir, 'refs')] } });
  const missing = join(dir, 'missing.yaml');
  await assert.rejects(loadConfig(missing), (e: unknown) => isMirrorError(e, 'CONFIG_INVALID') && e.message.startsWith(`${missing}: cannot read`) && /ENOENT/.test(e.message));
});

test('config/example.yaml parses, and documents the defaults', async () => {
  const config = await loadConfig(EXAMPLE);
  assert.deepEqual(config, {
    ...DEFAULTS,
    upstreams: [{ name: 'central', spec: { url: 'https://cache.example.com:11002', instanceName: '', rpcTimeoutMs: 60_000, readIdleTimeoutMs: 30_000 }, push: false }],
  });
});
