import ipaddr from 'ipaddr.js'
import { z } from 'zod'
import { b64, type ConsulClient, type TxnOp } from '../consul/client.ts'
import type { KvItem } from '../consul/kv.ts'
import type { KvLayout } from './kv-layout.ts'
import { TincConsulError } from '../errors.ts'
import { isTincName } from '../tinc/names.ts'
import { decodeJson } from './record.ts'

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

export async function readIpam(client: ConsulClient, layout: KvLayout): Promise<Map<string, HeldAddress>> {
  return parseIpam((await client.kvList(layout.ipamPrefix)).items, layout)
}

/** ipam/ entries as read from Consul; an unreadable value still marks its address as taken. */
export function parseIpam(items: KvItem[], layout: KvLayout): Map<string, HeldAddress> {
  const held = new Map<string, HeldAddress>()
  for (const item of items) {
    const address = item.key.slice(layout.ipamPrefix.length)
    if (!ipaddr.IPv4.isValidFourPartDecimal(address)) continue
    const d = decodeJson(item.value, ipamEntrySchema, 1024)
    held.set(address, { address, index: item.modifyIndex, entry: d.ok ? d.value : undefined })
  }
  return held
}

/** Address → the node holding it now (released entries left out). */
export function activeHolders(held: Map<string, HeldAddress>): Map<string, string> {
  return new Map([...held.values()].flatMap((h) => (h.entry && !h.entry.releasedAt ? [[h.address, h.entry.name] as [string, string]] : [])))
}

export type AllocateResult = { ok: true; address: string } | { ok: false; op: number; what: string }

export interface AllocateOptions {
  client: ConsulClient
  layout: KvLayout
  cidr: string
  name: string
  /** Operations that must succeed together with the reservation, built for a given address. */
  with?(address: string): TxnOp[]
  now?: Date
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
  for (let listing = 0; listing < 5; listing++) {
    const held = await readIpam(opts.client, opts.layout)
    let tries = 0
    for (const c of candidates(range, opts.name, held)) {
      // After a run of lost races the listing is stale: read it again rather than walk it.
      if (++tries > 32) break
      const res = await opts.client.txn([{ KV: { Verb: 'cas', Key: opts.layout.ipam(c.address), Value: value, Index: c.index } }, ...(opts.with?.(c.address) ?? [])])
      if (res.ok) return { ok: true, address: c.address }
      const failed = res.errors.find((e) => e.OpIndex !== 0)
      if (failed) return { ok: false, op: failed.OpIndex - 1, what: failed.What }
    }
    if (tries === 0) throw new TincConsulError('IPAM_FULL', `no free address left in ${opts.cidr}`)
  }
  throw new TincConsulError('IPAM_CONTENDED', `could not reserve an address in ${opts.cidr}: every candidate was taken by a concurrent join; try again`)
}

/** The release operation revocation adds: the entry stays, so the same name can have its address back. */
export function releaseOp(layout: KvLayout, address: string, name: string, index: number, now = new Date()): TxnOp {
  return { KV: { Verb: 'cas', Key: layout.ipam(address), Value: b64(JSON.stringify({ name, at: now.toISOString(), releasedAt: now.toISOString() } satisfies IpamEntry)), Index: index } }
}
