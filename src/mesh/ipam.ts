import ipaddr from 'ipaddr.js'
import * as z from 'zod'
import { b64, isAclDenied, type ConsulClient, type TxnOp } from '../consul/client.ts'
import type { KvItem } from '../consul/kv.ts'
import type { KvLayout } from './kv-layout.ts'
import { txnWithChangeLog } from './change-log.ts'
import { TincConsulError } from '../errors.ts'
import { isTincName } from '../tinc/names.ts'
import { canonicalIpv6, decodeJson } from './record.ts'

/**
 * VPN address allocation. `ipam/<address>` names the node holding an address;
 * it is created with check-and-set index 0 inside the same transaction as
 * whatever needs the address (the node's record, the invite being used up), so
 * two joins racing for one address can't both win and a failed join reserves
 * nothing. No lock or session is needed.
 *
 * Revocation keeps the entry but marks it released: anyone may take a released
 * address, but fresh ones go first, so a node that re-joins under the same
 * name usually gets its old address back.
 *
 * A network with an IPv6 range (`cidr6`) gives each node a /128 as well, held
 * the same way under `ipam/<address6>` (RFC 5952 form, e.g. `ipam/fd12:3456:789a:1::1`;
 * ':' is valid in a KV key) and reserved in the same transaction as the IPv4 one.
 *
 * A node may hold two active entries for a while: `group move` reserves the new address beside
 * the old one, the node's daemon follows the one written last (src/mesh/renumber.ts), and the
 * old one is released once the node's record shows the new one.
 */
export const ipamEntrySchema = z
  .object({
    name: z.string().refine(isTincName, 'not a tinc node name'),
    at: z.iso.datetime(),
    releasedAt: z.iso.datetime().optional(),
  })
  .strict()
export type IpamEntry = z.infer<typeof ipamEntrySchema>

export interface HeldAddress {
  address: string
  /** ModifyIndex of the entry; the check-and-set index for taking it over. */
  index: number
  /** Undefined when the entry is unreadable; it then counts as taken, never reused. */
  entry: IpamEntry | undefined
}

export interface IpRange {
  first: number
  last: number
  prefixLength: number
}

export function ipToInt(ip: string): number {
  return ipaddr.IPv4.parse(ip)
    .toByteArray()
    .reduce((n, b) => n * 256 + b, 0)
}

export function intToIp(n: number): string {
  return [24, 16, 8, 0].map((s) => Math.floor(n / 2 ** s) % 256).join('.')
}

/** The usable host addresses of a CIDR: its network and broadcast addresses are skipped. */
export function hostRange(cidr: string): IpRange {
  const [addr, prefixLength] = ipaddr.IPv4.parseCIDR(cidr)
  if (prefixLength > 30) throw new TincConsulError('CIDR_TOO_SMALL', `${cidr} has no room for nodes; use a /30 or wider (a /24 holds 254 nodes)`)
  const size = 2 ** (32 - prefixLength)
  const network = Math.floor(ipToInt(addr.toString()) / size) * size
  return { first: network + 1, last: network + size - 2, prefixLength }
}

export function inRange(range: IpRange, ip: string): boolean {
  try {
    const n = ipToInt(ip)
    return n >= range.first && n <= range.last
  } catch {
    return false
  }
}

/**
 * Addresses to try for `name`, best first: an address this name already holds
 * or held; then the lowest never-used ones; then ones released by others.
 */
export function* candidates(range: IpRange, name: string, held: Map<string, HeldAddress>): Generator<{ address: string; index: number }> {
  const mine = [...held.values()].filter((h) => h.entry?.name === name).sort((a, b) => Number(a.entry?.releasedAt !== undefined) - Number(b.entry?.releasedAt !== undefined))
  for (const h of mine) if (inRange(range, h.address)) yield { address: h.address, index: h.index }
  for (let n = range.first; n <= range.last; n++) {
    const ip = intToIp(n)
    if (!held.has(ip)) yield { address: ip, index: 0 }
  }
  const released = [...held.values()].filter((h) => h.entry?.releasedAt !== undefined && h.entry.name !== name && inRange(range, h.address)).sort((a, b) => ipToInt(a.address) - ipToInt(b.address))
  for (const h of released) yield { address: h.address, index: h.index }
}

