import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { rm } from 'node:fs/promises'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { newAssociationValue, newGroupValue } from '../src/mesh/groups.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { createNetwork } from '../src/mesh/network.ts'
import { NETWORK } from './helpers-keys.ts'
import { recordingNft, startNode, tempRoot, type TestNode } from './sync-fixture.ts'

const layout = kvLayout('test')

// Groups in 10.99.0.0/24: alpha (.1) in "left", beta (.2) in "right", gamma (.5) in no group.
describe('the access policy against a real Consul agent', () => {
  let consul: DevConsul
  let admin: ConsulClient
  let root: string
  const nodes: TestNode[] = []
  const nft = recordingNft()
  const scripts = nft.calls

  before(async () => {
    consul = await startDevConsul()
    admin = createConsulClient({ url: consul.url })
    root = await tempRoot()
    await createNetwork(admin, layout, NETWORK)
    nodes.push(await startNode({ root, name: 'alpha', octet: 1, isPublic: true, consulUrl: consul.url, nft: nft.nft }))
    nodes.push(await startNode({ root, name: 'beta', octet: 2, isPublic: true, consulUrl: consul.url }))
    nodes.push(await startNode({ root, name: 'gamma', octet: 5, isPublic: false, consulUrl: consul.url }))
  })
  after(async () => {
    for (const n of nodes) await n.daemon.stop()
    await consul?.stop()
    if (root) await rm(root, { recursive: true, force: true })
  })

  test('groups hide names, an association shows them again, and the table follows; an open network never runs nft', async () => {
    const [alpha] = nodes as [TestNode]
    await alpha.until(() => ['beta', 'gamma'].every((n) => alpha.daemon.view()?.peers.has(n)), 'alpha sees beta and gamma')
    assert.deepEqual(alpha.daemon.access().hidden, [], 'an open network hides nobody')
    assert.equal(scripts.length, 0, 'an open network never runs nft')

    await admin.kvPut(layout.group('left'), JSON.stringify(newGroupValue({ cidr: '10.99.0.0/31' })))
    await admin.kvPut(layout.group('right'), JSON.stringify(newGroupValue({ cidr: '10.99.0.2/31' })))
    await alpha.until(() => alpha.daemon.access().hidden.join() === 'beta,gamma', 'beta (another group) and gamma (no group) hidden from alpha')
    assert.equal(alpha.daemon.access().group, 'left')
    assert.ok(alpha.daemon.view()?.peers.has('beta'), 'a hidden node keeps its place in the view (and its host file)')
    await alpha.until(() => /ip saddr 10\.99\.0\.0\/31 accept/.test(scripts.at(-1) ?? ''), 'the table lets only left in')

    await admin.kvPut(layout.association('right', 'left'), JSON.stringify(newAssociationValue()))
    await alpha.until(() => alpha.daemon.access().hidden.join() === 'gamma', 'the association shows beta again')
    await alpha.until(() => /ip saddr \{ 10\.99\.0\.0\/31, 10\.99\.0\.2\/31 \} accept/.test(scripts.at(-1) ?? ''), 'the table lets left and right in')

    await admin.kvPut(layout.group('bad'), '{"v":1,"cidr":"10.99.0.0/30","createdAt":"2026-12-02T00:00:00.000Z"}')
    await alpha.until(() => alpha.daemon.access().refused.some((r) => r.key === layout.group('bad') && /overlap/.test(r.reason)), 'an overlapping group refused and shown')
    assert.equal(alpha.daemon.access().hidden.join(), 'gamma', 'a refused group changes nothing')
  })
})
