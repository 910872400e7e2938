import { isIPv4 } from 'node:net'
import { RCODE, TYPE, prepare, rdata, type Prepared, type RR } from './wire.ts'

/**
 * The zone as pre-encoded answers, rebuilt from the mesh view whenever it
 * changes, so a query is two map lookups and a copy. Nothing here talks to
 * Consul: the daemon hands in its view, and DNS keeps answering from the last
 * one while Consul is away. A ZoneInput is plain data, so the same zone can be
 * built in helper processes from the same message.
 */
export interface ZoneNode {
  name: string
  address: string
  public: boolean
  fingerprint: string
}

export interface ZoneServiceInstance {
  /** The tinc node the instance runs on; its SRV target is NODE.<domain>. */
  node: string
  address: string
  port: number
  tags: string[]
}

/** A service and its healthy instances only: filtering by health is the feeder's job. */
export interface ZoneService {
  name: string
  protocol: 'tcp' | 'udp'
  instances: ZoneServiceInstance[]
}

/** An operator-defined name: `NAME.<domain>` CNAME `TARGET.<domain>` (a node, or SVC.service). */
export interface ZoneAlias {
  name: string
  target: string
}

export interface ZoneInput {
  domain: string
  cidr: string
  /** This node: the zone's NS and SOA name. */
  self: string
  nodes: ZoneNode[]
  services?: ZoneService[]
  aliases?: ZoneAlias[]
  ttl: { node: number; service: number; negative: number }
  serial: number
}

export interface Zone {
  /** Undefined for names outside our zones: the server answers REFUSED. */
  lookup(name: string, type: number): Prepared | undefined
  /** Names left out, and why (collisions, bad labels, alias problems). */
  readonly skipped: Array<{ name: string; reason: string }>
}

/** tinc allows `_` in names, DNS labels don't: my_laptop is my-laptop.mesh. */
export const dnsLabel = (tincName: string): string => tincName.replace(/_/g, '-').toLowerCase()

const LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/

/** One lower-case DNS label: what alias and service names must be. */
export const isDnsLabel = (s: string): boolean => LABEL.test(s)

/**
 * An alias target as stored: a name inside the zone without the domain
 * ("nas", "jellyfin.service"), or undefined when it isn't one. Accepts the
 * fully qualified form too ("nas.mesh.").
 */
export function aliasTarget(target: string, domain: string): string | undefined {
  const t = target.trim().toLowerCase().replace(/\.$/, '')
  const bare = t.endsWith(`.${domain}`) ? t.slice(0, -domain.length - 1) : t
  return bare && bare.length <= 253 && bare.split('.').every(isDnsLabel) ? bare : undefined
}

/** `10.99.0.7` → `7.0.99.10.in-addr.arpa`, or undefined for anything but an IPv4 address. */
export function reverseName(address: string): string | undefined {
  return isIPv4(address) ? `${address.split('.').reverse().join('.')}.in-addr.arpa` : undefined
}

/**
 * The nodes that get a name: two whose names become the same label once `_` is `-`
 * and case is folded are both left out, so neither wins silently, and so is a node
 * called "service", the services' subdomain. Shared by the zone and the hosts block,
 * so both leave out the same nodes.
 */
export function uniqueNodes<N extends { name: string }>(nodes: N[]): { byLabel: Map<string, N>; skipped: Array<{ name: string; reason: string }> } {
  const groups = new Map<string, N[]>()
  for (const n of nodes) groups.set(dnsLabel(n.name), [...(groups.get(dnsLabel(n.name)) ?? []), n])
  const byLabel = new Map<string, N>()
  const skipped: Array<{ name: string; reason: string }> = []
  for (const [label, group] of groups) {
    if (label === 'service') for (const g of group) skipped.push({ name: g.name, reason: '"service" is reserved for services' })
    else if (group.length === 1 && group[0]) byLabel.set(label, group[0])
    else
      for (const g of group)
        skipped.push({
          name: g.name,
          reason: `collides with ${group
            .filter((o) => o !== g)
            .map((o) => o.name)
            .join(', ')} as ${label}`,
        })
  }
  return { byLabel, skipped }
}

