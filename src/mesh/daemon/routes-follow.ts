import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { Logger } from '../../log.ts'
import { readOwnRoutes, type OwnRoute } from '../own-routes.ts'
import type { NetworkRecord, NodeRecord } from '../record.ts'
import { judgeRoutes, type Approval, type ApprovalRead, type RouteJudgement } from '../routes.ts'
import type { MeshView } from '../view.ts'
import { masqueradeKeeper, type MasqueradeKeeper } from './masquerade.ts'

/**
 * The daemon's side of routes behind nodes (docs/subnets.md): judges every apply's announced
 * routes against the approvals (src/mesh/routes.ts) for the host-file renderer, and follows our
 * own routes block (a change takes a HUP: tincd routes to itself only the Subnet lines it loaded)
 * and its masquerade table.
 */
export interface RouteFollower {
  /** The served routes by node, for the renderer; the judgement is kept for status. */
  judge(network: NetworkRecord, view: MeshView, own: NodeRecord | undefined, approvals: ApprovalRead | undefined): ReadonlyMap<string, readonly string[]>
  judgement(): RouteJudgement | undefined
  /** The approvals the last judgement used (the last good read, else the cache's), for the cache. */
  approvals(): Approval[] | undefined
  /** The cache's approvals, used until subnet-approvals/ has been read once. */
  setCachedApprovals(approvals: Approval[] | undefined): void
  /** Follows our routes block; true when it changed since the last apply of this process. */
  followOwn(tincDir: string, self: string, network: NetworkRecord): Promise<boolean>
}

export function routeFollower(net: string, log: Logger, masquerade: MasqueradeKeeper = masqueradeKeeper(net, log)): RouteFollower {
  let last: RouteJudgement | undefined
  let cached: Approval[] | undefined
  let own: string | undefined
  let used: Approval[] | undefined
  return {
    judge(network, view, self, approvals) {
      const announced = new Map<string, readonly string[]>()
      for (const [name, p] of view.peers) if (p.record.routes?.length) announced.set(name, p.record.routes)
      if (self?.routes?.length) announced.set(self.name, self.routes)
      // Approvals are never "none" because a read failed: the watch keeps its last good read, and
      // before the first one the cache's (a restart doesn't drop routes while Consul is away).
      used = approvals?.approvals ?? cached
      last = judgeRoutes(network, announced, used ?? [])
      return last.served
    },
    judgement: () => last,
    approvals: () => used,
    setCachedApprovals(a) {
      cached = a
    },
    async followOwn(tincDir, self, network) {
      const text = await readFile(join(tincDir, 'hosts', self), 'utf8').catch(() => undefined)
      if (text === undefined) return false
      let routes: OwnRoute[]
      try {
        routes = readOwnRoutes(text)
      } catch (err) {
        log.error({ err }, 'the routes block of our host file is unreadable; leaving routes and masquerade as they are')
        return false
      }
      await masquerade.apply(network.cidr, routes)
      const key = routes.map((r) => r.cidr).join(' ')
      const changed = own !== undefined && own !== key
      own = key
      return changed
    },
  }
}
