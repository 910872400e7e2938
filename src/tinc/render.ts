import { readFile, readdir, rm, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { networkMode, type AcceptedPeer } from '../mesh/record.ts'
import type { MeshView } from '../mesh/view.ts'
import { writeFileAtomic } from '../util/atomic.ts'
import { replaceManagedBlock } from './conf-block.ts'
import { parseHostFile, renderHostFile } from './hostfile.ts'
import { confMode, DEFAULT_TINC_MODE, peerSubnets, type TincMode } from './mode.ts'
import { isTincName } from './names.ts'

export interface RenderResult {
  written: string[]
  deleted: string[]
  connectTo: string[]
  confChanged: boolean
  /** tincd must re-read its config: ConnectTo changed, or a known peer's key or address changed, or a peer went away. */
  hupNeeded: boolean
  reasons: string[]
  /**
   * tinc.conf's Mode when it differs from the network's. Mode sits outside the managed block and
   * takes a restart of tincd (setup.ts), so the renderer reports it rather than rewriting it.
   */
  modeMismatch?: { conf: string; network: TincMode }
}

/** What tincd cares about in a host file: if this changes for a known peer, tinc needs a HUP. */
function identity(text: string): string {
  const h = parseHostFile(text)
  const pick = (k: string) => h.entries.filter((e) => e.key.toLowerCase() === k).map((e) => e.value)
  return JSON.stringify([h.publicKey, pick('address'), pick('port'), pick('subnet')])
}

/** Whether tinc.conf turns on StrictSubnets (tinc's boolean syntax: yes/no, case-insensitive). */
export function hasStrictSubnets(conf: string): boolean {
  return parseHostFile(conf).entries.some((e) => e.key.toLowerCase() === 'strictsubnets' && /^yes$/i.test(e.value))
}

/**
 * A peer's host file, exactly as the daemon writes it: from the record's validated fields
 * only, never its text. `init` and `join` write the same bytes, so the daemon's first
 * render of a peer they wrote changes nothing. A record with an IPv6 address adds its /128 as a
 * second Subnet line, and each served route behind the peer (src/mesh/routes.ts) one more. In switch mode it has no Subnet line (the record still carries the
 * addresses, for DNS and the address table): tincd learns MACs instead.
 */
export function hostFileText(peer: Pick<AcceptedPeer, 'record' | 'publicKey' | 'options'>, mode: TincMode = DEFAULT_TINC_MODE, routes: readonly string[] = []): string {
  const { addresses, port, subnets, vpnAddress6 } = peer.record
  // The IPv6 /128 lives in its own field (record.ts says why) and becomes the second Subnet line here;
  // `routes` are the subnets behind the peer that judgeRoutes serves (announced and approved), never the record's own list.
  const all = [...subnets, ...(vpnAddress6 ? [`${vpnAddress6}/128`] : []), ...routes]
  return renderHostFile({ addresses, port, subnets: peerSubnets(mode, all), options: peer.options, publicKey: peer.publicKey })
}

/**
 * Renders the view into the tinc directory. The renderer owns `hosts/`: it writes
 * `hosts/<peer>` for every peer in the view, deletes the files of names that left it,
 * and, once a complete read has shown what the mesh is (`prune`), deletes every other
 * file named like a node. It never touches our own host file, the operator's kept
 * names, files not named like a node (`tinc-up`, `x-down`, temp and dot files) or
 * directories. The ConnectTo block in tinc.conf lists the view's public peers.
 */
export interface RenderOptions {
  tincDir: string
  self: string
  /** Peers the operator keeps by hand (`<net>.keep`): never written, never deleted. */
  keep: ReadonlySet<string>
  /** Names whose files must go (the reconciler's `removed`). */
  removed: readonly string[]
  /** Delete every node-named file not in the view: only after a complete read since start. */
  prune: boolean
  /**
   * Listed names that could not be judged yet (the reconciler's `pending`): their files are
   * never deleted, even when pruning ("unreadable" is not "gone"). One still in the view with
   * the copy accepted before is written like any other peer.
   */
  pending?: ReadonlySet<string> | readonly string[]
  /**
   * What this process last wrote to each host file, and the peer object it came from.
   * A peer whose object is the same as last time (the reconciler reuses unchanged ones) is
   * skipped without rendering or touching the disk, so an apply costs O(changes), not
   * O(peers). Empty on start, so the first render checks every file on disk. The mode it was
   * rendered for is kept too: a peer's file depends on the network's mode as well as its record.
   */
  written: Map<string, { text: string; from: object; mode?: TincMode; routes?: string }>
  /**
   * The routes behind each peer that are served (src/mesh/routes.ts: announced, approved, no
   * overlap), rendered as extra Subnet lines. Absent or missing a name: none for that peer.
   */
  routes?: ReadonlyMap<string, readonly string[]>
  /** Which of the public peers get a ConnectTo (src/mesh/connect-to.ts); every one when absent. */
  chooseConnectTo?(publics: readonly string[]): string[]
}

export async function renderTinc(view: MeshView, opts: RenderOptions): Promise<RenderResult> {
  const result: RenderResult = { written: [], deleted: [], connectTo: [], confChanged: false, hupNeeded: false, reasons: [] }
  const confPath = join(opts.tincDir, 'tinc.conf')
  const conf = await readFile(confPath, 'utf8')
  const pending = new Set(opts.pending ?? [])
  if (confMode(conf) !== networkMode(view.network)) result.modeMismatch = { conf: confMode(conf), network: networkMode(view.network) }
  // Never ours, never the operator's, never a name that is not a tinc node name.
  const untouchable = (name: string) => name === opts.self || opts.keep.has(name) || !isTincName(name)
  await writeHostFiles(view, opts, untouchable, hasStrictSubnets(conf), result)
  const spare = (name: string) => untouchable(name) || pending.has(name) || view.peers.has(name)
  const removed = new Set(opts.removed)
  const reason = (name: string) => (removed.has(name) ? `${name} was removed` : `${name} is not in the mesh`)
  // Pruning covers every removed name that still has a file, without asking for the others.
  const doomed = opts.prune ? await nodeFiles(join(opts.tincDir, 'hosts')) : [...removed]
  for (const name of doomed) if (!spare(name)) await removeHostFile(name, reason(name), opts, result)
  // A removed name whose file someone else deleted must be written again if it comes back.
  for (const name of removed) if (!spare(name)) opts.written.delete(name)
  const publics = [...view.peers.values()]
    .filter((p) => !untouchable(p.record.name) && p.record.addresses.length > 0)
    .map((p) => p.record.name)
    .sort()
  const chosen = opts.chooseConnectTo ? [...opts.chooseConnectTo(publics)].sort() : publics
  // A ConnectTo the operator wrote outside the block is not repeated in it: tincd 1.0 would open a
  // second meta connection to that node and close the first, and that churn can leave a peer
  // holding a stale session key, dropping our packets until KeyExpire.
  const theirs = operatorConnectTo(conf)
  result.connectTo = chosen.filter((n) => !theirs.has(n))
  const next = replaceManagedBlock(
    conf,
    result.connectTo.map((n) => `ConnectTo = ${n}`),
  )
  if (next !== conf && (await writeFileAtomic(confPath, next, (await stat(confPath)).mode & 0o7777))) {
    result.confChanged = true
    result.hupNeeded = true
    result.reasons.push('the ConnectTo set changed')
  }
  return result
}

/** The nodes tinc.conf lists in ConnectTo lines outside our block. */
export function operatorConnectTo(conf: string): Set<string> {
  let outside: string
  try {
    outside = replaceManagedBlock(conf, undefined)
  } catch {
    outside = conf
  }
  return new Set(
    parseHostFile(outside)
      .entries.filter((e) => e.key.toLowerCase() === 'connectto')
      .map((e) => e.value.trim()),
  )
}

async function writeHostFiles(view: MeshView, opts: RenderOptions, untouchable: (name: string) => boolean, strictSubnets: boolean, result: RenderResult): Promise<void> {
  const mode = networkMode(view.network)
  for (const [name, peer] of view.peers) {
    if (untouchable(name)) continue
    const last = opts.written.get(name)
    const served = opts.routes?.get(name) ?? []
    const routes = served.join(' ')
    if (last?.from === peer && last.mode === mode && last.routes === routes) continue
    const path = join(opts.tincDir, 'hosts', name)
    const text = hostFileText(peer, mode, served)
    if (last?.text === text) {
      Object.assign(last, { from: peer, mode, routes })
      continue
    }
    // What we wrote last is what is there (hosts/ is ours); only a first write reads the disk.
    const old = last ? last.text : await readFile(path, 'utf8').catch(() => undefined)
    const changed = await writeFileAtomic(path, text, 0o644, { durable: false })
    opts.written.set(name, { text, from: peer, mode, routes })
    if (!changed) continue
    result.written.push(name)
    if (old !== undefined && identity(old) !== identity(text)) {
      result.hupNeeded = true
      result.reasons.push(`${name}'s key, address or subnets changed`)
    } else if (old === undefined && strictSubnets) {
      // tincd reads a new peer's key when it connects, but with StrictSubnets it only
      // routes subnets it loaded from host files at start or HUP: without a HUP the
      // new peer connects and its traffic is dropped as an unauthorized subnet.
      result.hupNeeded = true
      result.reasons.push(`new peer ${name} (StrictSubnets)`)
    }
  }
}

async function removeHostFile(name: string, reason: string, opts: RenderOptions, result: RenderResult): Promise<void> {
  opts.written.delete(name)
  try {
    await rm(join(opts.tincDir, 'hosts', name))
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return
    throw err
  }
  result.deleted.push(name)
  result.hupNeeded = true
  result.reasons.push(reason)
}

/** Regular files and symlinks in hosts/ named like a node (dot and temp files never are); directories are left alone. */
async function nodeFiles(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { withFileTypes: true }).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return []
    throw err
  })
  return entries
    .filter((e) => (e.isFile() || e.isSymbolicLink()) && isTincName(e.name))
    .map((e) => e.name)
    .sort()
}
