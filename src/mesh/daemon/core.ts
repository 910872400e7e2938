import type { Logger } from '../../log.ts'
import { renderTinc, type RenderOptions, type RenderResult } from '../../tinc/render.ts'
import { tincBackend } from '../../tinc/backend.ts'
import type { CachedView } from '../cache.ts'
import { checkPeer, type AcceptedPeer, type NetworkRecord, type NodeRecord } from '../record.ts'
import { savePins } from '../pins.ts'
import { applyAdoption, readHandMadeFiles } from '../adoption.ts'
import type { Refusal } from '../reconcile.ts'
import { viewRecords, type MeshView } from '../view.ts'
import type { CacheWriter } from './cache-writer.ts'
import { routeFollower, type RouteFollower } from './routes-follow.ts'
import { approvalKeySuffix, type Approval, type RouteJudgement } from '../routes.ts'
import type { MeshInputs } from './inputs.ts'
import { cacheInput, consulInput, judge, type JudgeContext, type Judgement } from './judge.ts'
import type { StateFeed } from './state-feed.ts'
import type { AccessFollower } from './access-follow.ts'

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
  /** Reads of every record: at start, and whenever the change log could not say what changed. */
  fullReads: number
  lastFullReadReason?: string
  applies: number
  hups: number
}

export interface CoreOptions {
  tincDir: string
  pidFile: string
  stateDir: string
  log: Logger
  ctx: JudgeContext
  inputs: MeshInputs
  feed: StateFeed
  cache: CacheWriter
  stats: SyncStats
  /** Body bytes read from Consul since the last apply (and resets the count). */
  takeBytes(): number
  /** Our own record, from our host file; undefined while it can't be built. */
  own(): Promise<NodeRecord | undefined>
  onApplied?(event: AppliedEvent): void
  /** Which of the public peers to ConnectTo (the keeper's choice); all of them when absent. */
  chooseConnectTo?(publics: readonly string[]): string[]
  /** The access policy's follower: what DNS may answer, and the nftables table (src/mesh/daemon/access-follow.ts). */
  access?: AccessFollower
}

export interface Core {
  view(): MeshView | undefined
  refusals(): ReadonlyMap<string, string>
  /** Names listed in Consul whose record could not be read (their last good copy stays), or can't be judged yet. */
  pending(): readonly string[]
  /** Judge and render from Consul's inputs, after any apply in progress. */
  schedule(): Promise<void>
  applyCache(cached: CachedView): Promise<void>
  /** The aliases changed: feed DNS and the cache. */
  aliasesChanged(): void
  /** The services changed: feed DNS. */
  servicesChanged(): void
  /** The access policy changed: feed DNS what it may answer, and load the table. */
  accessChanged(): Promise<void>
  /** The routes behind nodes as last judged (src/mesh/routes.ts), and approvals under subnet-approvals/ that could not be used. */
  routes(): { judgement: RouteJudgement | undefined; refusedApprovals: ReadonlyArray<{ key: string; reason: string }> }
  stop(): Promise<void>
}

/** How soon new keys held back by a failed revoked/ read are judged again. */
const RETRY_MS = 1000

/** What the core has rendered so far. */
interface CoreState {
  /** What the reconciler accepted: peers only, the previous view for the next judgement. */
  judged: MeshView | undefined
  /** What DNS and status read: the judged peers plus this node, from its own files. */
  view: MeshView | undefined
  refusals: Map<string, string>
  pending: string[]
  /** hosts/ belongs to the renderer only once a complete listing has said who exists. */
  owned: boolean
  /** The last judgement from Consul: what the cache holds. */
  last: Judgement | undefined
  /** The route approvals the cache was last given, by key (approvalKeys). */
  cachedApprovals?: ReadonlySet<string>
  written: RenderOptions['written']
  /** The tinc.conf/network mode disagreement last logged, so it is logged once, not per apply. */
  modeMismatch?: string
  /** Our own record as a peer, for the view DNS and status read. */
  self?: { record: NodeRecord; network: NetworkRecord; peer: AcceptedPeer | undefined }
  /** Routes behind nodes: the last judgement, and our own routes and masquerade (src/mesh/daemon/routes-follow.ts). */
  routing: RouteFollower
  /** Names kept until adopted whose file we have rendered: adopted for good, so their files aren't read again. */
  adopted: Set<string>
}

/**
 * The daemon's core step: inputs → reconciler → renderers (host files and the tinc.conf block,
 * tincd's reload, the DNS feed, the cache). Applies run one at a time, each from the latest inputs.
 */
