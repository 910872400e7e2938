import { interfaceOf } from '../tinc/setup.ts'
import { accessFirewall } from './daemon/access-firewall.ts'
import { accessFollower, type AccessStatus } from './daemon/access-follow.ts'
import { watch as fsWatch, type FSWatcher } from 'node:fs'
import { mkdir } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { watch as chokidarWatch } from 'chokidar'
import { createConsulClient, type ConsulClient } from '../consul/client.ts'
import type { ZoneAlias } from '../dns/zone.ts'
import type { Logger } from '../log.ts'
import { loadCache } from './cache.ts'
import { cacheWriter } from './daemon/cache-writer.ts'
import { meshCore, type AppliedEvent, type Core, type SyncStats } from './daemon/core.ts'
import { watchInputs, type InputName, type MeshInputs, type NodesWatch } from './daemon/inputs.ts'
import { ownRecordKeeper, type NameConflict, type OwnRecordKeeper } from './daemon/own-record.ts'
import { stateFeed, type MeshState, type StateFeed } from './daemon/state-feed.ts'
import type { JudgeContext } from './daemon/judge.ts'
import { loadKeepList } from './keep.ts'
import { kvLayout, type KvLayout } from './kv-layout.ts'
import { loadPins, pinsPath } from './pins.ts'
import { readTincName } from './publish.ts'
import type { MeshView } from './view.ts'
import type { MeshService, ServiceRefusal } from './services.ts'
import type { NetworkRecord } from './record.ts'
import type { RouteJudgement } from './routes.ts'
import type { DumpResult } from '../tinc/dump.ts'
import type { ConnectToPlan, ConnectToTimers } from './connect-to.ts'
import { connectToKeeper } from './daemon/connect-to-keeper.ts'
import { renumberer, type Renumberer } from './daemon/renumber.ts'
import type { Renumbering } from './renumber.ts'
import { tincBackend } from '../tinc/backend.ts'
import { run } from '../util/exec.ts'

export { NODES_WATCHES, type NodesWatch } from './daemon/inputs.ts'
export type { AppliedEvent, MeshState, NameConflict, SyncStats }

export interface SyncOptions {
  net: string
  tincDir: string
  stateDir: string
  pidFile: string
  consulUrl: string
  token?: string
  prefix?: string
  waitSeconds?: number
  /** How nodes/ is followed (default `feed`: the change log; `recurse`: every record on every change). */
  nodesWatch?: NodesWatch
  /** Published in our record when we serve joins, so invites can point at us. */
  joinPort?: number
  /** The operator's keep list (`<config-dir>/<net>.keep`): hand-made peers the daemon never touches. */
  keepFile?: string
  log: Logger
  /** Called after every apply; the benchmark and tests hook in here. */
  onApplied?(event: AppliedEvent): void
  /** Called when a read from Consul was deliberately not taken (an empty prefix that can't be empty). */
  onIgnored?(reason: string): void
  /**
   * Called with the new state whenever the view, the aliases or the services change: the feed
   * for renderers other than tinc's (DNS, the hosts block). Never with a partial state.
   */
  onState?(state: MeshState): void
  /** Keep the healthy instances of this network's services (default true). */
  services?: boolean
  /** Most service instances taken from one node (default DEFAULT_MAX_SERVICES, `--max-services`). */
  maxServicesPerNode?: number
  /** Keep K ConnectTo lines (src/mesh/connect-to.ts); without it, one to every public peer. */
  connectTo?: ConnectToSettings & { readState(): Promise<DumpResult> }
  /** Enforce the access policy with an nftables table (default true; docs/groups.md). False removes a table an earlier run loaded. */
  accessEnforce?: boolean
  /** Loads an nft script (default: `nft -f -`); tests pass a recorder so they never touch the host's rules. */
  accessNft?: (script: string) => Promise<void>
  /**
   * `group move` gave this node new addresses and its files, interface and tincd have them: the
   * parts bound to the old ones (DNS, status, the services' address) must start again.
   */
  onRenumbered?(r: Renumbering): void
  /** Runs `ip ARGS` to swap the address on the tinc interface (default: the ip command); tests pass a recorder. */
  ip?: (args: string[]) => Promise<void>
}

export interface ConnectToSettings {
  k: number
  pinned?: string[]
  sponsor?: { name: string; until: number }
  timers: ConnectToTimers
}

/** How often the ConnectTo keeper looks at tincd's connections. */
const CONNECT_TO_TICK_MS = 10_000

