import { isIPv4 } from 'node:net'
import ipaddr from 'ipaddr.js'
import { DEFAULT_ANSWER_LIMITS, type AnswerLimits } from './limits.ts'
import { OPT_RR, RCODE, TYPE, prepare, rdata, type Prepared, type RR } from './wire.ts'

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
  /** The IPv6 VPN address, in networks with an IPv6 range: an AAAA record and an ip6.arpa PTR. */
  address6?: string
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
  /** The network's IPv6 range (a /64): its ip6.arpa zone is served too. */
  cidr6?: string
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

/**
 * The most a reply adds around the prepared records: the header, the longest
 * question parseQuery accepts (255 bytes of labels, the root byte, type and
 * class) and our OPT record.
 */
export const REPLY_OVERHEAD = 12 + 256 + 4 + OPT_RR.length

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

/** `fd12::7` → its 32 nibbles reversed under ip6.arpa, or undefined for anything but an IPv6 address. */
export function reverseName6(address: string): string | undefined {
  if (!ipaddr.IPv6.isValid(address) || ipaddr.IPv4.isValidFourPartDecimal(address)) return undefined
  const hex = Buffer.from(ipaddr.IPv6.parse(address).toByteArray()).toString('hex')
  return `${[...hex].reverse().join('.')}.ip6.arpa`
}

