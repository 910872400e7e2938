import { z } from 'zod'
import { metaFilter } from '../consul/agent.ts'
import { isDnsLabel } from '../dns/zone.ts'
import { META } from '../services/registration.ts'
import type { MeshView } from './view.ts'

/**
 * The healthy service instances the mesh state keeps, built from Consul's health
 * endpoint. Entries are untrusted twice over: their shape is checked here, and
 * each one must belong to a node in the view and carry exactly that node's VPN
 * address. A node's token may register any service name (names are the
 * operator's to choose), so that address check is what stops one node from
 * announcing a service at another node's address.
 */
export interface MeshServiceInstance {
  /** The service ID on its agent. */
  id: string
  /** The tinc node it runs on. */
  node: string
  address: string
  port: number
  tags: string[]
}

export interface MeshService {
  name: string
  protocol: 'tcp' | 'udp'
  instances: MeshServiceInstance[]
}

export interface ServiceRefusal {
  service: string
  id: string
  reason: string
}

/** What the watches ask Consul for: only this network's instances. */
export const serviceFilters = (net: string) => ({ catalog: metaFilter('ServiceMeta', META.net, net), health: metaFilter('Service.Meta', META.net, net) })

const entrySchema = z.object({
  Service: z.object({
    ID: z.string().min(1).max(256),
    Service: z.string(),
    Address: z.string(),
    Port: z.number().int().min(1).max(65535),
    Tags: z.array(z.string().max(255)).max(64).nullish(),
    Meta: z.record(z.string(), z.string()).nullish(),
  }),
})

export interface HealthyEntry {
  id: string
  name: string
  node: string
  address: string
  port: number
  protocol: 'tcp' | 'udp'
  tags: string[]
}

/** Shape checks only: what `service ls --all` shows, and the input to meshServices. */
export function parseHealthEntries(service: string, entries: unknown[], net: string): { entries: HealthyEntry[]; refused: ServiceRefusal[] } {
  const out: HealthyEntry[] = []
  const refused: ServiceRefusal[] = []
  for (const raw of entries) {
    const r = entrySchema.safeParse(raw)
    const id = (raw as { Service?: { ID?: unknown } } | null)?.Service?.ID
    const refuse = (reason: string) => refused.push({ service, id: typeof id === 'string' ? id.slice(0, 256) : '?', reason })
    if (!r.success) {
      const issue = r.error.issues[0]
      refuse(`malformed entry: ${[issue?.path.join('.'), issue?.message].filter(Boolean).join(' ')}`)
      continue
    }
    const s = r.data.Service
    const meta = s.Meta ?? {}
    // The health filter asked for this network already; an entry from another one means the filter was ignored.
    if (meta[META.net] !== net) continue
    const node = meta[META.node]
    const protocol = meta[META.protocol] ?? 'tcp'
    if (s.Service !== service) refuse(`answered for "${s.Service}" on a query for "${service}"`)
    else if (!isDnsLabel(service)) refuse('the service name is not a DNS label')
    else if (!node) refuse(`no ${META.node} meta`)
    else if (protocol !== 'tcp' && protocol !== 'udp') refuse(`${META.protocol} is neither tcp nor udp`)
    else out.push({ id: s.ID, name: service, node, address: s.Address, port: s.Port, protocol, tags: s.Tags ?? [] })
  }
  return { entries: out, refused }
}

/** The services DNS may serve: each instance on a node of the view, at that node's own address. */
export function meshServices(raw: ReadonlyMap<string, unknown[]>, view: MeshView, net: string): { services: MeshService[]; refused: ServiceRefusal[] } {
  const groups = new Map<string, MeshService>()
  const refused: ServiceRefusal[] = []
  for (const [name, list] of raw) {
    const parsed = parseHealthEntries(name, list, net)
    refused.push(...parsed.refused)
    for (const e of parsed.entries) {
      const peer = view.peers.get(e.node)
      if (!peer) {
        refused.push({ service: name, id: e.id, reason: `node "${e.node}" is not in the mesh` })
        continue
      }
      if (e.address !== peer.record.vpnAddress) {
        refused.push({ service: name, id: e.id, reason: `address ${e.address} is not ${e.node}'s VPN address ${peer.record.vpnAddress}` })
        continue
      }
      const key = `${name}/${e.protocol}`
      let g = groups.get(key)
      if (!g) groups.set(key, (g = { name, protocol: e.protocol, instances: [] }))
      g.instances.push({ id: e.id, node: e.node, address: e.address, port: e.port, tags: e.tags })
    }
  }
  // A stable order: the zone is rebuilt only when this changes, and Consul's order may not be.
  const services = [...groups.values()].sort((a, b) => (a.name === b.name ? a.protocol.localeCompare(b.protocol) : a.name.localeCompare(b.name)))
  for (const s of services) s.instances.sort((a, b) => a.node.localeCompare(b.node) || a.port - b.port || a.id.localeCompare(b.id))
  return { services, refused }
}
