import { X509Certificate, createPrivateKey } from 'node:crypto';
import { createSecureContext } from 'node:tls';
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
    const text = pem.toString('utf8');
    const certificates = text.match(PEM_CERTIFICATE) ?? [];
    if (certificates.length === 0) throw new Error('no PEM certificate (-----BEGIN CERTIFICATE-----) in it');
    // A truncated bundle would otherwise lose its last certificate without a word. Other blocks
    // (a key in a combined file, a CRL) are skipped, as OpenSSL skips them.
    const begun = text.match(/-----BEGIN CERTIFICATE-----/g)?.length ?? 0;
    if (begun !== certificates.length) throw new Error(`it begins ${begun} certificates but holds ${certificates.length} whole ones: a certificate is cut short`);
    for (const certificate of certificates) new X509Certificate(certificate);
  } catch (err) {
    throw new MirrorError('CONFIG_INVALID', `the ${what} file ${file} is not a PEM ${isKey ? 'private key' : 'certificate'}: ${errorMessage(err)}`, { cause: err });
  }
}

/** Checks that a certificate and its key belong together (OpenSSL refuses a mismatched pair only at the first handshake otherwise). */
export function checkKeyPair(certFile: string, cert: Buffer, keyFile: string, key: Buffer): void {
  try {
    createSecureContext({ cert, key });
  } catch (err) {
    throw new MirrorError('CONFIG_INVALID', `the certificate ${certFile} and the key ${keyFile} do not belong together: ${errorMessage(err)}`, { cause: err });
  }
}

/** Certificates in a PEM file that are expired or not yet valid at `now`, one line each, for a start-up warning. */
export function certificateValidityProblems(file: string, pem: Buffer, now = new Date()): string[] {
  const problems: string[] = [];
  for (const block of pem.toString('utf8').match(PEM_CERTIFICATE) ?? []) {
    const certificate = new X509Certificate(block);
    const subject = certificate.subject.replace(/\n/g, ', ');
    if (new Date(certificate.validTo) < now) problems.push(`${file}: the certificate of ${subject} expired on ${certificate.validTo}`);
    else if (new Date(certificate.validFrom) > now) problems.push(`${file}: the certificate of ${subject} is not valid before ${certificate.validFrom}`);
  }
  return problems;
}
