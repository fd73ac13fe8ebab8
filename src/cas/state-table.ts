/**
 * A table of JSON records the daemon keeps beside the index in the store's one LevelDB (sync
 * runs, upstream health, recorded misses, later push jobs): LevelDB admits one process, so
 * whatever owns the store owns its state too. Keys sort as strings; writes are atomic per call.
 */
export interface StateTable<V> {
  get(key: string): Promise<V | undefined>;
  put(key: string, value: V): Promise<void>;
  del(key: string): Promise<void>;
  /** Puts and deletes applied together, or not at all. */
  batch(ops: readonly ({ type: 'put'; key: string; value: V } | { type: 'del'; key: string })[]): Promise<void>;
  /** Entries in key order (reverse: descending), at most `limit`; `gte`/`lt` bound the keys. */
  entries(options?: { gte?: string; lt?: string; reverse?: boolean; limit?: number }): AsyncIterable<[string, V]>;
  clear(): Promise<void>;
}

/** The operations of a `level` sublevel with a JSON value encoding that a table uses. */
export interface JsonSublevel<V> {
  get(key: string): Promise<V | undefined>;
  put(key: string, value: V): Promise<void>;
  del(key: string): Promise<void>;
  batch(ops: ({ type: 'put'; key: string; value: V } | { type: 'del'; key: string })[]): Promise<void>;
  iterator(range: { gte?: string; lt?: string; reverse?: boolean; limit?: number }): AsyncIterable<[string, V]>;
  clear(): Promise<void>;
}

export class SublevelStateTable<V> implements StateTable<V> {
  constructor(private readonly sublevel: JsonSublevel<V>) {}

  get(key: string): Promise<V | undefined> {
    return this.sublevel.get(key);
  }

  put(key: string, value: V): Promise<void> {
    return this.sublevel.put(key, value);
  }

  del(key: string): Promise<void> {
    return this.sublevel.del(key);
  }

  async batch(ops: readonly ({ type: 'put'; key: string; value: V } | { type: 'del'; key: string })[]): Promise<void> {
    if (ops.length === 0) return;
    await this.sublevel.batch(ops.map((op) => (op.type === 'put' ? { type: 'put' as const, key: op.key, value: op.value } : { type: 'del' as const, key: op.key })));
  }

  async *entries(options: { gte?: string; lt?: string; reverse?: boolean; limit?: number } = {}): AsyncIterable<[string, V]> {
    const range: { gte?: string; lt?: string; reverse?: boolean; limit?: number } = {};
    if (options.gte !== undefined) range.gte = options.gte;
    if (options.lt !== undefined) range.lt = options.lt;
    if (options.reverse !== undefined) range.reverse = options.reverse;
    if (options.limit !== undefined) range.limit = options.limit;
    for await (const [k, v] of this.sublevel.iterator(range)) yield [k, v];
  }

  clear(): Promise<void> {
    return this.sublevel.clear();
  }
}
