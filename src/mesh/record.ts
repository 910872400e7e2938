import ipaddr from 'ipaddr.js'
import * as z from 'zod'
import { isTincName } from '../tinc/names.ts'
import { ALLOWED_OPTIONS, isPlausibleRsaKey, keyFingerprint, parseHostFile, type HostFileEntry } from '../tinc/hostfile.ts'
import { DEFAULT_TINC_MODE, TINC_MODES, type TincMode } from '../tinc/mode.ts'
import { isCanonicalRoute } from './route-cidr.ts'

/**
 * A node's record in KV. `v` names the shape; later releases may add fields to it, so an unknown
 * field is accepted and dropped (zod's default strip), never rendered: a node running a newer
 * release must not vanish from older ones.
 */
export const RECORD_VERSION = 1
/** A 8192-bit key's host file is under 2 KiB; anything near this is not a host record. */
export const MAX_RECORD_BYTES = 8192

const hostname = z.string().regex(/^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*$/)
const address = z.union([z.ipv4(), z.ipv6(), hostname])

export const nodeRecordSchema = z
  .object({
    v: z.literal(RECORD_VERSION),
    name: z.string().refine(isTincName, 'not a tinc node name'),
    vpnAddress: z.ipv4(),
    subnets: z.array(z.string().max(43)).min(1).max(8),
    addresses: z.array(address).max(8),
    port: z.number().int().min(1).max(65535),
    hostFile: z.string().max(6000),
    fingerprint: z.string().regex(/^sha256:[0-9a-f]{64}$/),
    /** Set on public nodes that serve joins: invites point at addresses[]:joinPort. */
    joinPort: z.number().int().min(1).max(65535).optional(),
    /**
     * The node's IPv6 VPN address, a /128 from the network's `cidr6`, in canonical (RFC 5952) form.
     * Optional: a network without `cidr6`, and nodes of older releases, have none. It is carried
     * here only, never in `subnets` or `hostFile`: older readers accept a single /32 there, so the
     * second Subnet line is rendered by readers that know this field (src/tinc/render.ts).
     */
    vpnAddress6: z.ipv6().optional(),
    /**
     * Subnets behind the node (a home router's LAN) it announces, canonical CIDRs without host bits
     * (src/mesh/routes.ts). Optional, like vpnAddress6 and for the same reason: `subnets` and
     * `hostFile` keep the single /32 older readers accept, and older readers drop this field. A
     * route is rendered only once an operator approved it (docs/subnets.md).
     */
    routes: z.array(z.string().max(43)).max(8).optional(),
    updatedAt: z.iso.datetime(),
  })
  .strip()

export type NodeRecord = z.infer<typeof nodeRecordSchema>

export const networkRecordSchema = z
  .object({
    v: z.literal(RECORD_VERSION),
    cidr: z.string().refine(isIpv4Cidr, 'not an IPv4 CIDR'),
    domain: z.string().regex(/^[a-z0-9](?:[a-z0-9-]{0,62})(?:\.[a-z0-9](?:[a-z0-9-]{0,62}))*$/),
    createdAt: z.iso.datetime(),
    /**
     * How service names look in Consul (src/services/naming.ts): `scoped` (`tinc-<net>--<node>--nfs`,
     * each node's policy grants only its own prefix) or `bare` (`nfs`, any name). Optional, so records of
     * older releases still read: without it, names are bare, as those releases registered them.
     * Older releases drop the field and register bare names, which a scoped policy refuses.
     */
    serviceNames: z.enum(['scoped', 'bare']).optional(),
    /**
     * tinc's Mode on every node (src/tinc/mode.ts), chosen by `init --mode`. Optional, so records of
     * older releases still read: without it the network is in router mode, as those releases made it.
     * Older releases drop the field. A mode this release doesn't know is refused rather than guessed.
     */
    mode: z.enum(TINC_MODES, { error: (i) => `unknown tinc mode ${JSON.stringify(i.input)} (this release knows ${TINC_MODES.join(' and ')})` }).optional(),
    /**
     * The network's IPv6 range (`init --cidr6`): a /64 of the unique local fc00::/7. Optional: without
     * it the network is IPv4 only, as every network before the field. Older releases drop the field
     * and the nodes' `vpnAddress6`, and keep routing IPv4.
     */
    cidr6: z.string().refine(isUlaCidr6, 'not an IPv6 unique local /64 (fd00::/8 or fc00::/7, for example fd12:3456:789a:1::/64)').optional(),
  })
  .strip()

