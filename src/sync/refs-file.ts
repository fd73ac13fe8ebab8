import { readFile, readdir, stat } from 'node:fs/promises';
import { join, relative, sep } from 'node:path';
import { MirrorError, errorMessage } from '../errors.js';

/** Reads a refs file: one name per line; `#` starts a comment; blank lines are ignored. */
export async function readRefsFile(path: string): Promise<string[]> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new MirrorError('CONFIG_INVALID', `cannot read refs file ${path}: ${errorMessage(err)}`, { cause: err });
  }
  return parseRefsText(text);
}

export function parseRefsText(text: string): string[] {
  return text
    .split(/\r?\n/)
    .map((line) => line.replace(/(^|\s)#.*$/, '').trim())
    .filter((line) => line !== '');
}

/** Backup and lock files editors leave beside the file being edited (`refs~`, `#refs#`, `refs.swp`). */
function isEditorLeftover(name: string): boolean {
  return name.endsWith('~') || (name.startsWith('#') && name.endsWith('#')) || /\.(swp|swo|bak|orig|rej|tmp)$/.test(name);
}

/**
 * The names of a refs path: a refs file, or a directory whose regular files (recursively, hidden
 * ones and editors' backup files skipped) are refs files. Sorted by path, so a run's selection
 * does not depend on listing order.
 */
export async function readRefsPath(path: string): Promise<string[]> {
  let info;
  try {
    info = await stat(path);
  } catch (err) {
    throw new MirrorError('CONFIG_INVALID', `cannot read refs file ${path}: ${errorMessage(err)}`, { cause: err });
  }
  if (!info.isDirectory()) return readRefsFile(path);
  const entries = await readdir(path, { recursive: true, withFileTypes: true });
  const files = entries
    .filter((e) => e.isFile() && !isEditorLeftover(e.name) && !relative(path, join(e.parentPath, e.name)).split(sep).some((part) => part.startsWith('.')))
    .map((e) => join(e.parentPath, e.name))
    .sort();
  const names: string[] = [];
  for (const file of files) names.push(...(await readRefsFile(file)));
  return names;
}