export function meshCore(o: CoreOptions): Core {
  const st: CoreState = {
    judged: undefined,
    view: undefined,
    refusals: new Map(),
    pending: [],
    owned: false,
    last: undefined,
    written: new Map(),
    routing: routeFollower(o.ctx.net ?? 'tinc', o.log),
    adopted: new Set(),
  }
  let memoNetwork = ''
  let retry: NodeJS.Timeout | undefined
  let stopped = false

  const applyConsul = async () => {
    const input = consulInput(o.inputs, o.ctx)
    if (!input || stopped) return
    // Decoding results depend on the network's range: a new network record starts afresh.
    if (JSON.stringify(input.network) !== memoNetwork) {
      o.ctx.memo.clear()
      memoNetwork = JSON.stringify(input.network)
    }
    const j = await judge(st.judged, input, o.ctx, true)
    await commit(o, st, j, 'consul')
    clearTimeout(retry)
    if (j.retry && !stopped) retry = setTimeout(() => void schedule(), RETRY_MS)
  }
  let chain = Promise.resolve()
  const schedule = () => {
    chain = chain.then(applyConsul).catch((err: unknown) => o.log.error({ err }, 'applying the mesh view failed; keeping the files as they are'))
    return chain
  }

  return {
    view: () => st.view,
    refusals: () => st.refusals,
    pending: () => st.pending,
    schedule,
    routes: () => ({ judgement: st.routing.judgement(), refusedApprovals: o.inputs.approvals?.refused ?? [] }),
    applyCache: async (c) => {
      o.feed.setAliases(c.aliases ?? [])
      st.routing.setCachedApprovals(c.approvals)
      await commit(o, st, await judge(undefined, cacheInput(c, o.ctx), o.ctx, false), 'cache')
    },
    aliasesChanged: () => {
      const last = st.last
      if (last) o.cache.set(() => cachedView(last, o.feed, st.routing.approvals()))
      emitState(o, st)
    },
    servicesChanged: () => emitState(o, st),
    accessChanged: async () => {
      emitState(o, st)
      await o.access?.apply()
    },
    stop: async () => {
      stopped = true
      clearTimeout(retry)
      await chain
    },
  }
}

/** One judgement made real: pins, host files and the ConnectTo block, tincd's reload, DNS, the cache. */
async function commit(o: CoreOptions, st: CoreState, j: Judgement, source: AppliedEvent['source']): Promise<void> {
  const { ctx, log } = o
  // Hand-made peers not adopted yet keep their files, and a record with another key than theirs is
  // refused: left out of what is rendered, served and pinned (src/mesh/adoption.ts).
  const waiting = new Set([...(ctx.untilAdopted ?? [])].filter((n) => !st.adopted.has(n)))
  const files = await readHandMadeFiles(o.tincDir, ctx.self.name, waiting)
  for (const [name, f] of files) if (f?.rendered) st.adopted.add(name)
  const adoption = applyAdoption(j.view, files)
  const handMadeRefusals = [...adoption.handMade].flatMap(([name, h]): Refusal[] => (h.refused ? [{ key: ctx.layout.node(name), name, reason: h.reason, kind: 'ownership' }] : []))
  // A read that failed is not a refusal of the record: it is counted apart, as unreadable.
  noteRefusals(o, st, [...j.refusals.filter((r) => r.kind !== 'unreadable'), ...handMadeRefusals])
  const unreadable = j.refusals.flatMap((r) => (r.kind === 'unreadable' && r.name ? [r.name] : []))
  const newPins = j.newPins.filter(([name]) => !adoption.handMade.has(name))
  for (const [name, fp] of newPins) ctx.pins.set(name, fp)
  if (newPins.length) await savePins(o.stateDir, ctx.pins)
  const keep = adoption.handMade.size ? new Set([...ctx.keep, ...adoption.handMade.keys()]) : ctx.keep
  if (source === 'consul' && j.complete) st.owned = true
  const routes = st.routing.judge(j.network, j.view, await o.own(), o.inputs.approvals)
  // At start, DNS answers from the cache before a thousand host files are checked: names don't wait on tinc's files.
  if (source === 'cache') {
    st.view = await withSelf(adoption.view, o, st)
    emitState(o, st)
  }
  // A name that is listed but can't be judged yet keeps its file: "unreadable" is not "gone".
  const render = await renderTinc(adoption.view, {
    tincDir: o.tincDir,
    self: ctx.self.name,
    keep,
    pending: j.pending,
    removed: j.removed,
    prune: st.owned,
    written: st.written,
    routes,
    chooseConnectTo: o.chooseConnectTo,
  })
  const mismatch = render.modeMismatch && `${render.modeMismatch.conf}/${render.modeMismatch.network}`
  if (mismatch && mismatch !== st.modeMismatch) log.warn(render.modeMismatch, "tinc.conf sets another Mode than the network's: set it (outside the managed block) and restart tincd")
  st.modeMismatch = mismatch
  st.judged = j.view
  st.view = await withSelf(adoption.view, o, st)
  st.pending = [...new Set([...j.pending, ...unreadable])].sort()
  o.stats.applies++
  if (render.written.length || render.deleted.length) log.info({ written: render.written, deleted: render.deleted }, 'host files updated')
  if (await st.routing.followOwn(o.tincDir, ctx.self.name, j.network)) Object.assign(render, { hupNeeded: true, reasons: [...render.reasons, 'our own routes changed'] })
  if (render.hupNeeded) {
    log.info({ reasons: render.reasons }, 'asking tincd to reload')
    if (await tincBackend().reload(o.pidFile, log)) o.stats.hups++
  }
  o.onApplied?.({ source, render, refusals: j.refusals, bytesRead: o.takeBytes() })
  emitState(o, st)
  await o.access?.apply()
  if (source !== 'consul') return
  const soon = takesTrustAway(st.last, j, st.cachedApprovals, st.routing.approvals())
  st.last = j
  st.cachedApprovals = approvalKeys(st.routing.approvals())
  o.cache.set(() => cachedView(j, o.feed, st.routing.approvals()), soon ? 'soon' : 'later')
}

