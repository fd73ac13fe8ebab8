import { pino, type Logger } from 'pino';

export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';

/** JSON logs on stderr, so stdout stays for command output (summaries, the listen address). */
export function createLogger(level: LogLevel): Logger {
  return pino({ level, base: undefined, redact: ['accessToken', 'token'] }, pino.destination(2));
}

export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