/** How far into a range fresh IPv6 addresses are looked for: far beyond any mesh's size, and a bound on the walk. */
const V6_SCAN = 1n << 20n

/**
 * IPv6 addresses to try for `name`, best first, as `candidates` orders IPv4 ones: the one this
 * name holds or held, then the lowest never-used hosts of the /64 (`::1` up), then released ones.
 */
export function* candidates6(cidr6: string, name: string, held: Map<string, HeldAddress>): Generator<{ address: string; index: number }> {
  const range = ipaddr.IPv6.parseCIDR(cidr6)
  const inside = (a: string) => a.includes(':') && ipaddr.IPv6.parse(a).match(range)
  const mine = [...held.values()].filter((h) => h.entry?.name === name && inside(h.address)).sort((a, b) => Number(a.entry?.releasedAt !== undefined) - Number(b.entry?.releasedAt !== undefined))
  for (const h of mine) yield { address: h.address, index: h.index }
  const base = ipaddr.IPv6.networkAddressFromCIDR(cidr6)
    .toByteArray()
    .reduce((n, b) => n * 256n + BigInt(b), 0n)
  // A group's cidr6 may be far smaller than the /64: never step out of the range.
  const size = 1n << BigInt(128 - range[1])
  const end = size < V6_SCAN ? size : V6_SCAN
  for (let n = 1n; n < end; n++) {
    const ip = bigIntToIpv6(base + n)
    if (!held.has(ip)) yield { address: ip, index: 0 }
  }
  for (const h of held.values()) if (h.entry?.releasedAt !== undefined && h.entry.name !== name && inside(h.address)) yield { address: h.address, index: h.index }
}

/** The first host of an IPv6 range (`::1`), for checking a record before its address is known. */
export function firstAddress6(cidr6: string | undefined): string | undefined {
  if (!cidr6) return undefined
  const parts = ipaddr.IPv6.networkAddressFromCIDR(cidr6).parts
  parts[7] = 1
  return new ipaddr.IPv6(parts).toRFC5952String()
}

function bigIntToIpv6(n: bigint): string {
  const parts = Array.from({ length: 8 }, (_, i) => Number((n >> BigInt(16 * (7 - i))) & 0xffffn))
  return new ipaddr.IPv6(parts).toRFC5952String()
}

export async function readIpam(client: ConsulClient, layout: KvLayout): Promise<Map<string, HeldAddress>> {
  return parseIpam((await client.kvList(layout.ipamPrefix)).items, layout)
}

/** ipam/ entries as read from Consul; an unreadable value still marks its address as taken. */
export function parseIpam(items: KvItem[], layout: KvLayout): Map<string, HeldAddress> {
  const held = new Map<string, HeldAddress>()
  for (const item of items) {
    const address = item.key.slice(layout.ipamPrefix.length)
    if (!ipaddr.IPv4.isValidFourPartDecimal(address) && canonicalIpv6(address) !== address) continue
    const d = decodeJson(item.value, ipamEntrySchema, 1024)
    held.set(address, { address, index: item.modifyIndex, entry: d.ok ? d.value : undefined })
  }
  return held
}

/** Address → the node holding it now (released entries left out). */
export function activeHolders(held: Map<string, HeldAddress>): Map<string, string> {
  return new Map([...held.values()].flatMap((h) => (h.entry && !h.entry.releasedAt ? [[h.address, h.entry.name] as [string, string]] : [])))
}

export type AllocateResult = { ok: true; address: string; address6?: string } | { ok: false; op: number; what: string }

