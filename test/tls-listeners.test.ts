import assert from 'node:assert/strict';
import { join } from 'node:path';
import test from 'node:test';
import { writeFile } from 'node:fs/promises';
import * as grpc from '@grpc/grpc-js';
import { parseConfig } from '../src/config/load.js';
import { Daemon } from '../src/daemon/daemon.js';
import { CapabilitiesClient } from '../src/gen/build/bazel/remote/execution/v2/remote_execution.js';
import { silentLogger } from '../src/log.js';
import { certificateValidityProblems } from '../src/pem.js';
import { runCli, tempDir } from './helpers/mirror.js';
import { makeCertificate } from './helpers/tls.js';

function capabilities(address: string, credentials: grpc.ChannelCredentials): Promise<{ code: grpc.status; details: string }> {
  const client = new CapabilitiesClient(address, credentials);
  return new Promise((resolve) => {
    client.getCapabilities({ instanceName: '' }, new grpc.Metadata(), { deadline: Date.now() + 10_000 }, (err) => {
      client.close();
      resolve(err ? { code: err.code, details: err.details } : { code: grpc.status.OK, details: '' });
    });
  });
}

test('listeners: https with client certificates admits only clients holding one; plain and https listeners side by side', async (t) => {
  const dir = await tempDir(t);
  const server = await makeCertificate(dir, 'server');
  const office = await makeCertificate(dir, 'office-ci');
  const stranger = await makeCertificate(dir, 'stranger');
  const yaml = [
    `dir: ${dir}`,
    'log-level: silent',
    'listen:',
    '  - 127.0.0.1:0',
    '  - address: 127.0.0.1:0',
    `    server-cert: ${server.certFile}`,
    `    server-key: ${server.keyFile}`,
    `    client-certs: ${office.certFile}`,
    '',
  ].join('\n');
  const daemon = await Daemon.start(parseConfig(yaml, join(dir, 'mirror.yaml')), { log: silentLogger(), syncAtStart: false });
  t.after(() => daemon.stop());
  const [plain, secure] = daemon.addresses;
  assert.deepEqual((await daemon.status()).daemon?.listen, [`${plain} (http, pull-only)`, `${secure} (https, client certificates, pull-only)`]);
  assert.ok(plain && secure);
  assert.equal((await capabilities(plain, grpc.credentials.createInsecure())).code, grpc.status.OK);
  assert.equal((await capabilities(secure, grpc.credentials.createSsl(server.cert, office.key, office.cert))).code, grpc.status.OK);
  // Refused in the handshake: no certificate, or one not in the bundle.
  assert.equal((await capabilities(secure, grpc.credentials.createSsl(server.cert))).code, grpc.status.UNAVAILABLE);
  assert.equal((await capabilities(secure, grpc.credentials.createSsl(server.cert, stranger.key, stranger.cert))).code, grpc.status.UNAVAILABLE);
  assert.equal((await capabilities(secure, grpc.credentials.createInsecure())).code, grpc.status.UNAVAILABLE);
});

test('listeners: certificate files are checked at start (exit 2 naming the file); flags and keys must come in pairs', async (t) => {
  const dir = await tempDir(t);
  const server = await makeCertificate(dir, 'server');
  const notPem = join(dir, 'passwd');
  await writeFile(notPem, 'root:x:0:0:root:/root:/bin/bash\n');
  const badCert = await runCli(['serve', '--dir', dir, '--listen', '127.0.0.1:0', '--server-cert', notPem, '--server-key', server.keyFile]);
  assert.equal(badCert.code, 2);
  assert.match(badCert.stderr, /server certificate file .*passwd is not a PEM certificate/);
  const alone = await runCli(['serve', '--dir', dir, '--listen', '127.0.0.1:0', '--server-cert', server.certFile]);
  assert.equal(alone.code, 2);
  assert.match(alone.stderr, /--server-cert and --server-key must be given together/);
  const file = join(dir, 'mirror.yaml');
  await writeFile(file, `dir: ${dir}\nlisten:\n  - address: 127.0.0.1:0\n    client-certs: ${server.certFile}\n`);
  const clientOnly = await runCli(['serve', '--config', file]);
  assert.equal(clientOnly.code, 2);
  assert.match(clientOnly.stderr, /listen\[0\]: client-certs needs TLS/);

  // A certificate with another certificate's key is refused at start, naming both files.
  const other = await makeCertificate(dir, 'other');
  const mismatched = await runCli(['serve', '--dir', dir, '--listen', '127.0.0.1:0', '--server-cert', server.certFile, '--server-key', other.keyFile]);
  assert.equal(mismatched.code, 2);
  assert.match(mismatched.stderr, /the certificate .*server\.crt and the key .*other\.key do not belong together/);
  // A bundle whose last certificate is cut short is refused, not read as the certificates before it.
  const truncated = join(dir, 'truncated.pem');
  await writeFile(truncated, `${server.cert.toString()}-----BEGIN CERTIFICATE-----\nMIIB\n`);
  const cut = await runCli(['serve', '--dir', dir, '--listen', '127.0.0.1:0', '--server-cert', server.certFile, '--server-key', server.keyFile, '--client-certs', truncated]);
  assert.equal(cut.code, 2);
  assert.match(cut.stderr, /truncated\.pem is not a PEM certificate: it begins 2 certificates but holds 1 whole ones/);
  // A combined certificate-and-key file is fine: OpenSSL skips the key block, and so does the check.
  const combined = join(dir, 'combined.pem');
  await writeFile(combined, `${server.cert.toString()}${server.key.toString()}`);
  const both = await runCli(['serve', '--dir', join(dir, 'combined-store'), '--listen', '127.0.0.1:0', '--server-cert', combined, '--server-key', server.keyFile, '--client-certs', '/nonexistent/bundle.pem']);
  assert.equal(both.code, 2);
  assert.match(both.stderr, /cannot read the client certificates file \/nonexistent\/bundle\.pem/, 'got past the combined server certificate file');
});

test('certificates expired or not yet valid are named for a start-up warning', async (t) => {
  const dir = await tempDir(t);
  const { certFile, cert } = await makeCertificate(dir, 'short');
  assert.deepEqual(certificateValidityProblems(certFile, cert), []);
  const later = new Date(Date.now() + 10 * 86_400_000);
  assert.match(certificateValidityProblems(certFile, cert, later)[0] ?? '', /short\.crt: the certificate of CN=short expired on /);
  const earlier = new Date(Date.now() - 86_400_000);
  assert.match(certificateValidityProblems(certFile, cert, earlier)[0] ?? '', /is not valid before /);
});
