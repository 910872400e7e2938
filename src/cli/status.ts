import { defineCommand } from 'citty'
import { TincConsulError } from '../errors.ts'
import type { NodeStatus, Status } from '../status/model.ts'
import { DEFAULT_STATUS_PORT } from '../status/server.ts'
import { writeFileAtomic } from '../util/atomic.ts'
import { printable } from '../util/text.ts'
import { consulArgs } from './common.ts'
import { described, envDefault } from './env.ts'
import { parseIntFlag } from './parse.ts'
import { alignRows } from './table.ts'

const statusArgs = {
  // Only so the network's env file (its status port) is loaded.
  net: consulArgs.net,
  'config-dir': consulArgs['config-dir'],
  server: { type: 'string', description: described('Where the daemon serves status', 'status-server'), default: envDefault('status-server', '127.0.0.1') },
  'status-port': { type: 'string', description: described('Its port', 'status-port'), default: envDefault('status-port', String(DEFAULT_STATUS_PORT)) },
} as const

async function fetchFrom(args: { server: string; 'status-port': string }, path: string): Promise<Response> {
  const port = parseIntFlag('status-port', args['status-port'], 1, 65535)
  const url = `http://${args.server.includes(':') ? `[${args.server}]` : args.server}:${port}${path}`
  try {
    return await fetch(url, { signal: AbortSignal.timeout(10_000) })
  } catch (err) {
    throw new TincConsulError('STATUS_UNREACHABLE', `cannot reach the daemon's status server at ${url} (${(err as Error).message}); is \`tinc-consul run\` running, with status on?`, { cause: err })
  }
}

async function fetchStatus(args: { server: string; 'status-port': string }): Promise<Status> {
  const res = await fetchFrom(args, '/status')
  if (!res.ok) throw new TincConsulError('STATUS_HTTP', `the status server answered ${res.status}`)
  return (await res.json()) as Status
}

export function humanBytes(n: number | undefined): string {
  if (n === undefined) return '-'
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let v = n
  let i = 0
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024
    i++
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`
}

export function ago(iso: string | undefined, now: number): string {
  if (!iso) return '-'
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000))
  if (s < 60) return `${s}s ago`
  if (s < 3600) return `${Math.floor(s / 60)}m ago`
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`
  return `${Math.floor(s / 86400)}d ago`
}

const ANSI = { green: '\x1b[32m', yellow: '\x1b[33m', red: '\x1b[31m', dim: '\x1b[2m', bold: '\x1b[1m', reset: '\x1b[0m' } as const

const pathText = (n: NodeStatus) => (n.path === 'relayed' ? `relay via ${n.via ?? '?'}` : n.path === 'self' ? 'this node' : n.path)

const conflictText = (c: NonNullable<Status['node']['nameConflict']>) =>
  `another daemon writes a different record under this node's name (ours ${c.ours.slice(0, 19)}…, theirs ${c.theirs.slice(0, 19)}…)${c.gaveUp ? `; gave up rewriting it after ${c.attempts} tries: stop the other machine or rename one, then restart this daemon` : `; rewrite ${c.attempts}`}`

/** tinc.conf outside the managed block is the operator's, so this is said, not fixed. */
const modeMismatchText = (conf: string, network: string | undefined) =>
  `tinc.conf sets Mode = ${conf}, but the network is in ${network ?? '?'} mode: set Mode = ${network ?? '?'}${network === 'switch' ? ' and DeviceType = tap' : ''} in tinc.conf and restart tincd`

/** This node's definitions the registrar refused, by file. */
const localRefusedText = (l: NonNullable<Status['localServices']>) =>
  `${l.refused.length} of this node's services not registered (${l.registered} registered, cap ${l.max}): ${l.refused.map((r) => `${r.file}: ${r.reason}`).join('; ')}`

