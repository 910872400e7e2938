import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync } from 'node:fs'
import { MEMBER_ALIVE } from '../../src/consul/client.ts'
import { waitFor } from '../../src/lab/daemon.ts'
import { labTest, useLab, namespacesWithPrefix, pidAlive } from './helpers.ts'

describe('lab: three nodes (one behind NAT) with hand-written tinc host files and one Consul server', () => {
  const get = useLab({ nodes: 3, nat: 1, consulServers: 1, tinc: true })

  labTest('every node pings every other node over tinc, including through the NAT', async () => {
    await get().waitForMesh()
    const r = await get().exec('node1', ['ping', '-c2', '-W2', '10.99.0.3'])
    assert.match(r.stdout, /2 received/)
  })

  labTest('the NAT node connects out from its router address, and nobody can connect in', async () => {
    const lab = get()
    await lab.waitForMesh()
    // node3's tinc connection reaches node1 masqueraded as the router's uplink address. The mesh
    // can already ping through node2 while node3's own attempt to node1 waits out tincd's retry
    // backoff (its first try can race node1's start), so wait for the connection itself.
    const established = () => lab.exec('node1', ['ss', '-Htn', 'state', 'established', '( sport = :655 )'])
    const ss = await waitFor(
      'node3 to hold a meta connection to node1',
      async () => {
        const out = (await established()).stdout
        return /198\.18\.0\.101:\d+/.test(out) ? out : undefined
      },
      { timeoutMs: 60_000, intervalMs: 500 },
    )
    assert.doesNotMatch(ss, /198\.18\.1\.2:/)
    // Even a node that knows the inside network can't reach it: the router forwards replies only.
    await lab.exec('node1', ['ip', 'route', 'add', '198.18.1.0/24', 'via', '198.18.0.101'])
    const inbound = await lab.exec('node1', ['ping', '-c1', '-W1', '198.18.1.2'], { allowFailure: true })
    assert.notEqual(inbound.code, 0, 'a public node reached the NAT node directly')
    const outbound = await lab.exec('node3', ['ping', '-c1', '-W1', '198.18.0.1'], { allowFailure: true })
    assert.equal(outbound.code, 0, 'the NAT node could not reach a public node')
  })

  labTest("Consul has a leader and every node's agent is an alive member", async () => {
    const lab = get()
    assert.match(await lab.consul('node2').leader(), /^198\.19\.0\.201:8300$/)
    const members = await lab.consul('node3').members()
    assert.deepEqual(
      members
        .filter((m) => m.status === MEMBER_ALIVE)
        .map((m) => m.name)
        .sort(),
      ['consul1', 'node1', 'node2', 'node3'],
    )
    assert.equal(members.find((m) => m.name === 'consul1')?.role, 'server')
  })

  labTest("a KV write through one node's agent is read through another's", async () => {
    const lab = get()
    const value = `from node3 ${Date.now()}`
    assert.equal(await lab.consul('node3').kvPut('smoke/key', value), true)
    assert.equal((await lab.consul('node1').kvGet('smoke/key'))?.value, value)
  })

  labTest('lab cut drops underlay traffic between two nodes both ways, and heal restores it', async () => {
    const lab = get()
    await lab.cut('node1', 'node2')
    assert.notEqual((await lab.exec('node1', ['ping', '-c1', '-W1', '198.18.0.2'], { allowFailure: true })).code, 0)
    assert.notEqual((await lab.exec('node2', ['ping', '-c1', '-W1', '198.18.0.1'], { allowFailure: true })).code, 0)
    // Other pairs are untouched.
    assert.equal((await lab.exec('node3', ['ping', '-c1', '-W1', '198.18.0.2'], { allowFailure: true })).code, 0)
    await lab.heal('node1', 'node2')
    assert.equal((await lab.exec('node1', ['ping', '-c1', '-W1', '198.18.0.2'], { allowFailure: true })).code, 0)
  })

  labTest('down stops every process and removes namespaces, the host link and the run dir', async () => {
    const lab = get()
    const { prefix } = lab.state.plan
    const pids = lab.state.pids
    assert.ok(pids.length >= 5, `expected tincd and consul pids, got ${pids.length}`)
    lab.down()
    assert.deepEqual(namespacesWithPrefix(prefix), [])
    assert.deepEqual(pids.filter(pidAlive), [])
    assert.equal(existsSync(lab.state.runDir), false)
    assert.equal(existsSync(`/sys/class/net/${lab.state.plan.hostIf}`), false)
  })
})
