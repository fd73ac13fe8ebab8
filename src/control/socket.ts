import { connect } from 'node:net';
import { MirrorError } from '../errors.js';

/**
 * Whether a process accepts connections on the unix socket at `path`. A socket file nobody
 * answers on is what a daemon killed with SIGKILL leaves behind. A socket this user may not use
 * (another user's daemon) is an error that says so, not "no daemon".
 */
export function socketAnswers(path: string): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const socket = connect(path);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'EACCES' || err.code === 'EPERM') {
        reject(new MirrorError('CONFIG_INVALID', `cannot reach the daemon on ${path}: permission denied (the control socket is its owner's only): run this as the user the daemon runs as`, { cause: err }));
      } else {
        resolve(false);
      }
    });
  });
}
