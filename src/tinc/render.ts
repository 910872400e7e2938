import { readFile, rm, stat } from 'node:fs/promises'
import { join } from 'node:path'
import type { MeshView } from '../mesh/view.ts'
import { writeFileAtomic } from '../util/atomic.ts'
import { replaceManagedBlock } from './conf-block.ts'
import { parseHostFile, renderHostFile } from './hostfile.ts'
import { isTincName } from './names.ts'

export interface RenderResult {
  written: string[]
  deleted: string[]
  connectTo: string[]
  confChanged: boolean
  /** tincd must re-read its config: ConnectTo changed, or a known peer's key or address changed, or a peer went away. */
  hupNeeded: boolean
  reasons: string[]
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
 * Renders the view into the tinc directory: `hosts/<peer>` for every peer but
 * ourselves, and the ConnectTo block in tinc.conf. Only ever touches
 * `hosts/<valid name>` and tinc.conf; never our own host file.
 */
export interface RenderOptions {
  tincDir: string
  self: string
  removed: string[]
  /**
   * What this process last wrote to each host file, and the peer object it came from.
   * A peer whose object is the same as last time (the view reuses unchanged ones) is
   * skipped without rendering or touching the disk, so an apply costs O(changes), not
   * O(peers). Empty on start, so the first render checks every file on disk.
   */
  written: Map<string, { text: string; from: object }>
}

export async function renderTinc(view: MeshView, opts: RenderOptions): Promise<RenderResult> {
  const result: RenderResult = { written: [], deleted: [], connectTo: [], confChanged: false, hupNeeded: false, reasons: [] }
  const confPath = join(opts.tincDir, 'tinc.conf')
  const conf = await readFile(confPath, 'utf8')
  const strictSubnets = hasStrictSubnets(conf)
  for (const [name, peer] of view.peers) {
    if (name === opts.self || !isTincName(name)) continue
    const last = opts.written.get(name)
    if (last?.from === peer) continue
    const path = join(opts.tincDir, 'hosts', name)
    const text = renderHostFile({ addresses: peer.record.addresses, port: peer.record.port, subnets: peer.record.subnets, options: peer.options, publicKey: peer.publicKey })
    if (last?.text === text) {
      last.from = peer
      continue
    }
    const old = await readFile(path, 'utf8').catch(() => undefined)
    const changed = await writeFileAtomic(path, text, 0o644, { durable: false })
    opts.written.set(name, { text, from: peer })
    if (changed) {
      result.written.push(name)
      if (old !== undefined && identity(old) !== identity(text)) {
        result.hupNeeded = true
        result.reasons.push(`${name}'s key or address changed`)
      } else if (old === undefined && strictSubnets) {
        // tincd reads a new peer's key when it connects, but with StrictSubnets it only
        // routes subnets it loaded from host files at start or HUP: without a HUP the
        // new peer connects and its traffic is dropped as an unauthorized subnet.
        result.hupNeeded = true
        result.reasons.push(`new peer ${name} (StrictSubnets)`)
      }
    }
  }
  for (const name of opts.removed) {
    if (name === opts.self || !isTincName(name)) continue
    opts.written.delete(name)
    try {
      await rm(join(opts.tincDir, 'hosts', name))
      result.deleted.push(name)
      result.hupNeeded = true
      result.reasons.push(`${name} was removed`)
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
    }
  }
  result.connectTo = [...view.peers.values()]
    .filter((p) => p.record.name !== opts.self && p.record.addresses.length > 0)
    .map((p) => p.record.name)
    .sort()
  const next = replaceManagedBlock(conf, result.connectTo.map((n) => `ConnectTo = ${n}`))
  if (next !== conf && (await writeFileAtomic(confPath, next, (await stat(confPath)).mode & 0o7777))) {
    result.confChanged = true
    result.hupNeeded = true
    result.reasons.push('the ConnectTo set changed')
  }
  return result
}
