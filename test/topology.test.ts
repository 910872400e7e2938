import { test } from 'node:test'
import assert from 'node:assert/strict'
import { DEFAULT_LAB_OPTIONS, findNode, namespacesOf, planLab } from '../src/lab/topology.ts'

test('public nodes get underlay addresses; NAT nodes get a router whose uplink is what peers see', () => {
  const plan = planLab('ab12', { ...DEFAULT_LAB_OPTIONS, nodes: 4, nat: 2 })
  assert.deepEqual(
    plan.nodes.map((n) => [n.name, n.behindNat, n.underlayIp, n.publicIp, n.vpnIp]),
    [
      ['node1', false, '198.18.0.1', '198.18.0.1', '10.99.0.1'],
      ['node2', false, '198.18.0.2', '198.18.0.2', '10.99.0.2'],
      ['node3', true, '198.18.1.2', '198.18.0.101', '10.99.0.3'],
      ['node4', true, '198.18.2.2', '198.18.0.102', '10.99.0.4'],
    ],
  )
  assert.equal(plan.nodes[2]?.router?.ns, 'tclab12-nat1')
  assert.equal(plan.nodes[2]?.router?.lanIp, '198.18.1.1')
})

test('every namespace carries the per-run prefix, and names are unique', () => {
  const plan = planLab('00ff', { ...DEFAULT_LAB_OPTIONS, nodes: 5, nat: 2, consulServers: 3 })
  const all = namespacesOf(plan)
  assert.equal(new Set(all).size, all.length)
  for (const ns of all) assert.match(ns, /^tcl00ff-/)
  assert.equal(all.length, 1 + 3 + 5 + 2)
})

test('interface names fit the kernel limit of 15 characters', () => {
  const plan = planLab('deadbeef', { ...DEFAULT_LAB_OPTIONS, nodes: 20, nat: 19, consulServers: 3 })
  assert.ok(plan.hostIf.length <= 15, plan.hostIf)
  for (const n of plan.nodes) assert.ok(`c-${n.name}`.length <= 15 && `u-${n.name}`.length <= 15)
})

test('control addresses never collide between nodes, servers and the host link', () => {
  const plan = planLab('1234', { ...DEFAULT_LAB_OPTIONS, nodes: 20, nat: 5, consulServers: 3 })
  const ips = [...plan.nodes.map((n) => n.controlIp), ...plan.servers.map((s) => s.controlIp), plan.hostIp]
  assert.equal(new Set(ips).size, ips.length)
})

test('bad lab options are refused with a message naming the flag', () => {
  assert.throws(() => planLab('1234', { ...DEFAULT_LAB_OPTIONS, nodes: 0 }), /--nodes must be 1-20/)
  assert.throws(() => planLab('1234', { ...DEFAULT_LAB_OPTIONS, nodes: 2, nat: 2 }), /at least one node must be public/)
  assert.throws(() => planLab('1234', { ...DEFAULT_LAB_OPTIONS, consulServers: 2 as 1 }), /--consul-servers must be 0, 1 or 3/)
  assert.throws(() => planLab('1234', { ...DEFAULT_LAB_OPTIONS, consulServers: 0, acl: true }), /ACLs need the lab's Consul servers/)
  assert.deepEqual(planLab('1234', { ...DEFAULT_LAB_OPTIONS, consulServers: 0 }).servers, [])
  assert.throws(() => planLab('1234', { ...DEFAULT_LAB_OPTIONS, vpnCidr: '192.168.1.0/24' }), /10\.x\.y\.0\/24/)
  assert.throws(() => planLab('../x', DEFAULT_LAB_OPTIONS), /hex/)
})

test('findNode names the nodes that exist when asked for one that does not', () => {
  const plan = planLab('1234', DEFAULT_LAB_OPTIONS)
  assert.throws(() => findNode(plan, 'node9'), /node1, node2, node3/)
})
