import { resolve } from 'node:path';
import { validateCronExpression } from 'cron';
import { z } from 'zod';
import { DEFAULT_RECHECK_AFTER_MS } from '../cas/disk-store.js';
import { parseUserName } from '../cas/names.js';
import { errorMessage } from '../errors.js';
import type { LogLevel } from '../log.js';
import { parseUpstreamUrl } from '../remote/endpoint.js';
import { DEFAULT_READ_IDLE_TIMEOUT_MS, type UpstreamSpec } from '../remote/upstream.js';
import { DEFAULT_RPC_TIMEOUT_MS } from '../remote/endpoint.js';
import { defaultMaxConnections } from '../server/listener.js';
import {
  DEFAULT_IDLE_TIMEOUT_MS,
  DEFAULT_MAX_BATCH_BYTES,
  DEFAULT_MAX_REQUEST_BYTES,
  DEFAULT_MAX_STREAMS_PER_CONNECTION,
  DEFAULT_SEND_BUDGET_BYTES,
  DEFAULT_STALL_TIMEOUT_MS,
  splitListen,
} from '../server/server.js';
import type { Config, ListenerConfig, UpstreamConfig } from './config.js';
import { DEFAULT_LISTEN, defaultDataDir } from './defaults.js';

/*
 * The schema of `mirror.yaml`: kebab-case keys as BuildStream's own configuration, unknown keys are
 * errors, every default is here. Ranges are those of the CLI's flags (src/cli/main.ts). Its output
 * is the `Config` of config.ts.
 */

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const satisfies readonly LogLevel[];

const SECOND = 1000;
const MINUTE = 60 * SECOND;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;
const UNITS: Readonly<Record<string, number>> = { ms: 1, s: SECOND, m: MINUTE, h: HOUR, d: DAY };
const DURATION = /^(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)$/;

/** `90000` → `90s`, `7200000` → `2h`: a limit in a message, in the largest unit that divides it. */
function formatMs(ms: number): string {
  for (const [unit, size] of [['d', DAY], ['h', HOUR], ['m', MINUTE], ['s', SECOND]] as const) {
    if (ms !== 0 && ms % size === 0) return `${ms / size}${unit}`;
  }
  return ms === 0 ? '0' : `${ms}ms`;
}

/** A number of seconds, or a string with a unit (`500ms`, `10s`, `5m`, `2h`, `1d`); output in ms. */
function duration(range: { min: number; max: number; minExclusive?: boolean; zero?: string }) {
  const expected = 'expected a duration: a number of seconds, or a string with a unit (500ms, 10s, 5m, 2h, 1d)';
  return z.union([z.number(), z.string()], { error: expected }).transform((value, ctx) => {
    let ms: number;
    if (typeof value === 'number') {
      ms = value * SECOND;
    } else {
      const m = DURATION.exec(value.trim());
      if (!m) {
        ctx.issues.push({ code: 'custom', message: `'${value}' is not a duration: give seconds, or a number with a unit (500ms, 10s, 5m, 2h, 1d)`, input: value });
        return z.NEVER;
      }
      ms = Number(m[1]) * (UNITS[m[2] ?? ''] ?? NaN);
    }
    ms = Math.round(ms);
    const low = range.minExclusive ? ms <= range.min : ms < range.min;
    if (!Number.isFinite(ms) || low || ms > range.max) {
      const bounds = range.minExclusive
        ? `above ${formatMs(range.min)}, at most ${formatMs(range.max)}`
        : `from ${formatMs(range.min)}${range.zero ? ` (${range.zero})` : ''} to ${formatMs(range.max)}`;
      ctx.issues.push({ code: 'custom', message: `must be a duration ${bounds}`, input: value });
      return z.NEVER;
    }
    return ms;
  });
}

function int(min: number, max: number = Number.MAX_SAFE_INTEGER) {
  const message = max === Number.MAX_SAFE_INTEGER ? `must be an integer >= ${min}` : `must be an integer from ${min} to ${max}`;
  return z.number().int({ error: message }).min(min, { error: message }).max(max, { error: message });
}

