import type { ConsulClient } from '../../consul/client.ts'
import type { Logger } from '../../log.ts'
import type { CachedView } from '../cache.ts'
import { activeHolders, parseIpam } from '../ipam.ts'
import type { KvLayout } from '../kv-layout.ts'
import type { Pins } from '../pins.ts'
import type { NetworkRecord } from '../record.ts'
import { reconcile, type NodeEntry, type OwnIdentity, type ReconcileInput, type ReconcileResult } from '../reconcile.ts'
import type { MeshView } from '../view.ts'
import type { MeshInputs } from './inputs.ts'
import { revokedFrom } from '../revoke.ts'

/** What every judgement shares, whatever the source. */
export interface JudgeContext {
  client: ConsulClient
  layout: KvLayout
  self: OwnIdentity
  pins: Pins
  keep: ReadonlySet<string>
  log: Logger
  memo: NonNullable<ReconcileInput['memo']>
}

export interface Judgement extends ReconcileResult {
  network: NetworkRecord
  /** The nodes/ listing was complete: files the view lacks may go. */
  complete: boolean
  /** New keys were held back because revoked/ could not be re-read; judge again soon. */
  retry: boolean
  allocations: ReadonlyMap<string, string> | undefined
  revoked: ReadonlySet<string> | undefined
}

/** Consul's inputs as the reconciler takes them; undefined until every input has had a good read. */
export function consulInput(inputs: MeshInputs, ctx: JudgeContext): ReconcileInput | undefined {
  const { network, nodes, allocations, revoked } = inputs
  if (!network || !nodes || !allocations || !revoked) return undefined
  const entries = new Map<string, NodeEntry>()
  for (const [key, read] of nodes.keys)
    entries.set(key, read.state === 'value' ? { state: 'value', value: read.item.value, createIndex: read.item.createIndex } : { state: 'unreadable', reason: read.reason })
  // Our own record is always there in a healthy store: an empty listing proves nothing.
  const complete = !nodes.filtered && nodes.keys.size > 0
  return { ...base(ctx), network, nodes: entries, complete, allocations, revoked, trustNewKeys: true }
}

/** The cached view as the reconciler takes it: nothing is confirmed gone, every rule still applies. */
export function cacheInput(cached: CachedView, ctx: JudgeContext): ReconcileInput {
  const nodes = new Map<string, NodeEntry>(cached.records.map((r) => [ctx.layout.node(r.name), { state: 'value', value: r, createIndex: cached.seniority?.[r.name] ?? Number.MAX_SAFE_INTEGER }]))
  const allocations = cached.allocations ? new Map(Object.entries(cached.allocations)) : undefined
  const revoked = cached.revoked ? new Set(cached.revoked) : undefined
  return { ...base(ctx), network: cached.network, nodes, complete: false, allocations, revoked, trustNewKeys: true }
}

const base = (ctx: JudgeContext) => ({ layout: ctx.layout, self: ctx.self, pins: ctx.pins, keep: ctx.keep, memo: ctx.memo })

/**
 * Runs the reconciler, asking Consul again where a watch may simply be behind another:
 * - a join writes a record and its ipam/ entry together, but they arrive through separate
 *   watches: a record refused over its address is judged again against a fresh ipam/ read;
 * - the revoked/ watch can lag the nodes/ watch: before a key is trusted for the first time,
 *   revoked/ is read directly. If that read fails, new keys wait (never trusted unchecked).
 */
export async function judge(previous: MeshView | undefined, input: ReconcileInput, ctx: JudgeContext, fresh: boolean): Promise<Judgement> {
  let current = input
  let result = reconcile(previous, current)
  let retry = false
  if (fresh && result.refusals.some((r) => r.kind === 'ownership' && /ipam|allocat/i.test(r.reason))) {
    const read = await ctx.client.kvList(ctx.layout.ipamPrefix).catch(() => undefined)
    const allocations = read && read.items.length > 0 ? activeHolders(parseIpam(read.items, ctx.layout)) : undefined
    if (allocations) {
      current = { ...current, allocations }
      result = reconcile(previous, current)
    }
  }
  if (fresh && result.newPins.length > 0) {
    const read = await ctx.client.kvList(ctx.layout.revokedPrefix).catch((err: unknown) => {
      ctx.log.warn({ err, names: result.newPins.map(([n]) => n) }, 'could not re-read revoked/ before trusting new keys; they wait')
      return undefined
    })
    if (!read) {
      retry = true
      current = { ...current, trustNewKeys: false }
    } else {
      const late = [...revokedFrom(read.items, ctx.layout)].filter((fp) => !current.revoked?.has(fp))
      if (late.length) current = { ...current, revoked: new Set([...(current.revoked ?? []), ...late]) }
    }
    if (!read || current.revoked !== input.revoked) result = reconcile(previous, current)
  }
  return { ...result, network: current.network, complete: current.complete, retry, allocations: current.allocations, revoked: current.revoked }
}
