import { readOwnRoutes, withOwnRoutes, withoutOwnRoutes } from './own-routes.ts'
import type { NetworkRecord } from './record.ts'
import { parseRoute } from './route-cidr.ts'
import { vpnOverlap } from './routes.ts'

/** The most routes a record carries (record.ts). */
const MAX_ROUTES = 8

export interface AdoptedRoutes {
  /** Subnets of the hand-made host file that become announced routes, canonical. */
  routes: string[]
  /** The others, left in the host file as they are, with why. */
  kept: Array<{ subnet: string; reason: string }>
}

/**
 * A hand-made node's own host file may route a LAN (`Subnet = 192.168.1.0/24` on a home router).
 * Adopt keeps routing it: such subnets become the node's announced routes, and since the operator
 * runs adopt, they are approved in the same run. What can't be a route (not a canonical CIDR,
 * inside the VPN ranges, over the record's limit) stays in the file untouched and is reported.
 */
export function adoptedRoutes(extraSubnets: readonly string[], network: Pick<NetworkRecord, 'cidr' | 'cidr6'>): AdoptedRoutes {
  const out: AdoptedRoutes = { routes: [], kept: [] }
  for (const subnet of extraSubnets) {
    const parsed = parseRoute(subnet)
    const overlap = parsed.ok ? vpnOverlap(parsed.cidr, network) : undefined
    if (!parsed.ok) out.kept.push({ subnet, reason: parsed.reason })
    else if (parsed.cidr !== subnet) out.kept.push({ subnet, reason: `not written as its canonical form ${parsed.cidr}` })
    else if (overlap) out.kept.push({ subnet, reason: overlap })
    else if (out.routes.includes(parsed.cidr)) continue
    else if (out.routes.length >= MAX_ROUTES) out.kept.push({ subnet, reason: `a node announces at most ${MAX_ROUTES} routes` })
    else out.routes.push(parsed.cidr)
  }
  return out
}

/** The own host file with `routes` moved from plain Subnet lines into the routes block (own-routes.ts); everything else stays. */
export function hostFileWithRoutes(text: string, routes: readonly string[]): string {
  if (routes.length === 0) return text
  const moved = new Set(routes)
  const value = (l: string) => (l.replace(/^\s*subnet\s*=?\s*/i, '').split('#')[0] ?? '').trim()
  const isMoved = (l: string) => /^\s*subnet\s*(?:=|\s)/i.test(l) && moved.has(value(l))
  const inBlock = readOwnRoutes(text)
  const outside = withoutOwnRoutes(text)
    .split('\n')
    .filter((l) => !isMoved(l))
    .join('\n')
  return withOwnRoutes(outside, [...inBlock, ...routes.filter((r) => !inBlock.some((b) => b.cidr === r)).map((cidr) => ({ cidr, masquerade: false }))])
}
