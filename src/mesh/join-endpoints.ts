import * as z from 'zod'
import type { ConsulClient } from '../consul/client.ts'
import { isTincName, parseHostPort } from '../tinc/names.ts'
import type { KvLayout } from './kv-layout.ts'
import { decodeJson } from './record.ts'

export const DEFAULT_JOIN_PORT = 8655

/**
 * The list invites take their endpoints from: `join-endpoints/<name>`, one
 * entry per join server. Only a join-server token (which only `init` and
 * `invite --serve-joins` hand out) or an operator's can write it, so a node
 * can't put itself into every later invite the way a self-declared field in
 * its own record could.
 */
const endpoint = z
  .string()
  .max(260)
  .refine((s) => parseHostPort(s)?.port !== undefined, 'expected HOST:PORT')

export const joinEndpointsSchema = z
  .object({
    v: z.literal(1),
    endpoints: z.array(endpoint).min(1).max(16),
    at: z.iso.datetime(),
  })
  .strip()
export type JoinEndpoints = z.infer<typeof joinEndpointsSchema>

/** `host:port` for each public address, IPv6 in brackets. */
export function endpointsFor(addresses: readonly string[], port: number): string[] {
  return addresses.map((a) => `${a.includes(':') ? `[${a}]` : a}:${port}`).slice(0, 16)
}

/**
 * Every listed endpoint of a join server that is still a node, in name order.
 * An entry that doesn't parse, or whose node is gone (revoked, removed), is
 * named in `skipped` and left out.
 */
export async function listJoinEndpoints(client: ConsulClient, layout: KvLayout): Promise<{ endpoints: string[]; skipped: string[] }> {
  const [list, nodes] = await Promise.all([client.kvList(layout.joinEndpointsPrefix), client.kvKeys(layout.nodesPrefix)])
  const members = new Set(nodes.keys.map((k) => k.slice(layout.nodesPrefix.length)))
  const endpoints: string[] = []
  const skipped: string[] = []
  for (const item of [...list.items].sort((a, b) => a.key.localeCompare(b.key))) {
    const name = item.key.slice(layout.joinEndpointsPrefix.length)
    if (name === '') continue
    const d = decodeJson(item.value, joinEndpointsSchema, 8192)
    if (!isTincName(name)) skipped.push(`${name}: not a tinc node name`)
    else if (!d.ok) skipped.push(`${name}: ${d.reason}`)
    else if (!members.has(name)) skipped.push(`${name}: no longer a node`)
    else for (const e of d.value.endpoints) if (!endpoints.includes(e)) endpoints.push(e)
  }
  return { endpoints, skipped }
}

/** The entry's JSON, as init, a `--serve-joins` redemption and the broker write it. */
export const joinEndpointsValue = (endpoints: string[], now = new Date()): string => JSON.stringify({ v: 1, endpoints, at: now.toISOString() } satisfies JoinEndpoints)

/** Writes this join server's entry, unless it already says the same. */
export async function publishJoinEndpoints(client: ConsulClient, layout: KvLayout, name: string, endpoints: string[], now = new Date()): Promise<boolean> {
  const key = layout.joinEndpoint(name)
  const current = await client.kvGet(key)
  const d = current && decodeJson(current.value, joinEndpointsSchema, 8192)
  if (d?.ok && JSON.stringify(d.value.endpoints) === JSON.stringify(endpoints)) return false
  await client.kvPut(key, joinEndpointsValue(endpoints, now))
  return true
}
