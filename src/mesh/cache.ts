import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import * as z from 'zod'
import { isDnsLabel } from '../dns/zone.ts'
import { writeFileAtomic } from '../util/atomic.ts'
import { isTincName } from '../tinc/names.ts'
import { isCanonicalRoute } from './route-cidr.ts'
import type { Approval } from './routes.ts'
import { networkRecordSchema, nodeRecordSchema, type NetworkRecord, type NodeRecord } from './record.ts'

/**
 * The last good view on disk, so a restarted daemon can render before Consul
 * answers (and keeps serving while it doesn't). Only accepted records are
 * cached, and they are checked again on load like anything else.
 */
// The same checks as aliases read from Consul (src/mesh/aliases.ts): the cache is read back like any input.
const aliasSchema = z.object({
  name: z.string().refine(isDnsLabel),
  target: z
    .string()
    .max(253)
    .refine((t) => t.split('.').every(isDnsLabel)),
})
// Fields were added over time; each is optional so an older cache still loads, and unknown
// ones are dropped so a newer release's cache doesn't stop this one.
const cacheSchema = z.object({
  network: networkRecordSchema,
  records: z.array(nodeRecordSchema),
  aliases: z.array(aliasSchema).max(10_000).optional(),
  seniority: z.record(z.string(), z.number().int().nonnegative()).optional(),
  allocations: z.record(z.string(), z.string()).optional(),
  revoked: z.array(z.string().regex(/^sha256:[0-9a-f]{64}$/)).optional(),
  approvals: z
    .array(z.object({ node: z.string().refine(isTincName), cidr: z.string().refine(isCanonicalRoute), at: z.iso.datetime(), createIndex: z.number().int().nonnegative() }))
    .max(10_000)
    .optional(),
})

export interface CachedView {
  network: NetworkRecord
  records: NodeRecord[]
  /** DNS aliases as last read (already checked), so names keep resolving across a restart without Consul. */
  aliases?: Array<{ name: string; target: string }>
  /** Each record's CreateIndex in Consul: who was there first when identities collide. */
  seniority?: Record<string, number>
  /** ipam/ as last read (address → holder), so the cached view is judged by the same rules. */
  allocations?: Record<string, string>
  /** revoked/ as last read. */
  revoked?: string[]
  /** subnet-approvals/ as last read (already checked), so approved routes stay through a restart without Consul. */
  approvals?: Approval[]
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
  return writeFileAtomic(cachePath(stateDir), `${JSON.stringify({ ...view, records, aliases: view.aliases ?? [] })}\n`, 0o600, { durable: false })
}