/** The ip6.arpa zone of an IPv6 range, at the nibble boundary at or above its prefix. */
export function reverseZone6(cidr6: string): string {
  const [addr, bits] = ipaddr.IPv6.parseCIDR(cidr6)
  const nibbles = Buffer.from(addr.toByteArray())
    .toString('hex')
    .slice(0, Math.floor(bits / 4))
  return `${[...nibbles].reverse().join('.')}.ip6.arpa`
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

/** The RR sets of the zone by owner and type, before encoding; owner `null` is "the question name". */
type Sets = Map<string, Map<number, RR[]>>

/** An SRV record, with the node name whose A record its answer carries as additional data. */
type Srv = RR & { glue?: string }

/** Used for the alias entries' "any other type" answer. */
const OTHER = -1

/** What the steps of buildZone share. */
interface Builder {
  input: ZoneInput
  apex: string
  rev: string
  /** The ip6.arpa zone, in networks with an IPv6 range. */
  rev6: string | undefined
  serviceApex: string
  sets: Sets
  /** Each node's A record under its own name: what SRV answers carry as additional data. */
  glue: Map<string, RR>
  skipped: Zone['skipped']
  add(name: string, rr: RR): void
  soa(zone: string): RR
}

export function buildZone(input: ZoneInput, limits: AnswerLimits = DEFAULT_ANSWER_LIMITS): Zone {
  const b = newBuilder(input)
  const byLabel = addNodes(b)
  addServices(b, byLabel, limits)
  const aliases = checkAliases(b)
  addEmptyNonTerminals(b)
  const table = encode(b, aliases, limits.maxAnswerBytes - REPLY_OVERHEAD)

  const negative = new Map<string, { nx: Prepared; nodata: Prepared }>()
  for (const zone of zonesOf(b)) negative.set(zone, { nx: prepare(RCODE.NXDOMAIN, [], [b.soa(zone)]), nodata: prepare(RCODE.NOERROR, [], [b.soa(zone)]) })
  // RFC 8482: answer ANY with one small record instead of everything.
  const any = prepare(RCODE.NOERROR, [{ name: null, type: TYPE.HINFO, ttl: input.ttl.node, data: rdata.hinfo('RFC8482', '') }])
  const zoneOf = (name: string): string | undefined => {
    if (name === b.apex || name.endsWith(`.${b.apex}`)) return b.apex
    if (name === b.rev || name.endsWith(`.${b.rev}`)) return b.rev
    if (b.rev6 && (name === b.rev6 || name.endsWith(`.${b.rev6}`))) return b.rev6
    return undefined
  }
  return {
    skipped: b.skipped,
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

function newBuilder(input: ZoneInput): Builder {
  const apex = input.domain.toLowerCase()
  const selfName = `${dnsLabel(input.self)}.${apex}`
  const sets: Sets = new Map()
  const b: Builder = {
    input,
    apex,
    rev: reverseZone(input.cidr),
    rev6: input.cidr6 ? reverseZone6(input.cidr6) : undefined,
    serviceApex: `service.${apex}`,
    sets,
    glue: new Map(),
    skipped: [],
    add(name, rr) {
      let m = sets.get(name)
      if (!m) sets.set(name, (m = new Map()))
      const list = m.get(rr.type)
      if (list) list.push(rr)
      else m.set(rr.type, [rr])
    },
    soa: (zone) => ({ name: zone, type: TYPE.SOA, ttl: input.ttl.negative, data: rdata.soa(selfName, `hostmaster.${apex}`, input.serial, 3600, 600, 86400, input.ttl.negative) }),
  }
  for (const zone of zonesOf(b)) {
    b.add(zone, { ...b.soa(zone), name: null })
    b.add(zone, { name: null, type: TYPE.NS, ttl: input.ttl.node, data: rdata.name(selfName) })
  }
  return b
}

/** The zones served: the domain, the in-addr.arpa zone and, with an IPv6 range, its ip6.arpa zone. */
const zonesOf = (b: Pick<Builder, 'apex' | 'rev' | 'rev6'>): string[] => [b.apex, b.rev, ...(b.rev6 ? [b.rev6] : [])]

/** A, AAAA, TXT and PTR for every node with a name of its own; returns those nodes by label. */
function addNodes(b: Builder): Map<string, ZoneNode> {
  const nodes = uniqueNodes(b.input.nodes)
  b.skipped.push(...nodes.skipped)
  const ttl = b.input.ttl.node
  for (const [label, n] of nodes.byLabel) {
    const fqdn = `${label}.${b.apex}`
    const a: RR = { name: null, type: TYPE.A, ttl, data: rdata.a(n.address) }
    b.add(fqdn, a)
    b.glue.set(fqdn, { ...a, name: fqdn })
    b.add(fqdn, { name: null, type: TYPE.TXT, ttl, data: rdata.txt([n.public ? 'public' : 'behind NAT', `tinc=${n.name}`, `key=${n.fingerprint}`]) })
    const ptr = reverseName(n.address)
    if (ptr?.endsWith(`.${b.rev}`)) b.add(ptr, { name: null, type: TYPE.PTR, ttl, data: rdata.name(fqdn) })
    // Only a node with an IPv6 address has AAAA; the others answer AAAA with NODATA, as before.
    const ptr6 = n.address6 === undefined ? undefined : reverseName6(n.address6)
    if (n.address6 !== undefined && b.rev6 && ptr6?.endsWith(`.${b.rev6}`)) {
      b.add(fqdn, { name: null, type: TYPE.AAAA, ttl, data: rdata.aaaa(n.address6) })
      b.add(ptr6, { name: null, type: TYPE.PTR, ttl, data: rdata.name(fqdn) })
    }
  }
  return nodes.byLabel
}

/**
 * A and SRV records under SVC.service, _SVC._PROTO.service and TAG.SVC.service,
 * for at most the limits' instances per name (see pickInstances).
 */
function addServices(b: Builder, byLabel: Map<string, ZoneNode>, limits: AnswerLimits): void {
  // Each owner name's instances over every service that has some there: web.service.mesh
  // collects both a tcp and a udp service called web, and is capped as one name.
  const owners = new Map<string, ZoneServiceInstance[]>()
  const collect = (owner: string, list: ZoneServiceInstance[]) => owners.set(owner, (owners.get(owner) ?? []).concat(list))
  for (const svc of b.input.services ?? []) {
    const label = svc.name.toLowerCase()
    if (!isDnsLabel(label)) {
      b.skipped.push({ name: svc.name, reason: 'not a DNS label' })
      continue
    }
    const healthy = svc.instances.filter((i) => byLabel.has(dnsLabel(i.node)))
    if (healthy.length === 0) continue
    collect(`${label}.${b.serviceApex}`, healthy)
    collect(`_${label}._${svc.protocol}.${b.serviceApex}`, healthy)
    for (const tag of new Set(healthy.flatMap((i) => i.tags.map((t) => t.toLowerCase())))) {
      if (isDnsLabel(tag))
        collect(
          `${tag}.${label}.${b.serviceApex}`,
          healthy.filter((i) => i.tags.some((t) => t.toLowerCase() === tag)),
        )
    }
  }
  const ttl = b.input.ttl.service
  for (const [owner, all] of owners) {
    const picked = pickInstances(all, limits.maxInstances, limits.maxInstancesPerNode)
    // One A per address: several instances on one node share it.
    for (const address of new Set(picked.map((i) => i.address))) b.add(owner, { name: null, type: TYPE.A, ttl, data: rdata.a(address) })
    for (const i of picked) {
      const glue = `${dnsLabel(i.node)}.${b.apex}`
      const srv: Srv = { name: null, type: TYPE.SRV, ttl, data: rdata.srv(1, 1, i.port, glue), glue }
      b.add(owner, srv)
    }
  }
}

/**
 * The instances one name answers with: each node and port once, at most
 * `perNode` from one node and `max` in all, taken one per node in turn (in the
 * order the nodes first appear) so that a node with many instances can't push
 * the others out. The same input always gives the same pick, in that
 * round-robin order, so an answer cut to fewer records keeps the spread.
 */
export function pickInstances<I extends { node: string; port: number }>(instances: I[], max: number, perNode: number): I[] {
  const byNode = new Map<string, I[]>()
  const seen = new Set<string>()
  for (const i of instances) {
    const node = dnsLabel(i.node)
    if (seen.has(`${node}:${i.port}`)) continue
    seen.add(`${node}:${i.port}`)
    const list = byNode.get(node)
    if (list) list.push(i)
    else byNode.set(node, [i])
  }
  const out: I[] = []
  for (let round = 0; round < perNode && out.length < max; round++) {
    const before = out.length
    for (const list of byNode.values()) {
      const i = list[round]
      if (i && out.length < max) out.push(i)
    }
    if (out.length === before) break
  }
  return out
}

/** Aliases point at a node or a service; never at another alias, so there is no chain to follow. Returns alias → target, both fully qualified. */
function checkAliases(b: Builder): Map<string, string> {
  const targets = new Map<string, string>()
  for (const alias of b.input.aliases ?? []) {
    const name = alias.name.toLowerCase()
    const target = aliasTarget(alias.target, b.apex)
    const fqdn = `${name}.${b.apex}`
    if (!isDnsLabel(name) || name === 'service') b.skipped.push({ name: alias.name, reason: 'not a usable DNS label' })
    else if (b.sets.has(fqdn)) b.skipped.push({ name: alias.name, reason: `${fqdn} is already a node` })
    else if (!target) b.skipped.push({ name: alias.name, reason: `target ${JSON.stringify(alias.target)} is not a name in ${b.apex}` })
    else targets.set(fqdn, `${target}.${b.apex}`)
  }
  return targets
}

/** Empty non-terminals (service.mesh, the in-addr.arpa and ip6.arpa labels between a host and the zone) answer NODATA, not NXDOMAIN. */
function addEmptyNonTerminals(b: Builder): void {
  for (const name of [...b.sets.keys()]) {
    const zone = name.endsWith(b.rev) ? b.rev : b.rev6 && name.endsWith(b.rev6) ? b.rev6 : b.apex
    for (let i = name.indexOf('.'); i >= 0 && name.length - i - 1 > zone.length; i = name.indexOf('.', i + 1)) if (!b.sets.has(name.slice(i + 1))) b.sets.set(name.slice(i + 1), new Map())
  }
  if (!b.sets.has(b.serviceApex)) b.sets.set(b.serviceApex, new Map())
}

/** Every answer pre-encoded, each within `budget` bytes after the question. */
function encode(b: Builder, aliases: Map<string, string>, budget: number): Map<string, Map<number, Prepared>> {
  const table = new Map<string, Map<number, Prepared>>()
  for (const [name, types] of b.sets) {
    const m = new Map<number, Prepared>()
    for (const [type, rrs] of types) m.set(type, fitted(b, rrs, budget))
    table.set(name, m)
  }
  for (const [fqdn, target] of aliases) {
    const cname: RR = { name: null, type: TYPE.CNAME, ttl: b.input.ttl.node, data: rdata.name(target) }
    const m = new Map<number, Prepared>([[TYPE.CNAME, prepare(RCODE.NOERROR, [cname])]])
    const there = b.sets.get(target)
    // RFC 1034 4.3.2: the CNAME, then the target's records of the asked type; the target's own NXDOMAIN/NODATA otherwise.
    for (const [type, rrs] of there ?? []) m.set(type, fitted(b, [cname, ...rrs.map((r) => ({ ...r, name: target }))], budget))
    m.set(OTHER, prepare(there ? RCODE.NOERROR : RCODE.NXDOMAIN, [cname], [b.soa(b.apex)]))
    table.set(fqdn, m)
  }
  return table
}

/**
 * One answer, with the A records of its SRV targets as additional data, cut to
 * `budget` bytes: when the whole set doesn't fit, the longest run of records
 * from the front that does, with the additional records for just those. That
 * is a smaller record set, not a truncated message, so there is no TC bit: the
 * same records over UDP and TCP, every time. At least one record stays, so a
 * name never answers empty because of the limit.
 */
function fitted(b: Builder, rrs: RR[], budget: number): Prepared {
  const make = (n: number) => {
    const kept = rrs.slice(0, n)
    const targets = new Set(kept.flatMap((r) => (r as Srv).glue ?? []))
    return prepare(
      RCODE.NOERROR,
      kept,
      [],
      [...targets].flatMap((t) => b.glue.get(t) ?? []),
    )
  }
  const all = make(rrs.length)
  if (all.body.length <= budget) return all
  // The longest prefix that fits, by halving: a few encodings per oversized set, once per zone change.
  let lo = 1
  let hi = rrs.length - 1
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1
    if (make(mid).body.length <= budget) lo = mid
    else hi = mid - 1
  }
  return make(lo)
}
