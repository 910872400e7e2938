import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { z } from 'zod'
import { isDnsLabel } from '../dns/zone.ts'
import { writeFileAtomic } from '../util/atomic.ts'
import { networkRecordSchema, nodeRecordSchema, type NetworkRecord, type NodeRecord } from './record.ts'

/**
 * The last good view on disk, so a restarted daemon can render before Consul
 * answers (and keeps serving while it doesn't). Only accepted records are
 * cached, and they are checked again on load like anything else.
 */
// The same checks as aliases read from Consul (src/mesh/aliases.ts): the cache is read back like any input.
const aliasSchema = z.object({ name: z.string().refine(isDnsLabel), target: z.string().max(253).refine((t) => t.split('.').every(isDnsLabel)) })
const cacheSchema = z.object({ network: networkRecordSchema, records: z.array(nodeRecordSchema), aliases: z.array(aliasSchema).max(10_000).optional() })

export interface CachedView {
  network: NetworkRecord
  records: NodeRecord[]
  /** DNS aliases as last read (already checked), so names keep resolving across a restart without Consul. */
  aliases?: Array<{ name: string; target: string }>
}

export function cachePath(stateDir: string): string {
  return join(stateDir, 'cache.json')
}

export async function loadCache(stateDir: string): Promise<CachedView | undefined> {
  try {
    const parsed = cacheSchema.safeParse(JSON.parse(await readFile(cachePath(stateDir), 'utf8')))
    return parsed.success ? parsed.data : undefined
  } catch {
    return undefined
  }
}

export async function saveCache(stateDir: string, view: CachedView): Promise<boolean> {
  const records = [...view.records].sort((a, b) => a.name.localeCompare(b.name))
  return writeFileAtomic(cachePath(stateDir), `${JSON.stringify({ network: view.network, records, aliases: view.aliases ?? [] })}\n`, 0o600, { durable: false })
}
