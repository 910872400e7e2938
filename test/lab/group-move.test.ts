import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { waitFor } from '../../src/lab/daemon.ts'
import { LAB_NETNAME, type Lab } from '../../src/lab/lab.ts'
import { LISTENER, listening, takeMatrix, waitApplied, type MatrixNode } from '../../src/lab/reach-matrix.ts'
import { labConfigDir } from '../../src/lab/tinc-manual.ts'
import type { AccessPolicy, Group } from '../../src/mesh/access-policy.ts'
import { activeHolders, readIpam } from '../../src/mesh/ipam.ts'
import { kvLayout } from '../../src/mesh/kv-layout.ts'
import { defaultInterface } from '../../src/tinc/setup.ts'
import { dig, labTest, useLab, withLogs } from './helpers.ts'

/**
 * `group move` (issue 20: "moving a node between groups is an operator command that re-allocates
 * its address") on real tincd 1.0, Consul with ACLs and nftables. A network made with init and
 * group invites, so every address is in ipam/:
 *
 *   infra (--infra) 10.99.0.0/28   node1 (public; the group made by `init --infra-cidr`)
 *   eng             10.99.0.16/28  node2, node3
 *   ops             10.99.0.32/28  node4 (behind NAT)
 *
 * `group move node3 ops` from node1 with the operator token; node3's own sidecar must renumber
 * it (host file, tinc-up, interface, tincd) without anyone touching node3. Then: the matrix
 * follows (node3 reaches ops and no longer eng), every node's DNS and table follow, the old
 * address is released, and node2's own token can't move anyone. The time from the command's
 * start to node3's record carrying the new address is printed, never asserted.
 */

const layout = kvLayout(LAB_NETNAME)
const KEY = ['--key-size', '1024']
const PORT = 7100
const TUN = defaultInterface(LAB_NETNAME)
const GROUPS: Group[] = [
  { name: 'eng', cidr: '10.99.0.16/28', infra: false },
  { name: 'infra', cidr: '10.99.0.0/28', infra: true },
  { name: 'ops', cidr: '10.99.0.32/28', infra: false },
]
const POLICY: AccessPolicy = { groups: GROUPS, associations: [] }

