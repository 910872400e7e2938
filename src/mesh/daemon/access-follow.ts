import { existsSync } from 'node:fs'
import { rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { Logger } from '../../log.ts'
import { compilePolicy, type AccessPolicy } from '../access-policy.ts'
import type { PolicyRead } from '../groups.ts'
import type { OwnIdentity } from '../reconcile.ts'
import type { MeshView } from '../view.ts'
import { ownGroup, type AccessFirewall, type AccessFirewallState } from './access-firewall.ts'
import type { RenumberState } from './renumber.ts'

/** What status shows about the access policy on this node. */
export interface AccessStatus {
  groups: number
  associations: number
  /** This node's group, by its IPv4 VPN address (ownGroup). */
  group?: string
  /** Names in the view this node may not reach: DNS doesn't answer them. */
  hidden: string[]
  refused: PolicyRead['refused']
  /** Why the policy could not be read (it is kept as read before). */
  unreadable?: string
  firewall?: AccessFirewallState
  /** The latest move of this node to new addresses (`group move`) its daemon made or tried. */
  renumber?: RenumberState
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
  /** Keeps the table; with enforcement off (AccessFirewallOptions.enforce) it only takes away one an earlier run left. */
  firewall: AccessFirewall
  /** The tinc interface; asked once (again only after it failed), see accessFollower. */
  iface(): Promise<string>
  policy(): (PolicyRead & { unreadable?: string }) | undefined
  self(): OwnIdentity
  log: Logger
}

/** The last judgement of a view, and what it was made from: the view and the policy by identity (neither is changed once made), ourselves by value. */
interface HiddenMemo {
  view: MeshView
  policy: AccessPolicy
  name: string
  address: string | undefined
  /** Sorted. */
  hidden: string[]
  visible: MeshView
}

/** The names in `view` this node may not reach, sorted, and the view without them. */
function judgeView(view: MeshView, policy: AccessPolicy, self: OwnIdentity): Pick<HiddenMemo, 'hidden' | 'visible'> {
  const c = compilePolicy(policy)
  const mine = ownGroup(c, self.vpnAddress)
  const hidden = [...view.peers.values()].filter((p) => p.record.name !== self.name && !c.groupsMayReach(mine, c.groupOf(p.record.vpnAddress))).map((p) => p.record.name)
  if (hidden.length === 0) return { hidden, visible: view }
  const gone = new Set(hidden)
  return { hidden: hidden.sort(), visible: { network: view.network, peers: new Map([...view.peers].filter(([name]) => !gone.has(name))) } }
}

/**
 * Follows the access policy (src/mesh/access-policy.ts) on this node: it filters what DNS answers
 * and keeps the nftables table. Host files stay for every peer: tinc relays through nodes whatever
 * the policy says, and the table, not the routing, decides what reaches this node.
 *
 * nft runs only once a network has groups, or when an earlier run left a table: a marker file
 * in the state directory says so, so a node of an open mesh never touches nftables.
 *
 * The core emits the same view many times (each alias or service change) and status asks for it
 * too, so the judgement of a view is kept until the view, the policy or our address changes. The
 * interface name is resolved once: tincd takes `Interface` from tinc.conf only when it starts,
 * and the unit binds this daemon to tinc@<net> (BindsTo=), so a restart of tincd restarts us too.
 */
export function accessFollower(o: AccessFollowerOptions): AccessFollower {
  const marker = join(o.stateDir, 'access-table')
  let loadedBefore = existsSync(marker)
  let memo: HiddenMemo | undefined
  let iface: Promise<string> | undefined
  const judged = (view: MeshView): Pick<HiddenMemo, 'hidden' | 'visible'> => {
    const policy = o.policy()?.policy
    if (!policy || policy.groups.length === 0) return { hidden: [], visible: view }
    const self = o.self()
    if (memo?.view === view && memo.policy === policy && memo.name === self.name && memo.address === self.vpnAddress) return memo
    memo = { view, policy, name: self.name, address: self.vpnAddress, ...judgeView(view, policy, self) }
    return memo
  }
  const resolveIface = (): Promise<string> => {
    // A failure is not kept: the next apply asks again.
    iface ??= o.iface().catch((err: unknown) => {
      iface = undefined
      throw err
    })
    return iface
  }
  return {
    visible: (view) => judged(view).visible,
    async apply() {
      const read = o.policy()
      const self = o.self()
      if (!read || self.vpnAddress === undefined) return
      if (read.policy.groups.length === 0 && !loadedBefore) return
      const iface = await resolveIface().catch((err: unknown) => void o.log.error({ err }, 'cannot tell the tinc interface; the access table is loaded at the next change'))
      if (iface === undefined) return
      await o.firewall.apply({ iface, policy: read.policy, selfAddress: self.vpnAddress, tableLeft: loadedBefore })
      // By what nft did, not by the mode: a removal that failed leaves the table, and the marker with it.
      const loaded = o.firewall.loaded()
      if (loaded === true && !loadedBefore) {
        await writeFile(marker, 'tinc-consul loaded an access table for this network; removed when it is gone\n').catch((err: unknown) =>
          o.log.warn({ err, file: marker }, 'could not write the access table marker'),
        )
        loadedBefore = true
      } else if (loaded === false && loadedBefore) {
        await rm(marker, { force: true }).catch((err: unknown) => o.log.warn({ err, file: marker }, 'could not remove the access table marker'))
        loadedBefore = false
      }
    },
    status(view) {
      const read = o.policy()
      const group = read ? ownGroup(compilePolicy(read.policy), o.self().vpnAddress)?.name : undefined
      return {
        groups: read?.policy.groups.length ?? 0,
        associations: read?.policy.associations.length ?? 0,
        ...(group ? { group } : {}),
        hidden: view ? [...judged(view).hidden] : [],
        refused: read?.refused ?? [],
        ...(read?.unreadable ? { unreadable: read.unreadable } : {}),
        firewall: o.firewall.state(),
      }
    },
  }
}
