import type { ConsulClient } from '../../consul/client.ts'
import { watchHealth } from '../../consul/health.ts'
import type { KvItem } from '../../consul/kv.ts'
import { watchFeed, type TreeSnapshot } from '../../consul/feed-watch.ts'
import { watchPrefix, type Watch } from '../../consul/watch.ts'
import type { Logger } from '../../log.ts'
import { isTincName } from '../../tinc/names.ts'
import { changeLogSource } from '../change-log.ts'
import { activeHolders, parseIpam, type HeldAddress } from '../ipam.ts'
import { revokedFrom } from '../revoke.ts'
import { parseApprovals, type ApprovalRead } from '../routes.ts'
import type { KvLayout } from '../kv-layout.ts'
import { decodeJson, networkRecordSchema, type NetworkRecord } from '../record.ts'
import { parseAccessPolicy, type PolicyRead } from '../groups.ts'
import { OPEN_POLICY } from '../access-policy.ts'
import { serviceFilters } from '../services.ts'

/**
 * How the daemon follows nodes/: `feed` blocks on one query and reads the records the change log
 * names (src/mesh/change-log.ts); `recurse` re-reads every record on every change, the naive way,
 * kept as the benchmarks' reference and as a way out should the log misbehave.
 *
 * Every blocking query holds a connection to the agent, which allows 200 per client address by
 * default (limits.http_max_conns_per_client) and keeps counting a stopped daemon's queries until
 * their waits end (hashicorp/consul#8524). The daemon holds 8: the network record, nodes/, ipam/,
 * revoked/, aliases/, subnet-approvals/ and two for services (src/consul/health.ts), so a
 * restarted daemon and the agent's other clients always find room.
 */
export type NodesWatch = 'feed' | 'recurse'
export const NODES_WATCHES: readonly NodesWatch[] = ['feed', 'recurse']

/** The latest good read of each input; undefined until its first good read. */
export interface MeshInputs {
  network?: NetworkRecord
  nodes?: TreeSnapshot
  /** ipam/ active holders, address → name. */
  allocations?: ReadonlyMap<string, string>
  /** ipam/ as read, released entries and write indexes included: how a `group move` reaches the node it moves. */
  ipam?: ReadonlyMap<string, HeldAddress>
  revoked?: ReadonlySet<string>
  aliasItems?: KvItem[]
  /** subnet-approvals/ as last read: approvals of routes behind nodes (src/mesh/routes.ts). */
  approvals?: ApprovalRead
  /**
   * The access policy under network/ (docs/groups.md), read with the network record. `unreadable`
   * when a read hid keys from our token: the policy read before is kept, never taken as "no groups".
   */
  access?: PolicyRead & { unreadable?: string }
  services: ReadonlyMap<string, unknown[]>
}

export type InputName = 'network' | 'access' | 'nodes' | 'ipam' | 'revoked' | 'aliases' | 'approvals' | 'services'

export interface WatchSetOptions {
  /** Filled in place with each input's latest good read. */
  inputs: MeshInputs
  client: ConsulClient
  layout: KvLayout
  net: string
  waitSeconds?: number
  nodesWatch: NodesWatch
  services: boolean
  log: Logger
  /** An input changed; `inputs` already holds the new value. */
  onChange(what: InputName): void | Promise<void>
  /** A read was deliberately not taken (an empty prefix that can't be empty). */
  onIgnored(reason: string): void
  onBytes(bytes: number): void
  /** nodes/ was read in full, and why. */
  onFullRead?(reason: string): void
}

export interface WatchSet {
  readonly inputs: MeshInputs
  /** The network watch: it re-reads within a second of an outage ending, and its index is the one status shows. */
  readonly lead: Watch
  stop(): Promise<void>
}

const sameSet = (a: ReadonlySet<string> | undefined, b: ReadonlySet<string>) => a !== undefined && a.size === b.size && [...b].every((x) => a.has(x))
/** Active entries as address → "name@index": equal when no entry was given, taken back or rewritten. */
const writesOf = (held: ReadonlyMap<string, HeldAddress>): Map<string, string> =>
  new Map([...held.values()].flatMap((h) => (h.entry && !h.entry.releasedAt ? [[h.address, `${h.entry.name}@${h.index}`] as [string, string]] : [])))
const sameMap = (a: ReadonlyMap<string, string> | undefined, b: ReadonlyMap<string, string>) => a !== undefined && a.size === b.size && [...b].every(([k, v]) => a.get(k) === v)

/**
 * The daemon's inputs from Consul: one watch per input, each keeping its latest good read.
 * A read that can't be right is not taken: a prefix holding a marker key (revoked/, aliases/,
 * ipam/, subnet-approvals/ on networks made by init) or at least our own record (nodes/) is never empty, so an
 * empty read after a non-empty one is a bad moment of the store (consul-template blanked files
 * on exactly this), not everyone leaving.
 */
