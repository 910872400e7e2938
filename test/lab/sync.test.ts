import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, readFileSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { kvLayout } from '../../src/mesh/kv-layout.ts'
import { ConsulError } from '../../src/errors.ts'
import { waitFor } from '../../src/lab/daemon.ts'
import { LAB_NETNAME, type Lab } from '../../src/lab/lab.ts'
import { revokeNode } from '../../src/mesh/revoke.ts'
import { readManagedBlock } from '../../src/tinc/conf-block.ts'
import { keyFingerprint, parseHostFile } from '../../src/tinc/hostfile.ts'
import { nodeRecord, rsaPublicPem } from '../helpers-keys.ts'
import { labTest, useLab } from './helpers.ts'

const layout = kvLayout(LAB_NETNAME)
const NODES = ['node1', 'node2', 'node3', 'node4']

const hosts = (lab: Lab, node: string) => readdirSync(join(lab.tincFiles(node).dir, 'hosts')).sort()
const connectTo = (lab: Lab, node: string) => readManagedBlock(readFileSync(join(lab.tincFiles(node).dir, 'tinc.conf'), 'utf8'))
const ping = async (lab: Lab, from: string, toOctet: number) => (await lab.exec(from, ['ping', '-c1', '-W1', `10.99.0.${toOctet}`], { allowFailure: true })).code === 0

/** Waits (bounded) until `check` holds on every listed node: the daemons act on their own schedule. */
async function everywhere(lab: Lab, nodes: string[], what: string, check: (node: string) => boolean) {
  await waitFor(what, async () => (nodes.every(check) ? true : undefined), { timeoutMs: 30_000, intervalMs: 100 })
  for (const n of nodes) assert.ok(check(n), `${n}: ${what}`)
}

