import type { ConsulClient } from '../consul/client.ts'
import type { KvLayout } from '../consul/kv-layout.ts'
import { TincConsulError } from '../errors.ts'
import { decodeJson, nodeRecordSchema } from './record.ts'

/**
 * Revokes a node in one transaction: its key's fingerprint goes into
 * revoked/ and its record is deleted. Every daemon then drops the node's host
 * file and ConnectTo and reloads tincd, and refuses that key under any name.
 */
export async function revokeNode(client: ConsulClient, layout: KvLayout, name: string, now = new Date()): Promise<{ fingerprint: string }> {
  const key = layout.node(name)
  const current = await client.kvGet(key)
  if (!current) throw new TincConsulError('NO_SUCH_NODE', `no record for "${name}" at ${key}`)
  const d = decodeJson(current.value, nodeRecordSchema)
  if (!d.ok) throw new TincConsulError('RECORD_UNREADABLE', `the record for "${name}" is unreadable (${d.reason}); delete ${key} by hand`)
  const fingerprint = d.value.fingerprint
  const value = Buffer.from(JSON.stringify({ name, revokedAt: now.toISOString() })).toString('base64')
  await client.request('PUT', '/v1/txn', [
    { KV: { Verb: 'set', Key: layout.revoked(fingerprint), Value: value } },
    // delete-cas: if the record changed since we read it, the whole revocation rolls back.
    { KV: { Verb: 'delete-cas', Key: key, Index: current.modifyIndex } },
  ])
  return { fingerprint }
}
