import { b64, isAclDenied, type ConsulClient, type TxnOp } from '../consul/client.ts'
import { TincConsulError, UsageError } from '../errors.ts'
import type { AccessPolicy } from './access-policy.ts'
import { refusalOfNew, type GroupValue } from './groups.ts'
import type { KvLayout } from './kv-layout.ts'
import { readAccessPolicy, type PolicyState } from './network.ts'
import type { NetworkRecord } from './record.ts'

/**
 * Writes to the access policy (docs/groups.md), shared by `group` and `init --infra-cidr`. Every
 * write takes an operator token (node tokens only read `network/`), is checked by the rules every
 * reader applies (src/mesh/groups.ts) before it is made, and is made with check-and-set, so a
 * concurrent command makes the later one fail instead of overwriting.
 */

/** A fresh read of the policy for a write: a listing with holes could let a write create an overlap, so a filtered read is an error. */
export async function readPolicyForWriting(client: ConsulClient, layout: KvLayout, network: NetworkRecord): Promise<PolicyState> {
  return forWriting(await readAccessPolicy(client, layout, network), layout)
}

/** `state`, when a write may be based on it: readPolicyForWriting's check, on a read made already. */
export function forWriting(state: PolicyState, layout: KvLayout): PolicyState {
  if (state.filtered) throw new TincConsulError('ACL_DENIED', `consul hid part of ${layout.network}/ from this token: changing groups takes an operator (management) token`)
  return state
}

/** One transaction on the policy; says whether ACLs refused it or a check-and-set found the keys changed (`raced`). */
export async function policyTxn(client: ConsulClient, layout: KvLayout, ops: TxnOp[], what: string, raced: string): Promise<void> {
  const res = await client.txn(ops)
  if (res.ok) return
  if (res.errors.some((e) => isAclDenied(e.What)))
    throw new TincConsulError('ACL_DENIED', `consul refused ${what}: only an operator (management) token may write ${layout.network}/ (pass --token or set CONSUL_HTTP_TOKEN)`)
  const why = res.errors.map((e) => e.What).join('; ')
  throw new TincConsulError('GROUP_RACED', `${what} failed: ${raced}${why ? ` (${why})` : ''}; look at \`tinc-consul group ls\` and try again`)
}

export interface CreatedGroup {
  /** The policy read before the write. */
  before: PolicyState
  /** The policy with the new group, as every reader takes it. */
  policy: AccessPolicy
}

/**
 * Creates group `name` with `value`: refused before anything is written when a reader would
 * refuse it or the name exists; created only if absent (cas=0). `read` is a fresh read of the
 * policy the caller made already; without it the policy is read here.
 */
export async function createGroup(client: ConsulClient, layout: KvLayout, network: NetworkRecord, name: string, value: GroupValue, read?: PolicyState): Promise<CreatedGroup> {
  const key = layout.group(name)
  const before = read ? forWriting(read, layout) : await readPolicyForWriting(client, layout, network)
  if (before.items.some((i) => i.key === key)) {
    const stale = before.read.refused.find((r) => r.key === key)
    throw new UsageError('GROUP_EXISTS', `group ${name} exists already${stale ? ` but is refused (${stale.reason})` : ''}; to change its ranges remove it first (\`tinc-consul group rm ${name}\`)`)
  }
  const refusal = refusalOfNew(before.items, layout, network, key, value)
  if (refusal) throw new UsageError('GROUP_REFUSED', `group ${name} can't be created: ${refusal}`)
  await policyTxn(client, layout, [{ KV: { Verb: 'cas', Key: key, Value: b64(JSON.stringify(value)), Index: 0 } }], `the creation of group ${name}`, `group ${name} was created meanwhile`)
  return { before, policy: await keepOnlyIfAccepted(client, layout, network, name) }
}

/**
 * Two creations racing can each pass the overlap check against a listing without the other. Both
 * keys then exist, and every reader refuses the newer; so the newer one takes its key back out
 * rather than leave a group that is listed but not used.
 */
async function keepOnlyIfAccepted(client: ConsulClient, layout: KvLayout, network: NetworkRecord, name: string): Promise<AccessPolicy> {
  const key = layout.group(name)
  const after = await readPolicyForWriting(client, layout, network)
  const refusal = after.read.refused.find((r) => r.key === key)
  if (!refusal) return after.read.policy
  const mine = after.items.find((i) => i.key === key)
  if (mine) await client.txn([{ KV: { Verb: 'delete-cas', Key: key, Index: mine.modifyIndex } }])
  throw new TincConsulError('GROUP_RACED', `group ${name} was written, but another write came first: ${refusal.reason}; removed it again`)
}
