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
  readonly names: number
  /** Names left out, and why (collisions, bad labels, alias problems). */
  readonly skipped: Array<{ name: string; reason: string }>
}

/** tinc allows `_` in names, DNS labels don't: my_laptop is my-laptop.mesh. */
export const dnsLabel = (tincName: string): string => tincName.replace(/_/g, '-').toLowerCase()

const LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/

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
  /** SRV targets' A records go in the additional section. */
  const glue = new Map<string, RR[]>()

  for (const zone of [apex, rev]) {
    add(zone, { ...soa(zone), name: null })
    add(zone, { name: null, type: TYPE.NS, ttl: input.ttl.node, data: rdata.name(selfName) })
  }

  // Names that collide once `_` becomes `-` and case is folded are left out: neither may win silently.
  const byLabel = new Map<string, ZoneNode[]>()
  for (const n of input.nodes) byLabel.set(dnsLabel(n.name), [...(byLabel.get(dnsLabel(n.name)) ?? []), n])
  for (const [label, group] of byLabel) {
    const n = group[0]
    if (!n) continue
    if (group.length > 1 || label === 'service') {
      for (const g of group) skipped.push({ name: g.name, reason: group.length > 1 ? `collides with ${group.filter((o) => o !== g).map((o) => o.name).join(', ')} as ${label}.${apex}` : `"${label}" is reserved for services` })
      continue
    }
    const fqdn = `${label}.${apex}`
    const a: RR = { name: null, type: TYPE.A, ttl: input.ttl.node, data: rdata.a(n.address) }
    add(fqdn, a)
    glue.set(fqdn, [{ ...a, name: fqdn }])
    add(fqdn, { name: null, type: TYPE.TXT, ttl: input.ttl.node, data: rdata.txt([n.public ? 'public' : 'behind NAT', `tinc=${n.name}`, `key=${n.fingerprint}`]) })
    const ptr = `${n.address.split('.').reverse().join('.')}.in-addr.arpa`
    if (ptr.endsWith(`.${rev}`)) add(ptr, { name: null, type: TYPE.PTR, ttl: input.ttl.node, data: rdata.name(fqdn) })
  }

  for (const svc of input.services ?? []) {
    const label = svc.name.toLowerCase()
    if (!LABEL.test(label)) {
      skipped.push({ name: svc.name, reason: 'not a DNS label' })
      continue
    }
    const ttl = input.ttl.service
    const addInstances = (owner: string, instances: ZoneServiceInstance[]) => {
      for (const address of new Set(instances.map((i) => i.address))) add(owner, { name: null, type: TYPE.A, ttl, data: rdata.a(address) })
      for (const i of instances) {
        const target = `${dnsLabel(i.node)}.${apex}`
        add(owner, { name: null, type: TYPE.SRV, ttl, data: rdata.srv(1, 1, i.port, target) })
      }
    }
    const healthy = svc.instances.filter((i) => byLabel.get(dnsLabel(i.node))?.length === 1)
    if (healthy.length === 0) continue
    addInstances(`${label}.${serviceApex}`, healthy)
    addInstances(`_${label}._${svc.protocol}.${serviceApex}`, healthy)
    for (const tag of new Set(healthy.flatMap((i) => i.tags.map((t) => t.toLowerCase())))) {
      if (!LABEL.test(tag)) continue
      addInstances(`${tag}.${label}.${serviceApex}`, healthy.filter((i) => i.tags.some((t) => t.toLowerCase() === tag)))
    }
  }

  // Aliases point at a node or a service; never at another alias, so there is no chain to follow.
  const aliasTargets = new Map<string, string>()
  for (const alias of input.aliases ?? []) {
    const name = alias.name.toLowerCase()
    const target = alias.target.toLowerCase().replace(/\.$/, '').replace(new RegExp(`\\.${apex.replace(/\./g, '\\.')}$`), '')
    const fqdn = `${name}.${apex}`
    if (!LABEL.test(name) || name === 'service') skipped.push({ name: alias.name, reason: 'not a usable DNS label' })
    else if (sets.has(fqdn)) skipped.push({ name: alias.name, reason: `${fqdn} is already a node` })
    else if (!target.split('.').every((l) => LABEL.test(l))) skipped.push({ name: alias.name, reason: `target ${JSON.stringify(alias.target)} is not a name in ${apex}` })
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
  const negApex = negative.get(apex) as { nx: Prepared; nodata: Prepared }

  const table = new Map<string, Map<number, Prepared>>()
  for (const [name, types] of sets) {
    const m = new Map<number, Prepared>()
    for (const [type, rrs] of types) {
      const additional = type === TYPE.SRV ? [...new Set(rrs.map((r) => r.data))].flatMap((d) => glue.get(srvTarget(d)) ?? []) : []
      m.set(type, prepare(RCODE.NOERROR, rrs, [], dedupe(additional)))
    }
    table.set(name, m)
  }
  for (const [fqdn, target] of aliasTargets) {
    const cname: RR = { name: null, type: TYPE.CNAME, ttl: input.ttl.node, data: rdata.name(target) }
    const m = new Map<number, Prepared>([[TYPE.CNAME, prepare(RCODE.NOERROR, [cname])]])
    const there = sets.get(target)
    // RFC 1034 4.3.2: the CNAME, then the target's records of the asked type; the target's own NXDOMAIN/NODATA otherwise.
    for (const [type, rrs] of there ?? []) m.set(type, prepare(RCODE.NOERROR, [cname, ...rrs.map((r) => ({ ...r, name: target }))], [], type === TYPE.SRV ? dedupe(rrs.flatMap((r) => glue.get(srvTarget(r.data)) ?? [])) : []))
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
    names: table.size,
    skipped,
    lookup(name, type) {
      const m = table.get(name)
      if (!m) {
        const zone = zoneOf(name)
        return zone ? (negative.get(zone) as { nx: Prepared }).nx : undefined
      }
      if (type === TYPE.ANY) return m.size ? any : (name.endsWith(rev) ? (negative.get(rev) as { nodata: Prepared }).nodata : negApex.nodata)
      return m.get(type) ?? m.get(OTHER) ?? (name.endsWith(rev) ? (negative.get(rev) as { nodata: Prepared }).nodata : negApex.nodata)
    },
  }
}

/** The target name in SRV rdata (priority, weight, port, then an uncompressed name). */
function srvTarget(data: Buffer): string {
  const labels: string[] = []
  for (let p = 6; p < data.length && data[p] !== 0; p += 1 + (data[p] as number)) labels.push(data.toString('latin1', p + 1, p + 1 + (data[p] as number)))
  return labels.join('.')
}

function dedupe(rrs: RR[]): RR[] {
  const seen = new Set<string>()
  return rrs.filter((r) => {
    const k = `${r.name} ${r.data.toString('hex')}`
    if (seen.has(k)) return false
    seen.add(k)
    return true
  })
}