export interface ConsulHealth {
  /** The latest request to Consul succeeded. */
  reachable: boolean
  lastReadAt?: Date
  index: number
  /** Requests that failed in a row. */
  failures: number
}

export interface SyncDaemon {
  readonly self: string
  readonly stats: SyncStats
  view(): MeshView | undefined
  aliases(): ZoneAlias[]
  services(): MeshService[]
  /** Service instances refused at the last judgement (not on a mesh node, wrong address, over the per-node cap). */
  servicesRefused(): ServiceRefusal[]
  /** The network record: from Consul, or from the cache until Consul answers. */
  network(): NetworkRecord | undefined
  /** Who holds each VPN address, as last read from ipam/. */
  allocations(): ReadonlyMap<string, string>
  /** Records refused right now, by key, with the reason (pinning, validation, revocation, identity). */
  refusals(): ReadonlyMap<string, string>
  /** Names listed in Consul that can't be judged yet; their files are kept as they are. */
  pending(): readonly string[]
  /** Another writer keeps rewriting our record (a cloned machine), if so. */
  conflict(): NameConflict | undefined
  /** Routes behind nodes as last judged (served, awaiting approval, refused), and approvals that could not be read. */
  routes(): { judgement: RouteJudgement | undefined; refusedApprovals: ReadonlyArray<{ key: string; reason: string }> }
  /** Whether Consul answers, when it last did, and the network record's index. */
  consul(): ConsulHealth
  /** The ConnectTo keeper's latest plan (chosen, benched, unknown pins); undefined when every public peer is kept. */
  connectTo(): ConnectToPlan | undefined
  /** The access policy on this node: groups, hidden names, the table's state. */
  access(): AccessStatus
  stop(): Promise<void>
}

/**
 * The daemon: a watch set feeds the inputs, the reconciler judges them into one view, and the
 * renderers (host files and the tinc.conf block, DNS, the cache) follow the view. Our own record
 * is kept in Consul beside that loop.
 */
export async function startSync(opts: SyncOptions): Promise<SyncDaemon> {
  const log = opts.log.child({ component: 'sync', net: opts.net })
  const layout = kvLayout(opts.net, opts.prefix)
  await mkdir(opts.stateDir, { recursive: true, mode: 0o700 })
  const self = await readTincName(opts.tincDir)
  const client = createConsulClient({ url: opts.consulUrl, token: opts.token })
  const stats: SyncStats = { refusedTotal: 0, servicesRefusedTotal: 0, emptyReadsIgnored: 0, bytesRead: 0, fullReads: 0, applies: 0, hups: 0 }
  const inputs: MeshInputs = { services: new Map() }
  const owner = ownRecordKeeper({ client, layout, tincDir: opts.tincDir, self, joinPort: opts.joinPort, log, revokedLocally: (fp) => inputs.revoked?.has(fp) ?? false })
  const mine = await owner.own().catch((err: unknown) => void log.error({ err }, 'cannot build our own record from our host file; publishing waits for it'))
  const ctx = await judgeContext(opts, { client, layout, self, mine, log })
  const feed = stateFeed(layout, opts.net, log, opts.onState, opts.maxServicesPerNode)
  let pendingBytes = 0
  const takeBytes = () => {
    const b = pendingBytes
    pendingBytes = 0
    return b
  }
  const cache = cacheWriter(opts.stateDir, log)
  const keeper = opts.connectTo && connectToKeeper({ ...opts.connectTo, self, intervalMs: CONNECT_TO_TICK_MS, onChange: () => void core.schedule(), log })
  const firewall = accessFirewall({ net: opts.net, log, enforce: opts.accessEnforce !== false, ...(opts.accessNft ? { nft: opts.accessNft } : {}) })
  const access = accessFollower({ stateDir: opts.stateDir, firewall, iface: () => interfaceOf(opts.tincDir, opts.net), policy: () => inputs.access, self: () => ctx.self, log })
  const core = meshCore({
    tincDir: opts.tincDir,
    pidFile: opts.pidFile,
    stateDir: opts.stateDir,
    log,
    ctx,
    inputs,
    feed,
    cache,
    stats,
    onApplied: opts.onApplied,
    takeBytes,
    own: () => owner.own().catch(() => undefined),
    chooseConnectTo: keeper ? (publics) => keeper.choose(publics) : undefined,
    access,
  })

  const cached = await loadCache(opts.stateDir)
  if (cached) {
    log.info({ peers: cached.records.length }, 'rendering from the on-disk cache until consul answers')
    await core.applyCache(cached).catch((err: unknown) => log.error({ err }, 'could not render from cache'))
  }
  const renumber = followMoves(opts, ctx, inputs, log)
  const react = reactor({ inputs, core, owner, feed, renumber, ownKey: layout.node(self), log })
  const watches = startWatches(opts, { inputs, client, layout, log, react, stats }, (b) => (pendingBytes += b))
  const files = watchLocalFiles(opts, ctx, core, owner, log)
  return {
    self,
    stats,
    view: core.view,
    aliases: feed.aliases,
    services: feed.services,
    servicesRefused: feed.servicesRefused,
    network: () => inputs.network ?? core.view()?.network,
    allocations: () => inputs.allocations ?? new Map(),
    refusals: core.refusals,
    pending: core.pending,
    conflict: owner.conflict,
    routes: core.routes,
    consul: () => ({ reachable: client.reach.ok === true, ...(client.reach.lastOkAt ? { lastReadAt: client.reach.lastOkAt } : {}), index: watches.lead.index, failures: client.reach.failures }),
    connectTo: () => keeper?.plan(),
    access: () => {
      const moved = renumber.state()
      return { ...access.status(core.view()), ...(moved ? { renumber: moved } : {}) }
    },
    async stop() {
      firewall.stop()
      keeper?.stop()
      owner.stop()
      await files.close()
      await watches.stop()
      await core.stop()
      await cache.flush()
    },
  }
}

