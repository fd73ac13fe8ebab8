import { DigestFunction_Value } from '../gen/build/bazel/remote/execution/v2/remote_execution.js';
import type { Qualifier } from '../gen/build/bazel/remote/asset/v1/remote_asset.js';
import { MirrorError } from '../errors.js';

/** The mirror serves one content space to every instance name; this only rejects junk. */
export function checkInstanceName(instanceName: string): void {
  if (instanceName.length > 1024 || /[\0-\x1f]/.test(instanceName)) {
    throw new MirrorError('INVALID_ARGUMENT', 'instance_name is longer than 1024 characters or has control characters');
  }
  if (instanceName.split('/').some((seg) => seg === '..' || seg === '.')) {
    throw new MirrorError('INVALID_ARGUMENT', `instance_name '${instanceName.slice(0, 100)}' has a '.' or '..' segment`);
  }
}

/** Only SHA-256 is stored and advertised; UNKNOWN means the server's default, SHA-256. */
export function checkDigestFunction(value: DigestFunction_Value): void {
  if (value !== DigestFunction_Value.UNKNOWN && value !== DigestFunction_Value.SHA256) {
    throw new MirrorError('UNSUPPORTED', `digest function ${DigestFunction_Value[value] ?? value} is not supported; this mirror stores SHA256 only`);
  }
}

export function checkNoQualifiers(qualifiers: readonly Qualifier[]): void {
  if (qualifiers.length > 0) {
    throw new MirrorError('UNSUPPORTED', `qualifiers are not supported (got '${qualifiers[0]?.name ?? ''}'); BuildStream sends none`);
  }
}
