import ipaddr from 'ipaddr.js'
import * as z from 'zod'
import type { KvItem } from '../consul/kv.ts'
import { groupOf, type AccessPolicy, type Group } from './access-policy.ts'
import { isGroupName, type KvLayout } from './kv-layout.ts'
import { decodeJson, RECORD_VERSION, type NetworkRecord } from './record.ts'
import { parseRoute, routesOverlap } from './route-cidr.ts'

/**
 * Access groups and associations as stored in Consul (docs/groups.md), read into the
 * AccessPolicy of src/mesh/access-policy.ts. Everything here is pure: the daemon's network
 * watch, `status` and the `group` commands all judge the same items with the same rules.
 *
 * Every key and value is untrusted: an operator token can leak and tools have bugs. A key or
 * value that breaks a rule is left out of the policy and reported with its reason, never
 * guessed at. Leaving out a group makes the policy stricter for its members (they are in no
 * group, and reach only the infrastructure groups), never looser for anyone else.
 */

/** Values are tiny (about 120 bytes); anything near this is not a group. */
export const MAX_POLICY_VALUE_BYTES = 1024

const version = z.literal(RECORD_VERSION, {
  error: (i) => (i.input === undefined ? 'no version (v)' : `unknown version ${JSON.stringify(i.input)} (this release reads ${RECORD_VERSION})`),
})

/** `network/groups/<name>`. Unknown fields are dropped (a newer release's additions), an unknown `v` refused. */
const groupValueSchema = z
  .object({
    v: version,
    cidr: z.string().max(43),
    cidr6: z.string().max(43).optional(),
    infra: z.boolean().optional(),
    createdAt: z.iso.datetime(),
  })
  .strip()

export type GroupValue = z.infer<typeof groupValueSchema>

/** `network/associations/<a>+<b>`, a < b. */
const associationValueSchema = z.object({ v: version, at: z.iso.datetime() }).strip()

export interface PolicyRefusal {
  key: string
  reason: string
}

export interface PolicyRead {
  /** Groups sorted by name, associations by their pair: the same items always give the same policy. */
  policy: AccessPolicy
  /** Keys left out of the policy, with why, sorted by key. */
  refused: PolicyRefusal[]
}

const compare = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0)

/** Whether `child` lies inside `parent` (both CIDRs; `parent` may have host bits, as the network record's schema allows). */
function inside(child: string, parent: string): boolean {
  const [c, cb] = ipaddr.parseCIDR(child)
  const [p, pb] = ipaddr.parseCIDR(parent)
  return c.kind() === p.kind() && cb >= pb && c.match(p, pb)
}

/** Why a range can't be a group's in this family and network, or undefined. */
function rangeProblem(field: 'cidr' | 'cidr6', value: string, family: 4 | 6, range: string | undefined): string | undefined {
  const parsed = parseRoute(value)
  if (!parsed.ok) return `${field}: ${parsed.reason}`
  if (parsed.family !== family) return `${field} ${value} is not an IPv${family} range`
  if (parsed.cidr !== value) return `${field} ${value} is not written canonically (${parsed.cidr})`
  if (range === undefined) return `${field} ${value} in a network without an IPv6 range`
  if (!inside(value, range)) return `${field} ${value} is not inside the network's ${range}`
  return undefined
}

interface Candidate {
  key: string
  group: Group
  createIndex: number
}

/** One `network/groups/` item on its own: its key, value and ranges. Overlaps are judged across all of them afterwards. */
function readGroup(item: KvItem, name: string, network: NetworkRecord): Candidate | string {
  if (!isGroupName(name)) return 'the key is not network/groups/<name>, a name being one lower-case DNS label of at most 32 characters'
  const d = decodeJson(item.value, groupValueSchema, MAX_POLICY_VALUE_BYTES)
  if (!d.ok) return d.reason
  const { cidr, cidr6, infra } = d.value
  const problem = rangeProblem('cidr', cidr, 4, network.cidr) ?? (cidr6 === undefined ? undefined : rangeProblem('cidr6', cidr6, 6, network.cidr6))
  if (problem) return problem
  const group: Group = { name, cidr, infra: infra === true }
  if (cidr6 !== undefined) group.cidr6 = cidr6
  return { key: item.key, group, createIndex: item.createIndex }
}