/** The in-addr.arpa zone covering a CIDR, at the octet boundary at or above its prefix. */
export function reverseZone(cidr: string): string {
  const [addr, bits] = cidr.split('/')
  const octets = (addr ?? '').split('.').slice(0, Math.floor(Number(bits) / 8))
  return [...octets.reverse(), 'in-addr', 'arpa'].join('.')
}

/** The one RR set stored per (name, type) before encoding; owner `null` is "the question name". */
type Sets = Map<string, Map<number, RR[]>>

/** Used for the alias entries' "any other type" answer. */
const OTHER = -1

export function buildZone(input: ZoneInput): Zone {
  const apex = input.domain.toLowerCase()
  const rev = reverseZone(input.cidr)
  const serviceApex = `service.${apex}`
  const selfName = `${dnsLabel(input.self)}.${apex}`
  const soa = (zone: string): RR => ({ name: zone, type: TYPE.SOA, ttl: input.ttl.negative, data: rdata.soa(selfName, `hostmaster.${apex}`, input.serial, 3600, 600, 86400, input.ttl.negative) })
  const skipped: Zone['skipped'] = []
  const sets: Sets = new Map()
  const add = (name: string, rr: RR) => {
    let m = sets.get(name)
    if (!m) sets.set(name, (m = new Map()))
    const list = m.get(rr.type)
    if (list) list.push(rr)
    else m.set(rr.type, [rr])
  }
  /** Each node's A record under its own name, and which nodes each name's SRV records point at: the additional section. */
  const glue = new Map<string, RR>()
  const srvTargets = new Map<string, Set<string>>()

  for (const zone of [apex, rev]) {
    add(zone, { ...soa(zone), name: null })
    add(zone, { name: null, type: TYPE.NS, ttl: input.ttl.node, data: rdata.name(selfName) })
  }

  const nodes = uniqueNodes(input.nodes)
  const byLabel = nodes.byLabel
  skipped.push(...nodes.skipped)
  for (const [label, n] of byLabel) {
    const fqdn = `${label}.${apex}`
    const a: RR = { name: null, type: TYPE.A, ttl: input.ttl.node, data: rdata.a(n.address) }
    add(fqdn, a)
    glue.set(fqdn, { ...a, name: fqdn })
    add(fqdn, { name: null, type: TYPE.TXT, ttl: input.ttl.node, data: rdata.txt([n.public ? 'public' : 'behind NAT', `tinc=${n.name}`, `key=${n.fingerprint}`]) })
    const ptr = reverseName(n.address)
    if (ptr?.endsWith(`.${rev}`)) add(ptr, { name: null, type: TYPE.PTR, ttl: input.ttl.node, data: rdata.name(fqdn) })
  }

  for (const svc of input.services ?? []) {
    const label = svc.name.toLowerCase()
    if (!isDnsLabel(label)) {
      skipped.push({ name: svc.name, reason: 'not a DNS label' })
      continue
    }
    const ttl = input.ttl.service
    const addInstances = (owner: string, instances: ZoneServiceInstance[]) => {
      // A name with both a tcp and a udp service comes through here twice: one A per address.
      const seen = new Set((sets.get(owner)?.get(TYPE.A) ?? []).map((rr) => rr.data.toString('hex')))
      for (const address of new Set(instances.map((i) => i.address))) {
        const data = rdata.a(address)
        if (!seen.has(data.toString('hex'))) add(owner, { name: null, type: TYPE.A, ttl, data })
      }
      for (const i of instances) {
        const target = `${dnsLabel(i.node)}.${apex}`
        add(owner, { name: null, type: TYPE.SRV, ttl, data: rdata.srv(1, 1, i.port, target) })
        srvTargets.set(owner, (srvTargets.get(owner) ?? new Set()).add(target))
      }
    }
    const healthy = svc.instances.filter((i) => byLabel.has(dnsLabel(i.node)))
    if (healthy.length === 0) continue
    addInstances(`${label}.${serviceApex}`, healthy)
    addInstances(`_${label}._${svc.protocol}.${serviceApex}`, healthy)
    for (const tag of new Set(healthy.flatMap((i) => i.tags.map((t) => t.toLowerCase())))) {
      if (!isDnsLabel(tag)) continue
      addInstances(
        `${tag}.${label}.${serviceApex}`,
        healthy.filter((i) => i.tags.some((t) => t.toLowerCase() === tag)),
      )
    }
  }

  // Aliases point at a node or a service; never at another alias, so there is no chain to follow.
  const aliasTargets = new Map<string, string>()
  for (const alias of input.aliases ?? []) {
    const name = alias.name.toLowerCase()
    const target = aliasTarget(alias.target, apex)
    const fqdn = `${name}.${apex}`
    if (!isDnsLabel(name) || name === 'service') skipped.push({ name: alias.name, reason: 'not a usable DNS label' })
    else if (sets.has(fqdn)) skipped.push({ name: alias.name, reason: `${fqdn} is already a node` })
    else if (!target) skipped.push({ name: alias.name, reason: `target ${JSON.stringify(alias.target)} is not a name in ${apex}` })
    else aliasTargets.set(fqdn, `${target}.${apex}`)
  }

  // Empty non-terminals (e.g. service.mesh, or the in-addr.arpa labels between a host and the zone) answer NODATA, not NXDOMAIN.
  for (const name of [...sets.keys()]) {
    const zone = name.endsWith(rev) ? rev : apex
    for (let i = name.indexOf('.'); i >= 0 && name.length - i - 1 > zone.length; i = name.indexOf('.', i + 1)) if (!sets.has(name.slice(i + 1))) sets.set(name.slice(i + 1), new Map())
  }
  if (!sets.has(serviceApex)) sets.set(serviceApex, new Map())

  const negative = new Map<string, { nx: Prepared; nodata: Prepared }>()
  for (const zone of [apex, rev]) negative.set(zone, { nx: prepare(RCODE.NXDOMAIN, [], [soa(zone)]), nodata: prepare(RCODE.NOERROR, [], [soa(zone)]) })

  const additionalFor = (owner: string): RR[] => [...(srvTargets.get(owner) ?? [])].flatMap((t) => glue.get(t) ?? [])
  const table = new Map<string, Map<number, Prepared>>()
  for (const [name, types] of sets) {
    const m = new Map<number, Prepared>()
    for (const [type, rrs] of types) m.set(type, prepare(RCODE.NOERROR, rrs, [], type === TYPE.SRV ? additionalFor(name) : []))
    table.set(name, m)
  }
  for (const [fqdn, target] of aliasTargets) {
    const cname: RR = { name: null, type: TYPE.CNAME, ttl: input.ttl.node, data: rdata.name(target) }
    const m = new Map<number, Prepared>([[TYPE.CNAME, prepare(RCODE.NOERROR, [cname])]])
    const there = sets.get(target)
    // RFC 1034 4.3.2: the CNAME, then the target's records of the asked type; the target's own NXDOMAIN/NODATA otherwise.
    for (const [type, rrs] of there ?? []) m.set(type, prepare(RCODE.NOERROR, [cname, ...rrs.map((r) => ({ ...r, name: target }))], [], type === TYPE.SRV ? additionalFor(target) : []))
    m.set(OTHER, prepare(there ? RCODE.NOERROR : RCODE.NXDOMAIN, [cname], [soa(apex)]))
    table.set(fqdn, m)
  }
  // RFC 8482: answer ANY with one small record instead of everything.
  const any = prepare(RCODE.NOERROR, [{ name: null, type: TYPE.HINFO, ttl: input.ttl.node, data: rdata.hinfo('RFC8482', '') }])

  const zoneOf = (name: string): string | undefined => {
    if (name === apex || name.endsWith(`.${apex}`)) return apex
    if (name === rev || name.endsWith(`.${rev}`)) return rev
    return undefined
  }
  return {
    skipped,
    lookup(name, type) {
      // Every name in the table is inside one of the zones, so zoneOf only runs for misses and NODATA.
      const m = table.get(name)
      const hit = m && (type === TYPE.ANY ? (m.size ? any : undefined) : (m.get(type) ?? m.get(OTHER)))
      if (hit) return hit
      const neg = negative.get(zoneOf(name) ?? '')
      return neg && (m ? neg.nodata : neg.nx)
    },
  }
}
