import ipaddr from 'ipaddr.js'
import { type ConsulClient, type TxnOp } from '../consul/client.ts'
import { TincConsulError } from '../errors.ts'
import { groupOf, type AccessPolicy, type Group } from './access-policy.ts'
import { activeHolders, allocateAddress, hostRange, inRange, readIpam, releaseOp, type HeldAddress } from './ipam.ts'
import type { KvLayout } from './kv-layout.ts'
import { usableNodeRecord } from './network.ts'
import type { NetworkRecord, NodeRecord } from './record.ts'
import { assignedAddresses } from './renumber.ts'

/**
 * The operator's half of `group move` (docs/groups.md; the node's half is
 * src/mesh/daemon/renumber.ts). Membership is the address, so moving a node to a group is giving
 * it an address in the group's range: the new address is reserved in ipam/ for the node beside
 * the one it holds, the node renumbers itself when its daemon reads that, and the old entry is
 * released once the node's record shows the new address.
 */

export interface MovePlan {
  node: string
  group: string
  /** The node's group now, by its record's address. */
  fromGroup?: string
  from: string
  to: string
  from6?: string
  to6?: string
  /** The node already has an address in the group: nothing was reserved. */
  already: boolean
}

/** The node's record as every reader would take it, or an error saying why there is none. */
export async function readNodeRecord(client: ConsulClient, layout: KvLayout, network: NetworkRecord, name: string): Promise<NodeRecord> {
  const entry = await client.kvGet(layout.node(name))
  if (!entry) throw new TincConsulError('NO_SUCH_NODE', `no node ${name} in this network (${layout.node(name)} is missing)`)
  const r = usableNodeRecord(entry.value, network, name)
  if (!r.ok) throw new TincConsulError('NODE_UNREADABLE', `${layout.node(name)} can't be used: ${r.reason}`)
  return r.value
}

/**
 * Reserves the node's address in `group`: the one it already has there (or was already given by
 * an earlier move), else the lowest free one of the group's range; and in the group's `cidr6` when
 * it has one and the node has an IPv6 address. Refused when the node's address isn't its own in
 * ipam/: a network made by hand has no ipam/ for the node to follow.
 */
export async function reserveMove(client: ConsulClient, layout: KvLayout, policy: AccessPolicy, group: Group, record: NodeRecord): Promise<MovePlan> {
  const name = record.name
  const held = await readIpam(client, layout)
  if (activeHolders(held).get(record.vpnAddress) !== name)
    throw new TincConsulError(
      'MOVE_NO_IPAM',
      `${name}'s address ${record.vpnAddress} is not ${name}'s in ${layout.ipam(record.vpnAddress)}, so its sidecar can't be told a new one; was the network made by hand? Give ${name} an address by hand (its host file's Subnet line and tinc-up), or re-join it with \`invite --group ${group.name}\``,
    )
  const base = { node: name, group: group.name, ...optional('fromGroup', groupOf(policy, record.vpnAddress)?.name), from: record.vpnAddress, ...optional('from6', record.vpnAddress6) }
  const pending = pendingIn(held, name, group)
  if (pending) return { ...base, ...pending, already: pending.to === record.vpnAddress && pending.to6 === record.vpnAddress6 }
  const cidr6 = record.vpnAddress6 !== undefined ? group.cidr6 : undefined
  const res = await allocateAddress({ client, layout, cidr: group.cidr, ...(cidr6 ? { cidr6 } : {}), name, held })
  if (!res.ok) throw new TincConsulError('MOVE_FAILED', `could not reserve an address in ${group.cidr} for ${name}: ${res.what}`)
  return { ...base, to: res.address, ...optional('to6', res.address6 ?? record.vpnAddress6), already: false }
}

/**
 * The addresses ipam/ gives the node now, when they are in the group already (the node is a
 * member, or a move there is under way): a second `group move` to the same group reserves
 * nothing new.
 */
function pendingIn(held: ReadonlyMap<string, HeldAddress>, name: string, group: Group): { to: string; to6?: string } | undefined {
  const a = assignedAddresses(held, name)
  if (a.address === undefined || !inRange(hostRange(group.cidr), a.address)) return undefined
  if (group.cidr6 !== undefined && a.address6 !== undefined && !ipaddr.IPv6.parse(a.address6).match(ipaddr.IPv6.parseCIDR(group.cidr6))) return undefined
  return { to: a.address, ...optional('to6', a.address6) }
}

/**
 * Releases what the node holds in ipam/ besides the addresses its record uses, once those are
 * the ones it was given last: the move is over. Released, not deleted, so the node can have one
 * back. Returns the addresses released; none while the node hasn't moved yet.
 */
export async function releaseOld(client: ConsulClient, layout: KvLayout, record: NodeRecord): Promise<string[]> {
  const held = await readIpam(client, layout)
  const a = assignedAddresses(held, record.name)
  if (a.address !== record.vpnAddress || (a.address6 !== undefined && a.address6 !== record.vpnAddress6)) return []
  const stale = [...held.values()].filter((h) => h.entry?.name === record.name && h.entry.releasedAt === undefined && h.address !== record.vpnAddress && h.address !== record.vpnAddress6)
  if (stale.length === 0) return []
  const ops: TxnOp[] = stale.map((h) => releaseOp(layout, h.address, record.name, h.index))
  const res = await client.txn(ops)
  if (!res.ok) throw new TincConsulError('MOVE_RACED', `ipam/ changed while releasing ${stale.map((h) => h.address).join(', ')}: run the command again`)
  return stale.map((h) => h.address)
}

/**
 * Waits for the node's record to show the plan's addresses, with blocking reads on its key (one
 * request per change of the record, not a poll); undefined when `timeoutMs` passes first. A
 * record that can't be used counts as not moved yet.
 */
export async function waitMoved(client: ConsulClient, layout: KvLayout, network: NetworkRecord, plan: MovePlan, timeoutMs: number): Promise<NodeRecord | undefined> {
  const deadline = Date.now() + timeoutMs
  let index = 0
  for (;;) {
    const left = deadline - Date.now()
    const r = await client.kvGetOne(layout.node(plan.node), index === 0 ? {} : { index, waitSeconds: Math.max(1, Math.ceil(left / 1000)) })
    const used = r.item && usableNodeRecord(r.item.value, network, plan.node)
    const record = used?.ok ? used.value : undefined
    if (record && record.vpnAddress === plan.to && record.vpnAddress6 === plan.to6) return record
    if (Date.now() >= deadline) return undefined
    // An index that went backwards (a restored store) starts the wait over rather than returning at once forever.
    index = r.index > index ? r.index : 0
  }
}

/** A move `group move` started that the node hasn't made yet (it is off, or its sidecar failed to). */
export interface PendingMove {
  node: string
  from: string
  to: string
  /** The group of the new address, if any. */
  group?: string
}

/** The nodes whose records don't use the address ipam/ gave them last. */
export function pendingMoves(nodes: ReadonlyArray<{ name: string; vpnAddress: string }>, held: ReadonlyMap<string, HeldAddress>, policy: AccessPolicy): PendingMove[] {
  return nodes.flatMap((n) => {
    const to = assignedAddresses(held, n.name).address
    return to === undefined || to === n.vpnAddress ? [] : [{ node: n.name, from: n.vpnAddress, to, ...optional('group', groupOf(policy, to)?.name) }]
  })
}

function optional<K extends string>(key: K, value: string | undefined): { [P in K]?: string } {
  return (value === undefined ? {} : { [key]: value }) as { [P in K]?: string }
}
