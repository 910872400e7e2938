import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { waitFor } from '../../src/lab/daemon.ts'
import { LAB_NETNAME, type Lab } from '../../src/lab/lab.ts'
import { labConfigDir } from '../../src/lab/tinc-manual.ts'
import { kvLayout } from '../../src/mesh/kv-layout.ts'
import { decodeJson, networkRecordSchema, nodeRecordSchema, type NodeRecord } from '../../src/mesh/record.ts'
import { reverseName6 } from '../../src/dns/zone.ts'
import { defaultInterface } from '../../src/tinc/setup.ts'
import { dig, labTest, useLab, withLogs } from './helpers.ts'

// Issue 18, item 3: a network made with `init --cidr6` gives every node an IPv6 /128 besides its
// IPv4 address, joiners included; every pair pings over IPv6 inside the mesh, through NAT too,
// and every node's DNS answers AAAA and the ip6.arpa PTR, on its IPv6 VPN address as well.

const layout = kvLayout(LAB_NETNAME)
const KEY = ['--key-size', '2048']
const CIDR6 = 'fd42:7e57:1ab::/64'
const TUN = defaultInterface(LAB_NETNAME)
const members = ['node1', 'node2', 'node3']

const plan = (lab: Lab, name: string) => lab.state.plan.nodes.find((n) => n.name === name) ?? assert.fail(`no ${name}`)
const asOperator = (lab: Lab) => ({ env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' } })
const configDir = (lab: Lab, name: string) => labConfigDir(lab.state.runDir, name)
const hostFile = (lab: Lab, at: string, peer: string) => readFileSync(join(lab.tincFiles(at).dir, 'hosts', peer), 'utf8')

async function start(lab: Lab, name: string) {
  await lab.restartTincd(name)
  await lab.startSidecar(name)
}

async function joinNode(lab: Lab, name: string) {
  const inv = (await lab.cli('node1', ['invite', '--net', LAB_NETNAME, '--config-dir', configDir(lab, 'node1')])).stdout.trim()
  const n = plan(lab, name)
  const out = await lab.cli(name, ['join', inv, '--name', name, ...(n.behindNat ? [] : ['--address', n.publicIp]), ...KEY, ...lab.setupFlags(name)])
  assert.match(out.stdout, new RegExp(`Joined lab as ${name} with address 10\\.99\\.0\\.\\d+ and fd42:7e57:1ab::[0-9a-f]+\\.`))
  await start(lab, name)
}

describe('lab, ACLs on: IPv6 inside the mesh, made with init --cidr6, invites and joins', () => {
  // node1 and node2 public; node3 behind NAT.
  const get = useLab({ nodes: 3, nat: 1, consulServers: 1, acl: true, tinc: false })

  labTest('every node has a /128, every pair pings over IPv6, and every node answers AAAA and ip6.arpa PTR', async () => {
    const lab = get()
    const init = await lab.cli(
      'node1',
      ['init', '--net', LAB_NETNAME, '--name', 'node1', '--cidr', '10.99.0.0/24', '--cidr6', CIDR6, '--address', plan(lab, 'node1').publicIp, ...KEY, ...lab.setupFlags('node1')],
      asOperator(lab),
    )
    assert.match(init.stdout, /This node has address 10\.99\.0\.1 and fd42:7e57:1ab::1\./)
    await start(lab, 'node1')
    await joinNode(lab, 'node2')
    await joinNode(lab, 'node3')

    const network = decodeJson((await lab.consul('node1').kvGet(layout.network))?.value ?? '', networkRecordSchema)
    assert.ok(network.ok && network.value.cidr6 === CIDR6, 'the network record carries cidr6')
    const records = (await lab.consul('node1').kvList(layout.nodesPrefix)).items.map((i) => {
      const d = decodeJson(i.value, nodeRecordSchema)
      return d.ok ? d.value : assert.fail(`${i.key}: ${d.reason}`)
    })
    assert.deepEqual(records.map((r) => r.name).sort(), members)
    const byName = new Map<string, NodeRecord>(records.map((r) => [r.name, r]))
    const v6 = (n: string) => byName.get(n)?.vpnAddress6 ?? assert.fail(`${n} has no IPv6 address`)
    assert.equal(new Set(members.map(v6)).size, members.length, 'distinct IPv6 addresses')
    const ipam = (await lab.consul('node1').kvList(layout.ipamPrefix)).items.map((i) => i.key.slice(layout.ipamPrefix.length))
    for (const m of members) {
      assert.ok(ipam.includes(v6(m)), `ipam/${v6(m)} holds ${m}'s address`)
      // Older readers accept one /32 in subnets: the /128 is the record's own field.
      assert.deepEqual(byName.get(m)?.subnets, [`${byName.get(m)?.vpnAddress}/32`])
    }

    await withLogs(lab, members, async () => {
      // Each daemon renders every peer's /128 as a second Subnet line (StrictSubnets routes only those).
      for (const at of members)
        for (const peer of members.filter((p) => p !== at))
          await waitFor(`${at}'s hosts/${peer} to route ${v6(peer)}`, async () => (hostFile(lab, at, peer).includes(`Subnet = ${v6(peer)}/128`) ? true : undefined), {
            timeoutMs: 30_000,
            intervalMs: 100,
          })
      for (const m of members) {
        const addr = await lab.exec(m, ['ip', '-6', '-o', 'addr', 'show', 'dev', TUN])
        assert.match(addr.stdout, new RegExp(`inet6 ${v6(m)}/64 `), `tinc-up set ${m}'s IPv6 address`)
      }
      for (const from of members)
        for (const to of members.filter((p) => p !== from))
          await waitFor(
            `${from} to ping ${to} (${v6(to)}) over IPv6`,
            async () => ((await lab.exec(from, ['ping', '-6', '-c1', '-W2', v6(to)], { allowFailure: true })).code === 0 ? true : undefined),
            {
              timeoutMs: 45_000,
            },
          )
    })

    await withLogs(lab, members, async () => {
      for (const at of members) {
        const own4 = byName.get(at)?.vpnAddress ?? assert.fail(`no address for ${at}`)
        for (const other of members.filter((p) => p !== at)) {
          await waitFor(`${at} to answer AAAA ${other}.mesh`, async () => ((await dig(lab, at, `@${own4}`, '+short', `${other}.mesh`, 'AAAA')).trim() === v6(other) ? true : undefined), {
            timeoutMs: 20_000,
            intervalMs: 200,
          })
          // The same answers from the server on the node's IPv6 VPN address.
          assert.equal((await dig(lab, at, `@${v6(at)}`, '+short', `${other}.mesh`, 'AAAA')).trim(), v6(other), `${at} on ${v6(at)} for ${other}`)
          assert.equal((await dig(lab, at, `@${v6(at)}`, '+short', '-x', v6(other))).trim(), `${other}.mesh.`, `${at}: PTR for ${v6(other)}`)
        }
        // The project's own resolver agrees, by name and by address.
        const other = members.find((p) => p !== at) ?? assert.fail('no other node')
        assert.equal((await lab.cli(at, ['resolve', `${other}.mesh`, '--type', 'AAAA', '--server', own4])).stdout, `${other}.mesh.\t30\tAAAA\t${v6(other)}\n`)
        assert.equal((await lab.cli(at, ['resolve', v6(other), '--server', own4])).stdout, `${reverseName6(v6(other))}.\t30\tPTR\t${other}.mesh.\n`)
      }
    })

    const st = JSON.parse((await lab.cli('node3', ['status', '--json', '--net', LAB_NETNAME, '--config-dir', configDir(lab, 'node3')])).stdout) as {
      nodes: Array<{ name: string; address?: string; address6?: string }>
    }
    for (const peer of ['node1', 'node2']) {
      const row = st.nodes.find((n) => n.name === peer)
      assert.deepEqual({ address: row?.address, address6: row?.address6 }, { address: byName.get(peer)?.vpnAddress, address6: v6(peer) }, `status on node3 for ${peer}`)
    }
  })
})
