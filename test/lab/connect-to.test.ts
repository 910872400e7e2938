import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { waitFor } from '../../src/lab/daemon.ts'
import type { Lab } from '../../src/lab/lab.ts'
import { rendezvousOrder } from '../../src/mesh/connect-to.ts'
import { readManagedBlock } from '../../src/tinc/conf-block.ts'
import { labTest, sidecarStatus, useLab, withLogs } from './helpers.ts'

// The ConnectTo budget (src/mesh/connect-to.ts) on real tincd 1.0 and Consul with ACLs: 8 public
// nodes and 3 behind NAT, K = 2. Every node keeps exactly its first two public nodes in rendezvous
// order (a pinned node its pin); cutting a node's underlay to both makes its sidecar pick the next
// two and the node pings everyone again with no manual step; healing brings the original choice back.

const K = 2
const env = { TINC_CONSUL_CONNECT_TO: String(K), TINC_CONSUL_CONNECT_TO_GRACE: '5', TINC_CONSUL_CONNECT_TO_BENCH: '20' }
const PINNED = { node: 'node10', to: ['node1'] }

const block = (lab: Lab, node: string) => readManagedBlock(readFileSync(join(lab.tincFiles(node).dir, 'tinc.conf'), 'utf8'))
const lines = (names: string[]) => [...names].sort().map((n) => `ConnectTo = ${n}`)
const vpnOf = (lab: Lab, node: string) => lab.state.plan.nodes.find((n) => n.name === node)?.vpnIp ?? assert.fail(`no ${node}`)

describe('lab, ACLs on: eleven nodes keep two ConnectTo lines each, and heal around a cut', () => {
  const get = useLab({ nodes: 11, nat: 3, consulServers: 1, acl: true, tinc: true })

  labTest(
    'each node has exactly K ConnectTo lines (a pin as given); a cut to both makes the node pick others and ping again; healing brings them back',
    async (t) => {
      const lab = get()
      const nodes = lab.state.plan.nodes.map((n) => n.name)
      const publics = lab.state.plan.nodes.filter((n) => !n.behindNat).map((n) => n.name)
      const want = (n: string) => (n === PINNED.node ? PINNED.to : rendezvousOrder(n, publics).slice(0, K))
      await lab.writeNetwork()
      for (const n of nodes) await lab.startSidecar(n, { env: n === PINNED.node ? { ...env, TINC_CONSUL_CONNECT_TO_PIN: PINNED.to.join(',') } : env })
      await withLogs(lab, nodes, async () => {
        await waitFor('every node to keep exactly its K ConnectTo lines', async () => (nodes.every((n) => JSON.stringify(block(lab, n)) === JSON.stringify(lines(want(n)))) ? true : undefined), {
          timeoutMs: 60_000,
          intervalMs: 250,
        })
        const load = new Map(publics.map((p) => [p, nodes.filter((n) => want(n).includes(p)).length]))
        t.diagnostic(`ConnectTo lines per public node: ${[...load].map(([p, c]) => `${p} ${c}`).join(', ')}`)
        await lab.waitForMesh()

        // A node behind NAT loses its underlay to both of its chosen public nodes.
        const x = lab.state.plan.nodes.filter((n) => n.behindNat && n.name !== PINNED.node).at(-1)?.name ?? assert.fail('no NAT node')
        const chosen = want(x)
        const next = rendezvousOrder(x, publics).slice(K, 2 * K)
        for (const p of chosen) await lab.cut(x, p)
        const cutAt = Date.now()
        await waitFor(`${x} to replace ${chosen.join(', ')} with ${next.join(', ')}`, async () => (JSON.stringify(block(lab, x)) === JSON.stringify(lines(next)) ? true : undefined), {
          timeoutMs: 120_000,
          intervalMs: 500,
        })
        t.diagnostic(`${x} replaced ${chosen.join(', ')} with ${next.join(', ')} ${((Date.now() - cutAt) / 1000).toFixed(1)} s after the cut (tinc's ping timeout, then a 5 s grace)`)
        const benched = (await sidecarStatus(lab, x)).connectTo?.benched.map((b) => b.name).sort()
        assert.deepEqual(benched, [...chosen].sort(), `${x}'s status shows both sitting out`)
        for (const peer of nodes.filter((n) => n !== x))
          await waitFor(`${x} to ping ${peer} around the cut`, async () => ((await lab.exec(x, ['ping', '-c1', '-W1', vpnOf(lab, peer)], { allowFailure: true })).code === 0 ? true : undefined), {
            timeoutMs: 60_000,
          })
        // No other node changed its choice.
        for (const n of nodes.filter((m) => m !== x)) assert.deepEqual(block(lab, n), lines(want(n)), `${n} keeps its choice`)

        for (const p of chosen) await lab.heal(x, p)
        const healAt = Date.now()
        await waitFor(`${x} to take ${chosen.join(', ')} back after healing`, async () => (JSON.stringify(block(lab, x)) === JSON.stringify(lines(chosen)) ? true : undefined), {
          timeoutMs: 120_000,
          intervalMs: 500,
        })
        t.diagnostic(`${x} took ${chosen.join(', ')} back ${((Date.now() - healAt) / 1000).toFixed(1)} s after the heal (the rest of a 20 s bench)`)
        for (const p of chosen)
          await waitFor(`${x} to ping ${p} directly again`, async () => ((await lab.exec(x, ['ping', '-c1', '-W1', vpnOf(lab, p)], { allowFailure: true })).code === 0 ? true : undefined), {
            timeoutMs: 60_000,
          })
        assert.deepEqual(block(lab, PINNED.node), lines(PINNED.to), 'the pinned list never changed')
      })
    },
    600_000,
  )
})
