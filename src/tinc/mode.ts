import { UsageError } from '../errors.ts'
import { parseHostFile } from './hostfile.ts'

/**
 * How tinc 1.0 forwards packets on a network, chosen once by `init --mode` and carried in the
 * network record (`mode`; absent means router, as every network was before the field existed).
 *
 * - `router`: a tun device; tincd routes IP packets by the Subnet lines of the host files, and
 *   with StrictSubnets it trusts only those (a node can claim only the address it was given).
 * - `switch`: a tap device; tincd forwards Ethernet frames and learns which node holds which MAC
 *   address from the traffic, like a switch. Host files need no Subnet lines, and StrictSubnets
 *   would make tincd ignore the MAC addresses peers announce (every frame would be flooded), so
 *   neither is written.
 */
export const TINC_MODES = ['router', 'switch'] as const
export type TincMode = (typeof TINC_MODES)[number]
export const DEFAULT_TINC_MODE: TincMode = 'router'

export function isTincMode(s: string): s is TincMode {
  return (TINC_MODES as readonly string[]).includes(s)
}

/** A `--mode` flag's value; undefined (not given) stays undefined. */
export function parseModeFlag(value: string | undefined): TincMode | undefined {
  if (value === undefined || value === '') return undefined
  if (!isTincMode(value)) throw new UsageError('BAD_FLAG', `--mode must be ${TINC_MODES.join(' or ')}, got ${JSON.stringify(value)}`)
  return value
}

/** The tinc.conf lines that go with `Mode = <mode>`; written outside the managed block (setup.ts says why). */
export function modeConfLines(mode: TincMode): string[] {
  // tincd picks a tap device in switch mode by itself; said explicitly, the file shows it.
  if (mode === 'switch') return ['DeviceType = tap']
  // tinc accepts only subnets written in local host files, and those come from the address table.
  return ['StrictSubnets = yes']
}

/** The Subnet lines a peer's host file carries: switch mode learns MAC addresses instead. */
export function peerSubnets(mode: TincMode, subnets: readonly string[]): string[] {
  return mode === 'switch' ? [] : [...subnets]
}

/** The Mode a tinc.conf sets, lower-cased as tincd compares it; tinc's default (router) when it sets none. */
export function confMode(conf: string): string {
  const entry = parseHostFile(conf).entries.find((e) => e.key.toLowerCase() === 'mode')
  return entry?.value.trim().toLowerCase() || DEFAULT_TINC_MODE
}
