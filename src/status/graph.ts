import { spawn } from 'node:child_process'
import type { Status } from './model.ts'

/**
 * The mesh as this node sees it, in Graphviz DOT: every node, the links tincd
 * reports (its edge list, both directions folded into one line), and how this
 * node reaches each peer. Green: direct. Orange: relayed, with a dashed line
 * to the relay. Red: unreachable.
 */
const COLOURS = { self: '#1f4e79', direct: '#2e7d32', relayed: '#ef6c00', unreachable: '#c62828', unknown: '#757575' } as const

const q = (s: string) => `"${s.replace(/["\\]/g, '\\$&')}"`

export function renderDot(s: Status): string {
  const lines = [
    `graph ${q(`tinc-consul ${s.node.net}`)} {`,
    `  label=${q(`${s.node.net} as seen from ${s.node.name} at ${s.at.replace('T', ' ').slice(0, 19)} UTC`)};`,
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
    ].filter(Boolean)
    const style = n.path === 'self' ? ', fillcolor="#dbe8f5", penwidth=3' : n.path === 'unreachable' ? ', style="rounded,dashed"' : ''
    // Real newlines become DOT's \n after quoting, so quoting can't double their backslash.
    lines.push(`  ${q(n.name)} [label=${q([n.name, ...detail].join('\n')).replace(/\n/g, '\\n')}, color=${q(colour)}${style}];`)
  }
  // tinc lists every edge once per direction; one line per pair reads better.
  const pairs = new Map<string, { a: string; b: string }>()
  for (const e of s.edges) {
    const [a, b] = [e.from, e.to].sort() as [string, string]
    pairs.set(`${a}\0${b}`, { a, b })
  }
  const known = new Set(s.nodes.map((n) => n.name))
  for (const { a, b } of pairs.values()) {
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