/** `group move` on this node: ipam/ giving us a new address renumbers us (src/mesh/daemon/renumber.ts). */
function followMoves(opts: SyncOptions, ctx: JudgeContext, inputs: MeshInputs, log: Logger): Renumberer {
  return renumberer({
    tincDir: opts.tincDir,
    self: () => ctx.self,
    network: () => inputs.network,
    held: () => inputs.ipam,
    iface: () => interfaceOf(opts.tincDir, opts.net),
    ip: opts.ip ?? (async (args) => void (await run(['ip', ...args], { timeoutMs: 10_000 }))),
    reloadTincd: () => tincBackend().reload(opts.pidFile, log),
    ...(opts.onRenumbered ? { onRenumbered: opts.onRenumbered } : {}),
    log,
  })
}

/** The watch set that feeds the inputs, counting the bytes read, the full reads and the reads not taken. */
function startWatches(
  opts: SyncOptions,
  p: { inputs: MeshInputs; client: ConsulClient; layout: KvLayout; log: Logger; react: (name: InputName) => void; stats: SyncStats },
  onBytes: (bytes: number) => void,
) {
  const { stats } = p
  return watchInputs({
    inputs: p.inputs,
    client: p.client,
    layout: p.layout,
    net: opts.net,
    waitSeconds: opts.waitSeconds,
    nodesWatch: opts.nodesWatch ?? 'feed',
    services: opts.services !== false,
    log: p.log,
    onBytes: (b) => {
      stats.bytesRead += b
      onBytes(b)
    },
    onFullRead: (reason) => {
      stats.fullReads++
      stats.lastFullReadReason = reason
    },
    onIgnored: (reason) => {
      stats.emptyReadsIgnored++
      opts.onIgnored?.(reason)
    },
    onChange: p.react,
  })
}

/** What the judge needs besides the inputs: our identity, the pins, the keep list. */
async function judgeContext(
  opts: SyncOptions,
  p: { client: ConsulClient; layout: KvLayout; self: string; mine: { vpnAddress: string; vpnAddress6?: string; fingerprint: string } | undefined; log: Logger },
): Promise<JudgeContext> {
  const keep = opts.keepFile ? await loadKeepList(opts.keepFile) : undefined
  if (keep?.bad.length) p.log.warn({ file: opts.keepFile, lines: keep.bad }, 'the keep list has lines that are not tinc node names; ignoring them')
  return {
    client: p.client,
    layout: p.layout,
    self: { name: p.self, vpnAddress: p.mine?.vpnAddress, vpnAddress6: p.mine?.vpnAddress6, fingerprint: p.mine?.fingerprint },
    pins: await loadPins(opts.stateDir),
    keep: keep?.names ?? new Set(),
    net: opts.net,
    untilAdopted: keep?.untilAdopted ?? new Set(),
    log: p.log,
    memo: new Map(),
  }
}

interface ReactorParts {
  inputs: MeshInputs
  core: Core
  owner: OwnRecordKeeper
  feed: StateFeed
  renumber: Renumberer
  ownKey: string
  log: Logger
}