/** DNS and the hosts block get the peers this node may reach (all of them in an open mesh). */
function emitState(o: CoreOptions, st: CoreState): void {
  o.feed.emit(st.view && o.access ? o.access.visible(st.view) : st.view, o.inputs.services)
}

/** Approvals by what they approve: a node's route (its key under subnet-approvals/). */
const approvalKeys = (approvals: readonly Approval[] | undefined): ReadonlySet<string> => new Set((approvals ?? []).map((a) => approvalKeySuffix(a.node, a.cidr)))

/**
 * Whether a judgement removes what the last one trusted: a peer, an unrevoked key, an approved
 * route. Revocations and approvals are compared by key, not counted: one approval withdrawn while
 * another is given keeps the count and still takes trust away.
 */
export function takesTrustAway(
  before: Pick<Judgement, 'revoked'> | undefined,
  after: Pick<Judgement, 'removed' | 'revoked'>,
  approvalsBefore: ReadonlySet<string> | undefined,
  approvalsAfter: readonly Approval[] | undefined,
): boolean {
  if (after.removed.length > 0 || [...(after.revoked ?? [])].some((fp) => !before?.revoked?.has(fp))) return true
  const now = approvalKeys(approvalsAfter)
  return [...(approvalsBefore ?? [])].some((key) => !now.has(key))
}

/**
 * The view with this node in it, as its own files describe it: DNS answers our own name and
 * status shows our address before (and whatever) Consul says about us. Never rendered as a host file.
 */
async function withSelf(view: MeshView, o: CoreOptions, st: CoreState): Promise<MeshView> {
  const own = await o.own()
  if (!own) return view
  // Checked once per own record and network, not at every apply: it parses and hashes the key.
  if (st.self?.record !== own || st.self.network !== view.network) {
    const checked = checkPeer(own, { network: view.network, keyName: own.name })
    st.self = { record: own, network: view.network, peer: checked.ok ? { ...checked.value, createIndex: 0 } : undefined }
  }
  const peer = st.self.peer
  return peer ? { network: view.network, peers: new Map([...view.peers, [own.name, peer]]) } : view
}

/** Counts and logs a refusal when its reason first appears, not at every apply. */
function noteRefusals(o: CoreOptions, st: CoreState, list: Refusal[]): void {
  for (const r of list) {
    if (st.refusals.get(r.key) === r.reason) continue
    o.stats.refusedTotal++
    o.log.warn({ key: r.key, peer: r.name, reason: r.reason, kind: r.kind }, 'refused a record from consul')
  }
  st.refusals = new Map(list.map((r) => [r.key, r.reason]))
}

function cachedView(j: Judgement, feed: StateFeed, approvals: Approval[] | undefined): CachedView {
  return {
    network: j.network,
    records: viewRecords(j.view),
    aliases: feed.aliases(),
    seniority: Object.fromEntries([...j.view.peers].map(([n, p]) => [n, p.createIndex])),
    ...(j.allocations ? { allocations: Object.fromEntries(j.allocations) } : {}),
    ...(j.revoked ? { revoked: [...j.revoked].sort() } : {}),
    ...(approvals ? { approvals } : {}),
  }
}
