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
  /** The network's name (the daemon's own nftables table is named after it). */
  net?: string
  /** Hand-made peers kept only until they adopt with the same key (src/mesh/adoption.ts); judged like any record. */
  untilAdopted?: ReadonlySet<string>
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

/** Above this many vanished records, one listing confirms them instead of one read each. */
const CONFIRM_ONE_BY_ONE = 8

/**
 * A peer that vanished from a listing is gone only if Consul says so when asked about it: a
 * listing cut short or served stale by a server that is catching up looks just like a
 * deletion. Each vanished key is read directly (a 404 confirms it); one that is still there, or
 * can't be read, counts as unreadable for this apply and keeps its copy.
 */
async function confirmAbsence(previous: MeshView | undefined, input: ReconcileInput, removed: string[], ctx: JudgeContext): Promise<ReconcileInput> {
  const vanished = removed.filter((name) => previous?.peers.has(name) && !input.nodes.has(ctx.layout.node(name)))
  if (vanished.length === 0) return input
  const stillThere = new Map<string, string>()
  if (vanished.length > CONFIRM_ONE_BY_ONE) {
    const listing = await ctx.client.kvKeys(ctx.layout.nodesPrefix).catch(() => undefined)
    const keys = new Set(listing?.keys ?? [])
    for (const name of vanished) if (!listing || listing.filtered || keys.has(ctx.layout.node(name))) stillThere.set(name, listing ? 'still listed when asked again' : 'the confirming listing failed')
  } else {
    for (const name of vanished) {
      const read = await ctx.client.kvGetOne(ctx.layout.node(name)).catch(() => undefined)
      if (!read || read.item) stillThere.set(name, read ? 'still there when read directly' : 'the confirming read failed')
    }
  }
  if (stillThere.size === 0) return input
  ctx.log.warn({ names: [...stillThere.keys()] }, 'records missing from a listing are still in consul (or could not be checked); keeping them')
  const nodes = new Map(input.nodes)
  for (const [name, reason] of stillThere) nodes.set(ctx.layout.node(name), { state: 'unreadable', reason: `missing from a listing, but ${reason}` })
  return { ...input, nodes }
}

/**
 * Runs the reconciler, asking Consul again where a read may be short or one watch simply
 * behind another:
 * - a record missing from a listing is read directly before its file goes (confirmAbsence);
 * - a join writes a record and its ipam/ entry together, but they arrive through separate
 *   watches: a record refused over its address is judged again against a fresh ipam/ read;
 * - the revoked/ watch can lag the nodes/ watch: before a key is trusted for the first time,
 *   revoked/ is read directly. If that read fails, new keys wait (never trusted unchecked).
 */
export async function judge(previous: MeshView | undefined, input: ReconcileInput, ctx: JudgeContext, fresh: boolean): Promise<Judgement> {
  let current = input
  let result = reconcile(previous, current)
  let retry = false
  if (fresh) {
    const confirmed = await confirmAbsence(previous, current, result.removed, ctx)
    if (confirmed !== current) {
      current = confirmed
      result = reconcile(previous, current)
    }
  }
  if (fresh && result.refusals.some((r) => r.kind === 'ownership' && /was never allocated/.test(r.reason))) {
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
