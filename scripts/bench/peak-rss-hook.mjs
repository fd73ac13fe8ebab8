// Preloaded into a measured node child (`node --import <this file> ...`): on exit it copies the
// process's own VmHWM (peak resident set, kB) into the file named by BST_BENCH_PEAK_RSS_FILE.
// The parent polls /proc/<pid>/status too, but a short-lived child can peak and exit between two
// polls, and its /proc entry is gone once reaped; VmHWM never decreases, so this is the true peak.
import { readFileSync, writeFileSync } from 'node:fs';

const out = process.env.BST_BENCH_PEAK_RSS_FILE;
if (out) {
  process.on('exit', () => {
    try {
      const hwm = /^VmHWM:\s+(\d+) kB$/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
      if (hwm) writeFileSync(out, `${hwm}\n`);
    } catch {
      // Best effort: the parent's polling is the fallback.
    }
  });
}
