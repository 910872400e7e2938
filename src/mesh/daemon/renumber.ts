import { readFile, stat } from 'node:fs/promises'
import { basename, join } from 'node:path'
import type { Logger } from '../../log.ts'
import { writeFileAtomic } from '../../util/atomic.ts'
import type { HeldAddress } from '../ipam.ts'
import type { OwnIdentity } from '../reconcile.ts'
import type { NetworkRecord } from '../record.ts'
import { planRenumber, renumberHostFile, renumberScript, type Renumbering } from '../renumber.ts'

/** The hook scripts that may name our address: init and join write it into tinc-up and tinc-down. */
const SCRIPTS = ['tinc-up', 'tinc-down']

export interface RenumberState {
  from: string
  to: string
  from6?: string
  to6?: string
  state: 'done' | 'failed'
  /** What went wrong, and what an operator does about it. */
  reason?: string
  /** When the move was made or tried (ISO 8601). */
  at: string
}

export interface RenumberOptions {
  tincDir: string
  self(): OwnIdentity
  network(): NetworkRecord | undefined
  /** ipam/ as last read; undefined before the first good read. */
  held(): ReadonlyMap<string, HeldAddress> | undefined
  iface(): Promise<string>
  /** Runs `ip ARGS` (the address on the tinc interface); throws on failure. */
  ip(args: string[]): Promise<void>
  reloadTincd(): Promise<unknown>
  /** Our addresses changed: the parts bound to the old ones (DNS, status, services) start again. */
  onRenumbered?(r: Renumbering): void
  log: Logger
}

export interface Renumberer {
  /** Compares ipam/ with our addresses and moves when they differ. Never throws; one move at a time. */
  check(): Promise<void>
  /** The latest move this daemon made or tried, for status. */
  state(): RenumberState | undefined
}

/**
 * Follows `group move` on this node (src/mesh/renumber.ts): when ipam/ gives this node a newer
 * address than the one it uses, the daemon rewrites its own host file and hook scripts, swaps the
 * address on the tinc interface, and has tincd reload (StrictSubnets re-reads our Subnet lines and
 * announces the change). Our host file changing makes the daemon publish the new record. A move
 * that fails half-way is retried on the next ipam/ change; the files are written first, so a
 * restart of tincd finishes it in any case.
 */
export function renumberer(o: RenumberOptions): Renumberer {
  const log = o.log.child({ component: 'renumber' })
  let last: RenumberState | undefined
  let running: Promise<void> = Promise.resolve()
  const once = async () => {
    const held = o.held()
    const network = o.network()
    if (!held || !network) return
    const plan = planRenumber(held, o.self(), network)
    // Our identity follows our host file a moment after we rewrite it: until then, the move made is not made again.
    if (!plan || (last?.state === 'done' && last.from === plan.from && last.to === plan.to && last.to6 === plan.to6)) return
    log.warn(plan, 'ipam/ gives this node a new address (`tinc-consul group move`): renumbering')
    const at = new Date().toISOString()
    const fail = (err: unknown, what: string) => {
      last = { ...plan, state: 'failed', reason: err instanceof Error ? err.message : String(err), at }
      log.error({ err, ...plan }, what)
    }
    try {
      await rewriteFiles(o.tincDir, o.self().name, plan)
    } catch (err) {
      return fail(err, 'could not renumber this node: its files are as they were; retried on the next ipam/ change')
    }
    last = { ...plan, state: 'done', at }
    try {
      await swapAddresses(o, plan, network)
      await o.reloadTincd()
      log.warn(plan, 'renumbered: tincd announces the new address and our record follows')
    } catch (err) {
      fail(err, 'renumbered the files, but not the interface or tincd: restarting tincd finishes the move (tinc-up sets the new address)')
    }
    // Our files name the new address now, whatever became of the interface: the parts follow them.
    o.onRenumbered?.(plan)
  }
  return {
    check() {
      // A network record with an unusable range (the schema takes any prefix) must not end the daemon.
      running = running.then(once).catch((err: unknown) => log.error({ err }, 'could not compare ipam/ with our addresses; tried again on the next change'))
      return running
    },
    state: () => last,
  }
}

/**
 * Our host file and hook scripts with the new addresses. Nothing is written unless the host file
 * has our Subnet lines and tinc-up, when there is one, names our address: a tinc-up that sets the
 * address some other way would bring the old one back at the next start of tincd.
 */
async function rewriteFiles(tincDir: string, name: string, plan: Renumbering): Promise<void> {
  const hostPath = join(tincDir, 'hosts', basename(name))
  const host = renumberHostFile(await readFile(hostPath, 'utf8'), plan)
  if (host.missing !== undefined) throw new Error(`${hostPath} has no "Subnet = ${host.missing}" line: edit it and tinc-up by hand, or re-join the node`)
  const scripts: Array<[string, string, number]> = []
  for (const script of SCRIPTS) {
    const path = join(tincDir, script)
    const text = await readFile(path, 'utf8').catch(() => undefined)
    if (text === undefined) continue
    const next = renumberScript(text, plan)
    if (next.count > 0) scripts.push([path, next.text, (await stat(path)).mode & 0o7777])
    // Naming the new address already is a move cut short after this write: finish it.
    else if (script === 'tinc-up' && renumberScript(text, { from: plan.to, to: plan.to }).count === 0)
      throw new Error(`${path} doesn't name ${plan.from}, so it would set the old address again: make it set ${plan.to} by hand`)
  }
  // Scripts first: a crash between the writes leaves tinc-up setting the new address while the
  // host file still names the old one, and the next check finishes the move.
  for (const [path, text, mode] of scripts) await writeFileAtomic(path, text, mode)
  await writeFileAtomic(hostPath, host.text, (await stat(hostPath)).mode & 0o7777)
}

/**
 * The new address on the interface before the old one goes, so the interface always has one. Then
 * the new one once more: with promote_secondaries off (the kernel's default in a fresh namespace),
 * removing the old primary address removes the new one too.
 */
async function swapAddresses(o: RenumberOptions, plan: Renumbering, network: NetworkRecord): Promise<void> {
  const dev = await o.iface()
  const bits = network.cidr.split('/')[1] ?? '32'
  const swap = async (add: string[], del: string[], old: string) => {
    await addOrKeep(o, add)
    await o.ip(del).catch((err: unknown) => o.log.warn({ err, dev }, `the old address ${old} was not on ${dev}`))
    await addOrKeep(o, add)
  }
  await swap(['addr', 'add', `${plan.to}/${bits}`, 'dev', dev], ['addr', 'del', `${plan.from}/${bits}`, 'dev', dev], plan.from)
  if (plan.from6 === undefined || plan.to6 === undefined) return
  await swap(['-6', 'addr', 'add', `${plan.to6}/64`, 'dev', dev, 'nodad'], ['-6', 'addr', 'del', `${plan.from6}/64`, 'dev', dev], plan.from6)
}

/** `ip addr add`, where an address already there (a move retried) is fine. */
async function addOrKeep(o: RenumberOptions, args: string[]): Promise<void> {
  await o.ip(args).catch((err: unknown) => {
    if (!/File exists/i.test(err instanceof Error ? err.message : String(err))) throw err
  })
}
