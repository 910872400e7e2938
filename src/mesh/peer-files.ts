import type { ConsulClient } from '../consul/client.ts'
import type { KvItem } from '../consul/kv.ts'
import { TincConsulError } from '../errors.ts'
import { tincBackend } from '../tinc/backend.ts'
import { revokedFrom } from './revoke.ts'
import { activeHolders, parseIpam } from './ipam.ts'
import type { KvLayout } from './kv-layout.ts'
import { reconcile, type NodeEntry, type OwnIdentity, type Refusal } from './reconcile.ts'
import { networkMode, type AcceptedPeer, type NetworkRecord } from './record.ts'
import type { TincMode } from '../tinc/mode.ts'

export interface PeerFiles {
  /** Host file text by peer name, byte for byte what the daemon writes for the same view. */
  files: Record<string, string>
  /** Records left out, and why (for init's progress and the join server's log). */
  refusals: Refusal[]
  /** Every name listed under nodes/, accepted or not. */
  listed: string[]
}

/**
 * The host files `init` writes and the join server hands a new node: the network's records
 * judged by the daemon's own reconciler, so a node never starts with a file its daemon would
 * refuse (a record squatting on another node's address, a revoked key), which the daemon
 * would otherwise only remove after its first complete read. Public ones become ConnectTo
 * entries; the rest let the new node route to nodes behind NAT (StrictSubnets) before its
 * daemon has synced. Files are rendered for `mode`, the network's unless the caller asks for
 * the record form (the join reply). Without a fresh read of ipam/ and revoked/ nothing can be judged, so a
 * failed or ACL-filtered read is an error, never a skipped check.
 */
export async function peerHostFiles(client: ConsulClient, layout: KvLayout, network: NetworkRecord, self: OwnIdentity, mode: TincMode | 'record' = networkMode(network)): Promise<PeerFiles> {
  const [nodes, ipam, revoked] = await Promise.all([readAll(client, layout.nodesPrefix), readAll(client, layout.ipamPrefix), readAll(client, layout.revokedPrefix)])
  const entries = new Map<string, NodeEntry>(nodes.map((i) => [i.key, { state: 'value', value: i.value, createIndex: i.createIndex }]))
  const result = reconcile(undefined, {
    layout,
    network,
    self,
    nodes: entries,
    complete: true,
    allocations: activeHolders(parseIpam(ipam, layout)),
    revoked: revokedFrom(revoked, layout),
    pins: new Map(),
    keep: new Set(),
    trustNewKeys: true,
  })
  const files: Record<string, string> = {}
  for (const [name, peer] of [...result.view.peers].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) files[name] = mode === 'record' ? recordForm(peer) : tincBackend().peerHostFile(peer, mode)
  return { files, refusals: result.refusals, listed: nodes.map((i) => i.key.slice(layout.nodesPrefix.length)) }
}

/**
 * A peer's file in its record's form (the join reply's): the one /32 Subnet line a joiner of any
 * release checks a file against; the IPv6 /128 is added by the joiner's daemon when it renders.
 */
function recordForm(peer: AcceptedPeer): string {
  const { vpnAddress6: _v6, ...record } = peer.record
  return tincBackend().peerHostFile({ ...peer, record }, 'router')
}

async function readAll(client: ConsulClient, prefix: string): Promise<KvItem[]> {
  let read: Awaited<ReturnType<ConsulClient['kvList']>>
  try {
    read = await client.kvList(prefix)
  } catch (err) {
    throw new TincConsulError('PEERS_UNREADABLE', `could not read ${prefix} from Consul, so the network's host files can't be checked: ${(err as Error).message}`, { cause: err })
  }
  // Hidden keys could be revocations or address holders: judging without them is guessing.
  if (read.filtered) throw new TincConsulError('PEERS_UNREADABLE', `Consul hid some keys under ${prefix} from this token (ACL); it needs read on the whole prefix to check the network's host files`)
  return read.items
}
