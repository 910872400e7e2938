import ipaddr from 'ipaddr.js'

/**
 * Who may talk to whom (docs/groups.md): groups are CIDRs inside the network's range, a node
 * belongs to the group whose range holds its VPN address, and associations join two groups both
 * ways. Every node reaches its own group and the infrastructure groups (public nodes and Consul
 * servers), and is reached by them. The policy is read from Consul under the network record
 * (src/mesh/groups.ts parses and checks it) and compiled on every node into DNS answers, status
 * and an nftables table (src/mesh/daemon/access-firewall.ts).
 *
 * A network with no groups is open, as before groups existed: every node reaches every node.
 * Once a group exists, a node whose address is in none reaches only the infrastructure groups.
 */
export interface Group {
  /** A DNS label: lower-case letters, digits and inner dashes, at most 32 characters. */
  name: string
  /** Canonical IPv4 CIDR inside the network's range. */
  cidr: string
  /** Canonical IPv6 CIDR inside the network's cidr6, on networks that have one. */
  cidr6?: string
  /** Public nodes and Consul servers: every node reaches it and is reached by it. */
  infra: boolean
}

export interface AccessPolicy {
  groups: readonly Group[]
  /** Pairs of group names, each pair sorted and listed once. */
  associations: ReadonlyArray<readonly [string, string]>
}

/** The open policy of a network without groups. */
export const OPEN_POLICY: AccessPolicy = { groups: [], associations: [] }

/** The group whose range holds `address` (IPv4 or IPv6), or undefined. Groups never overlap (groups.ts refuses overlaps). */
export function groupOf(policy: AccessPolicy, address: string | undefined): Group | undefined {
  if (address === undefined || !ipaddr.isValid(address)) return undefined
  const addr = ipaddr.parse(address)
  const v6 = addr.kind() === 'ipv6'
  return policy.groups.find((g) => {
    const cidr = v6 ? g.cidr6 : g.cidr
    if (cidr === undefined) return false
    const [net, bits] = ipaddr.parseCIDR(cidr)
    return net.kind() === addr.kind() && addr.match(net, bits)
  })
}

/**
 * The groups a member of `group` may reach (and be reached by): its own, every infrastructure
 * group, and every group associated with it. A node in no group (undefined) reaches the
 * infrastructure groups only; an infrastructure group reaches every group.
 */
export function reachableGroups(policy: AccessPolicy, group: string | undefined): Set<string> {
  const all = policy.groups.map((g) => g.name)
  const infra = policy.groups.filter((g) => g.infra).map((g) => g.name)
  if (group !== undefined && infra.includes(group)) return new Set(all)
  const out = new Set(infra)
  if (group === undefined) return out
  out.add(group)
  for (const [a, b] of policy.associations) {
    if (a === group) out.add(b)
    if (b === group) out.add(a)
  }
  return out
}

/**
 * Whether two nodes, by their VPN addresses, may talk. Symmetric. In an open network (no groups)
 * always true; otherwise by their groups, where a node in no group reaches only infrastructure.
 */
export function mayReach(policy: AccessPolicy, a: string | undefined, b: string | undefined): boolean {
  if (policy.groups.length === 0) return true
  const ga = groupOf(policy, a)
  const gb = groupOf(policy, b)
  if (ga?.infra || gb?.infra) return true
  if (ga === undefined || gb === undefined) return false
  return reachableGroups(policy, ga.name).has(gb.name)
}
