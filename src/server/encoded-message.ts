import type * as grpc from '@grpc/grpc-js';

/**
 * A response whose protobuf bytes the handler already wrote. The response serializer passes it
 * through untouched, so bulk data (ByteStream reads) goes from disk into the message without the
 * protobuf encoder copying it (twice, with ts-proto's writer); grpc-js still copies each message
 * once into its own frame.
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
  const length = frame.byteLength - BYTES_FIELD_HEADROOM;
  const start = BYTES_FIELD_HEADROOM - 1 - varintLength(length);
  writeBytesFieldHeader(frame, start, fieldNumber, length);
  return new EncodedMessage(frame.subarray(start));
}

/** Bytes a length-delimited field takes: tag (field numbers < 16), length, content. */
export function bytesFieldLength(contentLength: number): number {
  return 1 + varintLength(contentLength) + contentLength;
}

/** Writes a length-delimited field's tag and length at `offset`; returns where its content goes. */
export function writeBytesFieldHeader(buf: Buffer, offset: number, fieldNumber: number, contentLength: number): number {
  let at = offset;
  buf[at++] = (fieldNumber << 3) | 2;
  let rest = contentLength;
  while (rest > 0x7f) {
    buf[at++] = (rest % 0x80) | 0x80;
    rest = Math.floor(rest / 0x80);
  }
  buf[at++] = rest;
  return at;
}

function varintLength(value: number): number {
  let n = 1;
  for (let rest = value; rest > 0x7f; rest = Math.floor(rest / 0x80)) n += 1;
  return n;
}

/** A method definition whose responses may also be EncodedMessage. */
export function acceptingEncoded<Req, Res>(method: grpc.MethodDefinition<Req, Res>): grpc.MethodDefinition<Req, Res | EncodedMessage> {
  return {
    ...method,
    responseSerialize: (value: Res | EncodedMessage): Buffer => (value instanceof EncodedMessage ? value.bytes : method.responseSerialize(value)),
  };
}
