import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { allocateAddress, candidates, hostRange, readIpam } from '../src/mesh/ipam.ts'
import { revokeNode } from '../src/mesh/revoke.ts'
import { nodeRecord } from './helpers-keys.ts'

describe('address allocation against a real Consul agent', () => {
  let consul: DevConsul
  let admin: ConsulClient
  before(async () => {
    consul = await startDevConsul()
    admin = createConsulClient({ url: consul.url })
  })
  after(async () => {
    await consul?.stop()
  })
  const alloc = (net: string, cidr: string, name: string) => allocateAddress({ client: admin, layout: kvLayout(net), cidr, name })

  test('20 concurrent allocations get 20 distinct addresses, lowest first, never the network or broadcast address', async () => {
    const results = await Promise.all(Array.from({ length: 20 }, (_, i) => alloc('race', '10.50.0.0/24', `n${i}`)))
    const addresses = results.map((r) => (r.ok ? r.address : `failed: ${r.what}`))
    assert.equal(new Set(addresses).size, 20, `duplicates in ${addresses.join(' ')}`)
    assert.deepEqual(
      [...addresses].sort((a, b) => Number(a.split('.')[3]) - Number(b.split('.')[3])),
      Array.from({ length: 20 }, (_, i) => `10.50.0.${i + 1}`),
    )
    // Every reservation names its node.
    const held = await readIpam(admin, kvLayout('race'))
    assert.deepEqual([...held.values()].map((h) => h.entry?.name).sort(), Array.from({ length: 20 }, (_, i) => `n${i}`).sort())
  })

  test('a full network says so; a /31 or /32 is refused up front', async () => {
    for (const n of ['a', 'b']) assert.equal((await alloc('tiny', '10.51.0.0/30', n)).ok, true)
    await assert.rejects(alloc('tiny', '10.51.0.0/30', 'c'), { code: 'IPAM_FULL' })
    assert.throws(() => hostRange('10.51.0.0/31'), { code: 'CIDR_TOO_SMALL' })
  })

  test('the same name gets its own address again, also after revocation; others get fresh ones first', async () => {
    const net = 'rejoin'
    const layout = kvLayout(net)
    const first = await alloc(net, '10.52.0.0/24', 'laptop')
    assert.deepEqual(first, { ok: true, address: '10.52.0.1' })
    assert.deepEqual(await alloc(net, '10.52.0.0/24', 'laptop'), first, 'allocating twice must be idempotent')
    await admin.kvPut(layout.node('laptop'), JSON.stringify({ ...nodeRecord('laptop', 1), vpnAddress: '10.52.0.1', subnets: ['10.52.0.1/32'] }))
    const { releasedAddress } = await revokeNode(admin, layout, 'laptop')
    assert.equal(releasedAddress, '10.52.0.1')
    assert.deepEqual(await alloc(net, '10.52.0.0/24', 'desktop'), { ok: true, address: '10.52.0.2' }, 'a released address was handed to someone else while fresh ones were left')
    assert.deepEqual(await alloc(net, '10.52.0.0/24', 'laptop'), { ok: true, address: '10.52.0.1' })
  })

  test("when the caller's own operation fails, nothing is reserved", async () => {
    const layout = kvLayout('atomic')
    await admin.kvPut(layout.node('taken'), '{}')
    const res = await allocateAddress({ client: admin, layout, cidr: '10.53.0.0/24', name: 'taken', with: () => [{ KV: { Verb: 'cas', Key: layout.node('taken'), Value: '', Index: 0 } }] })
    assert.equal(res.ok, false)
    assert.equal(res.ok ? -1 : res.op, 0)
    assert.equal((await readIpam(admin, layout)).size, 0)
  })
})

test('candidates skip held addresses and try released ones last', () => {
  const range = hostRange('10.0.0.0/29')
  const entry = (name: string, released = false) => ({ name, at: '2026-01-01T00:00:00.000Z', ...(released ? { releasedAt: '2026-01-02T00:00:00.000Z' } : {}) })
  const held = new Map([
    ['10.0.0.1', { address: '10.0.0.1', index: 5, entry: entry('a') }],
    ['10.0.0.2', { address: '10.0.0.2', index: 6, entry: entry('b', true) }],
    ['10.0.0.3', { address: '10.0.0.3', index: 7, entry: undefined }],
  ])
  assert.deepEqual(
    [...candidates(range, 'c', held)].map((c) => c.address),
    ['10.0.0.4', '10.0.0.5', '10.0.0.6', '10.0.0.2'],
  )
  assert.deepEqual([...candidates(range, 'b', held)][0], { address: '10.0.0.2', index: 6 })
})
