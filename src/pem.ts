import { X509Certificate, createPrivateKey } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { MirrorError, errorMessage } from './errors.js';

/** What a PEM file holds, for messages: certificates or a private key. */
export type PemKind = 'server certificate' | 'client certificate' | 'client certificates' | 'client key' | 'server key';

/** Reads a file named in the configuration; a missing or unreadable one is CONFIG_INVALID naming it. */
export async function readConfigFile(file: string, what: string): Promise<Buffer> {
  try {
    return await readFile(file);
  } catch (err) {
    throw new MirrorError('CONFIG_INVALID', `cannot read the ${what} file ${file}: ${errorMessage(err)}`, { cause: err });
  }
}

/** readConfigFile for optional settings. */
export async function readOptional(file: string | undefined, what: string): Promise<Buffer | undefined> {
  return file === undefined ? undefined : readConfigFile(file, what);
}

/** Reads and parses a PEM file (certificates or a key), so a wrong file fails at start naming it, not at the first TLS handshake. */
export async function readPem(file: string, what: PemKind): Promise<Buffer> {
  const pem = await readConfigFile(file, what);
  checkPem(file, pem, what);
  return pem;
}

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

/**
 * Parses certificate and key files when they are configured, so a wrong file is a configuration
 * error naming it, not a TLS failure on the first connection.
 */
export function checkPem(file: string | undefined, pem: Buffer | undefined, what: PemKind): void {
  if (file === undefined || pem === undefined) return;
  const isKey = what === 'client key' || what === 'server key';
  try {
    if (isKey) {
      createPrivateKey(pem);
      return;
    }
    const certificates = pem.toString('utf8').match(PEM_CERTIFICATE) ?? [];
    if (certificates.length === 0) throw new Error('no PEM certificate (-----BEGIN CERTIFICATE-----) in it');
    for (const certificate of certificates) new X509Certificate(certificate);
  } catch (err) {
    throw new MirrorError('CONFIG_INVALID', `the ${what} file ${file} is not a PEM ${isKey ? 'private key' : 'certificate'}: ${errorMessage(err)}`, { cause: err });
  }
}
