import type { MirrorName } from '../cas/names.js';

/**
 * What the server asks when a client wants a name the mirror lacks (FetchBlob, FetchDirectory,
 * GetReference). The daemon wires in pull-through; the server itself never talks to upstreams.
 * Contract: resolves true when the name has been mirrored meanwhile (the server looks it up
 * again), false to answer NOT_FOUND now; never rejects; returns within the daemon's miss-wait.
 */
export interface MissHandler {
  nameMissed(name: MirrorName): Promise<boolean>;
}
