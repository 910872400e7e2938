import type { ConsulClient } from '../consul/client.ts'
import type { KvLayout } from '../consul/kv-layout.ts'
import type { NetworkRecord } from './record.ts'

/**
 * Writes a network's record, and the empty `revoked/` and `aliases/` keys beside it, in one
 * transaction. Without that key an empty revoked/ has no node of its own in
 * Consul's radix tree (the same goes for aliases/), so every daemon's blocking query on it would wake on
 * each write nearby, that is on every node record change in the mesh.
 */
export async function writeNetworkRecord(client: ConsulClient, layout: KvLayout, record: NetworkRecord): Promise<void> {
  await client.request('PUT', '/v1/txn', [
    { KV: { Verb: 'set', Key: layout.network, Value: Buffer.from(JSON.stringify(record)).toString('base64') } },
    { KV: { Verb: 'set', Key: layout.revokedPrefix, Value: '' } },
    { KV: { Verb: 'set', Key: layout.aliasesPrefix, Value: '' } },
  ])
}