/** Groups may not overlap: the older key (lower CreateIndex, then the name) keeps its range, a newer one that overlaps it is refused. */
function dropOverlaps(candidates: readonly Candidate[], refused: PolicyRefusal[]): Candidate[] {
  const order = [...candidates].sort((a, b) => a.createIndex - b.createIndex || compare(a.group.name, b.group.name))
  const taken: Candidate[] = []
  for (const c of order) {
    const clash4 = taken.find((t) => routesOverlap(t.group.cidr, c.group.cidr))
    const six = c.group.cidr6
    const clash6 = six === undefined ? undefined : taken.find((t) => t.group.cidr6 !== undefined && routesOverlap(t.group.cidr6, six))
    if (clash4) refused.push({ key: c.key, reason: `cidr ${c.group.cidr} overlaps group ${clash4.group.name}'s ${clash4.group.cidr}, created earlier` })
    else if (clash6) refused.push({ key: c.key, reason: `cidr6 ${c.group.cidr6} overlaps group ${clash6.group.name}'s ${clash6.group.cidr6}, created earlier` })
    else taken.push(c)
  }
  return taken
}

/** One `network/associations/` item: the pair it joins, or why it joins nothing. */
function readAssociation(item: KvItem, rest: string, groups: ReadonlySet<string>, refusedGroups: ReadonlySet<string>): readonly [string, string] | string {
  const parts = rest.split('+')
  const [a, b] = parts
  if (parts.length !== 2 || a === undefined || b === undefined || !isGroupName(a) || !isGroupName(b)) return 'the key is not network/associations/<group>+<group>'
  if (a === b) return `associates group ${a} with itself`
  if (a > b) return `the key's names are not in order: the association's key is ${b}+${a}`
  const d = decodeJson(item.value, associationValueSchema, MAX_POLICY_VALUE_BYTES)
  if (!d.ok) return d.reason
  for (const g of [a, b]) {
    if (refusedGroups.has(g)) return `group ${g} was refused`
    if (!groups.has(g)) return `group ${g} does not exist`
  }
  return [a, b]
}

/**
 * The access policy from a `?recurse` read of `<prefix>network` (the network record and
 * everything under `network/`). Keys under `network/` other than `groups/` and `associations/`
 * are left for later releases, neither used nor refused; so are the prefixes' own keys.
 */
export function parseAccessPolicy(items: readonly KvItem[], layout: KvLayout, network: NetworkRecord): PolicyRead {
  const refused: PolicyRefusal[] = []
  const candidates: Candidate[] = []
  const associationItems: Array<{ item: KvItem; rest: string }> = []
  for (const item of items) {
    if (item.key.startsWith(layout.groupsPrefix)) {
      const name = item.key.slice(layout.groupsPrefix.length)
      if (name === '') continue
      const read = readGroup(item, name, network)
      if (typeof read === 'string') refused.push({ key: item.key, reason: read })
      else candidates.push(read)
    } else if (item.key.startsWith(layout.associationsPrefix)) {
      const rest = item.key.slice(layout.associationsPrefix.length)
      if (rest !== '') associationItems.push({ item, rest })
    }
  }
  const taken = dropOverlaps(candidates, refused)
  const groups = new Set(taken.map((c) => c.group.name))
  // Names whose key was read but refused: an association naming one says so, rather than "does not exist".
  const refusedGroups = new Set(refused.map((r) => r.key.slice(layout.groupsPrefix.length)))
  const associations: Array<readonly [string, string]> = []
  for (const { item, rest } of associationItems) {
    const read = readAssociation(item, rest, groups, refusedGroups)
    if (typeof read === 'string') refused.push({ key: item.key, reason: read })
    else associations.push(read)
  }
  return {
    policy: {
      groups: taken.map((c) => c.group).sort((a, b) => compare(a.name, b.name)),
      associations: associations.sort((x, y) => compare(x[0], y[0]) || compare(x[1], y[1])),
    },
    refused: refused.sort((a, b) => compare(a.key, b.key)),
  }
}

