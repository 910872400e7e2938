import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { TincConsulError } from '../errors.ts'
import { TINC_NAME_RE } from '../tinc/names.ts'

/**
 * The operator's keep list, `<config-dir>/<net>.keep`: one tinc node name per line, `#`
 * comments. The daemon owns `hosts/`, and removes any peer file its view lacks; a name on
 * this list is the operator's instead (a hand-made peer outside Consul): its file is never
 * written, overwritten or removed, and a record under that name is not used.
 *
 * `NAME until-adopted` (written by `tinc-consul adopt` for a hand-made network's peers) keeps the
 * hand-made file only until that peer adopts with the same key: the rule is in src/mesh/adoption.ts.
 */
export const keepPath = (configDir: string, net: string): string => join(configDir, `${net}.keep`)

/** The tag after a name on the keep list that makes the keeping temporary. */
export const UNTIL_ADOPTED = 'until-adopted'

export interface KeepList {
  names: Set<string>
  /** Names kept only until a record with the hand-made file's key appears (`NAME until-adopted`). */
  untilAdopted: Set<string>
  /** Lines that are not a tinc node name, with their line numbers. */
  bad: string[]
}

export function parseKeepList(text: string): KeepList {
  const names = new Set<string>()
  const untilAdopted = new Set<string>()
  const bad: string[] = []
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.replace(/#.*/, '').trim()
    if (line === '') return
    const [name = '', tag, ...rest] = line.split(/\s+/)
    if (!TINC_NAME_RE.test(name) || rest.length > 0 || (tag !== undefined && tag !== UNTIL_ADOPTED)) bad.push(`line ${i + 1}: ${JSON.stringify(line.slice(0, 80))}`)
    else (tag === UNTIL_ADOPTED ? untilAdopted : names).add(name)
  })
  // A plain line wins: the operator's "never touch" is stronger than "until adopted".
  for (const n of names) untilAdopted.delete(n)
  return { names, untilAdopted, bad }
}

/**
 * A missing file is an empty list. A file that exists but can't be read stops the caller:
 * taking it as empty would let the daemon remove the very files the operator asked to keep.
 */
export async function loadKeepList(path: string): Promise<KeepList> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { names: new Set(), untilAdopted: new Set(), bad: [] }
    throw new TincConsulError('KEEP_UNREADABLE', `cannot read the keep list ${path}: ${(err as Error).message}`, { cause: err })
  }
  return parseKeepList(text)
}
