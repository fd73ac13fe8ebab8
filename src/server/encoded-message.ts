import type * as grpc from '@grpc/grpc-js';

/**
 * A response whose protobuf bytes the handler already wrote. The response serializer passes it
 * through untouched, so bulk data (ByteStream reads) is read from disk straight into the buffer
 * grpc-js frames, with no encoder copying every byte on the way.
 */
export class EncodedMessage {
  constructor(readonly bytes: Buffer) {}
}

/** Room for a length-delimited field's header: a one-byte tag and a length of up to 2^35. */
export const BYTES_FIELD_HEADROOM = 6;

/**
 * Encodes a message whose only field is bytes field `fieldNumber` (< 16), with the data already in
 * `frame` after BYTES_FIELD_HEADROOM spare bytes: writes the tag and length into that room.
 */
export function encodeBytesField(fieldNumber: number, frame: Buffer): EncodedMessage {
  let length = frame.byteLength - BYTES_FIELD_HEADROOM;
  const header = [(fieldNumber << 3) | 2];
  while (length > 0x7f) {
    header.push((length % 0x80) | 0x80);
    length = Math.floor(length / 0x80);
  }
  header.push(length);
  const start = BYTES_FIELD_HEADROOM - header.length;
  frame.set(header, start);
  return new EncodedMessage(frame.subarray(start));
}

/** A method definition whose responses may also be EncodedMessage. */
export function acceptingEncoded<Req, Res>(method: grpc.MethodDefinition<Req, Res>): grpc.MethodDefinition<Req, Res | EncodedMessage> {
  return {
    ...method,
    responseSerialize: (value: Res | EncodedMessage): Buffer => (value instanceof EncodedMessage ? value.bytes : method.responseSerialize(value)),
  };
}
