import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { b64, type ConsulClient, type TxnOp } from '../consul/client.ts'
import { txnWithChangeLog } from './change-log.ts'
import type { KvLayout } from './kv-layout.ts'
import { readOwnRoutes, withoutOwnRoutes } from './own-routes.ts'
import { TincConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import { hostFileFields, keyFingerprint, parseHostFile, renderHostFile } from '../tinc/hostfile.ts'
import { isTincName } from '../tinc/names.ts'
import { RECORD_VERSION, canonicalIpv6, checkPeer, decodeJson, nodeRecordSchema, type NetworkRecord, type NodeRecord } from './record.ts'

/** Reads `Name = …` from tinc.conf. */
export async function readTincName(tincDir: string): Promise<string> {
  const conf = await readFile(join(tincDir, 'tinc.conf'), 'utf8').catch((err: unknown) => {
    throw new TincConsulError('TINC_CONF_MISSING', `cannot read ${join(tincDir, 'tinc.conf')}: ${(err as Error).message}`, { cause: err })
  })
  const name = parseHostFile(conf).entries.find((e) => e.key.toLowerCase() === 'name')?.value
  if (!name || !isTincName(name)) throw new TincConsulError('TINC_NAME', `${join(tincDir, 'tinc.conf')} has no valid "Name =" line`)
  return name
}

/**
 * Builds this node's record from its own host file. The published host-file
 * text is re-rendered from the allow-list, so peers receive exactly what they
 * would keep.
 */
export async function buildOwnRecord(tincDir: string, name: string, now = new Date(), joinPort?: number): Promise<NodeRecord> {
  const path = join(tincDir, 'hosts', name)
  const text = await readFile(path, 'utf8').catch((err: unknown) => {
    throw new TincConsulError('HOST_FILE_MISSING', `cannot read our own host file ${path}: ${(err as Error).message}`, { cause: err })
  })
  // The routes block (own-routes.ts) becomes `routes`; the rest gives the address, key and /32.
  const routes = readOwnRoutes(text).map((r) => r.cidr)
  const h = parseHostFile(withoutOwnRoutes(text))
  if (h.errors.length) throw new TincConsulError('HOST_FILE_BAD', `${path}: ${h.errors[0]}`)
  if (!h.publicKey) throw new TincConsulError('HOST_FILE_BAD', `${path} has no RSA public key; generate one with tincd -K`)
  const { addresses, port, subnets, options } = hostFileFields(h)
  // The IPv4 /32 is the node's address; a /128 line (networks with cidr6) is its IPv6 one.
  const vpn = subnets.find((s) => !s.includes(':'))?.replace(/\/32$/, '')
  if (!vpn) throw new TincConsulError('HOST_FILE_BAD', `${path} has no "Subnet = <vpn address>/32" line`)
  const v6 = subnets.find((s) => s.includes(':'))?.replace(/\/128$/, '')
  const vpnAddress6 = v6 === undefined ? undefined : canonicalIpv6(v6)
  if (v6 !== undefined && !vpnAddress6) throw new TincConsulError('HOST_FILE_BAD', `${path}: "Subnet = ${v6}" is not an IPv6 address`)
  return makeRecord({ name, vpnAddress: vpn, vpnAddress6, addresses, port, options, publicKey: h.publicKey, joinPort: addresses.length ? joinPort : undefined, routes, now })
}

/** A record from its parts, with the host file rendered from the allow-list. */
export function makeRecord(p: {
  name: string
  vpnAddress: string
  /** The IPv6 VPN address (networks with cidr6): a record field only, so `subnets` and the host file stay as older readers accept them. */
  vpnAddress6?: string
  addresses: string[]
  port: number
  options?: Array<{ key: string; value: string }>
  publicKey: string
  joinPort?: number
  /** Subnets behind the node: a record field only, like vpnAddress6, so the host file keeps the one /32. */
  routes?: string[]
  now?: Date
}): NodeRecord {
  const subnets = [`${p.vpnAddress}/32`]
  const hostFile = renderHostFile({ addresses: p.addresses, port: p.port, subnets, options: p.options ?? [], publicKey: p.publicKey })
  return {
    v: RECORD_VERSION,
    name: p.name,
    vpnAddress: p.vpnAddress,
    subnets,
    addresses: p.addresses,
    port: p.port,
    hostFile,
    fingerprint: keyFingerprint(p.publicKey),
    ...(p.joinPort ? { joinPort: p.joinPort } : {}),
    ...(p.vpnAddress6 ? { vpnAddress6: p.vpnAddress6 } : {}),
    ...(p.routes?.length ? { routes: p.routes } : {}),
    updatedAt: (p.now ?? new Date()).toISOString(),
  }
}

/**
 * What a peer would say about a record we are about to write: the same schema
 * and checks it gets when read back from Consul. Undefined when it would be accepted.
 */
export function validateRecord(record: NodeRecord, network: NetworkRecord): string | undefined {
  const parsed = nodeRecordSchema.safeParse(record)
  if (!parsed.success) return parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')
  const checked = checkPeer(parsed.data, { network, keyName: record.name })
  return checked.ok ? undefined : checked.reason
}

/** Two records say the same thing, whatever their timestamps. */
export const sameRecordContent = (a: NodeRecord, b: NodeRecord): boolean => JSON.stringify({ ...a, updatedAt: '' }) === JSON.stringify({ ...b, updatedAt: '' })

/**
 * Writes our record with check-and-set: create-only when absent, otherwise only
 * over the version we read. A lost race re-reads and tries again, so two
 * writers can't silently overwrite each other. Skips the write when nothing
 * but the timestamp would change. The change log names the record in the same
 * transaction (src/mesh/change-log.ts). `since` is the ModifyIndex our record is at or
 * above from now on: a read of the key with a lower index is older than this publish.
 */
export async function publishRecord(
  client: ConsulClient,
  layout: KvLayout,
  network: NetworkRecord,
  record: NodeRecord,
  log: Logger,
): Promise<{ outcome: 'unchanged' | 'written'; since: number; attempts: number; logRetries: number }> {
  const refused = validateRecord(record, network)
  if (refused) throw new TincConsulError('OWN_RECORD_INVALID', `our own record would be refused by peers: ${refused}`)
  const key = layout.node(record.name)
  let attempts = 0
  let logRetries = 0
  for (let attempt = 1; attempt <= 5; attempt++) {
    const current = await client.kvGet(key)
    const stored = current && decodeJson(current.value, nodeRecordSchema)
    // Whatever else is there is not ours to keep; it is overwritten (with CAS).
    if (current && stored?.ok && sameRecordContent(stored.value, record)) return { outcome: 'unchanged', since: current.modifyIndex, attempts, logRetries }
    const op: TxnOp = { KV: { Verb: 'cas', Key: key, Value: b64(JSON.stringify(record)), Index: current?.modifyIndex ?? 0 } }
    const sent = await txnWithChangeLog(client, layout, [op], [record.name], log)
    attempts += sent.attempts
    logRetries += sent.logRetries
    if (sent.result.ok) {
      log.info({ key, attempt, logged: sent.logged }, 'published our record')
      return { outcome: 'written', since: sent.result.results[0]?.KV?.ModifyIndex ?? (current?.modifyIndex ?? 0) + 1, attempts, logRetries }
    }
    log.info({ key, attempt }, 'record changed under us; re-reading before writing again')
  }
  throw new TincConsulError('PUBLISH_CONFLICT', `could not write ${key}: it kept changing under us (another daemon with the same name?)`)
}
