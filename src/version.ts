import { createRequire } from 'node:module';

/** This package's version (from package.json, found relative to this file, not the cwd). */
export const VERSION: string = (createRequire(import.meta.url)('../package.json') as { version: string }).version;
