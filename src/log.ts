import { isatty } from 'node:tty'
import { pino, type DestinationStream, type Logger } from 'pino'

export type { Logger }

export interface LoggerOptions {
  level?: string
  /** 2 (stderr) for commands, whose stdout is output people read or pipe; 1 for the daemon, for journald. */
  fd?: 1 | 2
  /** Human-readable lines instead of JSON. Default: when the fd is a terminal, unless TINC_CONSUL_LOG_FORMAT says otherwise. */
  pretty?: boolean
}

/**
 * The root logger. Components take a child (`log.child({ component: 'lab' })`)
 * so every line says where it came from; errors go under `err`.
 */
export function createLogger(opts: LoggerOptions = {}): Logger {
  const fd = opts.fd ?? 2
  const level = opts.level ?? process.env.TINC_CONSUL_LOG_LEVEL ?? 'info'
  const format = process.env.TINC_CONSUL_LOG_FORMAT
  const pretty = opts.pretty ?? (format === 'pretty' ? true : format === 'json' ? false : isatty(fd))
  const dest = pino.destination({ fd, sync: true })
  return pino({ level, base: undefined }, pretty ? prettyStream(dest, isatty(fd)) : dest)
}

const LEVELS: Record<number, [string, string]> = {
  10: ['TRACE', '90'],
  20: ['DEBUG', '36'],
  30: ['INFO ', '32'],
  40: ['WARN ', '33'],
  50: ['ERROR', '31'],
  60: ['FATAL', '35'],
}

function show(v: unknown): string {
  if (typeof v === 'string') return /^[\w.:/@-]+$/.test(v) ? v : JSON.stringify(v)
  return JSON.stringify(v) ?? String(v)
}

/** One JSON line from pino as "12:03:04.123 INFO  [dns] message key=value". Exported for tests. */
export function prettyLine(json: string, colour = false): string {
  let rec: Record<string, unknown>
  try {
    rec = JSON.parse(json) as Record<string, unknown>
  } catch {
    return json
  }
  const { level, time, msg, component, err, ...rest } = rec
  const [name, code] = LEVELS[level as number] ?? [String(level), '0']
  const paint = (s: string) => (colour ? `\x1b[${code}m${s}\x1b[0m` : s)
  const clock = typeof time === 'number' ? new Date(time).toISOString().slice(11, 23) : ''
  const fields = Object.entries(rest).map(([k, v]) => `${k}=${show(v)}`)
  const e = err as { message?: string; code?: string; stack?: string } | undefined
  if (e) fields.push(`err=${show(e.code ? `${e.code}: ${e.message ?? ''}` : (e.message ?? e))}`)
  const where = typeof component === 'string' ? `[${component}] ` : ''
  const text = [clock, paint(name), `${where}${typeof msg === 'string' ? msg : ''}`, ...fields].filter(Boolean).join(' ')
  // Stacks only at debug, where someone asked for them.
  const stack = e?.stack && (level as number) <= 20 ? `\n${e.stack}` : ''
  return `${text}${stack}\n`
}

function prettyStream(dest: DestinationStream, colour: boolean): DestinationStream {
  return { write: (line: string) => dest.write(prettyLine(line, colour)) }
}
