import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { readFile, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { waitFor } from '../src/lab/daemon.ts'
import { approveRoute, unapproveRoute } from '../src/mesh/approvals.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { createNetwork } from '../src/mesh/network.ts'
import { NETWORK, nodeRecord, rsaPublicPem } from './helpers-keys.ts'
import { startFaultProxy, startNode, tempRoot, type FaultProxy, type TestNode } from './sync-fixture.ts'

// The approvals input follows the other inputs' fault rules (docs/subnets.md): a failed or blank
// read of subnet-approvals/ never removes a Subnet line, and a restart keeps the cache's approvals
// until Consul answers. Only a withdrawn approval removes it.

const layout = kvLayout('test')
const LAN = '192.168.1.0/24'
const approvalsPath = `/v1/kv/${layout.subnetApprovalsPrefix}`

describe('sync: approvals under faults', () => {
  let consul: DevConsul
  let admin: ConsulClient
  let proxy: FaultProxy
  let root: string
  const running: TestNode[] = []
  const routed = async (n: TestNode) => (await readFile(join(n.tincDir, 'hosts', 'beta'), 'utf8').catch(() => '')).includes(`Subnet = ${LAN}\n`)
  const beta = { ...nodeRecord('beta', 2, rsaPublicPem()), routes: [LAN] }
  const touchBeta = (port: number) => admin.kvPut(layout.node('beta'), JSON.stringify({ ...beta, port }))

  before(async () => {
    consul = await startDevConsul()
    admin = createConsulClient({ url: consul.url })
    proxy = await startFaultProxy(consul.url)
    root = await tempRoot()
    await createNetwork(admin, layout, NETWORK)
    await touchBeta(655)
  })
  after(async () => {
    for (const n of running) await n.daemon.stop()
    await proxy?.stop()
    await consul?.stop()
    if (root) await rm(root, { recursive: true, force: true })
  })

  test('a failed or blank approvals read keeps the Subnet line, through a restart too; unapprove removes it', async () => {
    const start = async (tincDir?: string) => {
      const n = await startNode({ root, name: 'alpha', octet: 1, isPublic: true, consulUrl: proxy.url, tincDir })
      running.push(n)
      return n
    }
    let alpha = await start()
    await alpha.until(async () => (await readFile(join(alpha.tincDir, 'hosts', 'beta'), 'utf8').catch(() => undefined)) !== undefined, 'beta written')
    assert.equal(await routed(alpha), false, 'announced but not approved: not routed')
    assert.equal(alpha.daemon.routes().judgement?.verdicts[0]?.state, 'awaiting')
    await approveRoute(admin, layout, 'beta', LAN)
    await alpha.until(() => routed(alpha), 'the approved route rendered')

    for (const fault of [{ status: 500, body: 'rpc error: No cluster leader' }, { status: 404 }]) {
      proxy.rule = (method, url) => (method === 'GET' && url.pathname === approvalsPath ? fault : 'pass')
      // An unrelated approval wakes the approvals watch into the faulty read...
      const seen = proxy.seen.length
      await approveRoute(admin, layout, 'gamma', `172.16.${fault.status % 250}.0/24`)
      await waitFor(`a ${fault.status} read of subnet-approvals/`, async () => (proxy.seen.slice(seen).some((r) => r.startsWith(`GET ${approvalsPath}?`)) ? true : undefined), {
        timeoutMs: 20_000,
        intervalMs: 20,
      })
      // ...and another input changes, so the daemon applies again without a good approvals read.
      await touchBeta(656 + fault.status)
      await alpha.until(async () => (await readFile(join(alpha.tincDir, 'hosts', 'beta'), 'utf8')).includes(`Port = ${656 + fault.status}`), `an apply during the ${fault.status} fault`)
      assert.equal(await routed(alpha), true, `a ${fault.status} on subnet-approvals/ removed the route`)
    }

    proxy.rule = (method, url) => (method === 'GET' && url.pathname === approvalsPath ? { status: 500 } : 'pass')
    // Twice: the cache written while approvals can't be read keeps the ones it had.
    for (const round of [1, 2]) {
      await alpha.daemon.stop()
      running.splice(running.indexOf(alpha), 1)
      alpha = await start(alpha.tincDir)
      await alpha.until(() => alpha.events.some((e) => e.source === 'consul'), `an apply from consul after restart ${round}`)
      assert.equal(await routed(alpha), true, `the cached approvals keep the route until Consul answers (restart ${round})`)
    }

    proxy.rule = () => 'pass'
    await unapproveRoute(admin, layout, 'beta', LAN)
    await alpha.until(async () => !(await routed(alpha)), 'the withdrawn approval removes the line')
  })
})
