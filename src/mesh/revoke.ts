import type { ConsulClient, TxnOp } from '../consul/client.ts'
import type { KvItem } from '../consul/kv.ts'
import type { KvLayout } from './kv-layout.ts'
import { txnWithChangeLog } from './change-log.ts'
import { TincConsulError } from '../errors.ts'
import { ipamEntrySchema, releaseOp } from './ipam.ts'
import { decodeJson, nodeRecordSchema } from './record.ts'

/**
 * Revokes a node in one transaction: its key's fingerprint goes into
 * revoked/ and its record is deleted. Every daemon then drops the node's host
 * file and ConnectTo and reloads tincd, and refuses that key under any name.
 * The node's address is released in the same transaction.
 */
export async function revokeNode(client: ConsulClient, layout: KvLayout, name: string, now = new Date()): Promise<{ fingerprint: string; releasedAddress: string | undefined }> {
  const key = layout.node(name)
  const current = await client.kvGet(key)
  if (!current) throw new TincConsulError('NO_SUCH_NODE', `no record for "${name}" at ${key}`)
  const d = decodeJson(current.value, nodeRecordSchema)
  if (!d.ok) throw new TincConsulError('RECORD_UNREADABLE', `the record for "${name}" is unreadable (${d.reason}); delete ${key} by hand`)
  const fingerprint = d.value.fingerprint
  const value = Buffer.from(JSON.stringify({ name, revokedAt: now.toISOString() })).toString('base64')
  const ops: TxnOp[] = [
    { KV: { Verb: 'set', Key: layout.revoked(fingerprint), Value: value } },
    // delete-cas: if the record changed since we read it, the whole revocation rolls back.
    { KV: { Verb: 'delete-cas', Key: key, Index: current.modifyIndex } },
    // A revoked join server must drop out of later invites too.
    { KV: { Verb: 'delete', Key: layout.joinEndpoint(name) } },
  ]
  // Free the node's address, keeping the name on it so a re-join under that name gets it back.
  const held = await client.kvGet(layout.ipam(d.value.vpnAddress))
  const entry = held && decodeJson(held.value, ipamEntrySchema, 1024)
  if (held && entry?.ok && entry.value.name === name) ops.push(releaseOp(layout, d.value.vpnAddress, name, held.modifyIndex, now))
  const res = (await txnWithChangeLog(client, layout, ops, [name])).result
  if (!res.ok) throw new TincConsulError('REVOKE_RACED', `"${name}" changed while it was being revoked (${res.errors.map((e) => e.What).join('; ')}); run revoke again`)
  return { fingerprint, releasedAddress: ops.length > 3 ? d.value.vpnAddress : undefined }
}

/** Fingerprints from revoked/ keys; the marker and junk keys are left out. */
export function revokedFrom(items: KvItem[], layout: KvLayout): Set<string> {
  return new Set(items.map((i) => `sha256:${i.key.slice(layout.revokedPrefix.length)}`).filter((fp) => /^sha256:[0-9a-f]{64}$/.test(fp)))
}
