import { readFile } from 'node:fs/promises';
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
