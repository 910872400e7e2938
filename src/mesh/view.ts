import type { AcceptedPeer, NetworkRecord, NodeRecord } from './record.ts'

export type { Refusal, RefusalKind } from './reconcile.ts'

/**
 * The mesh as this node believes it: the single source every renderer reads.
 * Built only by `reconcile` (src/mesh/reconcile.ts), which is pure so every
 * trust rule can be tested without Consul or disk.
 */
export interface MeshView {
  network: NetworkRecord
  peers: Map<string, AcceptedPeer>
}

/** The records a view accepted, for the on-disk cache. */
export function viewRecords(view: MeshView): NodeRecord[] {
  return [...view.peers.values()].map((p) => p.record)
}
