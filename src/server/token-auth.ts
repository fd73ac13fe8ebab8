import { timingSafeEqual } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';

/**
 * Refuses (UNAUTHENTICATED) every call that does not carry `authorization: Bearer <token>`, as
 * BuildStream 2 sends its `access-token`. Compared in constant time.
 */
export function requireBearerToken(token: string): grpc.ServerInterceptor {
  const expected = Buffer.from(token);
  const allowed = (metadata: grpc.Metadata): boolean => {
    const value = metadata.get('authorization')[0];
    // The scheme name is case-insensitive (RFC 9110 §11.1); the token is compared exactly.
    const match = typeof value === 'string' ? /^bearer +(.*)$/i.exec(value) : null;
    const given = Buffer.from(match?.[1] ?? '');
    return given.length === expected.length && timingSafeEqual(given, expected);
  };
  return (_method, call) =>
    new grpc.ServerInterceptingCall(call, {
      start: (next) => {
        next({
          onReceiveMetadata: (metadata, mdNext) => {
            if (allowed(metadata)) {
              mdNext(metadata);
              return;
            }
            call.sendStatus({ code: grpc.status.UNAUTHENTICATED, details: 'this push listener needs a valid access token (authorization: Bearer …)', metadata: new grpc.Metadata() });
          },
        });
      },
    });
}
