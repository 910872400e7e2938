import { spawn } from 'node:child_process'
import type { Status } from './model.ts'

/**
 * The mesh as this node sees it, in Graphviz DOT: every node, the links tincd
 * reports (its edge list, both directions folded into one line), and how this
 * node reaches each peer. Green: direct. Orange: relayed, with a dashed line
 * to the relay. Red: unreachable.
 *
 * The text depends on the topology alone (names, addresses, paths, relays,
 * links), never on the time or byte counters, so the same view gives the same
 * bytes and the rendered SVG can be cached by it (createSvgCache).
 */
const COLOURS = { self: '#1f4e79', direct: '#2e7d32', relayed: '#ef6c00', unreachable: '#c62828', unknown: '#757575' } as const

const q = (s: string) => `"${s.replace(/["\\]/g, '\\$&')}"`

export function renderDot(s: Status): string {
  const lines = [
    `graph ${q(`tinc-consul ${s.node.net}`)} {`,
    `  label=${q(`${s.node.net} as seen from ${s.node.name}`)};`,
    '  labelloc=t; fontname="Helvetica"; fontsize=12; layout=neato; overlap=false; splines=true; sep="+12";',
    '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11, fillcolor="#ffffff", penwidth=2];',
    '  edge [fontname="Helvetica", fontsize=9, color="#9e9e9e", len=2];',
  ]
  for (const n of s.nodes) {
    const colour = COLOURS[n.path]
    const detail = [
      n.address,
      n.public === undefined ? undefined : n.public ? 'public' : 'behind NAT',
      n.path === 'relayed' && n.via ? `via ${n.via}` : n.path === 'self' ? 'this node' : n.path,
      n.hidden ? 'hidden by groups' : undefined,
    ].filter(Boolean)
    const style = n.path === 'self' ? ', fillcolor="#dbe8f5", penwidth=3' : n.path === 'unreachable' || n.hidden ? ', style="rounded,dashed"' : ''
    // Real newlines become DOT's \n after quoting, so quoting can't double their backslash.
    lines.push(`  ${q(n.name)} [label=${q([n.name, ...detail].join('\n')).replace(/\n/g, '\\n')}, color=${q(colour)}${style}];`)
  }
  // tinc lists every edge once per direction; one line per pair reads better.
  // Sorted, so a dump that lists the same edges in another order gives the same text.
  const pairs = new Map<string, { a: string; b: string }>()
  for (const e of s.edges) {
    const [a, b] = [e.from, e.to].sort() as [string, string]
    pairs.set(`${a}\0${b}`, { a, b })
  }
  const known = new Set(s.nodes.map((n) => n.name))
  for (const [, { a, b }] of [...pairs].sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0))) {
    if (!known.has(a) || !known.has(b)) continue
    const mine = a === s.node.name ? b : b === s.node.name ? a : undefined
    const peer = mine ? s.nodes.find((n) => n.name === mine) : undefined
    const colour = peer?.path === 'direct' ? COLOURS.direct : undefined
    lines.push(`  ${q(a)} -- ${q(b)}${colour ? ` [color=${q(colour)}, penwidth=2]` : ''};`)
  }
  for (const n of s.nodes) {
    if (n.path === 'relayed' && n.via && known.has(n.via))
      lines.push(`  ${q(s.node.name)} -- ${q(n.name)} [style=dashed, color=${q(COLOURS.relayed)}, fontcolor=${q(COLOURS.relayed)}, label=${q(`via ${n.via}`)}, len=3];`)
  }
  lines.push('}')
  return `${lines.join('\n')}\n`
}

export type SvgResult = { ok: true; svg: string } | { ok: false; missing: boolean; error: string }

/** Renders DOT with Graphviz when it is installed; `missing` says it isn't. */
export function renderSvg(dot: string, bin = 'dot', timeoutMs = 10_000): Promise<SvgResult> {
  return new Promise((resolve) => {
    const child = spawn(bin, ['-Tsvg'], { stdio: ['pipe', 'pipe', 'pipe'], timeout: timeoutMs })
    const out: Buffer[] = []
    const err: Buffer[] = []
    child.stdout.on('data', (c: Buffer) => out.push(c))
    child.stderr.on('data', (c: Buffer) => err.push(c))
    child.on('error', (e: NodeJS.ErrnoException) => resolve({ ok: false, missing: e.code === 'ENOENT', error: e.message }))
    child.on('close', (code) => {
      if (code === 0) resolve({ ok: true, svg: Buffer.concat(out).toString('utf8') })
      else resolve({ ok: false, missing: false, error: `dot exited ${code}: ${Buffer.concat(err).toString('utf8').trim().slice(0, 300)}` })
    })
    child.stdin.on('error', () => {})
    child.stdin.end(dot)
  })
}

export interface SvgCacheOptions {
  /** Renders one DOT text; by default Graphviz through renderSvg. Tests count calls here. */
  render?: (dot: string) => Promise<SvgResult>
  /** How long a failed render is answered from the cache before the same DOT is tried again. */
  retryFailedAfterMs?: number
  now?: () => number
}

export interface SvgCache {
  svg(dot: string): Promise<SvgResult>
}

interface Entry {
  dot: string
  result: Promise<SvgResult | typeof SUPERSEDED>
  failedAt?: number
}

const SUPERSEDED = Symbol('superseded')

/**
 * The SVG of the latest DOT, rendered once per change of it. Requests for the
 * DOT being rendered wait for that one render; renders run one at a time, each
 * queued behind the one before it. A render still waiting its turn when a newer
 * DOT arrives is skipped, and its requests get the newer picture. A failure is
 * answered from the cache until the DOT changes or retryFailedAfterMs passes,
 * so a missing or broken Graphviz is not run for every request but is retried.
 * Only one picture is kept: the status has one current view.
 */
export function createSvgCache(opts: SvgCacheOptions = {}): SvgCache {
  const render = opts.render ?? ((dot: string) => renderSvg(dot))
  const retryMs = opts.retryFailedAfterMs ?? 30_000
  const now = opts.now ?? Date.now
  let latest: Entry | undefined
  // Settles when the last queued render has finished: the next one starts after it.
  let queue: Promise<unknown> = Promise.resolve()

  const start = (dot: string): Entry => {
    const entry: Entry = { dot, result: Promise.resolve(SUPERSEDED) }
    entry.result = queue.then(async () => {
      if (latest !== entry) return SUPERSEDED
      const r = await render(dot).catch((err: unknown): SvgResult => ({ ok: false, missing: false, error: (err as Error).message }))
      if (!r.ok) entry.failedAt = now()
      return r
    })
    queue = entry.result
    latest = entry
    return entry
  }

  const svg = async (dot: string): Promise<SvgResult> => {
    const fresh = latest?.dot === dot && (latest.failedAt === undefined || now() - latest.failedAt < retryMs)
    const r = await (fresh && latest ? latest : start(dot)).result
    // Superseded: a newer view is queued (its DOT is `latest`'s), and that is the picture to send.
    return r === SUPERSEDED ? svg((latest as Entry).dot) : r
  }
  return { svg }
}
