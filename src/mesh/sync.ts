import { watch as fsWatch } from 'node:fs'
import { mkdir } from 'node:fs/promises'
import { basename, join } from 'node:path'
import { watch as chokidarWatch } from 'chokidar'
import { createConsulClient } from '../consul/client.ts'
import { kvList, type KvItem } from '../consul/kv.ts'
import { kvLayout, type KvLayout } from '../consul/kv-layout.ts'
import { watchTree } from '../consul/tree-watch.ts'
import { watchHealth } from '../consul/health.ts'
import { backoffMs, watchPrefix, type Watch } from '../consul/watch.ts'
import type { Logger } from '../log.ts'
import { isTincName } from '../tinc/names.ts'
import { renderTinc, type RenderOptions, type RenderResult } from '../tinc/render.ts'
import { signalTincd } from '../tinc/signal.ts'
import type { ZoneAlias } from '../dns/zone.ts'
import { parseAliases } from './aliases.ts'
import { meshServices, serviceFilters, type MeshService } from './services.ts'
import { loadCache, saveCache } from './cache.ts'
import { activeHolders, parseIpam, readIpam } from './ipam.ts'
import { loadPins, pinsPath, savePins } from './pins.ts'
import { buildOwnRecord, publishRecord, readTincName, sameRecordContent } from './publish.ts'
import { decodeJson, networkRecordSchema, nodeRecordSchema, type NetworkRecord, type NodeRecord } from './record.ts'
import { buildView, viewRecords, type MeshView, type Refusal, type ViewInput } from './view.ts'

/**
 * Consul refuses a client address more than 200 concurrent HTTP connections by default
 * (limits.http_max_conns_per_client); leave room for our other watches and the operator's tools.
 */
export const DEFAULT_RECORD_WATCH_LIMIT = 150

/** How long the view cache waits for more changes before it is written. */
const CACHE_DELAY_MS = 1000

export interface SyncOptions {
  net: string
  tincDir: string
  stateDir: string
  pidFile: string
  consulUrl: string
  token?: string
  prefix?: string
  waitSeconds?: number
  /**
   * Most peer records watched one by one (one connection each to the agent); above this,
   * each change re-reads all of nodes/. 0 means always re-read everything (the naive way,
   * kept as the benchmark's reference).
   */
  recordWatchLimit?: number
  /** Published in our record when we serve joins, so invites can point at us. */
  joinPort?: number
  log: Logger
  /** Called after every apply; the benchmark and tests hook in here. */
  onApplied?(event: AppliedEvent): void
  /** Called when a read from Consul was deliberately not applied (an empty nodes/ read). */
  onIgnored?(reason: string): void
  /**
   * Called with the new state whenever the view or the aliases change: the feed for
   * renderers other than tinc's (DNS, the hosts block). Never with a partial state.
   */
  onState?(state: MeshState): void
  /** Keep the healthy instances of this network's services (default true). */
  services?: boolean
}

export interface MeshState {
  view: MeshView
  aliases: ZoneAlias[]
  /** Healthy instances only, each checked against the view. */
  services: MeshService[]
}

export interface ConsulHealth {
  reachable: boolean
  lastReadAt?: Date
  index: number
  /** The longest run of failed reads among the watches. */
  failures: number
}

export interface AppliedEvent {
  source: 'cache' | 'consul'
  render: RenderResult
  refusals: Refusal[]
  bytesRead: number
}

export interface SyncStats {
  refusedTotal: number
  /** Service instances refused (not on a mesh node, wrong address, malformed), counted when a reason first appears. */
  servicesRefusedTotal: number
  emptyReadsIgnored: number
  bytesRead: number
  applies: number
  hups: number
}

export interface SyncDaemon {
  readonly self: string
  readonly stats: SyncStats
  view(): MeshView | undefined
  aliases(): ZoneAlias[]
  services(): MeshService[]
  /** Who holds each VPN address, as last read from ipam/. */
  allocations(): ReadonlyMap<string, string>
  /** Records refused right now, by key, with the reason (pinning, validation, revocation). */
  refusals(): ReadonlyMap<string, string>
  /** Whether Consul answers, when it last did, and the network record's index. */
  consul(): ConsulHealth
  stop(): Promise<void>
}