/**
 * A non-empty string that a validator of the repository's own accepts: what it throws becomes the
 * issue, its message passed through `reword` (theirs may speak of command-line flags).
 */
function checked(check: (value: string) => void, reword: (message: string) => string = (m) => m) {
  return z
    .string()
    .min(1, { error: 'must not be empty' })
    .check((ctx) => {
      try {
        check(ctx.value);
      } catch (err) {
        ctx.issues.push({ code: 'custom', message: reword(errorMessage(err)), input: ctx.value });
      }
    });
}

/**
 * The schema of the whole document. Paths in it (data directory, certificates, refs files,
 * projects) are resolved against `configDir`, the directory of the config file.
 */
/**
 * A list refinement: an entry whose `key` (undefined: not checked) an earlier entry already has is
 * an issue at `[i, field]`, with `message(key, index of the first)`.
 */
function noDuplicates<T>(field: string, key: (entry: T) => string | undefined, message: (key: string, first: number) => string) {
  return (entries: readonly T[], ctx: z.RefinementCtx): void => {
    const firstAt = new Map<string, number>();
    entries.forEach((entry, i) => {
      const k = key(entry);
      if (k === undefined) return;
      const first = firstAt.get(k);
      if (first === undefined) firstAt.set(k, i);
      else ctx.addIssue({ code: 'custom', path: [i, field], message: message(k, first) });
    });
  };
}