export type NetworkRecord = z.infer<typeof networkRecordSchema>

/** The network's tinc mode: router when the record doesn't say (records made before the field). */
export const networkMode = (network: Pick<NetworkRecord, 'mode'>): TincMode => network.mode ?? DEFAULT_TINC_MODE

function isIpv4Cidr(s: string): boolean {
  try {
    const [addr] = ipaddr.parseCIDR(s)
    return addr.kind() === 'ipv4'
  } catch {
    return false
  }
}

/** A /64 inside fc00::/7 whose host bits are zero, written canonically (`fd12:3456:789a:1::/64`). */
export function isUlaCidr6(s: string): boolean {
  try {
    const [addr, bits] = ipaddr.IPv6.parseCIDR(s)
    if (bits !== 64 || addr.range() !== 'uniqueLocal') return false
    return s === `${ipaddr.IPv6.networkAddressFromCIDR(s).toRFC5952String()}/64`
  } catch {
    return false
  }
}

/** An IPv6 address in the one spelling ipam/ keys, records and DNS use (RFC 5952: lower case, longest zero run compressed). */
export function canonicalIpv6(address: string): string | undefined {
  try {
    return ipaddr.IPv6.parse(address).toRFC5952String()
  } catch {
    return undefined
  }
}

/** Why a record's `vpnAddress6` can't be its own in this network, or undefined when it can. */
export function checkVpnAddress6(address: string | undefined, network: Pick<NetworkRecord, 'cidr6'>): string | undefined {
  if (address === undefined) return undefined
  if (!network.cidr6) return `IPv6 VPN address ${address} in a network without an IPv6 range`
  if (canonicalIpv6(address) !== address) return `IPv6 VPN address ${address} is not written canonically (${canonicalIpv6(address) ?? 'invalid'})`
  const range = ipaddr.IPv6.parseCIDR(network.cidr6)
  if (!ipaddr.IPv6.parse(address).match(range)) return `IPv6 VPN address ${address} is outside the network's ${network.cidr6}`
  // The all-zero host is the subnet-router anycast address (RFC 4291 2.6.1): not a node's.
  if (address === ipaddr.IPv6.networkAddressFromCIDR(network.cidr6).toRFC5952String()) return `IPv6 VPN address ${address} is the range's subnet-router anycast address`
  return undefined
}

export type Decoded<T> = { ok: true; value: T } | { ok: false; reason: string }

/** Bytes from Consul → a value of the schema, or the reason it was refused. Never throws. */
export function decodeJson<T>(raw: Uint8Array | string, schema: z.ZodType<T>, maxBytes = MAX_RECORD_BYTES): Decoded<T> {
  const bytes = typeof raw === 'string' ? Buffer.from(raw, 'utf8') : raw
  if (bytes.length > maxBytes) return { ok: false, reason: `value is ${bytes.length} bytes, over the ${maxBytes}-byte limit` }
  let text: string
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes)
  } catch {
    return { ok: false, reason: 'value is not UTF-8' }
  }
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch {
    return { ok: false, reason: 'value is not JSON' }
  }
  const parsed = schema.safeParse(json)
  if (!parsed.success) {
    const issue = parsed.error.issues[0]
    return { ok: false, reason: `invalid record: ${issue ? `${issue.path.join('.') || '(root)'}: ${issue.message}` : 'schema mismatch'}` }
  }
  return { ok: true, value: parsed.data }
}

