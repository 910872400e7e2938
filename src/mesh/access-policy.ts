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

/** A group's range, parsed once. A malformed one keeps its error for the lookup that reaches it, which is where parsing it would throw. */
type Range = { net: ipaddr.IPv4 | ipaddr.IPv6; bits: number } | { error: unknown }

/**
 * A policy made ready for many questions: every range parsed and every reachable set built once,
 * where the plain rule would do both again for each pair of nodes. The daemon asks about every
 * peer at every change of the view, so it asks this. Answers are exactly the plain rule's
 * (test/groups.test.ts compares them with a reference implementation).
 */
export interface CompiledPolicy {
  readonly policy: AccessPolicy
  /** No groups: every node reaches every node, and nothing was parsed. */
  readonly open: boolean
  groupOf(address: string | undefined): Group | undefined
  /** Shared and cached: callers must not change it. */
  reachableGroups(group: string | undefined): ReadonlySet<string>
  /** mayReach for two nodes whose groups are known (undefined: in no group). */
  groupsMayReach(a: Group | undefined, b: Group | undefined): boolean
  mayReach(a: string | undefined, b: string | undefined): boolean
}

function parseRange(cidr: string): Range {
  try {
    const [net, bits] = ipaddr.parseCIDR(cidr)
    return { net, bits }
  } catch (error) {
    return { error }
  }
}

/** The plain rule for reachableGroups, run once per group by the compiled form. */
function reachSet(policy: AccessPolicy, group: string | undefined): Set<string> {
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

function compile(policy: AccessPolicy): CompiledPolicy {
  const open = policy.groups.length === 0
  // In the policy's order, as the plain rule's find() looks: the first group holding the address wins.
  const ranges = (field: 'cidr' | 'cidr6') => policy.groups.flatMap((group) => (group[field] === undefined ? [] : [{ group, range: parseRange(group[field]) }]))
  const v4 = open ? [] : ranges('cidr')
  const v6 = open ? [] : ranges('cidr6')
  // Only for names the policy has (and no group): a name from elsewhere is computed, not kept.
  const reach = new Map<string | undefined, ReadonlySet<string>>()
  const named = new Set<string | undefined>([undefined, ...policy.groups.map((g) => g.name)])
  const c: CompiledPolicy = {
    policy,
    open,
    groupOf(address) {
      if (open || address === undefined || !ipaddr.isValid(address)) return undefined
      const addr = ipaddr.parse(address)
      for (const { group, range } of addr.kind() === 'ipv6' ? v6 : v4) {
        if ('error' in range) throw range.error
        if (range.net.kind() === addr.kind() && addr.match(range.net, range.bits)) return group
      }
      return undefined
    },
    reachableGroups(group) {
      const known = reach.get(group)
      if (known) return known
      const set = reachSet(policy, group)
      if (named.has(group)) reach.set(group, set)
      return set
    },
    groupsMayReach(a, b) {
      if (open || a?.infra || b?.infra) return true
      if (a === undefined || b === undefined) return false
      return c.reachableGroups(a.name).has(b.name)
    },
    mayReach: (a, b) => open || c.groupsMayReach(c.groupOf(a), c.groupOf(b)),
  }
  return c
}

/** Policies are never changed once made (their fields are readonly), so one compiled form per policy object serves every caller. */
const compiled = new WeakMap<AccessPolicy, CompiledPolicy>()

export function compilePolicy(policy: AccessPolicy): CompiledPolicy {
  let c = compiled.get(policy)
  if (!c) {
    c = compile(policy)
    compiled.set(policy, c)
  }
  return c
}

/** The group whose range holds `address` (IPv4 or IPv6), or undefined. Groups never overlap (groups.ts refuses overlaps). */
export function groupOf(policy: AccessPolicy, address: string | undefined): Group | undefined {
  return compilePolicy(policy).groupOf(address)
}

/**
 * The groups a member of `group` may reach (and be reached by): its own, every infrastructure
 * group, and every group associated with it. A node in no group (undefined) reaches the
 * infrastructure groups only; an infrastructure group reaches every group.
 */
export function reachableGroups(policy: AccessPolicy, group: string | undefined): Set<string> {
  // A copy: the compiled form's set is shared.
  return new Set(compilePolicy(policy).reachableGroups(group))
}

/**
 * Whether two nodes, by their VPN addresses, may talk. Symmetric. In an open network (no groups)
 * always true; otherwise by their groups, where a node in no group reaches only infrastructure.
 */
export function mayReach(policy: AccessPolicy, a: string | undefined, b: string | undefined): boolean {
  return compilePolicy(policy).mayReach(a, b)
}
