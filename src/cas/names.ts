import { MirrorError } from '../errors.js';
import { isSha256Hex } from './digest.js';

/** Every BuildStream name URN starts with this (BuildStream 1.6 asset mode and 2.x). */
export const URN_PREFIX = 'urn:fdc:buildstream.build:2020:';

/**
 * What a name in the mirror's index points to.
 * - `ref`: a BuildStream 1.x ref `project/element/key`; the same as the 1.6 asset-mode URN
 *   `…:v1:<ref>`. Points to the artifact's root Directory. Stored under its v1 URN, so a
 *   1.x ref mirrored from a ReferenceStorage upstream and a v1 URN are one record.
 * - `artifact`: a 2.x artifact; points to a serialized `buildstream.v2.Artifact` blob.
 * - `element-sources`: a 2.x element's staged sources; points to a `buildstream.v2.Source` blob.
 * - `source`: a 2.x single source `kind/key`; points to a Directory.
 */
export type NameKind = 'ref' | 'artifact' | 'element-sources' | 'source';

export interface MirrorName {
  readonly kind: NameKind;
  /** The canonical URN, the key the name is stored under. */
  readonly urn: string;
  /** The part after the kind: the ref, artifact name, or source key. */
  readonly key: string;
}

/** Whether the Remote Asset call for this kind is FetchDirectory (else FetchBlob). */
export function isDirectoryName(kind: NameKind): boolean {
  return kind === 'ref' || kind === 'source';
}

const SEGMENT = /^[A-Za-z0-9._+@-]+$/;

function checkSegments(value: string, count: number, what: string): void {
  const segs = value.split('/');
  if (segs.length !== count || segs.some((s) => !SEGMENT.test(s) || s === '.' || s === '..')) {
    throw new MirrorError('INVALID_ARGUMENT', `'${short(value)}' is not a valid ${what}`);
  }
}

function short(s: string): string {
  return s.length > 120 ? `${s.slice(0, 120)}…` : s;
}

/** Validates a `project/element/key` artifact name or 1.x ref. */
export function checkArtifactName(name: string): void {
  if (name.length > 1024) throw new MirrorError('INVALID_ARGUMENT', 'artifact name is longer than 1024 characters');
  checkSegments(name, 3, 'artifact name (expected PROJECT/ELEMENT/KEY)');
}

export function refName(ref: string): MirrorName {
  checkArtifactName(ref);
  return { kind: 'ref', urn: `${URN_PREFIX}v1:${ref}`, key: ref };
}

export function artifactName(name: string): MirrorName {
  checkArtifactName(name);
  return { kind: 'artifact', urn: `${URN_PREFIX}artifact:${name}`, key: name };
}

/** Parses a BuildStream URN. Anything else is INVALID_ARGUMENT with a message saying what is served. */
export function parseUrn(urn: string): MirrorName {
  if (urn.length > 2048) throw new MirrorError('INVALID_ARGUMENT', 'URI is longer than 2048 characters');
  if (!urn.startsWith(URN_PREFIX)) {
    throw new MirrorError('INVALID_ARGUMENT', `unsupported URI '${short(urn)}': only BuildStream names (${URN_PREFIX}{artifact,source,v1}:…) are served`);
  }
  const rest = urn.slice(URN_PREFIX.length);
  const colon = rest.indexOf(':');
  const scheme = colon < 0 ? rest : rest.slice(0, colon);
  const key = colon < 0 ? '' : rest.slice(colon + 1);
  switch (scheme) {
    case 'v1':
      return refName(key);
    case 'artifact':
      return artifactName(key);
    case 'source':
      if (isSha256Hex(key)) return { kind: 'element-sources', urn, key };
      checkSegments(key, 2, 'source key (expected a 64-hex element sources key or KIND/KEY)');
      return { kind: 'source', urn, key };
    default:
      throw new MirrorError('INVALID_ARGUMENT', `unsupported BuildStream URN kind '${short(scheme)}' in '${short(urn)}' (expected artifact, source or v1)`);
  }
}

/** How a user gets full names: BuildStream's `bst show` with its full (64-hex) keys. */
export const HOW_TO_GET_NAMES = "bst show --deps all --format '%{name} %{full-key}' TARGET.bst";

const HEX = /^[0-9a-f]+$/;
/** The characters BuildStream keeps in an element's normal name; it turns any other into `_`. */
const NOT_NORMAL = /[^0-9A-Za-z._-]/g;

/**
 * BuildStream's normal name of an element path (`Element.normal_name`, then
 * `_compose_artifact_name`): `/` becomes `-`, the `.bst` extension is dropped, and characters
 * outside `[0-9A-Za-z._-]` become `_`. `sub/hello.bst` is `sub-hello`.
 */
export function normalElementName(path: string): string {
  return path.replace(/\.bst$/, '').replaceAll('/', '-').replace(NOT_NORMAL, '_');
}

function checkFullKey(input: string, key: string): void {
  if (key.length < 64 && HEX.test(key)) {
    throw new MirrorError('INVALID_ARGUMENT', `'${short(input)}' has a short cache key '${key}': give the full 64-character key, as ${HOW_TO_GET_NAMES} prints it`);
  }
  if (key.length !== 64 || !HEX.test(key)) {
    throw new MirrorError('INVALID_ARGUMENT', `'${short(input)}' does not end in a cache key (64 lowercase hex characters; full keys: ${HOW_TO_GET_NAMES})`);
  }
}

/**
 * Turns `PROJECT/ELEMENT/KEY` as a user copies it into an artifact name. ELEMENT may be the
 * element path `bst show` prints (`sub/hello.bst`), normalised as BuildStream does, or the normal
 * name itself; KEY must be the full 64-hex cache key, not bst's 8-character display key.
 */
export function userArtifactName(input: string): string {
  const segments = input.split('/');
  const key = segments.at(-1) ?? '';
  if (segments.length < 3 || segments.some((s) => s === '')) {
    throw new MirrorError('INVALID_ARGUMENT', `'${short(input)}' is not a name: expected PROJECT/ELEMENT/KEY or a BuildStream URN (full names: ${HOW_TO_GET_NAMES})`);
  }
  checkFullKey(input, key);
  const element = segments.slice(1, -1).join('/');
  if (element.includes(':')) {
    throw new MirrorError('INVALID_ARGUMENT', `'${short(input)}' names an element through a junction: give it under the junctioned project's own name, PROJECT/ELEMENT/KEY`);
  }
  return `${segments[0] ?? ''}/${normalElementName(element)}/${key}`;
}

/**
 * Parses a name as a user gives it to `sync`: a full URN, or `project/element/key`, which may be
 * a 1.x ref or a 2.x artifact. The candidates are tried in order against a Remote Asset upstream
 * (artifact URN, then the 1.6 asset-mode v1 URN); a ReferenceStorage upstream only knows refs.
 */
export function parseUserName(input: string): MirrorName[] {
  const name = input.trim();
  if (name === '') throw new MirrorError('INVALID_ARGUMENT', 'empty name');
  if (name.startsWith('urn:')) {
    const parsed = parseUrn(name);
    if (parsed.kind === 'artifact' || parsed.kind === 'ref') checkFullKey(name, parsed.key.split('/')[2] ?? '');
    return [parsed];
  }
  const artifact = userArtifactName(name);
  return [artifactName(artifact), refName(artifact)];
}