export function configSchema(configDir: string) {
  const path = z.string().min(1, { error: 'must not be empty' }).transform((p) => resolve(configDir, p));
  const url = checked((u) => void parseUpstreamUrl(u), (m) => m.replace('--instance-name', 'instance-name'));
  const listenAddress = checked((a) => void splitListen(a), (m) => m.replace(/^--listen /, ''));

  const listener = z.preprocess(
    (v) => (typeof v === 'string' ? { address: v } : v),
    z
      .strictObject(
        {
          address: listenAddress,
          'server-cert': path.optional(),
          'server-key': path.optional(),
          'client-certs': path.optional(),
          push: z.boolean().default(false),
          'access-token': path.optional(),
        },
        { error: (iss) => (iss.code === 'invalid_type' ? "expected 'HOST:PORT' or a mapping with an address" : undefined) },
      )
      .transform((l, ctx): ListenerConfig => {
        const problem =
          (l['server-cert'] === undefined) !== (l['server-key'] === undefined) ? 'server-cert and server-key must be given together'
          : l['client-certs'] !== undefined && l['server-cert'] === undefined ? 'client-certs needs TLS: give server-cert and server-key too'
          : undefined;
        const pushProblem =
          l['access-token'] !== undefined && !l.push ? 'access-token is for push listeners (push: true); pull-only listeners need none'
          : l.push && l['client-certs'] === undefined && l['access-token'] === undefined ? 'a push listener must authenticate its clients: give client-certs (with server-cert and server-key) or access-token'
          : undefined;
        if (problem !== undefined || pushProblem !== undefined) {
          ctx.issues.push({ code: 'custom', message: problem ?? pushProblem ?? '', input: l });
          return z.NEVER;
        }
        const push = { push: l.push, ...(l['access-token'] !== undefined && { accessTokenFile: l['access-token'] }) };
        if (l['server-cert'] === undefined || l['server-key'] === undefined) return { address: l.address, ...push };
        return {
          address: l.address,
          ...push,
          tls: { certFile: l['server-cert'], keyFile: l['server-key'], ...(l['client-certs'] !== undefined && { clientCertsFile: l['client-certs'] }) },
        };
      }),
  );

  const serve = z
    .strictObject({
      'max-batch-bytes': int(1024, 32 << 20).default(DEFAULT_MAX_BATCH_BYTES),
      'recheck-hours': z.number().min(0, { error: 'must be a number of hours >= 0 (0: rehash on every read)' }).default(DEFAULT_RECHECK_AFTER_MS / HOUR),
      'send-budget-mib': z
        .number()
        .min(4, { error: 'must be a number from 4 to 65536' })
        .max(65536, { error: 'must be a number from 4 to 65536' })
        .default(DEFAULT_SEND_BUDGET_BYTES / (1 << 20)),
      'stall-timeout': duration({ min: 0, max: DAY, zero: 'never' }).default(DEFAULT_STALL_TIMEOUT_MS),
      'idle-timeout': duration({ min: 0, max: 7 * DAY, zero: 'never' }).default(DEFAULT_IDLE_TIMEOUT_MS),
      'max-connections': int(1).default(() => defaultMaxConnections()),
      'max-streams-per-connection': int(1, 100_000).default(DEFAULT_MAX_STREAMS_PER_CONNECTION),
      'max-request-bytes': int(65536, 1 << 30).default(DEFAULT_MAX_REQUEST_BYTES),
    })
    .prefault({});

  const upstream = z
    .strictObject({
      name: z.string().min(1, { error: 'must not be empty' }).optional(),
      url: url.optional(),
      index: url.optional(),
      storage: url.optional(),
      'server-cert': path.optional(),
      'client-cert': path.optional(),
      'client-key': path.optional(),
      'access-token': path.optional(),
      'instance-name': z.string().default(''),
      'read-idle-timeout': duration({ min: 0, minExclusive: true, max: HOUR }).default(DEFAULT_READ_IDLE_TIMEOUT_MS),
      'rpc-timeout': duration({ min: 0, minExclusive: true, max: HOUR }).default(DEFAULT_RPC_TIMEOUT_MS),
      push: z.boolean().default(false),
    })
    .transform((u, ctx): UpstreamConfig => {
      const pair = u.index !== undefined || u.storage !== undefined;
      const problem =
        u.url !== undefined && pair ? 'give either url or an index/storage pair, not both'
        : u.url === undefined && !pair ? 'give url, or an index/storage pair (index and storage)'
        : pair && (u.index === undefined || u.storage === undefined) ? `an index/storage pair needs ${u.index === undefined ? 'index' : 'storage'} too`
        : (u['client-cert'] === undefined) !== (u['client-key'] === undefined) ? 'client-cert and client-key must be given together'
        : (u['server-cert'] ?? u['client-cert']) !== undefined && [u.url, u.index, u.storage].some((x) => x?.startsWith('http:')) ? 'server-cert, client-cert and client-key need https:// URLs'
        : undefined;
      if (problem !== undefined) {
        ctx.issues.push({ code: 'custom', message: problem, input: u });
        return z.NEVER;
      }
      const shared = {
        instanceName: u['instance-name'],
        rpcTimeoutMs: u['rpc-timeout'],
        ...(u['server-cert'] !== undefined && { serverCertFile: u['server-cert'] }),
        ...(u['client-cert'] !== undefined && { clientCertFile: u['client-cert'] }),
        ...(u['client-key'] !== undefined && { clientKeyFile: u['client-key'] }),
        ...(u['access-token'] !== undefined && { accessTokenFile: u['access-token'] }),
      };
      const readIdleTimeoutMs = u['read-idle-timeout'];
      if (u.url !== undefined) {
        const spec: UpstreamSpec = { ...shared, url: u.url, readIdleTimeoutMs };
        return { name: u.name ?? u.url, spec, push: u.push };
      }
      const index = u.index ?? '';
      const storage = u.storage ?? '';
      const spec: UpstreamSpec = { ...shared, url: index, storage: { ...shared, url: storage }, readIdleTimeoutMs };
      return { name: u.name ?? `${index} (index) + ${storage} (storage)`, spec, push: u.push };
    });

  const project = z
    .strictObject({
      path,
      targets: z.array(z.string().min(1, { error: 'must not be empty' })).min(1, { error: 'give at least one target element' }),
      bst: z.string().min(1, { error: 'must not be empty' }).default('bst'),
    })
    .transform((p) => ({ path: p.path, targets: p.targets, bst: p.bst }));

  const sync = z
    .strictObject({
      schedule: z
        .string()
        .check((ctx) => {
          const { valid, error } = validateCronExpression(ctx.value);
          if (!valid) ctx.issues.push({ code: 'custom', message: `'${ctx.value}' is not a cron expression: ${error?.message ?? 'invalid'}`, input: ctx.value });
        })
        .optional(),
      refs: z.array(checked((name) => void parseUserName(name))).default([]),
      'refs-files': z.array(path).default([]),
      projects: z.array(project).default([]),
      'on-miss': z.enum(['fetch', 'record', 'off']).default('fetch'),
      'miss-wait': duration({ min: 0, max: HOUR }).default(10 * SECOND),
      'with-buildtrees': z.boolean().default(false),
      concurrency: int(1, 256).default(8),
      'watch-debounce': duration({ min: 0, max: HOUR }).default(2 * SECOND),
    })
    .prefault({});

  const health = z
    .strictObject({
      'failures-to-offline': int(1, 1000).default(3),
      'probe-interval': duration({ min: 0, minExclusive: true, max: DAY }).default(30 * SECOND),
      'probe-max-interval': duration({ min: 0, minExclusive: true, max: DAY }).default(10 * MINUTE),
    })
    .check((ctx) => {
      if (ctx.value['probe-max-interval'] < ctx.value['probe-interval']) {
        ctx.issues.push({ code: 'custom', message: 'must be at least probe-interval', path: ['probe-max-interval'], input: ctx.value });
      }
    })
    .prefault({});

  const replicate = z
    .strictObject({
      watch: z.array(path).default([]),
    })
    .prefault({});

  const document = z
    .strictObject(
      {
        dir: path.default(() => defaultDataDir()),
        'log-level': z.enum(LOG_LEVELS).default('info'),
        listen: z
          .array(listener)
          .min(1, { error: 'give at least one address' })
          // Port 0 picks a free port each time, so it may repeat.
          .superRefine(noDuplicates('address', (l) => (l.address.endsWith(':0') ? undefined : l.address), (address, first) => `${address} is listed already (listen[${first}])`))
          .default([{ address: DEFAULT_LISTEN, push: false }]),
        serve,
        upstreams: z
          .array(upstream)
          // The name keys health records and push jobs: two upstreams may not share one.
          .superRefine(noDuplicates('name', (u) => u.name, (name, first) => `'${name}' is the name of upstreams[${first}] already: give each upstream its own name`))
          .default([]),
        sync,
        health,
        replicate,
      },
      { error: (iss) => (iss.code === 'invalid_type' ? 'the document must be a mapping of keys to values' : undefined) },
    )
    .transform(
      (d): Config => ({
        dir: d.dir,
        logLevel: d['log-level'],
        listen: d.listen,
        serve: {
          maxBatchBytes: d.serve['max-batch-bytes'],
          recheckAfterMs: Math.round(d.serve['recheck-hours'] * HOUR),
          limits: {
            sendBudgetBytes: Math.round(d.serve['send-budget-mib'] * (1 << 20)),
            stallTimeoutMs: d.serve['stall-timeout'],
            idleTimeoutMs: d.serve['idle-timeout'],
            maxConnections: d.serve['max-connections'],
            maxStreamsPerConnection: d.serve['max-streams-per-connection'],
            maxRequestBytes: d.serve['max-request-bytes'],
          },
        },
        upstreams: d.upstreams,
        sync: {
          schedule: d.sync.schedule,
          refs: d.sync.refs,
          refsFiles: d.sync['refs-files'],
          projects: d.sync.projects,
          onMiss: d.sync['on-miss'],
          missWaitMs: d.sync['miss-wait'],
          withBuildtrees: d.sync['with-buildtrees'],
          concurrency: d.sync.concurrency,
          watchDebounceMs: d.sync['watch-debounce'],
        },
        health: {
          failuresToOffline: d.health['failures-to-offline'],
          probeIntervalMs: d.health['probe-interval'],
          probeMaxIntervalMs: d.health['probe-max-interval'],
        },
        replicate: { watch: d.replicate.watch },
      }),
    );

  // An empty document, and a key with no value (`upstreams:` with its entries commented out), mean the defaults.
  return z.preprocess((doc) => dropNulls(doc ?? {}), document);
}

/** Removes the mapping entries whose value is null, at every depth (list items stay, and are errors). */
function dropNulls(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(dropNulls);
  if (value === null || typeof value !== 'object') return value;
  return Object.fromEntries(Object.entries(value).flatMap(([k, v]) => (v === null ? [] : [[k, dropNulls(v)]])));
}