/** What each input's change sets off. */
function reactor(p: ReactorParts): (what: InputName) => Promise<void> {
  return async (what) => {
    const network = p.inputs.network
    if ((what === 'network' || what === 'aliases') && network && p.inputs.aliasItems && p.feed.setAliasItems(p.inputs.aliasItems, network.domain)) p.core.aliasesChanged()
    if (what === 'services') return p.core.servicesChanged()
    if (what === 'access') return p.core.accessChanged()
    if (what === 'aliases') return
    // The renumbering runs beside the loop: it ends in our host file changing, which publishes.
    if (what === 'ipam' || what === 'network') void p.renumber.check()
    if (what === 'network' && network) {
      p.owner.setNetwork(network)
      await p.owner.publish()
    }
    await p.core.schedule()
    const nodes = p.inputs.nodes
    if (what === 'nodes' && nodes) {
      // Our record is gone (deleted by hand, lost with a store) or someone else wrote it. Putting
      // it back is safe even after a blank read: the create-only write finds it still there.
      await p.owner.observe(nodes.keys.get(p.ownKey), !nodes.filtered && !nodes.keys.has(p.ownKey))
    }
  }
}

interface LocalWatchers {
  close(): Promise<void>
}

/**
 * Local files the daemon follows: the pin file (`tinc-consul pin reset` edits it), the keep
 * list, and our own host file (a change is published). Every watcher has an error listener: an
 * emitted error is logged, never the end of the daemon.
 */
function watchLocalFiles(opts: SyncOptions, ctx: JudgeContext, core: Core, owner: OwnRecordKeeper, log: Logger): LocalWatchers {
  const dirWatch = (dir: string, file: string, onChange: () => Promise<void>): FSWatcher | undefined => {
    try {
      // A plain directory watch filtered by name: the cache is rewritten in the state directory
      // on every change, and a watcher that rescans the directory would pay for each one.
      const w = fsWatch(dir, (_event, name) => {
        if (name === file) void onChange().catch((err: unknown) => log.error({ err, file: join(dir, file) }, 'could not reload a changed file'))
      })
      w.on('error', (err) => log.error({ err, dir }, 'watching a directory failed; changes to its files need a restart to be seen'))
      return w
    } catch (err) {
      // No such directory means no such file: nothing to follow until a restart.
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') log.warn({ err, dir }, 'cannot watch a directory; changes to its files need a restart to be seen')
      return undefined
    }
  }
  const pins = dirWatch(opts.stateDir, basename(pinsPath(opts.stateDir)), async () => {
    const fresh = await loadPins(opts.stateDir)
    if (fresh.size === ctx.pins.size && [...ctx.pins].every(([n, fp]) => fresh.get(n) === fp)) return
    ctx.pins.clear()
    for (const [n, fp] of fresh) ctx.pins.set(n, fp)
    log.info({ pins: ctx.pins.size }, 'pins changed on disk; re-checking records')
    await core.schedule()
  })
  const keepFile = opts.keepFile
  const keep = keepFile
    ? dirWatch(dirname(keepFile), basename(keepFile), async () => {
        const list = await loadKeepList(keepFile)
        const same = (a: ReadonlySet<string>, b: ReadonlySet<string> | undefined) => a.size === (b?.size ?? 0) && [...a].every((n) => b?.has(n))
        if (same(list.names, ctx.keep) && same(list.untilAdopted, ctx.untilAdopted)) return
        ctx.keep = list.names
        ctx.untilAdopted = list.untilAdopted
        log.info({ keep: [...list.names], untilAdopted: [...list.untilAdopted] }, 'the keep list changed; re-checking records')
        await core.schedule()
      })
    : undefined
  const ownHostFile = join(opts.tincDir, 'hosts', basename(ctx.self.name))
  const own = chokidarWatch(ownHostFile, { ignoreInitial: true })
  own.on('all', () => {
    log.info({ file: ownHostFile }, 'our host file changed; publishing again')
    void owner
      .publish({ reset: true })
      .then(async () => {
        // Our address and key are ours alone in the reconciler: follow them.
        const mine = await owner.own()
        ctx.self = { name: ctx.self.name, vpnAddress: mine.vpnAddress, vpnAddress6: mine.vpnAddress6, fingerprint: mine.fingerprint }
        await core.schedule()
      })
      .catch((err: unknown) => log.error({ err }, 'could not read our changed host file'))
  })
  own.on('error', (err) => log.error({ err, file: ownHostFile }, 'watching our host file failed; restart the daemon to publish changes to it'))
  return {
    close: async () => {
      pins?.close()
      keep?.close()
      await own.close()
    },
  }
}