/** What the host-file renderer may use from a record that passed every check. */
export interface AcceptedPeer {
  record: NodeRecord
  publicKey: string
  options: HostFileEntry[]
  /** Host-file variables we dropped because they are not on the allow-list. */
  dropped: string[]
  /** The record's KV CreateIndex: seniority when two records claim the same address, key or name. */
  createIndex: number
}

export interface PeerContext {
  network: NetworkRecord
  /** The KV key's last segment: the record must describe the node it is stored under. */
  keyName: string
}

/**
 * The semantic checks that schema validation can't do: the record names the
 * node it's stored under, its key matches its fingerprint, and it claims only
 * its own VPN address. Pinning and revocation are the caller's (they need state).
 */
export function checkPeer(record: NodeRecord, ctx: PeerContext): Decoded<Omit<AcceptedPeer, 'createIndex'>> {
  if (record.name !== ctx.keyName) return { ok: false, reason: `record stored under "${ctx.keyName}" names "${record.name}"` }
  // Both are IPv4 by schema; the IPv4 parsers skip ipaddr's IPv6 attempt, a third of a decode's time.
  const net = ipaddr.IPv4.parseCIDR(ctx.network.cidr)
  const vpn = ipaddr.IPv4.parse(record.vpnAddress)
  if (!vpn.match(net)) return { ok: false, reason: `VPN address ${record.vpnAddress} is outside the network ${ctx.network.cidr}` }
  const [netAddr, bits] = net
  const networkAddr = ipaddr.IPv4.networkAddressFromCIDR(`${netAddr.toString()}/${bits}`).toString()
  const broadcast = ipaddr.IPv4.broadcastAddressFromCIDR(`${netAddr.toString()}/${bits}`).toString()
  if (bits < 31 && (record.vpnAddress === networkAddr || record.vpnAddress === broadcast)) {
    return { ok: false, reason: `VPN address ${record.vpnAddress} is the network's ${record.vpnAddress === networkAddr ? 'network' : 'broadcast'} address` }
  }
  const v6 = checkVpnAddress6(record.vpnAddress6, ctx.network)
  if (v6) return { ok: false, reason: v6 }
  // A node may route only its own address: no wider range, no other node's address, no default route.
  const own = `${record.vpnAddress}/32`
  for (const s of record.subnets) if (s !== own && s !== record.vpnAddress) return { ok: false, reason: `subnet ${s} is not the node's own address ${own}` }

  const routes = record.routes ?? []
  for (const r of routes) if (!isCanonicalRoute(r)) return { ok: false, reason: `route ${JSON.stringify(r)} is not a canonical CIDR without host bits` }
  if (new Set(routes).size !== routes.length) return { ok: false, reason: 'routes lists a CIDR twice' }

  const parsed = parseHostFile(record.hostFile)
  if (parsed.errors.length) return { ok: false, reason: `host file: ${parsed.errors[0]}` }
  if (!parsed.publicKey || !isPlausibleRsaKey(parsed.publicKey)) return { ok: false, reason: 'host file has no usable RSA public key' }
  if (keyFingerprint(parsed.publicKey) !== record.fingerprint) return { ok: false, reason: 'fingerprint does not match the public key in the host file' }
  const options: HostFileEntry[] = []
  const dropped: string[] = []
  for (const e of parsed.entries) {
    const canonical = Object.keys(ALLOWED_OPTIONS).find((k) => k.toLowerCase() === e.key.toLowerCase())
    const lower = e.key.toLowerCase()
    if (lower === 'subnet') {
      const v = e.value.split('#')[0]?.trim()
      if (v !== own && v !== record.vpnAddress) return { ok: false, reason: `host file claims subnet ${e.value}, not the node's own ${own}` }
    } else if (lower === 'address' || lower === 'port') {
      // Rendered from the record's validated fields instead.
    } else if (canonical && ALLOWED_OPTIONS[canonical]?.test(e.value)) {
      options.push({ key: canonical, value: e.value })
    } else dropped.push(e.key)
  }
  return { ok: true, value: { record, publicKey: parsed.publicKey, options, dropped } }
}
