import type { ConsulClient, TxnOp } from '../consul/client.ts'
import type { KvItem } from '../consul/kv.ts'
import { TincConsulError } from '../errors.ts'
import type { KvLayout } from './kv-layout.ts'
import { checkPeer, decodeJson, networkRecordSchema, nodeRecordSchema, type Decoded, type NetworkRecord, type NodeRecord } from './record.ts'
import { parseAccessPolicy, type PolicyRead } from './groups.ts'
import type { Group } from './access-policy.ts'

export interface NetworkWrite {
  /** True when this call made the network; false when one was there already. */
  created: boolean
  /** The record now in Consul: ours when created, the one found otherwise. */
  network: NetworkRecord
}

/**
 * The empty keys that give revoked/, aliases/, ipam/ and subnet-approvals/ a node of their own in Consul's radix
 * tree. Without one, a blocking query on an empty prefix wakes on every write nearby (each node
 * record change in the mesh). And daemons take a read that names no key at all as a bad moment,
 * not as everything deleted: with the marker, the listing after the last alias is removed
 * still names one key, so the removal is seen.
 */
export const markerKeys = (layout: KvLayout): string[] => [layout.revokedPrefix, layout.aliasesPrefix, layout.ipamPrefix, layout.subnetApprovalsPrefix]

/**
 * The one writer of a network's record, used by `init`, the lab and the tests, so every network
 * has the same keys. Creates `network` with cas=0 and the marker keys in one transaction: two
 * inits racing make one network, and the loser gets the winner's record back. A network found
 * in place gets any missing marker added (one made by an older `init` had no aliases/ or ipam/);
 * cas=0 there leaves existing keys alone, so nothing wakes for it.
 */
export async function createNetwork(client: ConsulClient, layout: KvLayout, record: NetworkRecord): Promise<NetworkWrite> {
  for (let attempt = 0; attempt < 3; attempt++) {
    const ops: TxnOp[] = [
      { KV: { Verb: 'cas', Key: layout.network, Value: Buffer.from(JSON.stringify(record)).toString('base64'), Index: 0 } },
      ...markerKeys(layout).map((Key): TxnOp => ({ KV: { Verb: 'set', Key, Value: '' } })),
    ]
    const res = await client.txn(ops)
    if (res.ok) return { created: true, network: record }
    const found = await readNetwork(client, layout)
    if (found) {
      await addMissingMarkers(client, layout)
      return { created: false, network: found }
    }
    // Deleted between our transaction and our read: try again.
  }
  throw new TincConsulError('NETWORK_RACE', `the network record at ${layout.network} kept changing; try again`)
}

/** The network's record, or undefined when there is none. An unreadable record is an error: it is fixed by hand, not replaced. */
export async function readNetwork(client: ConsulClient, layout: KvLayout): Promise<NetworkRecord | undefined> {
  const entry = await client.kvGet(layout.network)
  return entry && decodeNetwork(entry.value, layout)
}

function decodeNetwork(value: string | Uint8Array, layout: KvLayout): NetworkRecord {
  const d = decodeJson(value, networkRecordSchema)
  if (!d.ok) throw new TincConsulError('NETWORK_UNREADABLE', `the network record at ${layout.network} is unreadable (${d.reason}); fix or delete it by hand`)
  return d.value
}

/** `found`, or the error of a command run on a network `tinc-consul init` hasn't made yet. */
export function requireNetwork<T>(found: T | undefined, layout: KvLayout): T {
  if (found === undefined) throw new TincConsulError('NO_NETWORK', `no network record at ${layout.network}; run \`tinc-consul init\` first`)
  return found
}

/** A fresh read of the access policy, with what it was read from. */
export interface PolicyState {
  /** The `?recurse` read of `<prefix>network` the daemons make too. */
  items: KvItem[]
  read: PolicyRead
  /** Consul hid keys from this token, so the policy may lack groups: callers decide what that means for them. */
  filtered: boolean
}