const operator = (lab: Lab) => ({ env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' } })
const onNode1 = (lab: Lab) => ['--net', LAB_NETNAME, '--consul', 'http://127.0.0.1:8500', '--config-dir', labConfigDir(lab.state.runDir, 'node1')]
const planOf = (lab: Lab, name: string) => lab.state.plan.nodes.find((n) => n.name === name) ?? assert.fail(`no ${name}`)

async function start(lab: Lab, name: string): Promise<void> {
  await lab.restartTincd(name)
  await lab.startSidecar(name)
}

/** An invite for `group` from node1, redeemed by `name`; returns the address the join gave it. */
async function joinInto(lab: Lab, name: string, group: string): Promise<string> {
  const inv = (await lab.cli('node1', ['invite', '--group', group, ...onNode1(lab)], operator(lab))).stdout.trim()
  const n = planOf(lab, name)
  const out = await lab.cli(name, ['join', inv, '--name', name, ...(n.behindNat ? [] : ['--address', n.publicIp]), ...KEY, ...lab.setupFlags(name)])
  const address = /^Joined \S+ as \S+ with address (\S+)\.$/m.exec(out.stdout)?.[1] ?? assert.fail(`no address in: ${out.stdout}`)
  await start(lab, name)
  return address
}

const ping = async (lab: Lab, from: string, ip: string) => (await lab.exec(from, ['ping', '-c1', '-W1', ip], { allowFailure: true })).code === 0

async function matrix(t: { diagnostic(s: string): void }, lab: Lab, title: string, nodes: MatrixNode[]): Promise<void> {
  const { lines, diffs } = await takeMatrix(lab, nodes, POLICY, title, PORT)
  for (const line of lines) t.diagnostic(line)
  assert.deepEqual(diffs, [], `${title}: the matrix differs from the policy`)
}

describe('lab, ACLs on: `group move` renumbers a node into another group, nobody touching it', () => {
  const get = useLab({ nodes: 4, nat: 1, consulServers: 1, acl: true, tinc: false })

  labTest(
    'node3 moves from eng to ops: its own sidecar renumbers it, the matrix, DNS and tables follow, the old address is released',
    async (t) => {
      const lab = get()
      // The infrastructure group is defined at init, and node1 takes its address from it.
      const init = await lab.cli(
        'node1',
        ['init', '--net', LAB_NETNAME, '--name', 'node1', '--cidr', '10.99.0.0/24', '--infra-cidr', '10.99.0.0/28', '--address', planOf(lab, 'node1').publicIp, ...KEY, ...lab.setupFlags('node1')],
        operator(lab),
      )
      assert.match(init.stdout, /created infrastructure group infra \(10\.99\.0\.0\/28\)/)
      assert.match(init.stdout, /This node has address 10\.99\.0\.1\./)
      await start(lab, 'node1')
      for (const g of ['eng', 'ops']) await lab.cli('node1', ['group', 'add', g, '--cidr', GROUPS.find((x) => x.name === g)?.cidr ?? '', ...onNode1(lab)], operator(lab))
      const nodes: MatrixNode[] = [{ name: 'node1', address: '10.99.0.1' }]
      for (const [name, group] of [
        ['node2', 'eng'],
        ['node3', 'eng'],
        ['node4', 'ops'],
      ] as const)
        nodes.push({ name, address: await joinInto(lab, name, group) })
      assert.deepEqual(
        nodes.map((n) => n.address),
        ['10.99.0.1', '10.99.0.17', '10.99.0.18', '10.99.0.33'],
        'the group invites gave each node the lowest free address of its group',
      )
      const names = nodes.map((n) => n.name)
      await withLogs(lab, names, async () => {
        for (const n of nodes.slice(1)) await waitFor(`${n.name} to ping node1`, async () => ((await ping(lab, n.name, '10.99.0.1')) ? true : undefined), { timeoutMs: 60_000, intervalMs: 100 })
        // Listeners on every address, so node3's keeps answering on its new one.
        for (const n of nodes) await listening(await lab.spawn(n.name, `listener-${PORT}`, [process.execPath, '-e', LISTENER, '0.0.0.0', String(PORT)]), `${n.name}'s listener`)
        await waitApplied(lab, nodes, POLICY, 'the groups')
        await matrix(t, lab, 'before `group move node3 ops`', nodes)

        const t0 = Date.now()
        const move = await lab.cli('node1', ['group', 'move', 'node3', 'ops', '--wait', '90', ...onNode1(lab)], operator(lab))
        const took = Date.now() - t0
        for (const l of move.stdout.trim().split('\n')) t.diagnostic(`group move: ${l}`)
        assert.match(move.stdout, /moving node3 from group eng \(10\.99\.0\.18\) to group ops: reserved 10\.99\.0\.34/)
        assert.match(move.stdout, /node3 now has 10\.99\.0\.34/)
        assert.match(move.stdout, /released 10\.99\.0\.18/)
        t.diagnostic(`group move → node3's record at its new address: ${took} ms, the command's whole run (it waits for the record, then releases the old address)`)
        const node3 = nodes.find((n) => n.name === 'node3') ?? assert.fail('node3')
        node3.address = '10.99.0.34'

        // Nobody touched node3: its own sidecar rewrote its files and its interface.
        const addrs = (await lab.exec('node3', ['ip', '-o', '-4', 'addr', 'show', 'dev', TUN])).stdout
        assert.match(addrs, /inet 10\.99\.0\.34\/24 /)
        assert.doesNotMatch(addrs, /10\.99\.0\.18\//)
        const dir = lab.tincFiles('node3').dir
        assert.match(readFileSync(join(dir, 'hosts', 'node3'), 'utf8'), /^Subnet = 10\.99\.0\.34\/32$/m)
        assert.match(readFileSync(join(dir, 'tinc-up'), 'utf8'), /10\.99\.0\.34\/24/)
        assert.doesNotMatch(readFileSync(join(dir, 'tinc-up'), 'utf8'), /10\.99\.0\.18\b/)
        const holders = activeHolders(await readIpam(lab.consul('node1'), layout))
        assert.equal(holders.get('10.99.0.34'), 'node3')
        assert.equal(holders.get('10.99.0.18'), undefined, 'the old address is released')

        await waitApplied(lab, nodes, POLICY, 'node3 in ops')
        await matrix(t, lab, 'after `group move node3 ops`', nodes)
        // DNS: node4 (ops) resolves node3 at its new address, node2 (eng) no longer does, and node3's
        // own server answers on its new address (its parts started again there).
        await waitFor('node4 to resolve node3.mesh to 10.99.0.34', async () => ((await dig(lab, 'node4', '@10.99.0.33', '+short', 'node3.mesh')).trim() === '10.99.0.34' ? true : undefined), {
          timeoutMs: 30_000,
          intervalMs: 200,
        })
        assert.match(await dig(lab, 'node2', '@10.99.0.17', 'node3.mesh'), /status: NXDOMAIN/)
        assert.equal((await dig(lab, 'node3', '@10.99.0.34', '+short', 'node4.mesh')).trim(), '10.99.0.33')
        t.diagnostic('DNS: node4 (ops) → node3.mesh 10.99.0.34; node2 (eng) → NXDOMAIN; node3 answers on 10.99.0.34')
      })

      // node2's own token can't move anyone: ipam/ is the operators' and join servers'.
      const own = await lab.cli(
        'node2',
        ['group', 'move', 'node2', 'ops', '--wait', '0', '--net', LAB_NETNAME, '--consul', 'http://127.0.0.1:8500', '--config-dir', labConfigDir(lab.state.runDir, 'node2')],
        {
          allowFailure: true,
        },
      )
      assert.notEqual(own.code, 0, '`group move` with a node token fails')
      assert.match(`${own.stdout}${own.stderr}`, /may not write|permission denied/i)
      t.diagnostic(`\`group move node2 ops\` with node2's token: exit ${own.code}: ${`${own.stdout}${own.stderr}`.trim().split('\n').slice(-1).join('')}`)
      assert.equal(activeHolders(await readIpam(lab.consul('node1'), layout)).get('10.99.0.17'), 'node2', 'node2 kept its address')
    },
    600_000,
  )
})
