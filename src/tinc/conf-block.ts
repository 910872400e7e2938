import { TincConsulError } from '../errors.ts'

export const BLOCK_BEGIN = '# BEGIN tinc-consul'
export const BLOCK_END = '# END tinc-consul'
const NOTE = '# Managed by tinc-consul: lines between these markers are rewritten. Edit outside them.'

/**
 * Replaces the managed block in a file we share with people (tinc.conf),
 * leaving every other line byte-for-byte alone; appends the block when there is
 * none. Refuses when the markers are broken, rather than guess which lines are ours.
 */
export function replaceManagedBlock(text: string, body: string[] | undefined, tag?: string): string {
  const [BEGIN, END] = markers(tag)
  const lines = text.split('\n')
  const begins = lines.flatMap((l, i) => (l.trim() === BEGIN ? [i] : []))
  const ends = lines.flatMap((l, i) => (l.trim() === END ? [i] : []))
  // `undefined` removes the block (and only it).
  const block = body ? [BEGIN, NOTE, ...body, END] : []
  if (begins.length === 0 && ends.length === 0) {
    if (!body) return text
    const base = text === '' || text.endsWith('\n') ? text : `${text}\n`
    return `${base}${block.join('\n')}\n`
  }
  const [b] = begins
  const [e] = ends
  if (begins.length !== 1 || ends.length !== 1 || b === undefined || e === undefined || e < b) {
    throw new TincConsulError('CONF_BLOCK_BROKEN', `the "${BEGIN}" / "${END}" markers are broken (found ${begins.length} BEGIN and ${ends.length} END); fix them by hand`)
  }
  return [...lines.slice(0, b), ...block, ...lines.slice(e + 1)].join('\n')
}

/** A tag tells blocks apart in a file several networks share (/etc/hosts): `# BEGIN tinc-consul home`. */
function markers(tag?: string): [string, string] {
  return tag ? [`${BLOCK_BEGIN} ${tag}`, `${BLOCK_END} ${tag}`] : [BLOCK_BEGIN, BLOCK_END]
}

/** The lines inside the managed block (without markers and our note), or [] when there is none. */
export function readManagedBlock(text: string, tag?: string): string[] {
  const [BEGIN, END] = markers(tag)
  const lines = text.split('\n')
  const b = lines.findIndex((l) => l.trim() === BEGIN)
  const e = lines.findIndex((l) => l.trim() === END)
  if (b < 0 || e < b) return []
  return lines.slice(b + 1, e).filter((l) => l !== NOTE)
}
