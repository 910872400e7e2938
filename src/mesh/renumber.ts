import { hostRange, inRange, type HeldAddress } from './ipam.ts'
import { canonicalIpv6, checkVpnAddress6, type NetworkRecord } from './record.ts'

/**
 * Moving a node to another address (docs/groups.md, `group move`). ipam/ is where addresses are
 * given out, and only operators and join servers write it, so it is also how an operator tells a
 * node its new address: `group move` reserves the new address for the node beside the one it
 * holds, and the node's own daemon, which reads ipam/ anyway, sees that the address it was given
 * last is not the one it uses, and renumbers itself. The old entry stays the node's until the
 * node has moved (readers keep accepting its record meanwhile), then `group move` releases it.
 *
 * Everything here is pure: the daemon's side (files, interface, tincd) is in
 * src/mesh/daemon/renumber.ts.
 */

export interface AssignedAddresses {
  address?: string
  address6?: string
}

/**
 * The addresses ipam/ gives `name` now: per family, its active entry written last (the highest
 * ModifyIndex, Consul's own clock, so no machine's clock decides). Released and unreadable
 * entries give nothing.
 */
export function assignedAddresses(held: ReadonlyMap<string, HeldAddress>, name: string): AssignedAddresses {
  let v4: HeldAddress | undefined
  let v6: HeldAddress | undefined
  for (const h of held.values()) {
    if (h.entry?.name !== name || h.entry.releasedAt !== undefined) continue
    if (h.address.includes(':')) {
      if (!v6 || h.index > v6.index) v6 = h
    } else if (!v4 || h.index > v4.index) v4 = h
  }
  return { ...(v4 ? { address: v4.address } : {}), ...(v6 ? { address6: v6.address } : {}) }
}

/** A node's move from one address to another; `from6`/`to6` when its IPv6 address changes too. */
export interface Renumbering {
  from: string
  to: string
  from6?: string
  to6?: string
}

/**
 * Whether this node must renumber, from ipam/ as read, its own addresses and the network. A newer
 * assignment outside the network's ranges (or on its network or broadcast address) is never
 * followed: an entry can be written by hand. Undefined when nothing changes.
 */
export function planRenumber(
  held: ReadonlyMap<string, HeldAddress>,
  self: { name: string; vpnAddress?: string; vpnAddress6?: string },
  network: Pick<NetworkRecord, 'cidr' | 'cidr6'>,
): Renumbering | undefined {
  if (self.vpnAddress === undefined) return undefined
  const a = assignedAddresses(held, self.name)
  const to = a.address !== undefined && inRange(hostRange(network.cidr), a.address) ? a.address : self.vpnAddress
  // The rule every reader applies to a record's vpnAddress6, so a node never moves to an address its peers would refuse.
  const to6 = self.vpnAddress6 !== undefined && a.address6 !== undefined && checkVpnAddress6(a.address6, network) === undefined ? a.address6 : undefined
  const moves6 = to6 !== undefined && to6 !== self.vpnAddress6
  if (to === self.vpnAddress && !moves6) return undefined
  return { from: self.vpnAddress, to, ...(moves6 && self.vpnAddress6 ? { from6: self.vpnAddress6, to6 } : {}) }
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')

/** `from` as a whole address in text: not part of a longer IPv4 or IPv6 address. */
function addressToken(from: string): RegExp {
  return from.includes(':') ? new RegExp(`(?<![0-9a-fA-F:])${escape(from)}(?![0-9a-fA-F:])`, 'g') : new RegExp(`(?<![0-9.])${escape(from)}(?![0-9]|\\.[0-9])`, 'g')
}

/**
 * Our own host file with its `Subnet` lines for the old addresses changing to the new ones,
 * everything else (keys, comments, the routes block) as it was. `missing` names an old address
 * without its Subnet line: the file isn't what we wrote, and isn't changed.
 */
export function renumberHostFile(text: string, r: Renumbering): { text: string; missing?: string } {
  const pairs: Array<[string, string, string]> = [[r.from, r.to, '32']]
  if (r.from6 !== undefined && r.to6 !== undefined) pairs.push([r.from6, r.to6, '128'])
  let out = text
  for (const [from, to, bits] of pairs) {
    let found = false
    out = out.replace(/^([ \t]*Subnet[ \t]*=[ \t]*)([^\s#/]+)(\/\d+)?([ \t]*)$/gim, (line, head: string, addr: string, prefix: string | undefined, tail: string) => {
      const same = from.includes(':') ? canonicalIpv6(addr) === from : addr === from
      if (!same || (prefix !== undefined && prefix !== `/${bits}`)) return line
      found = true
      return `${head}${to}${prefix ?? ''}${tail}`
    })
    if (!found) return { text, missing: from }
  }
  return { text: out }
}

/** A hook script (tinc-up, tinc-down) with every mention of the old addresses changed; `count` says how many. */
export function renumberScript(text: string, r: Renumbering): { text: string; count: number } {
  let count = 0
  let out = text.replace(addressToken(r.from), () => (count++, r.to))
  if (r.from6 !== undefined && r.to6 !== undefined) {
    const to6 = r.to6
    out = out.replace(addressToken(r.from6), () => (count++, to6))
  }
  return { text: out, count }
}
