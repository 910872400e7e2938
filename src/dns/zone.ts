import { RCODE, TYPE, prepare, rdata, type Prepared, type RR } from './wire.ts'

/**
 * The zone as pre-encoded answers, rebuilt from the mesh view whenever it
 * changes, so a query is two map lookups and a copy. Nothing here talks to
 * Consul: the daemon hands in its view, and DNS keeps answering from the last
 * one while Consul is away.
 */
export interface ZoneNode {
  name: string
  address: string
  public: boolean
  fingerprint: string
}

export interface ZoneInput {
  domain: string
  cidr: string
  /** This node: the zone's NS and SOA name. */
  self: string
  nodes: ZoneNode[]
  ttl: { node: number; negative: number }
  serial: number
}

export interface Zone {
  /** Undefined for names outside our zones: the server answers REFUSED. */
  lookup(name: string, type: number): Prepared | undefined
  readonly names: number
  readonly collisions: string[]
}

/** tinc allows `_` in names, DNS labels don't: my_laptop is my-laptop.mesh. */
export const dnsLabel = (tincName: string): string => tincName.replace(/_/g, '-').toLowerCase()

/** The in-addr.arpa zone covering a CIDR, at the octet boundary at or above its prefix. */
export function reverseZone(cidr: string): string {
  const [addr, bits] = cidr.split('/')
  const octets = (addr ?? '').split('.').slice(0, Math.floor(Number(bits) / 8))
  return [...octets.reverse(), 'in-addr', 'arpa'].join('.')
}

export function buildZone(input: ZoneInput): Zone {
  const apex = input.domain.toLowerCase()
  const rev = reverseZone(input.cidr)
  const selfName = `${dnsLabel(input.self)}.${apex}`
  const soa = (zone: string): RR => ({ name: zone, type: TYPE.SOA, ttl: input.ttl.negative, data: rdata.soa(selfName, `hostmaster.${apex}`, input.serial, 3600, 600, 86400, input.ttl.negative) })
  const table = new Map<string, Map<number, Prepared>>()
  const entry = (name: string) => {
    let m = table.get(name)
    if (!m) table.set(name, (m = new Map()))
    return m
  }

  // Names that collide once `_` becomes `-` and case is folded are left out: neither may win silently.
  const byLabel = new Map<string, ZoneNode[]>()
  for (const n of input.nodes) byLabel.set(dnsLabel(n.name), [...(byLabel.get(dnsLabel(n.name)) ?? []), n])
  const collisions = [...byLabel.values()].filter((v) => v.length > 1).flatMap((v) => v.map((n) => n.name))

  for (const zone of [apex, rev]) {
    const m = entry(zone)
    m.set(TYPE.SOA, prepare(RCODE.NOERROR, [{ ...soa(zone), name: null }]))
    m.set(TYPE.NS, prepare(RCODE.NOERROR, [{ name: null, type: TYPE.NS, ttl: input.ttl.node, data: rdata.name(selfName) }]))
  }
  for (const [label, group] of byLabel) {
    const n = group[0]
    if (!n || group.length > 1) continue
    const fqdn = `${label}.${apex}`
    const a: RR = { name: null, type: TYPE.A, ttl: input.ttl.node, data: rdata.a(n.address) }
    const m = entry(fqdn)
    m.set(TYPE.A, prepare(RCODE.NOERROR, [a]))
    m.set(TYPE.TXT, prepare(RCODE.NOERROR, [{ name: null, type: TYPE.TXT, ttl: input.ttl.node, data: rdata.txt([n.public ? 'public' : 'behind NAT', `tinc=${n.name}`, `key=${n.fingerprint}`]) }]))
    const ptr = `${n.address.split('.').reverse().join('.')}.in-addr.arpa`
    if (ptr.endsWith(`.${rev}`)) entry(ptr).set(TYPE.PTR, prepare(RCODE.NOERROR, [{ name: null, type: TYPE.PTR, ttl: input.ttl.node, data: rdata.name(fqdn) }]))
  }
  // Empty non-terminals (e.g. 0.99.10.in-addr.arpa's parents inside the zone) answer NODATA, not NXDOMAIN.
  for (const name of [...table.keys()]) {
    const zone = name.endsWith(rev) ? rev : apex
    for (let i = name.indexOf('.'); i >= 0 && name.length - i - 1 > zone.length; i = name.indexOf('.', i + 1)) entry(name.slice(i + 1))
  }

  const negative = new Map<string, { nx: Prepared; nodata: Prepared }>()
  for (const zone of [apex, rev]) negative.set(zone, { nx: prepare(RCODE.NXDOMAIN, [], [soa(zone)]), nodata: prepare(RCODE.NOERROR, [], [soa(zone)]) })
  // RFC 8482: answer ANY with one small record instead of everything.
  const any = prepare(RCODE.NOERROR, [{ name: null, type: TYPE.HINFO, ttl: input.ttl.node, data: rdata.hinfo('RFC8482', '') }])

  const zoneOf = (name: string): string | undefined => {
    if (name === apex || name.endsWith(`.${apex}`)) return apex
    if (name === rev || name.endsWith(`.${rev}`)) return rev
    return undefined
  }
  return {
    names: table.size,
    collisions,
    lookup(name, type) {
      const zone = zoneOf(name)
      if (!zone) return undefined
      const neg = negative.get(zone) as { nx: Prepared; nodata: Prepared }
      const m = table.get(name)
      if (!m) return neg.nx
      if (type === TYPE.ANY) return any
      return m.get(type) ?? neg.nodata
    },
  }
}
