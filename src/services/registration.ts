import { createHash } from 'node:crypto'
import { formatDuration, type ServiceDefinition } from './definition.ts'
import { MAX_CONSUL_NAME, type ServiceNaming } from './naming.ts'

/**
 * What a definition becomes on the local Consul agent. The `mesh-*` meta keys
 * are how every node tells our instances from anything else registered in the
 * same Consul, and `mesh-def` (a hash of the payload) is how the daemon knows
 * the agent's copy is current without comparing check definitions field by
 * field (the agent doesn't return them in one place).
 */
export interface NodeIdentity {
  net: string
  /** The tinc node name. */
  node: string
  /** The node's VPN address: the service address every peer connects to. */
  address: string
}

export const META = { net: 'mesh-net', node: 'mesh-node', protocol: 'mesh-proto', hash: 'mesh-def', file: 'mesh-file' } as const

export const serviceId = (net: string, stem: string): string => `mesh-${net}-${stem}`
export const checkId = (id: string): string => `${id}:check`

/** Whether the daemon runs this check itself and reports it to a TTL check. */
export const isLocalCheck = (def: ServiceDefinition): boolean => def.check.type === 'script' || (def.check.type === 'http' && def.check.status !== undefined)

/**
 * A locally run check reports to a TTL this long: a few missed runs of a stuck or dead
 * daemon turn the service critical, and deregister_critical_after then removes it.
 */
export function localTtlMs(def: ServiceDefinition): number {
  const c = def.check
  return 'intervalMs' in c ? 3 * c.intervalMs + c.timeoutMs : 0
}

export function checkUrl(def: ServiceDefinition, address: string): string | undefined {
  return def.check.type === 'http' ? `${def.check.scheme}://${address}:${def.port}${def.check.path}` : undefined
}

export interface Registration {
  ID: string
  Name: string
  Address: string
  Port: number
  Tags: string[]
  Meta: Record<string, string>
  Check: Record<string, unknown>
}

/** `consulName` is the name in Consul (src/services/naming.ts); the definition's own name by default. */
export function registrationFor(def: ServiceDefinition, who: NodeIdentity, consulName = def.name): Registration {
  const id = serviceId(who.net, def.stem)
  const c = def.check
  const check: Record<string, unknown> = { CheckID: checkId(id), Name: `${def.name} (${c.type})`, DeregisterCriticalServiceAfter: formatDuration(c.deregisterAfterMs) }
  if (isLocalCheck(def)) {
    check.TTL = formatDuration(localTtlMs(def))
    check.Notes =
      c.type === 'script' ? `run by tinc-consul: ${(c as { command: string[] }).command.join(' ')}` : `run by tinc-consul: ${checkUrl(def, who.address)} expecting ${(c as { status?: number }).status}`
    // Critical until the first run says otherwise: a new service isn't announced before it is checked.
    check.Status = 'critical'
  } else if (c.type === 'ttl') {
    check.TTL = formatDuration(c.ttlMs)
    check.Notes = `report with: tinc-consul service ttl ${def.name} pass`
    check.Status = 'critical'
  } else {
    check.Interval = formatDuration(c.intervalMs)
    check.Timeout = formatDuration(c.timeoutMs)
    if (c.type === 'tcp') check.TCP = `${who.address}:${def.port}`
    else if (c.type === 'udp') check.UDP = `${who.address}:${def.port}`
    else if (c.type === 'http') {
      check.HTTP = checkUrl(def, who.address)
      check.TLSSkipVerify = c.tlsSkipVerify
    }
  }
  const base = {
    ID: id,
    Name: consulName,
    Address: who.address,
    Port: def.port,
    Tags: def.tags,
    Meta: { ...def.meta, [META.net]: who.net, [META.node]: who.node, [META.protocol]: def.protocol, [META.file]: def.file },
    Check: check,
  }
  const hash = createHash('sha256').update(JSON.stringify(base)).digest('hex').slice(0, 16)
  // The hash goes into the check's notes too: Consul bumps a check's index when its notes change,
  // and readers watch checks (one query for every service, src/consul/health.ts), so a changed
  // port or tag wakes them even for a check whose definition didn't change (ttl).
  const notes = typeof check.Notes === 'string' ? `${check.Notes}; ${META.hash} ${hash}` : `${META.hash} ${hash}`
  return { ...base, Meta: { ...base.Meta, [META.hash]: hash }, Check: { ...check, Notes: notes } }
}

/** The default of `--max-services`: registrations one node may have, and readers take from one node. */
export const DEFAULT_MAX_SERVICES = 32

export interface LocalRefusal {
  file: string
  service: string
  reason: string
}

/**
 * Which definitions this node registers: each under its Consul name for this node, and at most
 * `max` of them, taken in file-name order so that the same files win on every run. The rest are refused, not
 * registered: every reader takes at most that many instances from one node anyway, and each
 * registration costs every daemon in the mesh a read.
 */
export function planRegistrations<E extends { def: ServiceDefinition }>(
  entries: Iterable<E>,
  who: NodeIdentity,
  naming: ServiceNaming,
  max: number,
): { wanted: Map<string, E & { reg: Registration }>; refused: LocalRefusal[] } {
  const wanted = new Map<string, E & { reg: Registration }>()
  const refused: LocalRefusal[] = []
  for (const e of [...entries].sort((a, b) => a.def.file.localeCompare(b.def.file))) {
    const { def } = e
    const name = naming.toConsul(who.node, def.name)
    if (name.length > MAX_CONSUL_NAME)
      refused.push({
        file: def.file,
        service: def.name,
        reason: `"${name}" is longer than ${MAX_CONSUL_NAME} characters, one DNS label: this node's service names may have at most ${MAX_CONSUL_NAME - naming.nodePrefix(who.node).length} characters`,
      })
    else if (wanted.size >= max) refused.push({ file: def.file, service: def.name, reason: `over this node's cap of ${max} services (--max-services)` })
    else {
      const reg = registrationFor(def, who, name)
      wanted.set(reg.ID, { ...e, reg })
    }
  }
  return { wanted, refused }
}
