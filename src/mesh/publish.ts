import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { ConsulClient } from '../consul/client.ts'
import type { KvLayout } from '../consul/kv-layout.ts'
import { TincConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import { ALLOWED_OPTIONS, keyFingerprint, parseHostFile, renderHostFile } from '../tinc/hostfile.ts'
import { isTincName } from '../tinc/names.ts'
import { RECORD_VERSION, checkPeer, type NetworkRecord, type NodeRecord } from './record.ts'

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
  const h = parseHostFile(text)
  if (h.errors.length) throw new TincConsulError('HOST_FILE_BAD', `${path}: ${h.errors[0]}`)
  if (!h.publicKey) throw new TincConsulError('HOST_FILE_BAD', `${path} has no RSA public key; generate one with tincd -K`)
  const values = (k: string) => h.entries.filter((e) => e.key.toLowerCase() === k).map((e) => e.value)
  // "Address = host [port]": the optional port is tinc's; we publish Port separately.
  const addresses = values('address').map((a) => a.split(/\s+/)[0] ?? '').filter(Boolean)
  const port = Number(values('port')[0] ?? 655)
  const subnets = values('subnet').map((s) => s.split('#')[0]?.trim() ?? '')
  const vpn = subnets[0]?.replace(/\/32$/, '')
  if (!vpn) throw new TincConsulError('HOST_FILE_BAD', `${path} has no "Subnet = <vpn address>/32" line`)
  const options = h.entries.flatMap((e) => {
    const k = Object.keys(ALLOWED_OPTIONS).find((o) => o.toLowerCase() === e.key.toLowerCase())
    return k && ALLOWED_OPTIONS[k]?.test(e.value) ? [{ key: k, value: e.value }] : []
  })
  return makeRecord({ name, vpnAddress: vpn, addresses, port, options, publicKey: h.publicKey, joinPort: addresses.length ? joinPort : undefined, now })
}

/** A record from its parts, with the host file rendered from the allow-list. */
export function makeRecord(p: { name: string; vpnAddress: string; addresses: string[]; port: number; options?: Array<{ key: string; value: string }>; publicKey: string; joinPort?: number; now?: Date }): NodeRecord {
  const subnets = [`${p.vpnAddress}/32`]
  const hostFile = renderHostFile({ addresses: p.addresses, port: p.port, subnets, options: p.options ?? [], publicKey: p.publicKey })
  return { v: RECORD_VERSION, name: p.name, vpnAddress: p.vpnAddress, subnets, addresses: p.addresses, port: p.port, hostFile, fingerprint: keyFingerprint(p.publicKey), ...(p.joinPort ? { joinPort: p.joinPort } : {}), updatedAt: (p.now ?? new Date()).toISOString() }
}

/** Two records say the same thing, whatever their timestamps. */
export const sameRecordContent = (a: NodeRecord, b: NodeRecord): boolean => JSON.stringify({ ...a, updatedAt: '' }) === JSON.stringify({ ...b, updatedAt: '' })

/**
 * Writes our record with check-and-set: create-only when absent, otherwise only
 * over the version we read. A lost race re-reads and tries again, so two
 * writers can't silently overwrite each other. Skips the write when nothing
 * but the timestamp would change.
 */
export async function publishRecord(client: ConsulClient, layout: KvLayout, network: NetworkRecord, record: NodeRecord, log: Logger): Promise<'unchanged' | 'written'> {
  const check = checkPeer(record, { network, keyName: record.name })
  if (!check.ok) throw new TincConsulError('OWN_RECORD_INVALID', `our own record would be refused by peers: ${check.reason}`)
  const key = layout.node(record.name)
  for (let attempt = 1; attempt <= 5; attempt++) {
    const current = await client.kvGet(key)
    if (current) {
      try {
        if (sameRecordContent(JSON.parse(current.value) as NodeRecord, record)) return 'unchanged'
      } catch {
        // Whatever is there is not ours to keep; overwrite it (with CAS).
      }
    }
    if (await client.kvPut(key, JSON.stringify(record), { cas: current?.modifyIndex ?? 0 })) {
      log.info({ key, attempt }, 'published our record')
      return 'written'
    }
    log.info({ key, attempt }, 'record changed under us; re-reading before writing again')
  }
  throw new TincConsulError('PUBLISH_CONFLICT', `could not write ${key}: it kept changing under us (another daemon with the same name?)`)
}