export function watchInputs(opts: WatchSetOptions): WatchSet {
  const { layout, log, inputs } = opts
  const lead = networkWatch(opts)
  const watches: Watch[] = [
    lead,
    watchFeed({
      client: opts.client,
      waitSeconds: opts.waitSeconds,
      log,
      prefix: layout.nodesPrefix,
      changes: opts.nodesWatch === 'feed' ? changeLogSource(opts.client, layout) : undefined,
      onFullRead: opts.onFullRead,
      nameOnly: (key) => !isTincName(key.slice(layout.nodesPrefix.length)),
      onChange: async (s) => {
        opts.onBytes(s.bytes)
        if (s.filtered) log.warn('consul filtered some node records from this token; give it read on the whole prefix')
        if (s.keys.size === 0 && (inputs.nodes?.keys.size ?? 0) > 0) opts.onIgnored('empty nodes/ read')
        inputs.nodes = s
        await opts.onChange('nodes')
      },
    }),
    markedPrefixWatch(
      opts,
      'ipam',
      layout.ipamPrefix,
      (items) => parseIpam(items, layout),
      (held) => {
        // An entry rewritten in place (a move back to an address the node still holds) changes only its index.
        if (inputs.ipam && sameMap(writesOf(inputs.ipam), writesOf(held))) return false
        inputs.ipam = held
        inputs.allocations = activeHolders(held)
        return true
      },
    ),
    // An empty revoked/ without its marker wakes on every write near it; only a real change matters.
    markedPrefixWatch(
      opts,
      'revoked',
      layout.revokedPrefix,
      (items) => revokedFrom(items, layout),
      (next) => {
        if (sameSet(inputs.revoked, next)) return false
        inputs.revoked = next
        return true
      },
    ),
    markedPrefixWatch(
      opts,
      'aliases',
      layout.aliasesPrefix,
      (items) => items,
      (items) => {
        inputs.aliasItems = items
        return true
      },
    ),
    // A failed read leaves the last good approvals in place (the watch never reports it), and an
    // empty read after a non-empty one is not taken: a bad read never removes a Subnet line.
    markedPrefixWatch(
      opts,
      'approvals',
      layout.subnetApprovalsPrefix,
      (items) => parseApprovals(items, layout),
      (next) => {
        if (inputs.approvals && JSON.stringify(inputs.approvals) === JSON.stringify(next)) return false
        inputs.approvals = next
        return true
      },
    ),
  ]
  if (opts.services) {
    const onChange = (entries: ReadonlyMap<string, unknown[]>) => {
      inputs.services = new Map(entries)
      void opts.onChange('services')
    }
    watches.push(watchHealth({ client: opts.client, waitSeconds: opts.waitSeconds, log, filter: serviceFilters(opts.net), onChange }))
  }
  return { inputs, lead, stop: async () => void (await Promise.all(watches.map((w) => w.stop()))) }
}

/**
 * The network record's watch, and the daemon's probe after an outage: with a short backoff cap
 * it notices Consul is back within a second, and the client's recovery signal then wakes every
 * other watch to re-read at once.
 */
function networkWatch(opts: WatchSetOptions): Watch {
  const { layout, log, inputs } = opts
  return watchPrefix({
    client: opts.client,
    waitSeconds: opts.waitSeconds,
    log,
    prefix: layout.network,
    backoffMaxMs: 1000,
    onChange: async (r) => {
      opts.onBytes(r.bytes)
      const item = r.items.find((i) => i.key === layout.network)
      if (!item) return void log.warn({ key: layout.network }, 'no network record in consul yet; waiting for `tinc-consul init`')
      const d = decodeJson(item.value, networkRecordSchema)
      if (!d.ok) return void log.error({ key: layout.network, reason: d.reason }, 'refused the network record; keeping the last good one')
      const accessChanged = takeAccess(opts, r.items, d.value, r.filtered)
      if (inputs.network && JSON.stringify(inputs.network) === JSON.stringify(d.value)) return accessChanged ? opts.onChange('access') : undefined
      inputs.network = d.value
      await opts.onChange('network')
    },
  })
}

/**
 * The access policy from the network watch's read: the network record is in the same read, so a
 * read without groups means the operator has none. One filtered by ACLs (a node policy from a
 * release without read on network/) can't say, and keeps the policy read before. Returns whether
 * the policy or its refusals changed.
 */
function takeAccess(opts: WatchSetOptions, items: KvItem[], network: NetworkRecord, filtered: boolean): boolean {
  const { inputs, log, layout } = opts
  if (filtered) {
    const reason = `consul hid keys under ${layout.network}/ from this node's token (a node policy from an older release?); keeping the access policy read before`
    if (inputs.access?.unreadable !== reason) log.error({ prefix: `${layout.network}/` }, reason)
    const changed = inputs.access?.unreadable !== reason
    inputs.access = { ...(inputs.access ?? { policy: OPEN_POLICY, refused: [] }), unreadable: reason }
    return changed
  }
  const read = parseAccessPolicy(items, layout, network)
  if (inputs.access && !inputs.access.unreadable && JSON.stringify(inputs.access) === JSON.stringify(read)) return false
  for (const r of read.refused) if (!inputs.access?.refused.some((x) => x.key === r.key && x.reason === r.reason)) log.warn(r, 'refused an access policy key from consul')
  inputs.access = read
  return true
}

/**
 * A `?recurse` watch on a prefix that holds a marker key, so a good read is never empty: an
 * empty read after a non-empty one is not taken. `store` keeps the parsed value and says whether
 * it changed anything.
 */
function markedPrefixWatch<T>(opts: WatchSetOptions, what: InputName, prefix: string, parse: (items: KvItem[]) => T, store: (value: T) => boolean): Watch {
  let had: number | undefined
  return watchPrefix({
    client: opts.client,
    waitSeconds: opts.waitSeconds,
    log: opts.log,
    prefix,
    onChange: async (r) => {
      opts.onBytes(r.bytes)
      if (r.items.length === 0 && had !== undefined && had > 0) {
        opts.log.warn({ input: what }, `consul returned nothing at all under ${what}/, not even its marker; ignoring this read`)
        return opts.onIgnored(`empty ${what}/ read`)
      }
      had = r.items.length
      if (store(parse(r.items))) await opts.onChange(what)
    },
  })
}