/** The table people read: one line per node, colour only on a terminal. */
export function renderStatus(s: Status, opts: { colour: boolean; now?: number }): string {
  const now = opts.now ?? Date.parse(s.at)
  const paint = (c: keyof typeof ANSI, t: string) => (opts.colour ? `${ANSI[c]}${t}${ANSI.reset}` : t)
  const tincd = s.tincd.state === 'up' ? paint('green', `tincd up (pid ${s.tincd.pid ?? '?'})`) : paint('red', `tincd ${s.tincd.state}: ${s.tincd.reason ?? ''}`.trim())
  // A blocking query answers only when something changes: while Consul is reachable, "last answer" says nothing.
  const consul = s.consul.reachable
    ? paint('green', `consul ok (index ${s.consul.index})`)
    : paint('red', `consul unreachable${s.consul.lastSyncAt ? `, last answer ${ago(s.consul.lastSyncAt, now)}` : ''}`)
  const head = [
    `${paint('bold', s.node.name)} ${s.node.address ?? ''}${s.node.address6 ? ` ${s.node.address6}` : ''} on ${s.node.net} (${s.node.interface}${s.node.mode ? `, ${s.node.mode} mode` : ''})  ${tincd}  ${consul}`,
    `traffic: in ${humanBytes(s.bytes.in)}, out ${humanBytes(s.bytes.out)}${s.bytes.source === 'interface' ? ' (interface counters)' : ''}${s.dns ? `   dns: ${s.dns.queries} queries` : ''}${s.consul.refused.length ? paint('yellow', `   ${s.consul.refused.length} record(s) refused`) : ''}${s.consul.pending?.length ? paint('yellow', `   ${s.consul.pending.length} record(s) unreadable`) : ''}${s.consul.servicesRefused?.length ? paint('yellow', `   ${s.consul.servicesRefused.length} service instance(s) refused`) : ''}`,
    ...(s.node.nameConflict ? [paint('red', conflictText(s.node.nameConflict))] : []),
    ...(s.node.tincConfMode ? [paint('red', modeMismatchText(s.node.tincConfMode, s.node.mode))] : []),
    ...(s.localServices?.refused.length ? [paint('yellow', localRefusedText(s.localServices))] : []),
    ...(s.node.forwardingOff ? [paint('red', s.node.forwardingOff)] : []),
    ...connectToLines(s, now, paint),
    ...accessLines(s, paint),
    '',
  ]
  const rows = [['NAME', 'ADDRESS', 'REACHABLE', 'PATH', 'REMOTE', 'CHANGED']]
  const colours: Array<keyof typeof ANSI | undefined> = [undefined]
  for (const n of s.nodes) {
    rows.push([
      n.hidden ? `${n.name} (hidden)` : n.name,
      n.address6 ? `${n.address ?? '-'} ${n.address6}` : (n.address ?? '-'),
      n.reachable === undefined ? '?' : n.reachable ? 'yes' : 'no',
      pathText(n),
      n.remote ?? '-',
      n.path === 'self' ? '-' : ago(n.lastChange, now),
    ])
    colours.push(n.hidden ? 'dim' : n.path === 'direct' ? 'green' : n.path === 'relayed' ? 'yellow' : n.path === 'unreachable' ? 'red' : n.path === 'self' ? 'bold' : 'dim')
  }
  const lines = alignRows(rows).map((text, i) => {
    const c = colours[i]
    return c ? paint(c, text) : text
  })
  return `${[...head, ...lines, ...routeLines(s, paint)].join('\n')}\n`
}

/** The public nodes chosen for ConnectTo, and those sitting out; nothing when every public node is kept (or an older daemon). */
function connectToLines(s: Status, now: number, paint: (c: keyof typeof ANSI, t: string) => string): string[] {
  const c = s.connectTo
  if (!c) return []
  const benched = c.benched.map((b) => `${b.name} (silent ${b.strikes}×, tried again in ${Math.max(0, Math.round((Date.parse(b.until) - now) / 1000))} s)`)
  return [
    `connect to: ${c.chosen.join(', ') || 'nobody'}${benched.length ? paint('yellow', `   sitting out: ${benched.join(', ')}`) : ''}`,
    ...(c.unknownPins.length ? [paint('yellow', `pinned but without a host file here: ${c.unknownPins.join(', ')}`)] : []),
  ]
}

/** Groups (docs/groups.md): nothing in an open mesh; red when the policy or the table can't be applied. */
function accessLines(s: Status, paint: (c: keyof typeof ANSI, t: string) => string): string[] {
  const a = s.access
  const moved = a?.renumber
  const move = !moved
    ? []
    : moved.state === 'failed'
      ? [paint('red', `group move to ${moved.to} NOT done (${moved.reason ?? 'unknown reason'}); retried on the next ipam/ change`)]
      : [`renumbered from ${moved.from} to ${moved.to} at ${moved.at} (group move)`]
  if (!a || (a.groups === 0 && !a.unreadable && a.firewall?.mode !== 'failed')) return move
  const fw = a.firewall
  const table = !fw ? '' : fw.mode === 'enforced' ? `, enforced (reached from: ${(fw.allowedGroups ?? []).join(', ')})` : fw.mode === 'failed' ? '' : `, ${fw.mode}`
  return [
    `access: group ${a.group ?? '(none)'} of ${a.groups}, ${a.associations} association(s)${table}${a.hidden.length ? `, ${a.hidden.length} node(s) hidden` : ''}`,
    ...(fw?.mode === 'failed'
      ? [
          paint(
            'red',
            fw.stale
              ? `access table of an earlier policy NOT removed (${fw.reason ?? 'unknown reason'}): retried every 30 s`
              : `access table NOT loaded (${fw.reason ?? 'unknown reason'}): the groups are not enforced on this node`,
          ),
        ]
      : []),
    ...(a.unreadable ? [paint('red', a.unreadable)] : []),
    ...(a.refused.length ? [paint('yellow', `${a.refused.length} access policy key(s) refused: ${a.refused.map((r) => `${r.key}: ${r.reason}`).join('; ')}`)] : []),
    ...move,
  ]
}

