import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import * as z from 'zod'
import { TincConsulError } from '../errors.ts'
import { writeFileAtomic } from '../util/atomic.ts'

/**
 * Trust on first use for peer keys: the first fingerprint accepted for a name
 * is pinned, and a different key under that name is refused until an operator
 * runs `tinc-consul pin reset NAME` (or the node is revoked and re-joins).
 */
const pinsSchema = z.record(z.string(), z.string().regex(/^sha256:[0-9a-f]{64}$/))

export type Pins = Map<string, string>

export function pinsPath(stateDir: string): string {
  return join(stateDir, 'pins.json')
}

export async function loadPins(stateDir: string): Promise<Pins> {
  let text: string
  try {
    text = await readFile(pinsPath(stateDir), 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return new Map()
    throw new TincConsulError('PINS_UNREADABLE', `cannot read ${pinsPath(stateDir)}: ${(err as Error).message}`, { cause: err })
  }
  // A corrupt pin file must stop us: silently starting empty would re-trust every key.
  const parsed = pinsSchema.safeParse(
    (() => {
      try {
        return JSON.parse(text)
      } catch {
        return undefined
      }
    })(),
  )
  if (!parsed.success) throw new TincConsulError('PINS_CORRUPT', `${pinsPath(stateDir)} is corrupt; fix or remove it (removing re-trusts every current key)`)
  return new Map(Object.entries(parsed.data))
}

export async function savePins(stateDir: string, pins: Pins): Promise<boolean> {
  const sorted = Object.fromEntries([...pins.entries()].sort(([a], [b]) => a.localeCompare(b)))
  return writeFileAtomic(pinsPath(stateDir), `${JSON.stringify(sorted, null, 2)}\n`, 0o600)
}
