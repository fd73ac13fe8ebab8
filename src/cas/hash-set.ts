/**
 * A set of SHA-256 hashes (64 hex characters) kept as their first 64 bits in an open-addressing
 * table: about 16 bytes an entry, where a Set of the hex strings costs about 120. `verify` holds
 * every referenced blob of the store in one.
 *
 * Two hashes that share their first 64 bits are one entry, so has() may answer true for a hash
 * never added. Among 10 million hashes the chance that any two share a prefix is about 3 in a
 * million; use it only where a wrong "yes" is harmless (verify: a blob is kept that could have
 * been pruned).
 */
export class HashPrefixSet {
  private hi = new Uint32Array(1024);
  private lo = new Uint32Array(1024);
  private count = 0;
  /** The prefix 0/0 marks an empty slot, so it is kept aside. */
  private hasZero = false;

  get size(): number {
    return this.count + (this.hasZero ? 1 : 0);
  }

  add(hash: string): void {
    const [h, l] = prefix(hash);
    if (h === 0 && l === 0) {
      this.hasZero = true;
      return;
    }
    if ((this.count + 1) * 2 > this.hi.length) this.grow();
    if (insert(this.hi, this.lo, h, l)) this.count += 1;
  }

  has(hash: string): boolean {
    const [h, l] = prefix(hash);
    if (h === 0 && l === 0) return this.hasZero;
    const mask = this.hi.length - 1;
    for (let i = l & mask; ; i = (i + 1) & mask) {
      const sh = this.hi[i] ?? 0;
      const sl = this.lo[i] ?? 0;
      if (sh === 0 && sl === 0) return false;
      if (sh === h && sl === l) return true;
    }
  }

  private grow(): void {
    const hi = new Uint32Array(this.hi.length * 2);
    const lo = new Uint32Array(this.lo.length * 2);
    for (let i = 0; i < this.hi.length; i++) {
      const h = this.hi[i] ?? 0;
      const l = this.lo[i] ?? 0;
      if (h !== 0 || l !== 0) insert(hi, lo, h, l);
    }
    this.hi = hi;
    this.lo = lo;
  }
}

/** Inserts a non-zero prefix; false when it was there already. SHA-256 bits are uniform, so the low word is the slot. */
function insert(hi: Uint32Array, lo: Uint32Array, h: number, l: number): boolean {
  const mask = hi.length - 1;
  for (let i = l & mask; ; i = (i + 1) & mask) {
    const sh = hi[i] ?? 0;
    const sl = lo[i] ?? 0;
    if (sh === h && sl === l) return false;
    if (sh === 0 && sl === 0) {
      hi[i] = h;
      lo[i] = l;
      return true;
    }
  }
}

function prefix(hash: string): [number, number] {
  return [Number.parseInt(hash.slice(0, 8), 16) >>> 0, Number.parseInt(hash.slice(8, 16), 16) >>> 0];
}
