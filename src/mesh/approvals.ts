import { isAclDenied, type ConsulClient, type TxnResult } from '../consul/client.ts'
import { TincConsulError, UsageError } from '../errors.ts'
import type { KvLayout } from './kv-layout.ts'
import { readNodeRecords } from './network.ts'
import { RECORD_VERSION, type NetworkRecord } from './record.ts'
import { judgeRoutes, parseApprovals, parseRoute, vpnOverlap, type ApprovalRead, type RouteJudgement } from './routes.ts'

/**
 * Operators' approvals of routes behind nodes (docs/subnets.md), written under
 * `subnet-approvals/`, where node tokens may only read. Every write sets the prefix's empty marker
 * in the same transaction: daemons ignore a read of the prefix that names no key at all, so
 * without it the last approval's removal would never be seen.
 */

/** A CIDR from the command line, canonical, or a usage error saying what is wrong with it (checked before asking Consul anything). */
export function cidrArg(input: string): string {
  const parsed = parseRoute(input)
  if (!parsed.ok) throw new UsageError('BAD_CIDR', parsed.reason)
  return parsed.cidr
}

/** A usage error when the route overlaps the network's own ranges. */
export function refuseVpnOverlap(cidr: string, network: NetworkRecord): void {
  const overlap = vpnOverlap(cidr, network)
  if (overlap) throw new UsageError('CIDR_OVERLAPS_VPN', `${overlap}: a subnet behind a node must lie outside the VPN`)
}

function txnRefused(res: Extract<TxnResult, { ok: false }>, what: string): TincConsulError {
  const denied = res.errors.some((e) => isAclDenied(e.What))
  if (denied) return new TincConsulError('ACL_DENIED', `consul refused ${what}: only an operator (management) token may write subnet-approvals/`)
  return new TincConsulError('APPROVAL_RACED', `${what} failed: ${res.errors.map((e) => e.What).join('; ') || 'the key changed meanwhile'}`)
}

/** Approves NODE's CIDR. Returns false when it was approved already (the older approval keeps its seniority). */
export async function approveRoute(client: ConsulClient, layout: KvLayout, node: string, cidr: string, now = new Date()): Promise<boolean> {
  const key = layout.subnetApproval(node, cidr)
  if (await client.kvGet(key)) return false
  const value = Buffer.from(JSON.stringify({ v: RECORD_VERSION, at: now.toISOString() })).toString('base64')
  const res = await client.txn([{ KV: { Verb: 'cas', Key: key, Value: value, Index: 0 } }, { KV: { Verb: 'set', Key: layout.subnetApprovalsPrefix, Value: '' } }])
  if (!res.ok) throw txnRefused(res, `the approval of ${node}'s ${cidr}`)
  return true
}

/** Withdraws an approval: every node drops the Subnet line, and tincd (StrictSubnets, HUP) the kernel route. */
export async function unapproveRoute(client: ConsulClient, layout: KvLayout, node: string, cidr: string): Promise<void> {
  const key = layout.subnetApproval(node, cidr)
  const current = await client.kvGet(key)
  if (!current) throw new UsageError('NO_APPROVAL', `${node}'s ${cidr} is not approved`)
  const res = await client.txn([{ KV: { Verb: 'delete-cas', Key: key, Index: current.modifyIndex } }, { KV: { Verb: 'set', Key: layout.subnetApprovalsPrefix, Value: '' } }])
  if (!res.ok) throw txnRefused(res, `the removal of ${node}'s ${cidr} approval`)
}

export interface RouteListing {
  judgement: RouteJudgement
  approvals: ApprovalRead
  /** Records that could not be read, so their routes are missing from the listing. */
  unreadable: string[]
}

/** The routes of the whole network as any daemon would judge them now, from one read of each prefix. */
export async function listRoutes(client: ConsulClient, layout: KvLayout, network: NetworkRecord): Promise<RouteListing> {
  const [nodes, approvalItems] = await Promise.all([readNodeRecords(client, layout, network), client.kvList(layout.subnetApprovalsPrefix)])
  const announced = new Map<string, readonly string[]>()
  for (const record of nodes.records) if (record.routes?.length) announced.set(record.name, record.routes)
  const approvals = parseApprovals(approvalItems.items, layout)
  return { judgement: judgeRoutes(network, announced, approvals.approvals), approvals, unreadable: nodes.unreadable }
}