/**
 * The daemon's core: Consul and the node's own files feed one MeshView, and the
 * view feeds the tinc renderer. Everything is driven by watch events; applies
 * run one at a time, each from the latest inputs.
 */
export async function startSync(opts: SyncOptions): Promise<SyncDaemon> {
  const log = opts.log.child({ component: 'sync', net: opts.net })
  const layout: KvLayout = kvLayout(opts.net, opts.prefix)
  const revokedFrom = (items: KvItem[]) => items.map((i) => `sha256:${i.key.slice(layout.revokedPrefix.length)}`).filter((fp) => /^sha256:[0-9a-f]{64}$/.test(fp))
  await mkdir(opts.stateDir, { recursive: true, mode: 0o700 })
  const self = await readTincName(opts.tincDir)
  const pins = await loadPins(opts.stateDir)
  const client = createConsulClient({ url: opts.consulUrl, token: opts.token })
  const stats: SyncStats = { refusedTotal: 0, servicesRefusedTotal: 0, emptyReadsIgnored: 0, bytesRead: 0, applies: 0, hups: 0 }

  let view: MeshView | undefined
  let network: NetworkRecord | undefined
  let nodeItems: KvItem[] | undefined
  let revoked = new Set<string>()
  let allocations = new Map<string, string>()
  let lastRefusals = new Map<string, string>()
  let aliases: ZoneAlias[] = []
  let aliasItems: KvItem[] | undefined
  let lastAliasRefusals = ''
  // Aliases are checked against the network's domain, so they wait for the network record.
  const refreshAliases = () => {
    if (!network || !aliasItems) return
    const read = parseAliases(aliasItems, layout, network.domain)
    const refusedNow = JSON.stringify(read.refused)
    if (refusedNow !== lastAliasRefusals) for (const x of read.refused) log.warn({ key: x.key, reason: x.reason }, 'refused a DNS alias from consul')
    lastAliasRefusals = refusedNow
    if (JSON.stringify(read.aliases) === JSON.stringify(aliases)) return
    aliases = read.aliases
    if (view) {
      cacheDirty = { network: view.network, records: viewRecords(view), aliases }
      flushCacheSoon()
    }
    notify()
  }
  // Services are kept raw and judged against the view at each notify: a node that joins
  // after its service was registered makes that service appear without another read.
  let rawServices: ReadonlyMap<string, unknown[]> = new Map()
  let services: MeshService[] = []
  let lastServiceRefusals = new Set<string>()
  const notify = () => {
    if (!view) return
    const judged = meshServices(rawServices, view, opts.net)
    const now = new Set(judged.refused.map((r) => `${r.service}\0${r.id}\0${r.reason}`))
    for (const r of judged.refused) {
      if (lastServiceRefusals.has(`${r.service}\0${r.id}\0${r.reason}`)) continue
      stats.servicesRefusedTotal++
      log.warn({ service: r.service, id: r.id, reason: r.reason }, 'refused a service instance from consul')
    }
    lastServiceRefusals = now
    services = judged.services
    opts.onState?.({ view, aliases, services })
  }
  let pendingBytes = 0
  // The cache is a fallback for restarts: written a moment after the applies that changed it
  // (a burst of changes costs one write), at most one write in flight, always the newest
  // view, and on stop. Never on the path to a host file.
  let cacheDirty: Parameters<typeof saveCache>[1] | undefined
  let cacheSaving: Promise<void> | undefined
  const flushCache = (): Promise<void> => {
    if (cacheSaving || !cacheDirty) return cacheSaving ?? Promise.resolve()
    const next = cacheDirty
    cacheDirty = undefined
    cacheSaving = saveCache(opts.stateDir, next)
      .then(() => undefined)
      .catch((err: unknown) => log.warn({ err }, 'could not write the view cache'))
      .finally(() => {
        cacheSaving = undefined
        if (cacheDirty) void flushCache()
      })
    return cacheSaving
  }
  let cacheTimer: NodeJS.Timeout | undefined
  const flushCacheSoon = () => {
    if (cacheTimer || !cacheDirty) return
    cacheTimer = setTimeout(() => {
      cacheTimer = undefined
      void flushCache()
    }, CACHE_DELAY_MS)
    cacheTimer.unref()
  }
  const memo: NonNullable<ViewInput['memo']> = new Map()
  let memoNetwork = ''
  const writtenHostFiles: RenderOptions['written'] = new Map()

  const apply = async (source: 'cache' | 'consul', items: Array<{ key: string; value: KvItem['value'] | NodeRecord }>, net: NetworkRecord): Promise<void> => {
    if (JSON.stringify(net) !== memoNetwork) {
      memo.clear()
      memoNetwork = JSON.stringify(net)
    }
    const base = { previous: view, network: net, items, layout, pins, revoked, memo, allocations }
    let confirmed = false
    let built = buildView({ ...base, removalsConfirmed: confirmed })
    if (built.keptUnconfirmed.length > 0 && source === 'consul' && items.length > 0) {
      // Records vanished. Believe it only if the network record is still there right now:
      // a blank read during a leader election must not delete anyone's host file.
      const fresh = await client.kvGet(layout.network).catch(() => undefined)
      confirmed = fresh !== undefined && decodeJson(fresh.value, networkRecordSchema).ok
      if (confirmed) built = buildView({ ...base, removalsConfirmed: confirmed })
      else log.warn({ missing: built.keptUnconfirmed }, 'records vanished but the network record could not be confirmed; keeping their host files')
    }
    if (source === 'consul' && built.refusals.some((r) => r.reason.startsWith('address '))) {
      // A join writes the record and its ipam/ entry together, but the two watches deliver
      // them separately: ask Consul before calling a new node's address unallocated.
      const fresh = await readIpam(opts.consulUrl, opts.token, layout).catch(() => undefined)
      if (fresh && fresh.size > 0) {
        allocations = activeHolders(fresh)
        built = buildView({ ...base, allocations, removalsConfirmed: confirmed })
      }
    }
    if (source === 'consul' && built.newPins.length > 0) {
      // The revoked/ watch can lag the nodes/ watch by a few ms: before trusting a key for the
      // first time, ask Consul directly whether it is revoked, so a revoked key can't slip in
      // under a new name in that gap.
      // One read of the whole (small) list, not one request per new peer.
      const fresh = await kvList({ url: opts.consulUrl, token: opts.token, prefix: layout.revokedPrefix }).catch(() => undefined)
      const late = fresh ? revokedFrom(fresh.items).filter((fp) => !revoked.has(fp)) : []
      if (late.length) {
        revoked = new Set([...revoked, ...late])
        built = buildView({ ...base, allocations, revoked, removalsConfirmed: confirmed })
      }
    }
    const refusals = new Map(built.refusals.map((r) => [r.key, r.reason]))
    for (const r of built.refusals) {
      if (lastRefusals.get(r.key) !== r.reason) {
        stats.refusedTotal++
        log.warn({ key: r.key, peer: r.name, reason: r.reason }, 'refused a record from consul')
      }
    }
    lastRefusals = refusals
    for (const [name, fp] of built.newPins) pins.set(name, fp)
    if (built.newPins.length) await savePins(opts.stateDir, pins)
    for (const peer of built.view.peers.values()) if (peer.dropped.length) log.warn({ peer: peer.record.name, dropped: peer.dropped }, 'dropped host-file lines that are not on the allow-list')
    const render = await renderTinc(built.view, { tincDir: opts.tincDir, self, removed: built.removed, written: writtenHostFiles })
    view = built.view
    stats.applies++
    if (render.written.length || render.deleted.length) log.info({ written: render.written, deleted: render.deleted }, 'host files updated')
    if (render.hupNeeded) {
      log.info({ reasons: render.reasons }, 'asking tincd to reload')
      if (await signalTincd(opts.pidFile, 'SIGHUP', log)) stats.hups++
    }
    const bytesRead = pendingBytes
    pendingBytes = 0
    opts.onApplied?.({ source, render, refusals: built.refusals, bytesRead })
    notify()
    if (source === 'consul') cacheDirty = { network: net, records: viewRecords(built.view), aliases }
  }

  // Serialise applies; each one reads the latest inputs when it starts.
  let chain = Promise.resolve()
  const schedule = () => {
    chain = chain
      .then(async () => {
        if (network && nodeItems) await apply('consul', nodeItems, network)
        flushCacheSoon()
      })
      .catch((err: unknown) => log.error({ err }, 'applying the mesh view failed; keeping the files as they are'))
    return chain
  }

  const cached = await loadCache(opts.stateDir)
  if (cached) {
    log.info({ peers: cached.records.length }, 'rendering from the on-disk cache until consul answers')
    network = cached.network
    aliases = cached.aliases ?? []
    await apply('cache', cached.records.map((r) => ({ key: layout.node(r.name), value: r })), cached.network).catch((err: unknown) => log.error({ err }, 'could not render from cache'))
  }

  let publishFailures = 0
  let publishRetry: NodeJS.Timeout | undefined
  let stopping = false
  const publishOwn = async (): Promise<void> => {
    if (!network || stopping) return
    clearTimeout(publishRetry)
    try {
      const record = await buildOwnRecord(opts.tincDir, self, undefined, opts.joinPort)
      // Ask Consul, not our copy of revoked/: that watch may not have caught up with a revocation yet.
      if (revoked.has(record.fingerprint) || (await client.kvGet(layout.revoked(record.fingerprint)))) {
        log.error({ fingerprint: record.fingerprint }, 'our key is revoked; not publishing (re-join with a new key)')
        return
      }
      await publishRecord(client, layout, network, record, log)
      publishFailures = 0
    } catch (err) {
      publishFailures++
      const delay = backoffMs(publishFailures, 500, 30_000)
      log.error({ err, retryInMs: delay }, 'could not publish our record; retrying')
      publishRetry = setTimeout(() => void publishOwn(), delay)
    }
  }

  // Our own record as built from disk; rebuilt only when our host file changes.
  let ownRecord: NodeRecord | undefined
  const ownRecordDiffers = async (item: KvItem | undefined): Promise<boolean> => {
    if (!item) return true
    const d = decodeJson(item.value, nodeRecordSchema)
    if (!d.ok) return true
    const mine = (ownRecord ??= await buildOwnRecord(opts.tincDir, self, undefined, opts.joinPort).catch(() => undefined))
    return mine !== undefined && !sameRecordContent(mine, d.value)
  }

  const count = (r: { bytes: number }) => {
    stats.bytesRead += r.bytes
    pendingBytes += r.bytes
  }
  const common = { url: opts.consulUrl, token: opts.token, waitSeconds: opts.waitSeconds, log }
  const watches: Watch[] = [
    watchPrefix({
      ...common,
      prefix: layout.network,
      onChange: async (r) => {
        count(r)
        const item = r.items.find((i) => i.key === layout.network)
        if (!item) {
          log.warn({ key: layout.network }, 'no network record in consul yet; waiting for `tinc-consul init`')
          return
        }
        const d = decodeJson(item.value, networkRecordSchema)
        if (!d.ok) {
          log.error({ key: layout.network, reason: d.reason }, 'refused the network record; keeping the last good one')
          return
        }
        const first = !network || JSON.stringify(network) !== JSON.stringify(d.value)
        network = d.value
        refreshAliases()
        if (first) await publishOwn()
        await schedule()
      },
    }),
    watchTree({
      ...common,
      prefix: layout.nodesPrefix,
      perKeyLimit: opts.recordWatchLimit ?? DEFAULT_RECORD_WATCH_LIMIT,
      nameOnly: (key) => !isTincName(key.slice(layout.nodesPrefix.length)),
      onChange: async (r) => {
        count(r)
        if (r.filtered) log.warn('consul filtered some node records from this token; give it read on the whole prefix')
        if (r.items.length === 0 && nodeItems && nodeItems.length > 0) {
          // consul-template blanked files on exactly this; an empty read never means "everyone left".
          log.warn('consul returned no node records at all; ignoring this read')
          stats.emptyReadsIgnored++
          opts.onIgnored?.('empty nodes/ read')
          return
        }
        nodeItems = r.items
        await schedule()
        // Our record is gone (deleted by hand, lost with a store) or was overwritten by someone
        // else: put ours back, unless we were revoked.
        if (r.items.length > 0 && (await ownRecordDiffers(r.items.find((i) => i.key === layout.node(self))))) await publishOwn()
      },
    }),
    watchPrefix({
      ...common,
      prefix: layout.ipamPrefix,
      onChange: async (r) => {
        count(r)
        // Changes only when a node joins or is revoked: a whole-prefix read is fine here.
        const next = activeHolders(parseIpam(r.items, layout))
        if (next.size === 0 && allocations.size > 0) {
          log.warn('consul returned no address allocations at all; ignoring this read')
          return
        }
        if (next.size === allocations.size && [...next].every(([a, n]) => allocations.get(a) === n)) return
        allocations = next
        await schedule()
      },
    }),
    watchPrefix({
      ...common,
      prefix: layout.aliasesPrefix,
      onChange: (r) => {
        count(r)
        // Like nodes/: an empty read after a non-empty one (not even the marker key) is more
        // likely a bad moment than an operator deleting everything.
        if (r.items.length === 0 && aliasItems && aliasItems.length > 0) {
          log.warn('consul returned no aliases at all, not even the empty marker; ignoring this read')
          return
        }
        aliasItems = r.items
        refreshAliases()
      },
    }),
    watchPrefix({
      ...common,
      prefix: layout.revokedPrefix,
      onChange: async (r) => {
        count(r)
        const next = new Set(revokedFrom(r.items))
        // An empty revoked/ has no node of its own in Consul's tree, so its blocking query wakes on
        // every write anywhere near it, including each node record change. Only a real change matters.
        if (next.size === revoked.size && [...next].every((fp) => revoked.has(fp))) return
        revoked = next
        await schedule()
      },
    }),
  ]
  if (opts.services !== false) {
    watches.push(
      watchHealth({
        ...common,
        filter: serviceFilters(opts.net),
        onChange: (entries) => {
          rawServices = new Map(entries)
          notify()
        },
      }),
    )
  }

  // `tinc-consul pin reset` edits the pin file; pick that up without a restart.
  // A plain directory watch filtered by name: the cache is rewritten in the same directory
  // on every change, and a file watcher that rescans the directory would pay for each one.
  const pinWatcher = fsWatch(opts.stateDir, (_event, file) => {
    if (file !== basename(pinsPath(opts.stateDir))) return
    void loadPins(opts.stateDir)
      .then((fresh) => {
        const changed = fresh.size !== pins.size || [...pins].some(([n, fp]) => fresh.get(n) !== fp)
        if (!changed) return
        pins.clear()
        for (const [n, fp] of fresh) pins.set(n, fp)
        log.info({ pins: pins.size }, 'pins changed on disk; re-checking records')
        return schedule()
      })
      .catch((err: unknown) => log.error({ err }, 'could not reload pins'))
  })

  const ownHostFile = join(opts.tincDir, 'hosts', self)
  const fileWatcher = chokidarWatch(ownHostFile, { ignoreInitial: true })
  fileWatcher.on('all', () => {
    ownRecord = undefined
    log.info({ file: ownHostFile }, 'our host file changed; publishing again')
    void publishOwn()
  })

  return {
    self,
    stats,
    view: () => view,
    aliases: () => aliases,
    services: () => services,
    allocations: () => allocations,
    refusals: () => lastRefusals,
    consul: () => {
      const failures = Math.max(0, ...watches.map((w) => w.failures))
      const reads = watches.flatMap((w) => (w.lastReadAt ? [w.lastReadAt.getTime()] : []))
      return { reachable: failures === 0 && reads.length > 0, ...(reads.length ? { lastReadAt: new Date(Math.max(...reads)) } : {}), index: watches[0]?.index ?? 0, failures }
    },
    async stop() {
      stopping = true
      clearTimeout(publishRetry)
      clearTimeout(cacheTimer)
      await fileWatcher.close()
      pinWatcher.close()
      await Promise.all(watches.map((w) => w.stop()))
      await chain
      await cacheSaving
      await flushCache()
    },
  }
}
