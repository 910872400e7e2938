import { readFileSync } from 'node:fs'
import { groupOf, mayReach, reachableGroups, type AccessPolicy } from '../mesh/access-policy.ts'
import { waitFor, type Daemon } from './daemon.ts'
import type { Lab } from './lab.ts'
import { sidecarStatus } from './sidecar.ts'

/**
 * Who reaches whom over the VPN, measured on a running lab: for every ordered pair of nodes, a TCP
 * connection to a listener on the target's VPN address and a ping, set against what an access
 * policy says (mayReach() in src/mesh/access-policy.ts), taken by takeMatrix(). Used by the groups
 * lab tests (test/lab/groups.test.ts, group-move.test.ts), which assert on it, and by `lab demo`,
 * which prints it.
 */

export interface MatrixNode {
  name: string
  /** Its IPv4 VPN address. */
  address: string
}

/** from → to → got through. */
export type Cells = Record<string, Record<string, boolean>>

export interface ReachMatrix {
  tcp: Cells
  icmp: Cells
}

/** What a pair should do: true when `from` may reach `to`. */
export type Expectation = (from: MatrixNode, to: MatrixNode) => boolean

/**
 * A listener on the node's VPN address: answers "ok" to every connection. Args: host, port. A
 * client that resets the connection (a prober exiting with connections in flight) must not kill
 * it, so socket errors are ignored.
 */
export const LISTENER = `
const [host, port] = process.argv.slice(1)
require('node:net').createServer((s) => { s.on('error', () => {}); s.end('ok') }).listen(Number(port), host, () => console.log('listening on ' + host + ':' + port))
`

/** One TCP connection that must bring back "ok" within `ms`. Shared by the scripts below (and the tests' own). */
export const CONNECT = `
const net = require('node:net')
const once = (host, port, ms) => new Promise((resolve) => {
  const s = net.connect({ host, port })
  let got = ''
  const done = (ok) => { clearTimeout(timer); s.destroy(); resolve(ok) }
  const timer = setTimeout(() => done(false), ms)
  s.on('data', (d) => { got += d; if (got === 'ok') done(true) })
  s.on('error', () => done(false))
  s.on('close', () => done(got === 'ok'))
})
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
`

/**
 * From one namespace, TCP to every target at once: up to `tries` connections of `ms` each, stopped
 * at the first that works. Retries only guard an allowed path against a packet tinc lost (it loses
 * a few around each key renewal); a dropped SYN can't succeed however often it is retried.
 */
export const TCP_MATRIX = `${CONNECT}
const { targets, port, tries, ms } = JSON.parse(process.argv[1])
;(async () => {
  const out = {}
  await Promise.all(targets.map(async (host) => {
    for (let i = 0; i < tries; i++) if (await once(host, port, ms)) return void (out[host] = true)
    out[host] = false
  }))
  process.stdout.write(JSON.stringify(out))
})()
`

/**
 * Watches paths open: prints "watching", then starts a connection of `ms` to each target every
 * `every` ms until one works, and prints "open <host> <ms>" with the start of the first that worked
 * (this machine's clock). Gives up on a target after `withinMs` ("still-closed <host>"). It ends
 * by itself once the connections still under way are over, rather than resetting them.
 */
const OPEN_WATCH = `${CONNECT}
const { targets, port, ms, every, withinMs } = JSON.parse(process.argv[1])
console.log('watching')
const deadline = Date.now() + withinMs
for (const host of targets) {
  let done = false
  const tick = () => {
    if (done) return
    if (Date.now() > deadline) { done = true; return void console.log('still-closed ' + host) }
    const t = Date.now()
    once(host, port, ms).then((ok) => { if (ok && !done) { done = true; console.log('open ' + host + ' ' + t) } })
    setTimeout(tick, every)
  }
  tick()
}
`

/** Waits until a listener (LISTENER, or a script that prints the same) says it listens. */
export async function listening(d: Daemon, what: string): Promise<void> {
  await waitFor(`${what} to listen`, async () => (readFileSync(d.logFile, 'utf8').includes('listening on') ? true : undefined), { timeoutMs: 15_000, intervalMs: 50, daemons: [d] })
}

/** A LISTENER on every node's VPN address, on `port`. */
export async function startListeners(lab: Lab, nodes: readonly MatrixNode[], port: number): Promise<void> {
  for (const n of nodes) await listening(await lab.spawn(n.name, `listener-${port}`, [process.execPath, '-e', LISTENER, n.address, String(port)]), `${n.name}'s listener`)
}

