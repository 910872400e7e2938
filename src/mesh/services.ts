import * as z from 'zod'
import { metaFilter } from '../consul/agent.ts'
import { isDnsLabel } from '../dns/zone.ts'
import { namingFor, type ServiceNaming } from '../services/naming.ts'
import { DEFAULT_MAX_SERVICES, META, serviceId } from '../services/registration.ts'
import type { MeshView } from './view.ts'

/**
 * The healthy service instances the mesh state keeps, built from Consul's health
 * endpoint. Entries are untrusted twice over: their shape is checked here, and
 * each one must belong to a node in the view and carry exactly that node's VPN
 * address. With scoped names (src/services/naming.ts) the node is the Consul node
 * the instance is filed under, and the name must be one of that node's: a node's
 * token may write only its own names, but Consul lets it file them under any node
 * through the catalog, so these checks are what stop one node from announcing a
 * service as another's, or at another node's address.
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

/**
 * What the watches ask Consul for: only this network's instances. Checks carry no service meta,
 * so the check list takes those of services with this network's IDs (`mesh-<net>-…`, what every
 * registrar uses), and node checks that aren't passing: a node going critical takes its
 * instances out. Names are not filtered here: the reader maps them (src/services/naming.ts).
 */
export const serviceFilters = (net: string) => ({
  catalog: metaFilter('ServiceMeta', META.net, net),
  checks: `ServiceID matches ${JSON.stringify(`^${serviceId(net, '')}`)} or (ServiceID == "" and Status != "passing")`,
  health: metaFilter('Service.Meta', META.net, net),
})

const entrySchema = z.object({
  /** The catalog node the instance is filed under. Only scoped names need it. */
  Node: z.object({ Node: z.string().max(256) }).nullish(),
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

/**
 * Shape and ownership checks: what `service ls --all` shows, and the input to meshServices.
 * `service` is the name in Consul; entries come back under their mesh name. A name outside the
 * network's scope (not `tinc-<net>--<node>--…` when names are scoped) is not this network's:
 * ignored, not refused.
 */
export function parseHealthEntries(service: string, entries: unknown[], net: string, naming: ServiceNaming): { entries: HealthyEntry[]; refused: ServiceRefusal[] } {
  const out: HealthyEntry[] = []
  const refused: ServiceRefusal[] = []
  const name = naming.toMesh(service)
  if (name === undefined) return { entries: out, refused }
  for (const raw of entries) {
    const r = entrySchema.safeParse(raw)
    const id = (raw as { Service?: { ID?: unknown } } | null)?.Service?.ID
    const refuse = (reason: string) => refused.push({ service: name, id: typeof id === 'string' ? id.slice(0, 256) : '?', reason })
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
    const owner = naming.mode === 'scoped' ? ownerProblem(service, node, r.data.Node?.Node, naming) : undefined
    if (s.Service !== service) refuse(`answered for "${s.Service}" on a query for "${service}"`)
    else if (!isDnsLabel(name)) refuse('the service name is not a DNS label')
    else if (!node) refuse(`no ${META.node} meta`)
    else if (owner) refuse(owner)
    else if (protocol !== 'tcp' && protocol !== 'udp') refuse(`${META.protocol} is neither tcp nor udp`)
    else out.push({ id: s.ID, name, node, address: s.Address, port: s.Port, protocol, tags: s.Tags ?? [] })
  }
  return { entries: out, refused }
}

/**
 * Why a scoped instance isn't its node's, if it isn't: the name must be one of the node's names,
 * and that node is the one the catalog files it under, not the `mesh-node` meta, which is the
 * registering node's own word. A registrar goes through its own agent, whose node name is the
 * tinc name, so for it the three always agree.
 */
function ownerProblem(service: string, meta: string | undefined, filedUnder: string | undefined, naming: ServiceNaming): string | undefined {
  if (filedUnder === undefined) return 'the entry names no catalog node'
  if (!naming.belongsTo(service, filedUnder)) return `"${service}" is not a name of node "${filedUnder}", which it is filed under (its names start with "${naming.nodePrefix(filedUnder)}")`
  if (meta !== filedUnder) return `${META.node} "${meta}" is not "${filedUnder}", the node it is filed under`
  return undefined
}

/**
 * The services DNS may serve: each instance on a node of the view, at that node's own address,
 * named as the network record says (src/services/naming.ts), and at most `maxPerNode` from one
 * node. The cap is taken in name order, so every reader keeps the same ones; registrars apply
 * the same cap to their own files (planRegistrations), so only a node that bypasses its
 * registrar, or runs a higher cap, gets refusals here.
 */
export function meshServices(raw: ReadonlyMap<string, unknown[]>, view: MeshView, net: string, maxPerNode = DEFAULT_MAX_SERVICES): { services: MeshService[]; refused: ServiceRefusal[] } {
  const naming = namingFor(net, view.network)
  const refused: ServiceRefusal[] = []
  const byNode = new Map<string, HealthyEntry[]>()
  for (const [name, list] of raw) {
    const parsed = parseHealthEntries(name, list, net, naming)
    refused.push(...parsed.refused)
    for (const e of parsed.entries) {
      const peer = view.peers.get(e.node)
      if (!peer) refused.push({ service: e.name, id: e.id, reason: `node "${e.node}" is not in the mesh` })
      else if (e.address !== peer.record.vpnAddress) refused.push({ service: e.name, id: e.id, reason: `address ${e.address} is not ${e.node}'s VPN address ${peer.record.vpnAddress}` })
      else {
        // In place, not copied per entry: a node may send many more entries than the cap keeps.
        const list = byNode.get(e.node)
        if (list) list.push(e)
        else byNode.set(e.node, [e])
      }
    }
  }
  const groups = new Map<string, MeshService>()
  for (const [node, list] of byNode) {
    list.sort((a, b) => a.name.localeCompare(b.name) || a.protocol.localeCompare(b.protocol) || a.port - b.port || a.id.localeCompare(b.id))
    for (const e of list.slice(maxPerNode)) refused.push({ service: e.name, id: e.id, reason: `node "${node}" has more than ${maxPerNode} services (--max-services)` })
    for (const e of list.slice(0, maxPerNode)) {
      const key = `${e.name}/${e.protocol}`
      let g = groups.get(key)
      if (!g) groups.set(key, (g = { name: e.name, protocol: e.protocol, instances: [] }))
      g.instances.push({ id: e.id, node: e.node, address: e.address, port: e.port, tags: e.tags })
    }
  }
  // A stable order: the zone is rebuilt only when this changes, and Consul's order may not be.
  const services = [...groups.values()].sort((a, b) => (a.name === b.name ? a.protocol.localeCompare(b.protocol) : a.name.localeCompare(b.name)))
  for (const s of services) s.instances.sort((a, b) => a.node.localeCompare(b.node) || a.port - b.port || a.id.localeCompare(b.id))
  return { services, refused }
}
