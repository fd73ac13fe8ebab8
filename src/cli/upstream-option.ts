import { MirrorError } from '../errors.js';
import type { EndpointSpec } from '../remote/endpoint.js';
import type { UpstreamSpec } from '../remote/upstream.js';

/** The TLS, token and instance settings the CLI's flags give every upstream endpoint. */
export type SharedEndpointSettings = Omit<EndpointSpec, 'url'>;

export const UPSTREAM_OPTION_HELP =
  'Upstream cache: URL (http:// or https://), or index=URL,storage=URL for a separate Remote Asset index and CAS storage ' +
  "(BuildStream 2's type: index and type: storage); repeat to try several in order";

/** Parses one `--upstream` value: `URL`, or `index=URL,storage=URL` in either order. */
export function parseUpstreamOption(value: string, shared: SharedEndpointSettings): UpstreamSpec {
  if (!value.includes('=')) return { ...shared, url: value };
  const parts = new Map<string, string>();
  for (const part of value.split(',')) {
    const eq = part.indexOf('=');
    const key = part.slice(0, eq).trim();
    if (eq < 0 || (key !== 'index' && key !== 'storage')) {
      throw new MirrorError('CONFIG_INVALID', `--upstream '${value}': expected URL or index=URL,storage=URL ('${part}' is neither)`);
    }
    if (parts.has(key)) throw new MirrorError('CONFIG_INVALID', `--upstream '${value}': '${key}' is given twice`);
    parts.set(key, part.slice(eq + 1).trim());
  }
  const index = parts.get('index');
  const storage = parts.get('storage');
  if (index === undefined || storage === undefined) {
    throw new MirrorError('CONFIG_INVALID', `--upstream '${value}': an index/storage pair needs both index=URL and storage=URL`);
  }
  return { ...shared, url: index, storage: { ...shared, url: storage } };
}