describe('lab, ACLs on: four nodes that start knowing only the seed, synced by tinc-consul run', () => {
  // node1..node3 public, node4 behind NAT; each starts with its own host file and node1's.
  const get = useLab({ nodes: 4, nat: 1, consulServers: 1, acl: true, tinc: true, hostFiles: 'seed' })

  labTest('after run starts everywhere, every node has every host file, lists every public node, and every pair pings', async () => {
    const lab = get()
    assert.deepEqual(hosts(lab, 'node3'), ['node1', 'node3'])
    await lab.writeNetwork()
    for (const n of NODES) await lab.startSidecar(n)
    const wantConnectTo = (n: string) => ['node1', 'node2', 'node3'].filter((p) => p !== n).map((p) => `ConnectTo = ${p}`)
    await everywhere(
      lab,
      NODES,
      'all four host files and a ConnectTo for every other public node',
      (n) => hosts(lab, n).length === 4 && JSON.stringify(connectTo(lab, n)) === JSON.stringify(wantConnectTo(n)),
    )
    await lab.waitForMesh()
  })

  labTest("a node's token cannot overwrite another node's record", async () => {
    const lab = get()
    const node2 = lab.consul('node2', { token: lab.state.nodeTokens.node2 ?? null })
    await assert.rejects(node2.kvPut(layout.node('node1'), 'hijacked'), (e: unknown) => e instanceof ConsulError && e.code === 'CONSUL_FORBIDDEN')
    assert.match((await node2.kvGet(layout.node('node1')))?.value ?? '', /"name":"node1"/)
  })

  labTest('hostile records written straight into KV are refused and nothing unsafe reaches disk', async () => {
    const lab = get()
    const admin = lab.consul('node1')
    const node2Before = readFileSync(join(lab.tincFiles('node1').dir, 'hosts', 'node2'), 'utf8')
    const bad: Array<[string, string]> = [
      [`${layout.nodesPrefix}../x`, JSON.stringify(nodeRecord('x', 20))],
      [`${layout.nodesPrefix}x-up`, JSON.stringify(nodeRecord('x', 21))],
      [`${layout.nodesPrefix}bad name`, JSON.stringify(nodeRecord('x', 22))],
      [layout.node('proxy'), JSON.stringify(nodeRecord('proxy', 23, rsaPublicPem(), ['Proxy = exec /bin/touch /tmp/tc-pwned']))],
      [layout.node('thief'), JSON.stringify({ ...nodeRecord('thief', 24), subnets: ['10.99.0.1/32'] })],
      [layout.node('node2'), JSON.stringify(nodeRecord('node2', 2, rsaPublicPem()))],
    ]
    await admin.request(
      'PUT',
      '/v1/txn',
      bad.map(([Key, v]) => ({ KV: { Verb: 'set', Key, Value: Buffer.from(v).toString('base64') } })),
    )
    await admin.request('PUT', `/v1/kv/${layout.node('junk')}`, 'A'.repeat(400_000))
    await admin.kvPut(layout.node('canary'), JSON.stringify(nodeRecord('canary', 30)))
    await everywhere(lab, NODES, 'canary arrived (so every earlier write was judged)', (n) => hosts(lab, n).includes('canary'))
    for (const n of NODES) {
      const dir = lab.tincFiles(n).dir
      assert.deepEqual(hosts(lab, n), ['canary', 'node1', 'node2', 'node3', 'node4', 'proxy'], `${n}'s hosts/`)
      assert.equal(existsSync(join(dir, 'x')), false)
      assert.doesNotMatch(readFileSync(join(dir, 'hosts', 'proxy'), 'utf8'), /Proxy/)
      assert.doesNotMatch(connectTo(lab, n).join('\n'), /thief|junk/)
    }
    assert.equal(readFileSync(join(lab.tincFiles('node1').dir, 'hosts', 'node2'), 'utf8'), node2Before, 'a swapped key replaced a pinned one')
    assert.equal(existsSync('/tmp/tc-pwned'), false)
    // node2's own daemon sees a record that isn't its own and writes the real one back.
    const realKey = parseHostFile(readFileSync(join(lab.tincFiles('node2').dir, 'hosts', 'node2'), 'utf8')).publicKey ?? ''
    await waitFor('node2 to restore its own record', async () => ((await admin.kvGet(layout.node('node2')))?.value.includes(keyFingerprint(realKey)) ? true : undefined), {
      timeoutMs: 30_000,
      intervalMs: 100,
    })
    await admin.request(
      'PUT',
      '/v1/txn',
      [...bad.map(([k]) => k).filter((k) => k !== layout.node('node2')), layout.node('junk'), layout.node('canary')].map((Key) => ({ KV: { Verb: 'delete', Key } })),
    )
    await everywhere(lab, NODES, 'canary and proxy removed again', (n) => hosts(lab, n).length === 4)
  })

  labTest('with Consul down the host files stay; changes made after it returns still land', async () => {
    const lab = get()
    const before = NODES.map((n) => hosts(lab, n).join(','))
    lab.stopConsulServer('consul1')
    // Wait until every sidecar has hit the outage, then check nothing was touched.
    await everywhere(lab, NODES, 'sidecars noticed the outage', (n) => readFileSync(join(lab.state.runDir, n, 'sidecar.log'), 'utf8').includes('consul read failed'))
    assert.deepEqual(
      NODES.map((n) => hosts(lab, n).join(',')),
      before,
    )
    await lab.startConsulServer('consul1')
    await waitFor(
      'KV writes accepted again',
      async () =>
        (await lab
          .consul('node1')
          .kvPut(layout.node('latecomer'), JSON.stringify(nodeRecord('latecomer', 40)))
          .catch(() => false))
          ? true
          : undefined,
      { timeoutMs: 60_000 },
    )
    await everywhere(lab, NODES, 'latecomer arrived after the outage', (n) => hosts(lab, n).includes('latecomer'))
    await lab.consul('node1').request('DELETE', `/v1/kv/${layout.node('latecomer')}`)
  })

  labTest('with the seed node gone entirely, a restarted node still reaches the rest through the other public nodes', async () => {
    const lab = get()
    lab.stopNode('node1')
    await lab.restartTincd('node3')
    await waitFor('node3 to reach node2 and node4 over tinc', async () => ((await ping(lab, 'node3', 2)) && (await ping(lab, 'node3', 4)) ? true : undefined), { timeoutMs: 60_000 })
  })

  labTest('a revoked node loses its host file everywhere and can no longer ping anyone', async () => {
    const lab = get()
    assert.ok(await ping(lab, 'node4', 2), 'node4 could not ping before the revocation')
    await revokeNode(lab.consul('node2'), layout, 'node4')
    await everywhere(lab, ['node2', 'node3'], 'node4 host file removed', (n) => !hosts(lab, n).includes('node4'))
    await waitFor('node4 to be cut off', async () => ((await ping(lab, 'node4', 2)) || (await ping(lab, 'node4', 3)) ? undefined : true), { timeoutMs: 60_000 })
    assert.equal(await ping(lab, 'node2', 4), false)
  })
})
