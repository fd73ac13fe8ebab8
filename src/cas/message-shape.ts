import { BinaryReader, WireType } from '@bufbuild/protobuf/wire';

/**
 * The wire types of a message's known fields, nested messages by their own shape. A protobuf
 * decoder skips a field whose wire type does not match its declaration, so any message decodes
 * "successfully" as any other (an Artifact as an empty Directory); checking the declared wire
 * types tells the kinds apart. Unknown field numbers pass: newer BuildStream and REAPI versions
 * add fields.
 */
export interface MessageShape {
  readonly name: string;
  readonly fields: Readonly<Record<number, WireType | MessageShape>>;
  /** Fields every real message of this kind has (BuildStream always sets them). */
  readonly required?: readonly number[];
}

const LEN = WireType.LengthDelimited;
const VARINT = WireType.Varint;

const DIGEST: MessageShape = { name: 'Digest', fields: { 1: LEN, 2: VARINT } };
const FILE_NODE: MessageShape = { name: 'FileNode', fields: { 1: LEN, 2: DIGEST, 4: VARINT, 6: LEN } };
const DIRECTORY_NODE: MessageShape = { name: 'DirectoryNode', fields: { 1: LEN, 2: DIGEST } };
const SYMLINK_NODE: MessageShape = { name: 'SymlinkNode', fields: { 1: LEN, 2: LEN, 4: LEN } };

/** REAPI Directory (with node_properties = 5). */
export const DIRECTORY_SHAPE: MessageShape = { name: 'Directory', fields: { 1: FILE_NODE, 2: DIRECTORY_NODE, 3: SYMLINK_NODE, 5: LEN } };

/** BuildStream 2's Artifact, with the fields our proto leaves out (build_error 3, build_error_details 4, was_workspaced 7, build_deps 9). */
export const ARTIFACT_SHAPE: MessageShape = {
  name: 'BuildStream Artifact',
  fields: {
    1: VARINT, 2: VARINT, 3: LEN, 4: LEN, 5: LEN, 6: LEN, 7: VARINT, 8: DIGEST, 9: LEN, 10: DIGEST,
    11: { name: 'LogFile', fields: { 1: LEN, 2: DIGEST } },
    12: DIGEST, 13: DIGEST, 14: DIGEST, 15: DIGEST, 16: LEN, 17: DIGEST,
    18: { name: 'SandboxState', fields: { 2: LEN, 3: DIGEST } },
  },
  // strong_key: BuildStream sets it on every artifact it caches.
  required: [5],
};

/** BuildStream 2's Source. */
export const SOURCE_SHAPE: MessageShape = { name: 'BuildStream Source', fields: { 1: VARINT, 2: DIGEST }, required: [2] };

const WIRE_NAMES: Record<number, string> = { 0: 'varint', 1: '64-bit', 2: 'length-delimited', 3: 'group start', 4: 'group end', 5: '32-bit' };

/**
 * Why `data` cannot be a `shape` message (a field of a known number with another wire type, at
 * any depth), or undefined when it can. Malformed bytes throw, as the decoder would.
 */
export function shapeMismatch(data: Uint8Array, shape: MessageShape): string | undefined {
  const reader = new BinaryReader(data);
  const seen = new Set<number>();
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    seen.add(field);
    const declared = shape.fields[field];
    if (declared === undefined) {
      reader.skip(wireType, field);
      continue;
    }
    const expected = typeof declared === 'number' ? declared : LEN;
    if (wireType !== expected) {
      return `${shape.name} field ${field} is ${WIRE_NAMES[expected] ?? expected}, but the blob has ${WIRE_NAMES[wireType] ?? wireType} there`;
    }
    if (typeof declared === 'number') {
      reader.skip(wireType, field);
      continue;
    }
    const inner = shapeMismatch(reader.bytes(), declared);
    if (inner !== undefined) return inner;
  }
  const absent = shape.required?.find((field) => !seen.has(field));
  return absent === undefined ? undefined : `it has no field ${absent}, which every ${shape.name} has`;
}