/** A group's value as `group add` writes it: `infra` only when set, so older readers' records stay as small as they were. */
export function newGroupValue(ranges: { cidr: string; cidr6?: string | undefined; infra?: boolean }, now = new Date()): GroupValue {
  const value: GroupValue = { v: RECORD_VERSION, cidr: ranges.cidr, createdAt: now.toISOString() }
  if (ranges.cidr6 !== undefined) value.cidr6 = ranges.cidr6
  if (ranges.infra) value.infra = true
  return value
}

export const newAssociationValue = (now = new Date()): z.infer<typeof associationValueSchema> => ({ v: RECORD_VERSION, at: now.toISOString() })

/**
 * Why `key` with `value` would be refused if written now next to `items` (a fresh read of
 * `<prefix>network`), or undefined: what the commands check before they write, by the very
 * rules every reader applies. The new key counts as the newest (it loses every overlap).
 */
export function refusalOfNew(items: readonly KvItem[], layout: KvLayout, network: NetworkRecord, key: string, value: unknown): string | undefined {
  const created: KvItem = { key, value: Buffer.from(JSON.stringify(value)), modifyIndex: 0, createIndex: Number.MAX_SAFE_INTEGER }
  const read = parseAccessPolicy([...items.filter((i) => i.key !== key), created], layout, network)
  return read.refused.find((r) => r.key === key)?.reason
}

/** Every `network/associations/` key that names the group, refused ones included, so removing the group can take them all. */
export function associationKeysNaming(items: readonly KvItem[], layout: KvLayout, name: string): string[] {
  return items
    .map((i) => i.key)
    .filter((k) => k.startsWith(layout.associationsPrefix) && k.slice(layout.associationsPrefix.length).split('+').includes(name))
    .sort(compare)
}

/** The groups associated with `name`, sorted. */
export function associatedWith(policy: AccessPolicy, name: string): string[] {
  const out = policy.associations.flatMap(([a, b]) => (a === name ? [b] : b === name ? [a] : []))
  return out.sort(compare)
}

/** What membership needs to know of a node: its name and VPN addresses. */
export interface MemberNode {
  name: string
  vpnAddress: string
  vpnAddress6?: string | undefined
}

export interface Membership {
  /** Member names by group name, sorted; every group of the policy has an entry. */
  members: Map<string, string[]>
  /** Nodes whose IPv4 address is in no group: once any group exists they reach only the infrastructure groups. */
  ungrouped: string[]
  /** Nodes whose IPv6 address lies in another group than their IPv4 address (or in none), sorted by name. */
  split: Array<{ node: string; group: string | undefined; group6: string | undefined }>
}

/** Who is in which group. The IPv4 VPN address decides (every node has one); `split` names nodes whose IPv6 address disagrees. */
export function groupMembers(policy: AccessPolicy, nodes: Iterable<MemberNode>): Membership {
  const members = new Map<string, string[]>(policy.groups.map((g) => [g.name, []]))
  const ungrouped: string[] = []
  const split: Membership['split'] = []
  for (const node of nodes) {
    const group = groupOf(policy, node.vpnAddress)?.name
    if (group === undefined) ungrouped.push(node.name)
    else members.get(group)?.push(node.name)
    if (node.vpnAddress6 === undefined) continue
    const group6 = groupOf(policy, node.vpnAddress6)?.name
    if (group6 !== group) split.push({ node: node.name, group, group6 })
  }
  for (const list of members.values()) list.sort(compare)
  return { members, ungrouped: ungrouped.sort(compare), split: split.sort((a, b) => compare(a.node, b.node)) }
}
