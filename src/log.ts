import { pino, type Logger } from 'pino'

export type { Logger }

/**
 * The root logger. Components take a child (`log.child({ component: 'lab' })`)
 * so every line says where it came from; errors go under `err`.
 * JSON to stderr keeps stdout free for command output people read or pipe.
 */
export function createLogger(level = process.env.TINC_CONSUL_LOG_LEVEL ?? 'info'): Logger {
  return pino({ level, base: undefined }, pino.destination(2))
}
