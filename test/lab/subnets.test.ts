import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { waitFor } from '../../src/lab/daemon.ts'
import { LAB_NETNAME, type Lab } from '../../src/lab/lab.ts'
import { labConfigDir } from '../../src/lab/tinc-manual.ts'
import type { Status } from '../../src/status/model.ts'
import { defaultInterface } from '../../src/tinc/setup.ts'
import { labTest, useLab, withLogs } from './helpers.ts'

// Subnets behind nodes (docs/subnets.md), on real tincd 1.0 and Consul with ACLs: a LAN behind a
// public node whose host routes back, and one behind a node behind NAT whose host doesn't (the node
// masquerades). Once approved, every node pings both LAN hosts; an unapproved subnet and one that
// overlaps an older approval are in no host file and show refused in status; withdrawing an
// approval removes the Subnet line everywhere and the LAN goes dark.

const KEY = ['--key-size', '2048']
const TUN = defaultInterface(LAB_NETNAME)
const members = ['node1', 'node2', 'node3']
const LAN1 = '192.168.51.0/24'
const LAN2 = '192.168.52.0/24'
const UNAPPROVED = '172.16.53.0/24'
const OVERLAPPING = '192.168.51.128/25'

const plan = (lab: Lab, name: string) => lab.state.plan.nodes.find((n) => n.name === name) ?? assert.fail(`no ${name}`)
const asOperator = (lab: Lab) => ({ env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' } })
const configDir = (lab: Lab, name: string) => labConfigDir(lab.state.runDir, name)
const hostFile = (lab: Lab, at: string, peer: string) => readFileSync(join(lab.tincFiles(at).dir, 'hosts', peer), 'utf8')
const onNode = (lab: Lab, name: string) => ['--net', LAB_NETNAME, '--config-dir', configDir(lab, name)]
const ping = async (lab: Lab, from: string, ip: string) => (await lab.exec(from, ['ping', '-c1', '-W2', ip], { allowFailure: true })).code === 0

async function start(lab: Lab, name: string) {
  await lab.restartTincd(name)
  await lab.startSidecar(name)
}

async function joinNode(lab: Lab, name: string) {
  const inv = (await lab.cli('node1', ['invite', ...onNode(lab, 'node1')])).stdout.trim()
  const n = plan(lab, name)
  await lab.cli(name, ['join', inv, '--name', name, ...(n.behindNat ? [] : ['--address', n.publicIp]), ...KEY, ...lab.setupFlags(name)])
  await start(lab, name)
}

async function status(lab: Lab, name: string): Promise<Status> {
  return JSON.parse((await lab.cli(name, ['status', '--json', ...onNode(lab, name)])).stdout) as Status
}

/** Waits until every node's host file for `owner` has (or lacks) the Subnet line. */
async function everywhere(lab: Lab, owner: string, cidr: string, present: boolean) {
  for (const at of members.filter((m) => m !== owner))
    await waitFor(`${at}'s hosts/${owner} ${present ? 'to route' : 'to stop routing'} ${cidr}`, async () => (hostFile(lab, at, owner).includes(`Subnet = ${cidr}\n`) === present ? true : undefined), {
      timeoutMs: 30_000,
      intervalMs: 100,
    })
}

describe('lab, ACLs on: subnets behind nodes, approved by an operator, routed by every node', () => {
  // node1 and node2 public; node3 behind NAT.
  const get = useLab({ nodes: 3, nat: 1, consulServers: 1, acl: true, tinc: false })

  labTest(
    'approved LANs are pinged from every node; unapproved and overlapping ones are rendered nowhere; unapprove ends the route',
    async () => {
      const lab = get()
      await lab.cli('node1', ['init', '--net', LAB_NETNAME, '--name', 'node1', '--cidr', '10.99.0.0/24', '--address', plan(lab, 'node1').publicIp, ...KEY, ...lab.setupFlags('node1')], asOperator(lab))
      await start(lab, 'node1')
      await joinNode(lab, 'node2')
      await joinNode(lab, 'node3')
      const lan1 = await lab.addLan('node1', LAN1, { routeBack: true })
      const lan2 = await lab.addLan('node3', LAN2, { routeBack: false })

      await withLogs(lab, members, async () => {
        // Announce: the CLI says what the operator must do, forwarding included (we never set it).
        await lab.exec('node1', ['sysctl', '-q', '-w', 'net.ipv4.ip_forward=0'])
        const add1 = await lab.cli('node1', ['subnet', 'add', LAN1, ...onNode(lab, 'node1'), '--dir', lab.tincFiles('node1').root])
        assert.match(add1.stdout, /subnet approve node1 192\.168\.51\.0\/24/)
        assert.match(add1.stdout, /net\.ipv4\.ip_forward=1/)
        await lab.cli('node3', ['subnet', 'add', LAN2, '--masquerade', ...onNode(lab, 'node3'), '--dir', lab.tincFiles('node3').root])
        for (const cidr of [UNAPPROVED, OVERLAPPING]) await lab.cli('node2', ['subnet', 'add', cidr, ...onNode(lab, 'node2'), '--dir', lab.tincFiles('node2').root])
        const bad = await lab.cli('node2', ['subnet', 'add', '192.168.60.7/24', ...onNode(lab, 'node2'), '--dir', lab.tincFiles('node2').root], { allowFailure: true })
        assert.match(bad.stderr, /host bits set: the network is 192\.168\.60\.0\/24/)
        const inVpn = await lab.cli('node2', ['subnet', 'add', '10.99.0.0/16', ...onNode(lab, 'node2'), '--dir', lab.tincFiles('node2').root], { allowFailure: true })
        assert.match(inVpn.stderr, /overlaps the VPN range 10\.99\.0\.0\/24/)

        // A node's own token can't approve anything, its own subnet included.
        const self = await lab.cli('node2', ['subnet', 'approve', 'node2', UNAPPROVED, ...onNode(lab, 'node2')], { allowFailure: true })
        assert.notEqual(self.code, 0)
        assert.match(self.stderr, /operator|Permission denied|403/)

        await waitFor(
          'node1 to warn that it announces a subnet without forwarding',
          async () => ((await status(lab, 'node1')).node.forwardingOff?.includes('net.ipv4.ip_forward') ? true : undefined),
          {
            timeoutMs: 30_000,
          },
        )
        for (const router of ['node1', 'node3']) await lab.exec(router, ['sysctl', '-q', '-w', 'net.ipv4.ip_forward=1'])
        assert.equal((await status(lab, 'node1')).node.forwardingOff, undefined)

        for (const [node, cidr] of [
          ['node1', LAN1],
          ['node3', LAN2],
          ['node2', OVERLAPPING],
        ] as const)
          await lab.cli('node1', ['subnet', 'approve', node, cidr, '--net', LAB_NETNAME], asOperator(lab))
        await everywhere(lab, 'node1', LAN1, true)
        await everywhere(lab, 'node3', LAN2, true)
        const masq = await lab.exec('node3', ['nft', 'list', 'table', 'ip', `tinc-consul-${LAB_NETNAME}`])
        assert.match(masq.stdout, /ip saddr 10\.99\.0\.0\/24 ip daddr 192\.168\.52\.0\/24 masquerade/)

        for (const from of members)
          for (const host of [lan1.hostIp, lan2.hostIp]) await waitFor(`${from} to ping ${host}`, async () => ((await ping(lab, from, host)) ? true : undefined), { timeoutMs: 45_000 })
        // The route came from tinc's subnet-up hook, through the tinc interface.
        assert.match((await lab.exec('node2', ['ip', 'route', 'show', LAN2])).stdout, new RegExp(`dev ${TUN}`))

        // Neither the unapproved subnet nor the one overlapping an older approval is in any host file.
        for (const at of ['node1', 'node3']) for (const cidr of [UNAPPROVED, OVERLAPPING]) assert.ok(!hostFile(lab, at, 'node2').includes(cidr), `${at}'s hosts/node2 has no ${cidr}`)
        const st = await status(lab, 'node1')
        const route = (node: string, cidr: string) => st.routes.find((r) => r.node === node && r.cidr === cidr)
        assert.equal(route('node1', LAN1)?.state, 'served')
        assert.equal(route('node3', LAN2)?.state, 'served')
        assert.equal(route('node2', UNAPPROVED)?.state, 'awaiting')
        assert.deepEqual(
          { state: route('node2', OVERLAPPING)?.state, reason: route('node2', OVERLAPPING)?.reason },
          { state: 'refused', reason: `node2's ${OVERLAPPING} overlaps node1's ${LAN1}, approved earlier` },
        )
        const text = (await lab.cli('node1', ['status', ...onNode(lab, 'node1')])).stdout
        assert.match(text, /node2\s+192\.168\.51\.128\/25\s+refused\s+node2's 192\.168\.51\.128\/25 overlaps node1's/)
        const ls = (await lab.cli('node2', ['subnet', 'ls', ...onNode(lab, 'node2')])).stdout
        assert.match(ls, /node2\s+172\.16\.53\.0\/24\s+awaiting/)
      })

      await withLogs(lab, members, async () => {
        // Withdrawing an approval: the Subnet line goes from every node, then the kernel route, then the pings.
        await lab.cli('node1', ['subnet', 'unapprove', 'node3', LAN2, '--net', LAB_NETNAME], asOperator(lab))
        await everywhere(lab, 'node3', LAN2, false)
        for (const from of ['node1', 'node2']) {
          await waitFor(`${from} to drop the route to ${LAN2}`, async () => ((await lab.exec(from, ['ip', 'route', 'show', LAN2])).stdout.trim() === '' ? true : undefined), { timeoutMs: 20_000 })
          assert.equal(await ping(lab, from, lan2.hostIp), false, `${from} can no longer reach ${lan2.hostIp}`)
        }
        assert.equal(await ping(lab, 'node2', lan1.hostIp), true, 'the other LAN is still served')
        assert.equal((await status(lab, 'node2')).routes.find((r) => r.node === 'node3')?.state, 'awaiting')

        // Announcing no more removes our masquerade table.
        await lab.cli('node3', ['subnet', 'rm', LAN2, ...onNode(lab, 'node3'), '--dir', lab.tincFiles('node3').root])
        await waitFor('node3 to remove its masquerade table', async () => ((await lab.exec('node3', ['nft', 'list', 'tables'])).stdout.includes('tinc-consul-') ? undefined : true), {
          timeoutMs: 20_000,
        })
      })
    },
    300_000,
  )
})
