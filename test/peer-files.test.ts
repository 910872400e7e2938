import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { ConsulError } from '../src/errors.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { initNode } from '../src/mesh/init.ts'
import { kvLayout, type KvLayout } from '../src/mesh/kv-layout.ts'
import { createNetwork } from '../src/mesh/network.ts'
import { peerHostFiles } from '../src/mesh/peer-files.ts'
import { checkPeer, type NodeRecord } from '../src/mesh/record.ts'
import { revokeNode } from '../src/mesh/revoke.ts'
import { hostFileText } from '../src/tinc/render.ts'
import { NETWORK, nodeRecord } from './helpers-keys.ts'

const at = '2026-11-21T00:00:00.000Z'

/** Puts a record and its address reservation, as a join would. */
async function addNode(admin: ConsulClient, layout: KvLayout, record: NodeRecord, reserved = record.vpnAddress): Promise<void> {
  await admin.kvPut(layout.ipam(reserved), JSON.stringify({ name: record.name, at }))
  await admin.kvPut(layout.node(record.name), JSON.stringify(record))
}

const keys = async (admin: ConsulClient, prefix: string) => (await admin.kvList(prefix)).items.map((i) => i.key.slice(prefix.length)).sort()

/** The client, with reads of one prefix failing (a 500 from the agent) or hidden by ACL. */
function faulty(admin: ConsulClient, prefix: string, how: 'fail' | 'filtered'): ConsulClient {
  const kvList: ConsulClient['kvList'] = async (p, opts) => {
    if (p !== prefix) return admin.kvList(p, opts)
    if (how === 'fail') throw new ConsulError('CONSUL_HTTP', `GET kv/${p}: 500 rpc error`, 500)
    return { ...(await admin.kvList(p, opts)), filtered: true }
  }
  return new Proxy(admin, {
    get(target, key) {
      if (key === 'kvList') return kvList
      const v: unknown = Reflect.get(target, key, target)
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v
    },
  })
}

