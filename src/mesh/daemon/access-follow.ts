import { existsSync } from 'node:fs'
import { rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { Logger } from '../../log.ts'
import { groupOf, mayReach } from '../access-policy.ts'
import type { PolicyRead } from '../groups.ts'
import type { OwnIdentity } from '../reconcile.ts'
import type { MeshView } from '../view.ts'
import type { AccessFirewall, AccessFirewallState } from './access-firewall.ts'

/** What status shows about the access policy on this node. */
export interface AccessStatus {
  groups: number
  associations: number
  /** This node's group, by its VPN address. */
  group?: string
  /** Names in the view this node may not reach: DNS doesn't answer them. */
  hidden: string[]
  refused: PolicyRead['refused']
  /** Why the policy could not be read (it is kept as read before). */
  unreadable?: string
  firewall?: AccessFirewallState
}

export interface AccessFollower {
  /** The view DNS and the hosts block get: the peers this node may reach, and itself. */
  visible(view: MeshView): MeshView
  /** Loads the access table for the current policy and our addresses. Never throws. */
  apply(): Promise<void>
  status(view: MeshView | undefined): AccessStatus
}

export interface AccessFollowerOptions {
  stateDir: string
  /** Undefined: enforcement is off, or this process can't enforce. */
  firewall: AccessFirewall | undefined
  iface(): Promise<string>
  policy(): (PolicyRead & { unreadable?: string }) | undefined
  self(): OwnIdentity
  log: Logger
}

/**
 * Follows the access policy (src/mesh/access-policy.ts) on this node: it filters what DNS answers
 * and keeps the nftables table. Host files stay for every peer: tinc relays through nodes whatever
 * the policy says, and the table, not the routing, decides what reaches this node.
 *
 * nft runs only once a network has groups, or when an earlier run left a table: a marker file
 * in the state directory says so, so a node of an open mesh never touches nftables.
 */
export function accessFollower(o: AccessFollowerOptions): AccessFollower {
  const marker = join(o.stateDir, 'access-table')
  let loadedBefore = existsSync(marker)
  const hiddenIn = (view: MeshView): string[] => {
    const read = o.policy()
    const self = o.self()
    if (!read || read.policy.groups.length === 0) return []
    return [...view.peers.values()].filter((p) => p.record.name !== self.name && !mayReach(read.policy, self.vpnAddress, p.record.vpnAddress)).map((p) => p.record.name)
  }
  return {
    visible(view) {
      const hidden = new Set(hiddenIn(view))
      return hidden.size === 0 ? view : { network: view.network, peers: new Map([...view.peers].filter(([name]) => !hidden.has(name))) }
    },
    async apply() {
      const read = o.policy()
      const self = o.self()
      if (!o.firewall || !read || self.vpnAddress === undefined) return
      if (read.policy.groups.length === 0 && !loadedBefore) return
      await o.firewall.apply({ iface: await o.iface(), policy: read.policy, selfAddress: self.vpnAddress, ...(self.vpnAddress6 ? { selfAddress6: self.vpnAddress6 } : {}) })
      const mode = o.firewall.state().mode
      if (mode === 'enforced' && !loadedBefore) {
        await writeFile(marker, 'tinc-consul loaded an access table for this network; removed when it is gone\n').catch((err: unknown) =>
          o.log.warn({ err, file: marker }, 'could not write the access table marker'),
        )
        loadedBefore = true
      } else if (mode === 'open' && loadedBefore) {
        await rm(marker, { force: true })
        loadedBefore = false
      }
    },
    status(view) {
      const read = o.policy()
      const group = read ? groupOf(read.policy, o.self().vpnAddress)?.name : undefined
      return {
        groups: read?.policy.groups.length ?? 0,
        associations: read?.policy.associations.length ?? 0,
        ...(group ? { group } : {}),
        hidden: view ? hiddenIn(view).sort() : [],
        refused: read?.refused ?? [],
        ...(read?.unreadable ? { unreadable: read.unreadable } : {}),
        ...(o.firewall ? { firewall: o.firewall.state() } : {}),
      }
    },
  }
}
