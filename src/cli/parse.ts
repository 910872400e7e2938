import { isIPv4 } from 'node:net'
import { UsageError } from '../errors.ts'
import { parseHostPort } from '../tinc/names.ts'
import { cidrArg } from '../mesh/approvals.ts'

export function parseIntFlag(name: string, value: string | undefined, min: number, max: number): number {
  const n = Number(value)
  if (value === undefined || value === '' || !Number.isInteger(n) || n < min || n > max) {
    throw new UsageError('BAD_FLAG', `--${name} must be a whole number from ${min} to ${max}, got "${value ?? ''}"`)
  }
  return n
}

/** A duration like 30s, 15m, 1h, 7d. */
export function parseDurationFlag(name: string, value: string | undefined, maxMs: number): number {
  const m = /^(\d+)(s|m|h|d)$/.exec(value ?? '')
  const ms = m ? Number(m[1]) * { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2] as 's' | 'm' | 'h' | 'd'] : NaN
  if (!(ms > 0 && ms <= maxMs)) throw new UsageError('BAD_FLAG', `--${name} must be a duration like 30m, 1h or 7d (at most ${Math.round(maxMs / 86_400_000)}d), got "${value ?? ''}"`)
  return ms
}

/** --address may be repeated or comma-separated: HOST[:PORT] each. Returns hosts and the first explicit port. */
export function parseAddressFlags(value: string | string[] | undefined): { hosts: string[]; port?: number } {
  const all = (Array.isArray(value) ? value : value ? [value] : [])
    .flatMap((v) => v.split(','))
    .map((v) => v.trim())
    .filter(Boolean)
  const hosts: string[] = []
  let port: number | undefined
  for (const a of all) {
    const p = parseHostPort(a)
    if (!p) throw new UsageError('BAD_FLAG', `--address must be HOST or HOST:PORT, got "${a}"`)
    hosts.push(p.host)
    port ??= p.port
  }
  return { hosts, port }
}

/** A comma-separated list ("" for none). */
export const splitList = (value: string | undefined): string[] =>
  (value ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)

/** A comma-separated list of IPv4 addresses to listen on ("" for none). */
export function listFlag(name: string, value: string | undefined): string[] {
  const list = splitList(value)
  for (const h of list) if (!isIPv4(h)) throw new UsageError('BAD_FLAG', `--${name} takes IPv4 addresses, got ${JSON.stringify(h)}`)
  return list
}

/** A range flag: canonical, of the right family, or a usage error naming the flag. */
export function rangeFlag(flag: string, value: string, family: 4 | 6): string {
  const cidr = cidrArg(value)
  if (cidr.includes(':') !== (family === 6)) throw new UsageError('BAD_CIDR', `--${flag} takes an IPv${family} range, got ${cidr}`)
  return cidr
}