async function tcpRow(lab: Lab, from: MatrixNode, nodes: readonly MatrixNode[], port: number): Promise<Record<string, boolean>> {
  const others = nodes.filter((n) => n !== from)
  const r = await lab.exec(from.name, [process.execPath, '-e', TCP_MATRIX, JSON.stringify({ targets: others.map((n) => n.address), port, tries: 3, ms: 1000 })], { timeoutMs: 30_000 })
  const byIp = JSON.parse(r.stdout) as Record<string, boolean>
  return Object.fromEntries(others.map((n) => [n.name, byIp[n.address] === true]))
}

/** Five echo requests, 0.3 s apart, one second for the last reply: true when any came back (the same guard against loss as the TCP retries). */
const pings = async (lab: Lab, from: MatrixNode, to: MatrixNode): Promise<boolean> =>
  (await lab.exec(from.name, ['ping', '-n', '-q', '-c5', '-i0.3', '-W1', to.address], { allowFailure: true, timeoutMs: 15_000 })).code === 0

/** Takes the matrix: TCP to the listeners on `port` (startListeners) and ICMP echo, every ordered pair at once. */
async function measureMatrix(lab: Lab, nodes: readonly MatrixNode[], port: number): Promise<ReachMatrix> {
  const tcp: Cells = {}
  const icmp: Cells = {}
  await Promise.all(
    nodes.map(async (from) => {
      tcp[from.name] = await tcpRow(lab, from, nodes, port)
      const row: Record<string, boolean> = {}
      await Promise.all(nodes.filter((n) => n !== from).map(async (to) => void (row[to.name] = await pings(lab, from, to))))
      icmp[from.name] = row
    }),
  )
  return { tcp, icmp }
}

/** What `policy` says of a pair, by the nodes' VPN addresses. */
export const policyExpectation =
  (policy: AccessPolicy): Expectation =>
  (a, b) =>
    mayReach(policy, a.address, b.address)

/** A node's group under `policy`, or "(none)". */
export const groupLabel = (policy: AccessPolicy, n: MatrixNode): string => groupOf(policy, n.address)?.name ?? '(none)'

/**
 * The matrix as a table, rows reaching columns, each header "name group": "yes" when both TCP and
 * ICMP got through, "no" when neither did, and a cell that differs from `want` marked ✗.
 */
function renderMatrix(title: string, nodes: readonly MatrixNode[], m: ReachMatrix, want: Expectation, label: (n: MatrixNode) => string, port: number): string[] {
  const cell = (a: MatrixNode, b: MatrixNode): string => {
    if (a === b) return '·'
    const [tcp, icmp, w] = [m.tcp[a.name]?.[b.name], m.icmp[a.name]?.[b.name], want(a, b)]
    const got = tcp && icmp ? 'yes' : !tcp && !icmp ? 'no' : tcp ? 'tcp only' : 'icmp only'
    return got === (w ? 'yes' : 'no') ? got : `${got} ✗ (want ${w ? 'yes' : 'no'})`
  }
  const head = ['from \\ to', ...nodes.map((n) => `${n.name} ${label(n)}`)]
  const rows = nodes.map((a) => [`${a.name} ${label(a)}`, ...nodes.map((b) => cell(a, b))])
  const width = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)))
  const fmt = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(width[i] ?? 0)).join(' | ')} |`
  return [`${title} (TCP to :${port} and ICMP echo over the VPN; "yes" = both got through)`, fmt(head), fmt(width.map((w) => '-'.repeat(w))), ...rows.map(fmt)]
}

/** Every pair and protocol where the matrix differs from `want`, one line each; empty when it matches. */
function matrixDiffs(nodes: readonly MatrixNode[], m: ReachMatrix, want: Expectation): string[] {
  return nodes.flatMap((a) =>
    nodes
      .filter((b) => b !== a)
      .flatMap((b) =>
        (['tcp', 'icmp'] as const)
          .filter((p) => m[p][a.name]?.[b.name] !== want(a, b))
          .map((p) => `${a.name} → ${b.name} ${p}: got ${m[p][a.name]?.[b.name] ? 'through' : 'nothing'}, policy says ${want(a, b) ? 'reach' : 'no'}`),
      ),
  )
}

export interface TakenMatrix {
  /** The table (renderMatrix), its title saying how long the taking took. */
  lines: string[]
  /** Every pair and protocol that differs from the policy (matrixDiffs): empty when the matrix matches. */
  diffs: string[]
  /** How long the taking took. */
  ms: number
}

/**
 * The one step the groups tests and `lab demo` share: takes the matrix (listeners on `port`, see
 * startListeners), renders it against what `policy` says, each node labelled with its group, and
 * lists the cells that differ. The caller prints `lines` and judges `diffs`.
 */
export async function takeMatrix(lab: Lab, nodes: readonly MatrixNode[], policy: AccessPolicy, title: string, port: number): Promise<TakenMatrix> {
  const started = Date.now()
  const m = await measureMatrix(lab, nodes, port)
  const ms = Date.now() - started
  const want = policyExpectation(policy)
  return { lines: renderMatrix(`${title}, taken in ${ms} ms`, nodes, m, want, (n) => groupLabel(policy, n), port), diffs: matrixDiffs(nodes, m, want), ms }
}

/** What a node's status must show once it applies `policy`: the table's mode and groups, and the names it hides. */
function wantedAccess(policy: AccessPolicy, nodes: readonly MatrixNode[], n: MatrixNode) {
  const hidden = nodes
    .filter((o) => o !== n && !mayReach(policy, n.address, o.address))
    .map((o) => o.name)
    .sort()
  if (policy.groups.length === 0) return { groups: 0, associations: 0, mode: 'open', allowedGroups: undefined, hidden }
  const own = groupOf(policy, n.address)
  if (own?.infra) return { groups: policy.groups.length, associations: policy.associations.length, mode: 'open', allowedGroups: undefined, hidden }
  return { groups: policy.groups.length, associations: policy.associations.length, mode: 'enforced', allowedGroups: [...reachableGroups(policy, own?.name)].sort(), hidden }
}

/** Waits until every node's /status shows `policy` read and its table in the state the policy asks for. */
export async function waitApplied(lab: Lab, nodes: readonly MatrixNode[], policy: AccessPolicy, what: string): Promise<void> {
  await Promise.all(
    nodes.map(async (n) => {
      const want = wantedAccess(policy, nodes, n)
      let last = 'no status yet'
      await waitFor(
        `${n.name}'s status to show ${what} applied`,
        async () => {
          const a = (await sidecarStatus(lab, n.name)).access
          const got = { groups: a?.groups, associations: a?.associations, mode: a?.firewall?.mode, allowedGroups: a?.firewall?.allowedGroups, hidden: a?.hidden }
          last = JSON.stringify({ ...got, reason: a?.firewall?.reason })
          return JSON.stringify(got) === JSON.stringify(want) ? true : undefined
        },
        { timeoutMs: 60_000, intervalMs: 200 },
      ).catch((err: unknown) => {
        throw new Error(`${n.name}'s status never showed ${what} applied: want ${JSON.stringify(want)}, last seen ${last}`, { cause: err })
      })
    }),
  )
}