export interface AllocateOptions {
  client: ConsulClient
  layout: KvLayout
  cidr: string
  /** The network's IPv6 range: reserve a /128 from it too, in the same transaction. */
  cidr6?: string
  name: string
  /** Operations that must succeed together with the reservation, built for the given addresses. */
  with?(address: string, address6: string | undefined): TxnOp[]
  /** Records `with` writes: the change log names them in the same transaction (src/mesh/change-log.ts). */
  records?: string[]
  now?: Date
  /** ipam/ as the caller just read it: the first candidates come from it instead of another read. */
  held?: Map<string, HeldAddress>
}

/**
 * Reserves an address for `name` and runs `with(address)` in the same
 * transaction. When another node wins the address, the next candidate is
 * tried; when one of the caller's operations fails, the whole transaction has
 * rolled back and the result says which one (`op` indexes `with`'s list).
 */
export async function allocateAddress(opts: AllocateOptions): Promise<AllocateResult> {
  const range = hostRange(opts.cidr)
  const value = b64(JSON.stringify({ name: opts.name, at: (opts.now ?? new Date()).toISOString() } satisfies IpamEntry))
  const reserve = (address: string, index: number): TxnOp => ({ KV: { Verb: 'cas', Key: opts.layout.ipam(address), Value: value, Index: index } })
  for (let listing = 0; listing < 5; listing++) {
    const held = listing === 0 && opts.held ? opts.held : await readIpam(opts.client, opts.layout)
    const v6 = opts.cidr6 ? candidates6(opts.cidr6, opts.name, held) : undefined
    let c6 = v6?.next().value ?? undefined
    if (v6 && !c6) throw new TincConsulError('IPAM_FULL', `no free address left in ${opts.cidr6}`)
    let tries = 0
    const v4 = candidates(range, opts.name, held)
    let c = v4.next().value ?? undefined
    while (c) {
      // After a run of lost races the listing is stale: read it again rather than walk it.
      if (++tries > 32) break
      const own = [reserve(c.address, c.index), ...(c6 ? [reserve(c6.address, c6.index)] : [])]
      const ops = [...own, ...(opts.with?.(c.address, c6?.address) ?? [])]
      const res = opts.records?.length ? (await txnWithChangeLog(opts.client, opts.layout, ops, opts.records)).result : await opts.client.txn(ops)
      if (res.ok) return { ok: true, address: c.address, ...(c6 ? { address6: c6.address } : {}) }
      // A token that may not write ipam/ fails on every candidate alike: say so instead of walking the range.
      if (res.errors.some((e) => e.OpIndex < own.length && isAclDenied(e.What)))
        throw new TincConsulError('ACL_DENIED', `consul refused to reserve ${c.address} in ${opts.layout.ipamPrefix}: this token may not write there (an operator or join server token may)`)
      const failed = res.errors.find((e) => e.OpIndex >= own.length)
      if (failed) return { ok: false, op: failed.OpIndex - own.length, what: failed.What }
      // Another node won one of the two addresses: only that one moves on to its next candidate.
      if (res.errors.some((e) => e.OpIndex === 0)) c = v4.next().value ?? undefined
      if (c6 && res.errors.some((e) => e.OpIndex === 1)) {
        c6 = v6?.next().value ?? undefined
        if (!c6) throw new TincConsulError('IPAM_FULL', `no free address left in ${opts.cidr6}`)
      }
    }
    if (tries === 0) throw new TincConsulError('IPAM_FULL', `no free address left in ${opts.cidr}`)
  }
  throw new TincConsulError('IPAM_CONTENDED', `could not reserve an address in ${opts.cidr}: every candidate was taken by a concurrent join; try again`)
}

/** The release operation revocation adds: the entry stays, so the same name can have its address back. */
export function releaseOp(layout: KvLayout, address: string, name: string, index: number, now = new Date()): TxnOp {
  return { KV: { Verb: 'cas', Key: layout.ipam(address), Value: b64(JSON.stringify({ name, at: now.toISOString(), releasedAt: now.toISOString() } satisfies IpamEntry)), Index: index } }
}
