import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { connect } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import type { ConsulClient } from '../src/consul/client.ts'
import { createInvite, decodeInvite } from '../src/mesh/invite.ts'
import { redeemInvite } from '../src/mesh/join-client.ts'
import { listJoinEndpoints } from '../src/mesh/join-endpoints.ts'
import type { SeparatedJoinServer } from '../src/mesh/join-server.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { nodeRecord, rsaPublicPem } from './helpers-keys.ts'
import { separatedJoinFixture } from './sync-fixture.ts'

const layout = kvLayout('test')
const asRoot = process.getuid?.() === 0

/** Waits until the port takes a connection again; the test's own timeout bounds it. */
async function accepting(port: number): Promise<void> {
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect({ host: '127.0.0.1', port })
      s.once('connect', () => (s.destroy(), resolve(true)))
      s.once('error', () => resolve(false))
    })
    if (ok) return
    await sleep(100)
  }
}

describe('the join endpoint as `run` serves it: a front without a token, a broker with it', { skip: asRoot ? false : 'needs root to run the front as nobody' }, () => {
  let fx: Awaited<ReturnType<typeof separatedJoinFixture>>
  let admin: ConsulClient
  let server: SeparatedJoinServer
  let joinToken: string
  let management: string

  before(async () => {
    fx = await separatedJoinFixture({ burst: 1000 })
    ;({ admin, server, joinToken, management } = fx)
  })
  after(() => fx?.stop())

  test('the process that reads the network runs as nobody and has no token anywhere in its environment', () => {
    assert.equal(server.front.uid, 65534)
    const status = readFileSync(`/proc/${server.front.pid}/status`, 'utf8')
    assert.match(status, /^Uid:\s+65534\s+65534\s+65534\s+65534$/m)
    const env = readFileSync(`/proc/${server.front.pid}/environ`, 'utf8')
    assert.ok(!env.includes(joinToken) && !env.includes(management), 'a token reached the front')
    assert.doesNotMatch(env, /TOKEN/)
    // The broker, which holds the token, is a different process and not the front's child.
    const brokerEnv = readFileSync(`/proc/${server.brokerPid}/environ`, 'utf8')
    assert.ok(brokerEnv.includes(joinToken))
    const ppid = /^PPid:\s+(\d+)$/m.exec(status)?.[1]
    assert.equal(Number(ppid), server.brokerPid)
  })

  test('the broker lists this join server in join-endpoints/, with the port it bound', async () => {
    const listed = await listJoinEndpoints(admin, layout)
    assert.deepEqual(listed.endpoints, [`127.0.0.1:${server.port}`])
    // A node's own record claiming a join port puts nobody into the list.
    await admin.kvPut(layout.node('squatter'), JSON.stringify({ ...nodeRecord('squatter', 7), joinPort: 8655 }))
    assert.deepEqual((await listJoinEndpoints(admin, layout)).endpoints, [`127.0.0.1:${server.port}`])
    await admin.request('DELETE', `/v1/kv/${layout.node('squatter')}`)
  })

  test('a join goes through both processes and gets its Consul token', async () => {
    const { endpoints } = await listJoinEndpoints(admin, layout)
    const inv = decodeInvite((await createInvite({ client: admin, layout, net: 'test', endpoints, ttlMs: 3_600_000, createdBy: 'test' })).invite)
    const reply = await redeemInvite(inv, { name: 'laptop', publicKey: rsaPublicPem(), addresses: [], port: 655 })
    assert.equal(reply.name, 'laptop')
    assert.ok(reply.consul.token, 'ACLs are on, so the new node gets a token')
    assert.ok(await admin.kvGet(layout.node('laptop')))
    assert.ok(server.stats.served >= 0)
  })

  test('a front that dies is replaced on the same port, and joins go on', async () => {
    process.kill(server.front.pid, 'SIGKILL')
    await sleep(200)
    await accepting(server.port)
    const inv = decodeInvite((await createInvite({ client: admin, layout, net: 'test', endpoints: [`127.0.0.1:${server.port}`], ttlMs: 3_600_000, createdBy: 'test' })).invite)
    // The new front may take a moment to receive its socket: retry a refused connection.
    for (let i = 0; ; i++) {
      try {
        assert.equal((await redeemInvite(inv, { name: 'phone', publicKey: rsaPublicPem(), addresses: [], port: 655 })).name, 'phone')
        break
      } catch (err) {
        if (i >= 50 || (err as { code?: string }).code !== 'JOIN_UNREACHABLE') throw err
        await sleep(100)
      }
    }
  })
})