/** The pairs closed under `before` and open under `after`. */
export function newPaths(nodes: readonly MatrixNode[], before: Expectation, after: Expectation): Array<[MatrixNode, MatrixNode]> {
  return nodes.flatMap((a) => nodes.filter((b) => b !== a && !before(a, b) && after(a, b)).map((b): [MatrixNode, MatrixNode] => [a, b]))
}

export interface OpenWatch {
  /** Per path "from → to", when a connection over it first worked (Date.now()), or undefined when it never did within the bound. */
  opened(): Promise<Map<string, number | undefined>>
}

/**
 * Starts watching `paths` (closed now) open: one watcher per source node, connecting to the
 * listeners on `port` every 50 ms (1 s timeout each), for at most `withinMs`. Returns once every
 * watcher runs, so whatever opens the paths can start then.
 */
export async function watchOpening(lab: Lab, paths: ReadonlyArray<[MatrixNode, MatrixNode]>, port: number, withinMs: number): Promise<OpenWatch> {
  const bySource = new Map<MatrixNode, MatrixNode[]>()
  for (const [a, b] of paths) bySource.set(a, [...(bySource.get(a) ?? []), b])
  const watchers = await Promise.all(
    [...bySource].map(async ([from, to]) => {
      const args = JSON.stringify({ targets: to.map((n) => n.address), port, ms: 1000, every: 50, withinMs })
      const d = await lab.spawn(from.name, `open-watch-${port}`, [process.execPath, '-e', OPEN_WATCH, args])
      await waitFor(`${from.name}'s watcher to start`, async () => (/^watching$/m.test(readFileSync(d.logFile, 'utf8')) ? true : undefined), { timeoutMs: 15_000, intervalMs: 50, daemons: [d] })
      return { from, to, d }
    }),
  )
  const opened = async () => {
    const out = new Map<string, number | undefined>()
    for (const { from, to, d } of watchers) {
      const log = () => readFileSync(d.logFile, 'utf8')
      const settled = (n: MatrixNode) => new RegExp(`^(open|still-closed) ${n.address.replace(/\./g, '\\.')}\\b`, 'm').test(log())
      await waitFor(`${from.name}'s watcher to see ${to.map((n) => n.name).join(', ')} open`, async () => (to.every(settled) ? true : undefined), { timeoutMs: withinMs + 10_000, intervalMs: 50 })
      for (const n of to) {
        const at = new RegExp(`^open ${n.address.replace(/\./g, '\\.')} (\\d+)$`, 'm').exec(log())?.[1]
        out.set(`${from.name} → ${n.name}`, at === undefined ? undefined : Number(at))
      }
    }
    return out
  }
  return { opened }
}
