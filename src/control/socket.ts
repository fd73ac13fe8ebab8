import { connect } from 'node:net';

/**
 * Whether a process accepts connections on the unix socket at `path`. A socket file nobody
 * answers on is what a daemon killed with SIGKILL leaves behind.
 */
export function socketAnswers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(path);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}
