import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { MEMBER_ALIVE } from '../../src/consul/client.ts'
import { ConsulError } from '../../src/errors.ts'
import { labTest, useLab } from './helpers.ts'

describe('lab: three Consul servers with ACLs on (default deny)', () => {
  const get = useLab({ nodes: 2, nat: 1, consulServers: 3, acl: true, tinc: false })

  labTest('the three servers form one Raft cluster with a leader', async () => {
    const lab = get()
    const peers = await lab.consul('consul2').request<string[]>('GET', '/v1/status/peers')
    assert.deepEqual(peers.sort(), ['198.19.0.201:8300', '198.19.0.202:8300', '198.19.0.203:8300'])
    assert.ok(peers.includes(await lab.consul('node1').leader()))
  })

  labTest('every client agent joined with its agent token', async () => {
    const members = await get().consul('consul1').members()
    assert.equal(members.filter((m) => m.status === MEMBER_ALIVE).length, 5)
  })

  labTest('an anonymous KV write is refused; the management token the lab kept may write', async () => {
    const lab = get()
    await assert.rejects(lab.consul('node1', { token: null }).kvPut('acl/anon', 'x'), (err: unknown) => err instanceof ConsulError && err.code === 'CONSUL_FORBIDDEN')
    assert.equal(
      await lab
        .consul('node1', { token: null })
        .kvGet('acl/anon')
        .catch((e: unknown) => e instanceof ConsulError && e.code),
      'CONSUL_FORBIDDEN',
    )
    assert.match(lab.state.managementToken ?? '', /^[0-9a-f-]{36}$/)
    assert.equal(await lab.consul('node1').kvPut('acl/admin', 'ok'), true)
    assert.equal((await lab.consul('node2').kvGet('acl/admin'))?.value, 'ok')
  })
})