describe('one network writer and one judge for init and joins, against a real Consul agent', () => {
  let consul: DevConsul
  let admin: ConsulClient
  let root: string
  const layout = kvLayout('judge')
  const hub = nodeRecord('hub', 1)
  const peer = nodeRecord('peer', 9)
  // squatter holds 10.99.0.7 in ipam/ but wrote hub's address into its own record (its token
  // may write its own record as it likes).
  const squatter = nodeRecord('squatter', 1)
  const gone = nodeRecord('gone', 8)

  before(async () => {
    consul = await startDevConsul()
    admin = createConsulClient({ url: consul.url })
    root = await mkdtemp(join(tmpdir(), 'tinc-consul-judge-'))
    await createNetwork(admin, layout, NETWORK)
    await addNode(admin, layout, hub)
    await addNode(admin, layout, peer)
    await addNode(admin, layout, squatter, '10.99.0.7')
    await addNode(admin, layout, gone)
    // Revoked while some node was down: its record deleted, its key listed under revoked/ ...
    await revokeNode(admin, layout, 'gone')
    // ... and then written back by the revoked node (a stolen token, a stale daemon).
    await admin.kvPut(layout.node('gone'), JSON.stringify(gone))
  })
  after(async () => {
    await consul?.stop()
    if (root) await rm(root, { recursive: true, force: true })
  })

  test('the writer creates the network with every marker key once, and hands back the one it finds', async () => {
    const fresh = kvLayout('fresh')
    const first = await createNetwork(admin, fresh, NETWORK)
    assert.deepEqual(first, { created: true, network: NETWORK })
    assert.deepEqual(await keys(admin, fresh.prefix), ['aliases/', 'ipam/', 'network', 'revoked/', 'subnet-approvals/'])
    const second = await createNetwork(admin, fresh, { ...NETWORK, cidr: '10.1.0.0/16' })
    assert.deepEqual(second, { created: false, network: NETWORK })

    // A network made by an older init: only revoked/ beside it. Finding it adds the rest.
    const old = kvLayout('old')
    await admin.kvPut(old.network, JSON.stringify(NETWORK))
    await admin.kvPut(old.revokedPrefix, '')
    await admin.kvPut(old.alias('files'), 'hub')
    assert.equal((await createNetwork(admin, old, NETWORK)).created, false)
    assert.deepEqual(await keys(admin, old.prefix), ['aliases/', 'aliases/files', 'ipam/', 'network', 'revoked/', 'subnet-approvals/'])

    const broken = kvLayout('broken')
    await admin.kvPut(broken.network, 'not json')
    await assert.rejects(createNetwork(admin, broken, NETWORK), { code: 'NETWORK_UNREADABLE' })
  })

  test("a squatter's record and a revoked key are left out; what is handed out is what the daemon renders", async () => {
    const judged = await peerHostFiles(admin, layout, NETWORK, { name: 'newbie' })
    assert.deepEqual(Object.keys(judged.files), ['hub', 'peer'])
    for (const r of [hub, peer]) {
      const checked = checkPeer(r, { network: NETWORK, keyName: r.name })
      assert.ok(checked.ok)
      assert.equal(judged.files[r.name], hostFileText(checked.value))
    }
    assert.deepEqual(judged.refusals.map((r) => r.name).sort(), ['gone', 'squatter'])
    // Our own name is never handed to us, and nobody may hold our key or our address.
    const asPeer = await peerHostFiles(admin, layout, NETWORK, { name: 'peer' })
    assert.deepEqual(Object.keys(asPeer.files), ['hub'])
    const sameKey = await peerHostFiles(admin, layout, NETWORK, { name: 'clone', fingerprint: peer.fingerprint })
    assert.deepEqual(Object.keys(sameKey.files), ['hub'])
    const sameAddress = await peerHostFiles(admin, layout, NETWORK, { name: 'other', vpnAddress: '10.99.0.1' })
    assert.deepEqual(Object.keys(sameAddress.files), ['peer'])
  })

  test('a failed or ACL-filtered read of nodes/, ipam/ or revoked/ is an error, never a skipped check', async () => {
    for (const prefix of [layout.nodesPrefix, layout.ipamPrefix, layout.revokedPrefix]) {
      for (const how of ['fail', 'filtered'] as const) {
        await assert.rejects(
          peerHostFiles(faulty(admin, prefix, how), layout, NETWORK, { name: 'newbie' }),
          (err: Error & { code?: string }) => err.code === 'PEERS_UNREADABLE' && err.message.includes(prefix),
          `${how} read of ${prefix}`,
        )
      }
    }
  })

  test('init on a new network writes every marker key; init on this one writes no file for the squatter or the revoked node', async () => {
    const base = {
      domain: 'mesh',
      addresses: ['198.18.0.40'],
      port: 655,
      keyBits: 2048,
      consulUrl: consul.url,
      runDir: join(root, 'run'),
      joinPort: 0,
      force: false,
      splitDns: false,
      progress: () => undefined,
    }
    const made = await initNode({ ...base, net: 'made', name: 'first', cidr: '10.98.0.0/24', root: join(root, 'made'), configDir: join(root, 'made-etc') })
    assert.equal(made.createdNetwork, true)
    assert.deepEqual(
      (await keys(admin, kvLayout('made').prefix)).filter((k) => k.endsWith('/')),
      ['aliases/', 'ipam/', 'revoked/', 'subnet-approvals/'],
    )

    const steps: string[] = []
    const res = await initNode({ ...base, net: 'judge', name: 'newbie', root: join(root, 'judge'), configDir: join(root, 'judge-etc'), progress: (s) => void steps.push(s) })
    assert.equal(res.createdNetwork, false)
    assert.deepEqual((await readdir(join(res.dir, 'hosts'))).sort(), ['hub', 'newbie', 'peer'])
    const judged = await peerHostFiles(admin, layout, NETWORK, { name: 'newbie' })
    assert.equal(await readFile(join(res.dir, 'hosts', 'hub'), 'utf8'), judged.files.hub)
    assert.ok(
      steps.some((s) => /left out .*squatter/.test(s)),
      `init did not say what it left out: ${steps.join(' | ')}`,
    )
  })
})
