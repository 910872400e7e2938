import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync } from 'node:fs'
import { readFile, readdir, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { createNetwork } from '../src/mesh/network.ts'
import { revokeNode } from '../src/mesh/revoke.ts'
import { readManagedBlock } from '../src/tinc/conf-block.ts'
import { NETWORK, nodeRecord, rsaPublicPem } from './helpers-keys.ts'
import { startNode, tempRoot, type TestNode } from './sync-fixture.ts'

const layout = kvLayout('test')

describe('sync against a real Consul agent', () => {
  let consul: DevConsul
  let admin: ConsulClient
  let root: string
  const nodes: TestNode[] = []
  const file = (n: TestNode, peer: string) => readFile(join(n.tincDir, 'hosts', peer), 'utf8').catch(() => undefined)
  const connectTo = async (n: TestNode) => readManagedBlock(await readFile(join(n.tincDir, 'tinc.conf'), 'utf8'))

  before(async () => {
    consul = await startDevConsul()
    admin = createConsulClient({ url: consul.url })
    root = await tempRoot()
    await createNetwork(admin, layout, NETWORK)
    nodes.push(await startNode({ root, name: 'alpha', octet: 1, isPublic: true, consulUrl: consul.url }))
    nodes.push(await startNode({ root, name: 'beta', octet: 2, isPublic: true, consulUrl: consul.url }))
    nodes.push(await startNode({ root, name: 'laptop', octet: 3, isPublic: false, consulUrl: consul.url }))
  })
  after(async () => {
    for (const n of nodes) await n.daemon.stop()
    await consul?.stop()
    if (root) await rm(root, { recursive: true, force: true })
  })

  test("every node gets every peer's host file and a ConnectTo for every public peer", async () => {
    const [alpha, beta, laptop] = nodes as [TestNode, TestNode, TestNode]
    for (const n of nodes) await n.until(async () => (await readdir(join(n.tincDir, 'hosts'))).length === 3, 'all three host files present')
    assert.deepEqual(await connectTo(alpha), ['ConnectTo = beta'])
    assert.deepEqual(await connectTo(beta), ['ConnectTo = alpha'])
    assert.deepEqual(await connectTo(laptop), ['ConnectTo = alpha', 'ConnectTo = beta'])
    const seenByBeta = await file(beta, 'laptop')
    assert.match(seenByBeta ?? '', /^Subnet = 10\.99\.0\.3\/32$/m)
    assert.doesNotMatch(seenByBeta ?? '', /^Address/m)
    // The operator's own lines in tinc.conf are untouched.
    assert.match(await readFile(join(alpha.tincDir, 'tinc.conf'), 'utf8'), /^Name = alpha\nStrictSubnets = yes\n# a line the operator wrote\n/)
  })

  test('hostile records are refused one by one and nothing unsafe reaches disk', async () => {
    const [alpha, beta] = nodes as [TestNode, TestNode]
    const betaBefore = await file(alpha, 'beta')
    const refusedBefore = alpha.daemon.stats.refusedTotal
    const writes: Array<[string, string | Buffer]> = [
      [`${layout.nodesPrefix}../x`, JSON.stringify(nodeRecord('x', 20))],
      [`${layout.nodesPrefix}x-up`, JSON.stringify(nodeRecord('x', 21))],
      [layout.node('stealer'), JSON.stringify({ ...nodeRecord('stealer', 22), subnets: ['10.99.0.1/32'] })],
      [layout.node('beta'), JSON.stringify(nodeRecord('beta', 2, rsaPublicPem()))], // a swapped key for a pinned node
      [layout.node('binary'), Buffer.from([0xff, 0xfe, 0x00, 0x7b])],
    ]
    // Through a transaction, so keys like nodes/../x are stored exactly as written.
    await admin.request(
      'PUT',
      '/v1/txn',
      writes.map(([Key, v]) => ({ KV: { Verb: 'set', Key, Value: Buffer.from(v).toString('base64') } })),
    )
    // Near Consul's 512 KiB value limit; too big for a transaction, so a plain PUT.
    const garbage = await fetch(new URL(`/v1/kv/${layout.node('garbage')}`, consul.url), { method: 'PUT', body: new Uint8Array(500 * 1024).fill(0x41) })
    assert.equal(garbage.status, 200)
    // A good record written last: once it is on disk, every write before it has been judged.
    await admin.kvPut(layout.node('proxyline'), JSON.stringify(nodeRecord('proxyline', 30, rsaPublicPem(), ['Proxy = exec /bin/sh -c "touch /tmp/tc-pwned"'])))
    await alpha.until(async () => (await file(alpha, 'proxyline')) !== undefined, 'proxyline host file written')
    const hosts = (await readdir(join(alpha.tincDir, 'hosts'))).sort()
    assert.deepEqual(hosts, ['alpha', 'beta', 'laptop', 'proxyline'])
    assert.equal(existsSync(join(alpha.tincDir, 'x')), false)
    assert.doesNotMatch((await file(alpha, 'proxyline')) ?? '', /Proxy/)
    assert.equal(await file(alpha, 'beta'), betaBefore, "the pinned node's host file changed")
    // Five of the six are refused every time. The swapped beta key races beta's own daemon,
    // which writes its real record back at once: alpha may never read the swap at all (its
    // host file for beta staying the same is asserted above either way).
    assert.ok(alpha.daemon.stats.refusedTotal - refusedBefore >= 5, `only ${alpha.daemon.stats.refusedTotal - refusedBefore} refusals counted`)
    // beta's own daemon sees a record under its name that isn't its own and writes the real one back.
    await beta.until(
      async () =>
        alpha.daemon.view()?.peers.get('beta')?.record.fingerprint !== undefined &&
        (await admin.kvGet(layout.node('beta')))?.value.includes(alpha.daemon.view()?.peers.get('beta')?.record.fingerprint ?? '-') === true,
      'beta republished its real key',
    )
    await admin.request(
      'PUT',
      '/v1/txn',
      ['../x', 'x-up', 'stealer', 'garbage', 'binary'].map((k) => ({ KV: { Verb: 'delete', Key: `${layout.nodesPrefix}${k}` } })),
    )
  })

  test('an empty read of nodes/ never deletes host files; a confirmed removal does', async () => {
    const [alpha] = nodes as [TestNode]
    const ignored = alpha.daemon.stats.emptyReadsIgnored
    // What a blank read during a leader election looks like: nodes/ suddenly empty.
    await admin.request('DELETE', `/v1/kv/${layout.nodesPrefix}?recurse=true`)
    await alpha.until(() => alpha.daemon.stats.emptyReadsIgnored > ignored, 'the empty read was seen')
    assert.ok((await file(alpha, 'beta')) !== undefined, 'an empty read deleted a host file')
    // Now a real, observable removal: a non-empty nodes/ without proxyline, with the network record present.
    // The running daemons see their own records missing and publish them again.
    await admin.kvPut(layout.node('canary'), JSON.stringify(nodeRecord('canary', 40)))
    await alpha.until(async () => (await file(alpha, 'proxyline')) === undefined && (await file(alpha, 'canary')) !== undefined, 'proxyline removed, canary added')
    await alpha.until(async () => (await file(alpha, 'beta')) !== undefined && (await file(alpha, 'laptop')) !== undefined, 'beta and laptop republished themselves')
    assert.ok(await admin.kvGet(layout.node('alpha')), 'alpha did not republish its record')
  })

  test('a revoked node disappears everywhere and its key is refused under a new name', async () => {
    const [alpha, beta] = nodes as [TestNode, TestNode]
    const pem = rsaPublicPem()
    await admin.kvPut(layout.node('doomed'), JSON.stringify(nodeRecord('doomed', 50, pem)))
    await beta.until(async () => (await file(beta, 'doomed')) !== undefined, 'doomed arrives')
    await revokeNode(admin, layout, 'doomed')
    await admin.kvPut(layout.node('reborn'), JSON.stringify(nodeRecord('reborn', 51, pem)))
    await admin.kvPut(layout.node('canary2'), JSON.stringify(nodeRecord('canary2', 52)))
    for (const n of [alpha, beta]) {
      await n.until(async () => (await file(n, 'canary2')) !== undefined && (await file(n, 'doomed')) === undefined, 'doomed gone, canary2 present')
      assert.equal(await file(n, 'reborn'), undefined)
      assert.doesNotMatch((await connectTo(n)).join('\n'), /doomed|reborn/)
    }
  })

  test('once addresses are allocated, a record may only use its own allocation', async () => {
    const [, beta] = nodes as [TestNode, TestNode]
    const at = '2026-11-21T00:00:00.000Z'
    for (const [ip, name] of [
      ['10.99.0.1', 'alpha'],
      ['10.99.0.2', 'beta'],
      ['10.99.0.3', 'laptop'],
    ] as const)
      await admin.kvPut(layout.ipam(ip), JSON.stringify({ name, at }))
    await beta.until(async () => beta.daemon.allocations().size === 3, 'beta read the allocations')
    // A node that can write its own record still can't move onto alpha's address.
    await admin.kvPut(layout.node('squatter'), JSON.stringify(nodeRecord('squatter', 1)))
    await admin.kvPut(layout.ipam('10.99.0.44'), JSON.stringify({ name: 'newbie', at }))
    await admin.kvPut(layout.node('newbie'), JSON.stringify(nodeRecord('newbie', 44)))
    await beta.until(async () => (await file(beta, 'newbie')) !== undefined, 'newbie, whose address is allocated to it, accepted')
    await beta.until(async () => beta.events.some((e) => e.refusals.some((r) => r.name === 'squatter' && /allocated to alpha/.test(r.reason))), 'squatter refused')
    assert.equal(await file(beta, 'squatter'), undefined)
    assert.ok(beta.daemon.view()?.peers.has('alpha'))
    // canary2 was accepted before the network had allocations; it has none, so the copy goes too.
    await beta.until(async () => (await file(beta, 'canary2')) === undefined, 'canary2, which holds no allocation, dropped')
  })

  test('a restarted daemon renders from its cache while Consul is unreachable', async () => {
    const [alpha] = nodes as [TestNode]
    await alpha.daemon.stop()
    await rm(join(alpha.tincDir, 'hosts', 'newbie'))
    const offline = await startNode({ root, name: 'alpha', octet: 1, isPublic: true, consulUrl: 'http://127.0.0.1:9', tincDir: alpha.tincDir })
    nodes[0] = offline
    await offline.until(async () => (await file(offline, 'newbie')) !== undefined, 'newbie restored from cache')
    assert.equal(offline.events[0]?.source, 'cache')
  })
})