/** The access policy from one `?recurse` read of `<prefix>network`, judged by the rules every reader applies (src/mesh/groups.ts). */
export async function readAccessPolicy(client: ConsulClient, layout: KvLayout, network: NetworkRecord): Promise<PolicyState> {
  const r = await client.kvList(layout.network)
  return { items: r.items, read: parseAccessPolicy(r.items, layout, network), filtered: r.filtered }
}

/** The network's record and its access policy, from the one `?recurse` read of `<prefix>network` that holds both; undefined when there is no network. */
export async function readNetworkAndPolicy(client: ConsulClient, layout: KvLayout): Promise<{ network: NetworkRecord; policy: PolicyState } | undefined> {
  const r = await client.kvList(layout.network)
  const item = r.items.find((i) => i.key === layout.network)
  if (!item) return undefined
  const network = decodeNetwork(item.value, layout)
  return { network, policy: { items: r.items, read: parseAccessPolicy(r.items, layout, network), filtered: r.filtered } }
}

/** Where a node's addresses come from: its group's ranges, else the network's; IPv6 only on networks with a `cidr6`, from the group's or else the network's. */
export interface AddressRanges {
  cidr: string
  cidr6?: string
}

export function addressRanges(network: NetworkRecord, group?: Pick<Group, 'cidr' | 'cidr6'>): AddressRanges {
  return { cidr: group?.cidr ?? network.cidr, ...(network.cidr6 ? { cidr6: group?.cidr6 ?? network.cidr6 } : {}) }
}

/** Every node record that decodes and passes the checks peers apply, and the others with why. */
export async function readNodeRecords(client: ConsulClient, layout: KvLayout, network: NetworkRecord): Promise<{ records: NodeRecord[]; unreadable: string[] }> {
  const list = await client.kvList(layout.nodesPrefix)
  const records: NodeRecord[] = []
  const unreadable: string[] = []
  for (const item of list.items) {
    const name = item.key.slice(layout.nodesPrefix.length)
    if (name === '') continue
    const r = usableNodeRecord(item.value, network, name)
    if (r.ok) records.push(r.value)
    else unreadable.push(`${name}: ${r.reason}`)
  }
  return { records, unreadable }
}

/** A node record's bytes as every reader takes them: decoded and checked against the network, or why not. */
export function usableNodeRecord(value: Uint8Array | string, network: NetworkRecord, name: string): Decoded<NodeRecord> {
  const d = decodeJson(value, nodeRecordSchema)
  const checked = d.ok ? checkPeer(d.value, { network, keyName: name }) : d
  return checked.ok ? { ok: true, value: checked.value.record } : checked
}

/**
 * The group `name` of a fresh policy read, for an invite or a move (docs/groups.md). A group that
 * doesn't exist, was refused, or that this token can't be sure of (a read filtered by ACLs) is an
 * error: a node placed outside its group would land in the wrong part of the mesh.
 */
export function groupIn({ read, filtered }: PolicyState, layout: KvLayout, name: string): Group {
  const group = read.policy.groups.find((g) => g.name === name)
  if (group) return group
  const refused = read.refused.find((x) => x.key === layout.group(name))
  if (refused) throw new TincConsulError('GROUP_REFUSED', `group ${name} is refused: ${refused.reason}`)
  if (filtered) throw new TincConsulError('ACL_DENIED', `consul hid part of ${layout.network}/ from this token, and group ${name} is not in what it showed`)
  const known = read.policy.groups.map((g) => g.name)
  throw new TincConsulError('NO_SUCH_GROUP', `no group ${name}${known.length ? ` (groups: ${known.join(', ')})` : ' (the network has no groups; `tinc-consul group add` makes one)'}`)
}

async function addMissingMarkers(client: ConsulClient, layout: KvLayout): Promise<void> {
  for (const key of markerKeys(layout)) await client.kvPut(key, '', { cas: 0 })
}
