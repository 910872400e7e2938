import ipaddr from 'ipaddr.js'

/**
 * How a route behind a node is written (docs/subnets.md). A leaf module: the record schema
 * (record.ts) and the route rules (routes.ts) both check routes with it.
 */
export type ParsedRoute = { ok: true; cidr: string; family: 4 | 6 } | { ok: false; reason: string }

/** A route as records, approvals and host files write it: `192.168.1.0/24`, `fd00:1::/64` (RFC 5952), no host bits set. */
export function parseRoute(input: string): ParsedRoute {
  let addr: ipaddr.IPv4 | ipaddr.IPv6
  let bits: number
  try {
    ;[addr, bits] = ipaddr.parseCIDR(input)
  } catch {
    return { ok: false, reason: `${JSON.stringify(input)} is not a CIDR (write it like 192.168.1.0/24 or fd00:1::/64)` }
  }
  const family = addr.kind() === 'ipv4' ? 4 : 6
  const network = family === 4 ? ipaddr.IPv4.networkAddressFromCIDR(input).toString() : ipaddr.IPv6.networkAddressFromCIDR(input).toRFC5952String()
  const shown = family === 4 ? addr.toString() : (addr as ipaddr.IPv6).toRFC5952String()
  if (shown !== network) return { ok: false, reason: `${input} has host bits set: the network is ${network}/${bits}` }
  if (addr.kind() === 'ipv6' && (addr as ipaddr.IPv6).isIPv4MappedAddress()) return { ok: false, reason: `${input} is an IPv4-mapped IPv6 range; write the IPv4 range instead` }
  return { ok: true, cidr: `${network}/${bits}`, family }
}

/** Whether `s` is a route written exactly as parseRoute writes it. */
export const isCanonicalRoute = (s: string): boolean => {
  const p = parseRoute(s)
  return p.ok && p.cidr === s
}

/** Two ranges overlap when either holds the other's network address (CIDRs nest or are disjoint). */
export function routesOverlap(a: string, b: string): boolean {
  const [aa, ab] = ipaddr.parseCIDR(a)
  const [ba, bb] = ipaddr.parseCIDR(b)
  if (aa.kind() !== ba.kind()) return false
  return aa.match(ba, bb) || ba.match(aa, ab)
}
