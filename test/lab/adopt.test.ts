import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { waitFor, type Daemon } from '../../src/lab/daemon.ts'
import { LAB_NETNAME, MESH_WAIT_MS, type Lab } from '../../src/lab/lab.ts'
import { labConfigDir } from '../../src/lab/tinc-manual.ts'
import { kvLayout } from '../../src/mesh/kv-layout.ts'
import { makeRecord } from '../../src/mesh/publish.ts'
import { BLOCK_BEGIN, readManagedBlock } from '../../src/tinc/conf-block.ts'
import { operatorConnectTo } from '../../src/tinc/render.ts'
import { makeHandMade, pingInterruption } from '../../src/lab/demo-networks.ts'
import { dig, labTest, useLab, withLogs } from './helpers.ts'
import { rsaPublicPem } from '../helpers-keys.ts'

const layout = kvLayout(LAB_NETNAME)
const NODES = ['node1', 'node2', 'node3']
const PUBLIC = ['node1', 'node2']
const vpn = (n: string) => `10.99.0.${n.slice(4)}`
const RENDERED = /^# Written by tinc-consul from/
const hostFile = (lab: Lab, on: string, peer: string) => readFileSync(join(lab.tincFiles(on).dir, 'hosts', peer), 'utf8')
const conf = (lab: Lab, on: string) => readFileSync(join(lab.tincFiles(on).dir, 'tinc.conf'), 'utf8')
const admin = (lab: Lab) => ({ env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' } })

async function adopt(lab: Lab, node: string): Promise<string> {
  const out = await lab.cli(node, ['adopt', '--net', LAB_NETNAME, ...lab.setupFlags(node)], admin(lab))
  // The sidecar runs with the token adopt stored, not the lab's own token for the node.
  delete lab.state.nodeTokens[node]
  await lab.startSidecar(node)
  return out.stdout
}

describe('lab, ACLs on: a hand-made tinc network adopts node by node while it carries pings', () => {
  const get = useLab({ nodes: 3, nat: 1, consulServers: 1, acl: true, tinc: true })

  labTest(
    'every node adopts in turn without re-keying; hand-made peers keep working until they adopt; the end state is a managed mesh with names',
    async (t) => {
      const lab = get()
      await lab.waitForMesh()
      for (const n of NODES) makeHandMade(lab, n)
      const handMade = Object.fromEntries(NODES.map((n) => [n, Object.fromEntries(NODES.map((p) => [p, hostFile(lab, n, p)]))]))
      const pings: Array<{ pair: string; d: Daemon }> = []
      for (const [a, b] of [
        ['node1', 'node2'],
        ['node1', 'node3'],
        ['node2', 'node3'],
      ] as const) {
        pings.push({ pair: `${a}->${b}`, d: await lab.spawn(a, `ping-${a}-${b}`, ['stdbuf', '-oL', 'ping', '-D', '-i', '0.2', vpn(b)]) })
      }
      await withLogs(lab, NODES, async () => {
        const first = await adopt(lab, 'node1')
        assert.match(first, /created network lab \(10\.99\.0\.0\/24, names under \.mesh, router mode\)/)
        assert.match(first, /kept as .*tinc-up\.pre-adopt/)
        assert.doesNotMatch(readFileSync(join(labConfigDir(lab.state.runDir, 'node1'), `${LAB_NETNAME}.env`), 'utf8'), new RegExp(lab.state.managementToken ?? 'no token'))
        await waitFor('node1 to serve its own name', async () => ((await dig(lab, 'node1', `@${vpn('node1')}`, '+short', 'node1.mesh')).trim() === vpn('node1') ? true : undefined), {
          timeoutMs: 30_000,
        })

        // A record under a hand-made peer's name with another key is refused, and the hand-made file stays.
        const hostile = makeRecord({ name: 'node3', vpnAddress: vpn('node3'), addresses: [], port: 655, publicKey: rsaPublicPem(2048) })
        const mgmt = lab.consul('node1')
        await mgmt.kvPut(layout.ipam(vpn('node3')), JSON.stringify({ name: 'node3', at: new Date().toISOString() }))
        await mgmt.kvPut(layout.node('node3'), JSON.stringify(hostile))
        const refused = async () => {
          const st = JSON.parse((await lab.cli('node1', ['status', '--json', '--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, 'node1')])).stdout) as {
            consul: { refused: Array<{ key: string; reason: string }> }
          }
          return st.consul.refused.find((r) => r.key === layout.node('node3') && /differs from the hand-made host file/.test(r.reason))
        }
        await waitFor("node1's status to show the hostile node3 record refused", refused, { timeoutMs: 30_000 })
        assert.equal(hostFile(lab, 'node1', 'node3'), handMade.node1?.node3)
        assert.equal(hostFile(lab, 'node1', 'node2'), handMade.node1?.node2)
        await mgmt.txn([{ KV: { Verb: 'delete', Key: layout.node('node3') } }, { KV: { Verb: 'delete', Key: layout.ipam(vpn('node3')) } }])

        await adopt(lab, 'node2')
        await waitFor(
          "node1 and node2 to manage each other's host file",
          async () => (RENDERED.test(hostFile(lab, 'node1', 'node2')) && RENDERED.test(hostFile(lab, 'node2', 'node1')) ? true : undefined),
          {
            timeoutMs: 30_000,
          },
        )
        assert.equal(hostFile(lab, 'node2', 'node3'), handMade.node2?.node3, "node3 hasn't adopted: its hand-made file stays")
        await adopt(lab, 'node3')

        await waitFor('every host file to be managed on every node', async () => (NODES.every((n) => NODES.every((p) => p === n || RENDERED.test(hostFile(lab, n, p)))) ? true : undefined), {
          timeoutMs: 30_000,
        })
        for (const n of NODES) {
          // The hand-made ConnectTo lines outside the block are the operator's, and stay; the block
          // holds every other public node, never one the operator already lists (tincd would connect twice).
          const theirs = [...operatorConnectTo(conf(lab, n))].sort()
          assert.deepEqual(theirs, n === 'node1' ? ['node2'] : n === 'node2' ? ['node1'] : ['node1', 'node2'])
          const want = PUBLIC.filter((p) => p !== n && !theirs.includes(p)).map((p) => `ConnectTo = ${p}`)
          await waitFor(`${n}'s ConnectTo block`, async () => (JSON.stringify(readManagedBlock(conf(lab, n))) === JSON.stringify(want) ? true : undefined), { timeoutMs: 30_000 })
          assert.ok(conf(lab, n).includes(BLOCK_BEGIN), `${n}'s tinc.conf has our block`)
          for (const p of NODES) {
            await waitFor(`${n} to resolve ${p}.mesh`, async () => ((await dig(lab, n, `@${vpn(n)}`, '+short', `${p}.mesh`)).trim() === vpn(p) ? true : undefined), { timeoutMs: 30_000 })
            // Up to MESH_WAIT_MS: tinc 1.0 can hold a stale session key after connections churn (lab.ts says when).
            if (p !== n)
              await waitFor(`${n} to ping ${p}`, async () => ((await lab.exec(n, ['ping', '-c1', '-W1', vpn(p)], { allowFailure: true })).code === 0 ? true : undefined), { timeoutMs: MESH_WAIT_MS })
          }
        }
        // Same keys as before: nobody was re-keyed.
        for (const n of NODES) assert.equal(hostFile(lab, n, n), handMade[n]?.[n])
        // Keep watching a little past the end state (25 more answers on every pair): a reload's effect shows there.
        const answered = () => pings.map((p) => pingInterruption(readFileSync(p.d.logFile, 'utf8')).answered)
        const base = answered()
        await waitFor('25 more answered pings on every pair', async () => (answered().every((a, i) => a >= (base[i] ?? 0) + 25) ? true : undefined), { timeoutMs: 60_000 })
        for (const n of NODES) {
          const reloads = readFileSync(join(lab.state.runDir, n, 'sidecar.log'), 'utf8')
            .split('\n')
            .filter((l) => l.includes('asking tincd to reload')).length
          t.diagnostic(`${n}: tincd reloaded (SIGHUP) ${reloads} time(s) by its sidecar, never restarted`)
        }
      })
      for (const p of pings) await lab.kill(p.d)
      for (const p of pings) {
        const r = pingInterruption(readFileSync(p.d.logFile, 'utf8'))
        t.diagnostic(`${p.pair}: ${r.answered} pings answered, ${r.lost} lost, longest interruption ${r.longest} ping(s) in a row (${(r.longest * 0.2).toFixed(1)} s)`)
        assert.ok(r.answered > 0, `${p.pair}: no ping was ever answered`)
      }
    },
    300_000,
  )
})