/** Subnets behind nodes (docs/subnets.md), after the nodes; nothing when there are none. A daemon of an older release sends no `routes`. */
function routeLines(s: Status, paint: (c: keyof typeof ANSI, t: string) => string): string[] {
  const routes = s.routes ?? []
  const refused = s.refusedApprovals ?? []
  if (routes.length + refused.length === 0) return []
  const colour = { served: 'green', awaiting: 'yellow', refused: 'red', unannounced: 'dim' } as const
  const rows = [['NODE', 'SUBNET', 'STATE', 'DETAIL'], ...routes.map((r) => [r.node, r.cidr, r.state, r.state === 'served' ? `approved ${r.approvedAt ?? ''}`.trim() : (r.reason ?? '')])]
  const lines = alignRows(rows).map((text, i) => {
    const r = routes[i - 1]
    return r ? paint(colour[r.state], text) : text
  })
  return ['', ...lines, ...refused.map((r) => paint('yellow', `refused approval ${printable(r.key)}: ${printable(r.reason)}`))]
}

export const statusCommand = defineCommand({
  meta: { name: 'status', description: 'Show the mesh as this node sees it: who is reachable, directly or through a relay, traffic, Consul and tincd (from the running daemon)' },
  args: {
    ...statusArgs,
    json: { type: 'boolean', description: "Print the daemon's /status JSON", default: false },
    watch: { type: 'boolean', description: 'Redraw every --interval seconds until interrupted', default: false },
    interval: { type: 'string', description: 'Seconds between redraws with --watch', default: '2' },
  },
  async run({ args }) {
    const colour = process.stdout.isTTY === true && !process.env.NO_COLOR
    if (!args.watch) {
      const s = await fetchStatus(args)
      process.stdout.write(args.json ? `${JSON.stringify(s, null, 2)}\n` : renderStatus(s, { colour }))
      return
    }
    const every = parseIntFlag('interval', args.interval, 1, 3600) * 1000
    for (;;) {
      let text: string
      try {
        const s = await fetchStatus(args)
        text = args.json ? `${JSON.stringify(s)}\n` : renderStatus(s, { colour, now: Date.now() })
      } catch (err) {
        text = `${(err as Error).message}\n`
      }
      // Home and clear on a terminal; a pipe gets one snapshot after another.
      process.stdout.write(colour ? `\x1b[H\x1b[2J${text}` : `${text}\n`)
      await new Promise((r) => setTimeout(r, every))
    }
  },
})

export const graphCommand = defineCommand({
  meta: { name: 'graph', description: 'Print the mesh graph in Graphviz DOT, or write it as SVG (rendered by the daemon when Graphviz is installed there)' },
  args: {
    ...statusArgs,
    svg: { type: 'string', description: 'Write SVG to this file instead of printing DOT' },
    dot: { type: 'string', description: 'Write DOT to this file instead of printing it' },
  },
  async run({ args }) {
    const res = await fetchFrom(args, args.svg ? '/graph.svg' : '/graph.dot')
    const body = await res.text()
    if (!res.ok) {
      let msg = body
      try {
        const j = JSON.parse(body) as { error?: string; hint?: string }
        msg = [j.error, j.hint].filter(Boolean).join('; ')
      } catch {
        // not JSON: show it as it came
      }
      throw new TincConsulError(res.status === 501 ? 'NO_GRAPHVIZ' : 'STATUS_HTTP', `the status server answered ${res.status}: ${msg.trim()}`)
    }
    const file = args.svg ?? args.dot
    if (!file) return void process.stdout.write(body)
    await writeFileAtomic(file, body, 0o644)
    console.log(`wrote ${file} (${body.length} bytes)`)
  },
})
