import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { newGroupValue } from '../src/mesh/groups.ts'
import { initNode, type InitOptions } from '../src/mesh/init.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { readAccessPolicy, readNetwork } from '../src/mesh/network.ts'

// Issue 20: "an infrastructure group (public nodes and Consul servers, defined at init)".
describe('init places public nodes in an infrastructure group, against a real Consul agent', () => {
  let consul: DevConsul
  let admin: ConsulClient
  let root: string
  before(async () => {
    consul = await startDevConsul()
    admin = createConsulClient({ url: consul.url })
    root = await mkdtemp(join(tmpdir(), 'tc-init-infra-'))
  })
  after(async () => {
    await consul?.stop()
    if (root) await rm(root, { recursive: true, force: true })
  })

  const init = (net: string, name: string, extra: Partial<InitOptions> = {}, steps: string[] = []) =>
    initNode({
      net,
      name,
      domain: 'mesh',
      addresses: ['198.18.0.40'],
      port: 655,
      keyBits: 1024,
      consulUrl: consul.url,
      runDir: join(root, 'run'),
      joinPort: 0,
      force: false,
      splitDns: false,
      root: join(root, net, name),
      configDir: join(root, net, `${name}-etc`),
      progress: (s) => void steps.push(s),
      ...extra,
    })
  const policyOf = async (net: string) => {
    const layout = kvLayout(net)
    const network = (await readNetwork(admin, layout)) ?? assert.fail(`no network ${net}`)
    return (await readAccessPolicy(admin, layout, network)).read.policy
  }

  test('--infra-cidr creates the group and the first node takes its address from it; later public nodes join it by default; a re-run keeps everything', async () => {
    const steps: string[] = []
    const first = await init('corp', 'pub1', { cidr: '10.97.0.0/24', infraCidr: '10.97.0.0/28' }, steps)
    assert.equal(first.address, '10.97.0.1')
    assert.deepEqual((await policyOf('corp')).groups, [{ name: 'infra', cidr: '10.97.0.0/28', infra: true }])
    assert.ok(
      steps.some((s) => /created infrastructure group infra \(10\.97\.0\.0\/28\): the first group/.test(s)),
      steps.join(' | '),
    )
    const second: string[] = []
    assert.equal((await init('corp', 'pub2', {}, second)).address, '10.97.0.2', 'the only infrastructure group, by default')
    assert.ok(
      second.some((s) => /address comes from infrastructure group infra/.test(s)),
      second.join(' | '),
    )
    const again = await init('corp', 'pub1', { cidr: '10.97.0.0/24', infraCidr: '10.97.0.0/28' })
    assert.equal(again.address, '10.97.0.1', 'a re-run keeps the address')
    assert.equal((await policyOf('corp')).groups.length, 1)
  })

  test('a node made before the group keeps its address; bad ranges, a group that is not infrastructure and two candidates are refused before anything is written', async () => {
    assert.equal((await init('old', 'pub1', { cidr: '10.96.0.0/24' })).address, '10.96.0.1')
    const steps: string[] = []
    assert.equal((await init('old', 'pub1', { infraCidr: '10.96.0.16/28' }, steps)).address, '10.96.0.1')
    assert.ok(
      steps.some((s) => /pub1 is in the network already and keeps its address; `tinc-consul group move pub1 GROUP` moves it/.test(s)),
      steps.join(' | '),
    )
    assert.equal((await init('old', 'pub2')).address, '10.96.0.17', 'a new public node goes in the group')

    const layout = kvLayout('old')
    await assert.rejects(init('old', 'pub3', { infraCidr: '10.95.0.0/28', infraGroup: 'edge' }), { code: 'GROUP_REFUSED' })
    await assert.rejects(init('old', 'pub3', { infraCidr: '10.96.0.16/29', infraGroup: 'edge' }), { code: 'GROUP_REFUSED' })
    assert.equal(await admin.kvGet(layout.group('edge')), undefined, 'the refused group edge was never written')
    await admin.kvPut(layout.group('eng'), JSON.stringify(newGroupValue({ cidr: '10.96.0.64/28' })))
    await assert.rejects(init('old', 'pub3', { infraGroup: 'eng' }), { code: 'NOT_INFRA' })
    await assert.rejects(init('old', 'pub3', { infraGroup: 'nowhere' }), { code: 'NO_SUCH_GROUP' })
    await admin.kvPut(layout.group('edge'), JSON.stringify(newGroupValue({ cidr: '10.96.0.128/28', infra: true })))
    await assert.rejects(init('old', 'pub3'), { code: 'WHICH_INFRA' })
    assert.equal(await admin.kvGet(layout.node('pub3')), undefined, 'pub3 was never written')
    assert.equal((await init('old', 'pub3', { infraGroup: 'edge' })).address, '10.96.0.129')
  })

  test('a re-run on a node already in the network keeps its address without asking which infrastructure group, however many there are', async () => {
    assert.equal((await init('two', 'pub1', { cidr: '10.94.0.0/24' })).address, '10.94.0.1')
    const layout = kvLayout('two')
    await admin.kvPut(layout.group('infra'), JSON.stringify(newGroupValue({ cidr: '10.94.0.16/28', infra: true })))
    await admin.kvPut(layout.group('edge'), JSON.stringify(newGroupValue({ cidr: '10.94.0.32/28', infra: true })))
    await assert.rejects(init('two', 'pub2'), { code: 'WHICH_INFRA' }, 'a new node is asked which')
    assert.equal((await init('two', 'pub1')).address, '10.94.0.1', 'a re-run keeps the address')
  })

  test('a bad --infra-group is refused before the network is made', async () => {
    await assert.rejects(init('early', 'pub1', { cidr: '10.93.0.0/24', infraGroup: 'Bad' }), { code: 'BAD_GROUP' })
    assert.equal(await admin.kvGet(kvLayout('early').network), undefined, 'no network record was written')
  })
})
