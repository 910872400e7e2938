import * as z from 'zod'
import type { KvItem } from '../consul/kv.ts'
import { isTincName } from '../tinc/names.ts'
import type { KvLayout } from './kv-layout.ts'
import { isCanonicalRoute, routesOverlap } from './route-cidr.ts'
import { decodeJson, networkMode, RECORD_VERSION, type NetworkRecord } from './record.ts'

/**
 * Subnets behind nodes (docs/subnets.md): a node announces a LAN in its record's `routes`, an
 * operator approves it under `subnet-approvals/`, and every node renders it as a Subnet line of
 * that node's host file only when `judgeRoutes` says so. Pure, so every rule is tested directly.
 */

export { isCanonicalRoute, parseRoute, routesOverlap, type ParsedRoute } from './route-cidr.ts'

/** Most routes one node may announce: a home router has a LAN or two, not a routing table. */
export const MAX_ROUTES = 8

/** Why a route can't be served in this network (it overlaps the VPN's own ranges), or undefined. */
export function vpnOverlap(cidr: string, network: Pick<NetworkRecord, 'cidr' | 'cidr6'>): string | undefined {
  for (const range of [network.cidr, network.cidr6]) if (range && routesOverlap(cidr, range)) return `${cidr} overlaps the VPN range ${range}`
  return undefined
}

/** An operator's approval: `subnet-approvals/<node>/<cidr with "/" as "_">` → `{"v":1,"at":"…"}`. */
export const approvalSchema = z.object({ v: z.literal(RECORD_VERSION), at: z.iso.datetime() }).strip()

export interface Approval {
  node: string
  cidr: string
  at: string
  /** Seniority: the older approval wins an overlap. */
  createIndex: number
}

export const approvalKeySuffix = (node: string, cidr: string): string => `${node}/${cidr.replace('/', '_')}`

export interface ApprovalRead {
  approvals: Approval[]
  refused: Array<{ key: string; reason: string }>
}

/** Approvals as read from Consul: each key and value checked, a bad one reported and left out. */
export function parseApprovals(items: readonly KvItem[], layout: KvLayout): ApprovalRead {
  const approvals: Approval[] = []
  const refused: ApprovalRead['refused'] = []
  for (const item of items) {
    const rest = item.key.slice(layout.subnetApprovalsPrefix.length)
    if (rest === '') continue
    const [node, encoded, extra] = rest.split('/')
    const cidr = encoded?.replace('_', '/')
    if (extra !== undefined || !isTincName(node) || cidr === undefined || !isCanonicalRoute(cidr)) {
      refused.push({ key: item.key, reason: 'the key is not subnet-approvals/<node>/<canonical CIDR with "/" written "_">' })
      continue
    }
    const d = decodeJson(item.value, approvalSchema, 512)
    if (!d.ok) refused.push({ key: item.key, reason: d.reason })
    else approvals.push({ node, cidr, at: d.value.at, createIndex: item.createIndex })
  }
  return { approvals: approvals.sort((a, b) => a.createIndex - b.createIndex), refused }
}

/** unannounced: approved, but the node doesn't announce it (yet, or any more). */
export type RouteState = 'served' | 'awaiting' | 'refused' | 'unannounced'

export interface RouteVerdict {
  node: string
  cidr: string
  state: RouteState
  reason?: string
  approvedAt?: string
}

export interface RouteJudgement {
  /** Every announced route, and every approval no node announces, in node then CIDR order. */
  verdicts: RouteVerdict[]
  /** The routes rendered as Subnet lines, by node. */
  served: ReadonlyMap<string, readonly string[]>
}

/**
 * Which announced routes are served. A route is served when its node announces it, an operator
 * approved it, it overlaps neither of the VPN's ranges and no route served before it: approved
 * routes are taken oldest approval first (CreateIndex), and one overlapping a route already
 * taken is refused with both named. Switch networks route no subnets (tincd learns MACs).
 * `announced` holds only nodes in the view: a refused record announces nothing.
 */
export function judgeRoutes(network: NetworkRecord, announced: ReadonlyMap<string, readonly string[]>, approvals: readonly Approval[]): RouteJudgement {
  const approvalOf = new Map(approvals.map((a) => [`${a.node} ${a.cidr}`, a]))
  const verdicts: RouteVerdict[] = []
  const candidates: Array<{ verdict: RouteVerdict; approval: Approval }> = []
  const switchMode = networkMode(network) === 'switch'
  for (const [node, routes] of announced) {
    for (const cidr of new Set(routes)) {
      const approval = approvalOf.get(`${node} ${cidr}`)
      approvalOf.delete(`${node} ${cidr}`)
      const verdict: RouteVerdict = { node, cidr, state: 'awaiting', ...(approval ? { approvedAt: approval.at } : {}) }
      verdicts.push(verdict)
      const refusal = !isCanonicalRoute(cidr) ? `${cidr} is not a canonical CIDR` : switchMode ? 'switch-mode networks route no subnets' : vpnOverlap(cidr, network)
      if (refusal) Object.assign(verdict, { state: 'refused', reason: refusal })
      else if (!approval) verdict.reason = `awaiting approval: tinc-consul subnet approve ${node} ${cidr}`
      else candidates.push({ verdict, approval })
    }
  }
  candidates.sort((a, b) => a.approval.createIndex - b.approval.createIndex || compare(a.verdict.node, b.verdict.node) || compare(a.verdict.cidr, b.verdict.cidr))
  const taken: RouteVerdict[] = []
  for (const { verdict } of candidates) {
    const clash = taken.find((t) => routesOverlap(t.cidr, verdict.cidr))
    if (clash) Object.assign(verdict, { state: 'refused', reason: `${verdict.node}'s ${verdict.cidr} overlaps ${clash.node}'s ${clash.cidr}, approved earlier` })
    else {
      verdict.state = 'served'
      taken.push(verdict)
    }
  }
  for (const a of approvalOf.values()) verdicts.push({ node: a.node, cidr: a.cidr, state: 'unannounced', reason: `approved, but ${a.node} does not announce it`, approvedAt: a.at })
  verdicts.sort((a, b) => compare(a.node, b.node) || compare(a.cidr, b.cidr))
  const served = new Map<string, string[]>()
  for (const v of verdicts) if (v.state === 'served') served.set(v.node, [...(served.get(v.node) ?? []), v.cidr])
  return { verdicts, served }
}

function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0
}
