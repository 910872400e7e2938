import type { KvLayout } from '../consul/kv-layout.ts'
import { isTincName } from '../tinc/names.ts'
import { checkPeer, decodeJson, nodeRecordSchema, type AcceptedPeer, type Decoded, type NetworkRecord, type NodeRecord } from './record.ts'
import type { Pins } from './pins.ts'

/**
 * The mesh as this node believes it: the single source every renderer reads.
 * Built only by `buildView`, which is pure so every trust rule can be tested
 * without Consul or disk.
 */
export interface MeshView {
  network: NetworkRecord
  peers: Map<string, AcceptedPeer>
}

export interface Refusal {
  key: string
  name: string | undefined
  reason: string
}

export interface ViewInput {
  previous: MeshView | undefined
  network: NetworkRecord
  /** Raw items under nodes/ (from Consul), or accepted records (from the on-disk cache). */
  items: Array<{ key: string; value: Uint8Array | NodeRecord }>
  layout: KvLayout
  pins: Pins
  revoked: ReadonlySet<string>
  /**
   * Who holds each VPN address (ipam/, released entries left out). When there is
   * any entry at all, a record's address must be allocated to that record's
   * node: a node can write its own record, but not take a neighbour's address.
   * Empty for networks made before allocation existed (and in hand-made labs).
   */
  allocations?: ReadonlyMap<string, string>
  /** True when absent records may be taken as removed (a non-empty read with the network record present). */
  removalsConfirmed: boolean
  /**
   * Results of decoding and checking raw values, keyed by key and exact bytes, reused
   * across builds so one change costs one check instead of N. Only valid for one network
   * record: clear it when the network changes.
   */
  memo?: Map<string, { raw: Uint8Array; result: Decoded<AcceptedPeer> }>
}

export interface ViewResult {
  view: MeshView
  refusals: Refusal[]
  /** Names whose fingerprint this view pins for the first time. */
  newPins: Array<[string, string]>
  /** Names that were in the previous view and are gone from this one. */
  removed: string[]
  /** Names that vanished from Consul but were kept because removal was not confirmed. */
  keptUnconfirmed: string[]
}

export function buildView(input: ViewInput): ViewResult {
  const { previous, network, layout, pins, revoked } = input
  const peers = new Map<string, AcceptedPeer>()
  const refusals: Refusal[] = []
  const newPins: Array<[string, string]> = []
  const seen = new Set<string>()
  for (const item of input.items) {
    const name = item.key.startsWith(layout.nodesPrefix) ? item.key.slice(layout.nodesPrefix.length) : undefined
    if (!name || !isTincName(name)) {
      refusals.push({ key: item.key, name: undefined, reason: 'key is not nodes/<valid tinc name>' })
      continue
    }
    seen.add(name)
    const refuse = (reason: string) => {
      refusals.push({ key: item.key, name, reason })
      // One bad write must not undo a good peer: keep what we had for this name.
      const kept = previous?.peers.get(name)
      if (kept && !revoked.has(kept.record.fingerprint)) peers.set(name, kept)
    }
    const checked = checkItem(item, name, network, input.memo)
    if (!checked.ok) {
      refuse(checked.reason)
      continue
    }
    const vpn = checked.value.record.vpnAddress
    const holder = input.allocations?.get(vpn)
    if (input.allocations && input.allocations.size > 0 && holder !== name) {
      refuse(holder ? `address ${vpn} is allocated to ${holder}` : `address ${vpn} was never allocated (ipam/${vpn} is missing)`)
      continue
    }
    const fp = checked.value.record.fingerprint
    if (revoked.has(fp)) {
      refusals.push({ key: item.key, name, reason: `key ${fp} is revoked` })
      continue
    }
    // A pin on a revoked key is spent: revoking and re-joining is how a name gets a new key.
    const pinned = pins.get(name) !== undefined && !revoked.has(pins.get(name) ?? '') ? pins.get(name) : undefined
    if (pinned && pinned !== fp) {
      refuse(`key ${fp} differs from the pinned ${pinned}; run \`tinc-consul pin reset ${name}\` if the key really changed`)
      continue
    }
    if (!pinned) newPins.push([name, fp])
    peers.set(name, checked.value)
  }
  const removed: string[] = []
  const keptUnconfirmed: string[] = []
  for (const [name, peer] of previous?.peers ?? []) {
    if (peers.has(name)) continue
    // Still listed but refused without a good copy to keep: only a revoked key gets here.
    if (seen.has(name) || revoked.has(peer.record.fingerprint) || input.removalsConfirmed) removed.push(name)
    else {
      keptUnconfirmed.push(name)
      peers.set(name, peer)
    }
  }
  return { view: { network, peers }, refusals, newPins, removed, keptUnconfirmed }
}

function checkItem(item: { key: string; value: Uint8Array | NodeRecord }, name: string, network: NetworkRecord, memo: ViewInput['memo']): Decoded<AcceptedPeer> {
  const raw = item.value instanceof Uint8Array ? item.value : undefined
  const hit = raw && memo?.get(item.key)
  if (hit && Buffer.compare(hit.raw, raw) === 0) return hit.result
  const decoded = raw ? decodeJson(raw, nodeRecordSchema) : { ok: true as const, value: item.value as NodeRecord }
  const result = decoded.ok ? checkPeer(decoded.value, { network, keyName: name }) : decoded
  if (raw && memo) memo.set(item.key, { raw, result })
  return result
}

/** The records a view accepted, for the on-disk cache. */
export function viewRecords(view: MeshView): NodeRecord[] {
  return [...view.peers.values()].map((p) => p.record)
}
