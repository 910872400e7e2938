import { createHash } from 'node:crypto'
import { formatDuration, type ServiceDefinition } from './definition.ts'

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

export function registrationFor(def: ServiceDefinition, who: NodeIdentity): Registration {
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
    Name: def.name,
    Address: who.address,
    Port: def.port,
    Tags: def.tags,
    Meta: { ...def.meta, [META.net]: who.net, [META.node]: who.node, [META.protocol]: def.protocol, [META.file]: def.file },
    Check: check,
  }
  const hash = createHash('sha256').update(JSON.stringify(base)).digest('hex').slice(0, 16)
  return { ...base, Meta: { ...base.Meta, [META.hash]: hash } }
}
