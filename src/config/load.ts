import { readFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { parseDocument } from 'yaml';
import type { z } from 'zod';
import { MirrorError, errorMessage } from '../errors.js';
import type { LogLevel } from '../log.js';
import { splitListen } from '../server/server.js';
import type { Config } from './config.js';
import { configSchema } from './schema.js';

/** Command-line flags that win over the file (`serve --dir … --listen … --log-level …`). */
export interface ConfigOverrides {
  /** Used as given (a flag's path is the caller's to resolve, against its working directory). */
  readonly dir?: string | undefined;
  /** Replaces the file's listeners; an empty list leaves them. */
  readonly listen?: readonly string[] | undefined;
  readonly logLevel?: LogLevel | undefined;
}

/** Reads and validates a config file; every problem is a MirrorError('CONFIG_INVALID') naming the file. */
export async function loadConfig(file: string, overrides: ConfigOverrides = {}): Promise<Config> {
  return parseConfig(await readConfigText(file), file, overrides);
}

/** The text of a config file; an unreadable one is CONFIG_INVALID naming it. */
export async function readConfigText(file: string): Promise<string> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    throw new MirrorError('CONFIG_INVALID', `${file}: cannot read the config file: ${errorMessage(err)}`, { cause: err });
  }
}

/**
 * Parses the YAML text of the config file `file` (which only names it in messages and anchors its
 * relative paths): syntax errors name the line; validation errors are listed one per line as
 * `key.path[1].sub: message`. An empty file means every default.
 */
export function parseConfig(text: string, file: string, overrides: ConfigOverrides = {}): Config {
  const doc = parseDocument(text, { prettyErrors: true });
  if (doc.errors.length > 0) {
    const lines = doc.errors.map((e) => {
      const at = e.linePos?.[0];
      const message = e.message.replace(/ at line \d+, column \d+:[\s\S]*$/, '');
      return at ? `line ${at.line}, column ${at.col}: ${message}` : message;
    });
    throw invalid(file, lines.map((line) => `YAML syntax error: ${line}`));
  }
  let data: unknown;
  try {
    data = doc.toJS();
  } catch (err) {
    // Unresolved aliases, too many aliases.
    throw invalid(file, [`YAML error: ${errorMessage(err)}`], err);
  }
  const result = configSchema(dirname(file)).safeParse(data);
  if (!result.success) {
    throw invalid(file, result.error.issues.flatMap(formatIssue));
  }
  const config = result.data;
  const listen = overrides.listen?.length ? overrides.listen : undefined;
  // A bad flag throws splitListen's own error, which names --listen.
  for (const address of listen ?? []) splitListen(address);
  return {
    ...config,
    dir: overrides.dir ?? config.dir,
    logLevel: overrides.logLevel ?? config.logLevel,
    listen: listen ? listen.map((address) => ({ address, push: false })) : config.listen,
  };
}

/** `FILE: problem`, or `FILE: N problems:` and one indented line each. */
function invalid(file: string, problems: readonly string[], cause?: unknown): MirrorError {
  const message = problems.length === 1 ? `${file}: ${problems[0]}` : `${file}: ${problems.length} problems:\n  ${problems.join('\n  ')}`;
  return new MirrorError('CONFIG_INVALID', message, cause === undefined ? undefined : { cause });
}

/** `upstreams[1].url: message`; an unknown key is reported at the mapping that has it, one line per key. */
function formatIssue(issue: z.core.$ZodIssue): string[] {
  const at = formatPath(issue.path);
  const prefix = at === '' ? '' : `${at}: `;
  if (issue.code === 'unrecognized_keys') return issue.keys.map((key) => `${prefix}unknown key '${key}'`);
  return [`${prefix}${issue.message}`];
}

function formatPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const key of path) {
    if (typeof key === 'number') out += `[${key}]`;
    else out += out === '' ? String(key) : `.${String(key)}`;
  }
  return out;
}
