import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { waitFor } from '../../src/lab/daemon.ts'
import { LAB_NETNAME, type Lab } from '../../src/lab/lab.ts'
import { labConfigDir } from '../../src/lab/tinc-manual.ts'
import { kvLayout } from '../../src/mesh/kv-layout.ts'
import { decodeJson, networkRecordSchema } from '../../src/mesh/record.ts'
import { confMode } from '../../src/tinc/mode.ts'
import { defaultInterface } from '../../src/tinc/setup.ts'
import { labTest, useLab, withLogs } from './helpers.ts'

// Issue 18, item 4: a network made with `init --mode switch` runs tinc in switch mode (layer 2,
// a tap device) on every node, joiners included, and its nodes reach each other through NAT.

const layout = kvLayout(LAB_NETNAME)
const KEY = ['--key-size', '2048']
const TAP = defaultInterface(LAB_NETNAME)
const members = ['node1', 'node2', 'node3', 'node4']

const plan = (lab: Lab, name: string) => lab.state.plan.nodes.find((n) => n.name === name) ?? assert.fail(`no ${name}`)
const asOperator = (lab: Lab) => ({ env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' } })
const configDir = (lab: Lab, name: string) => labConfigDir(lab.state.runDir, name)
const tincConf = (lab: Lab, name: string) => readFileSync(join(lab.tincFiles(name).dir, 'tinc.conf'), 'utf8')

async function start(lab: Lab, name: string) {
  await lab.restartTincd(name)
  await lab.startSidecar(name)
}

async function joinNode(lab: Lab, name: string, from: string, inviteFlags: string[] = []) {
  const inv = (await lab.cli(from, ['invite', '--net', LAB_NETNAME, '--config-dir', configDir(lab, from), ...inviteFlags])).stdout.trim()
  const n = plan(lab, name)
  const out = await lab.cli(name, ['join', inv, '--name', name, ...(n.behindNat ? [] : ['--address', n.publicIp]), ...KEY, ...lab.setupFlags(name)])
  assert.match(out.stdout, new RegExp(`Joined lab as ${name}`))
  await start(lab, name)
}

/** The tap device's kind and MAC address in a node's namespace, from `ip -d link`. */
async function tapOf(lab: Lab, name: string): Promise<{ kind: string; mac: string }> {
  const out = await lab.exec(name, ['ip', '-j', '-d', 'link', 'show', 'dev', TAP])
  const [link] = JSON.parse(out.stdout) as Array<{ address?: string; link_type?: string; linkinfo?: { info_kind?: string; info_data?: { type?: string } } }>
  return { kind: `${link?.link_type ?? '?'}/${link?.linkinfo?.info_data?.type ?? '?'}`, mac: link?.address ?? '' }
}

/** The link-layer address a node's neighbour table holds for an IP on the tap device. */
async function neighbour(lab: Lab, name: string, ip: string): Promise<string | undefined> {
  const out = await lab.exec(name, ['ip', '-j', 'neigh', 'show', 'dev', TAP, 'to', ip])
  const [entry] = JSON.parse(out.stdout || '[]') as Array<{ dst: string; lladdr?: string }>
  return entry?.lladdr
}

describe('lab, ACLs on: a switch-mode network (layer 2) made with init --mode switch, invites and joins', () => {
  // node1 and node2 public; node3 and node4 behind NAT.
  const get = useLab({ nodes: 4, nat: 2, consulServers: 1, acl: true, tinc: false })

  labTest('every node runs Mode = switch on a tap device, every pair pings, and each sees the others by MAC in its neighbour table', async () => {
    const lab = get()
    const init = await lab.cli(
      'node1',
      ['init', '--net', LAB_NETNAME, '--name', 'node1', '--cidr', '10.99.0.0/24', '--mode', 'switch', '--address', plan(lab, 'node1').publicIp, ...KEY, ...lab.setupFlags('node1')],
      asOperator(lab),
    )
    assert.match(init.stdout, /created network lab \(10\.99\.0\.0\/24, names under \.mesh, switch mode\)/)
    // Asking for the other mode on an existing network is refused, not ignored.
    const wrong = await lab.cli('node1', ['init', '--net', LAB_NETNAME, '--name', 'node1', '--mode', 'router', '--address', plan(lab, 'node1').publicIp, ...KEY, ...lab.setupFlags('node1')], {
      ...asOperator(lab),
      allowFailure: true,
    })
    assert.notEqual(wrong.code, 0)
    assert.match(wrong.stderr + wrong.stdout, /already exists in switch mode, not router/)
    await start(lab, 'node1')
    // node2 serves joins too, so node4's join goes through a joined node's broker.
    await joinNode(lab, 'node2', 'node1', ['--name', 'node2', '--serve-joins'])
    await joinNode(lab, 'node3', 'node1')
    await joinNode(lab, 'node4', 'node2')

    const network = decodeJson((await lab.consul('node1').kvGet(layout.network))?.value ?? '', networkRecordSchema)
    assert.ok(network.ok && network.value.mode === 'switch', 'the network record carries mode: switch')
    const records = (await lab.consul('node1').kvList(layout.nodesPrefix)).items.map((i) => JSON.parse(Buffer.from(i.value).toString()) as { name: string; vpnAddress: string; subnets: string[] })
    assert.deepEqual(records.map((r) => r.name).sort(), members)
    // Records are what they are in router mode: the node's /32, for DNS and the address table.
    for (const r of records) assert.deepEqual(r.subnets, [`${r.vpnAddress}/32`])
    const ipOf = new Map(records.map((r) => [r.name, r.vpnAddress]))

    for (const m of members) {
      // The joiners learned the mode from the join reply's network record.
      assert.equal(confMode(tincConf(lab, m)), 'switch', `${m}'s tinc.conf:\n${tincConf(lab, m)}`)
      assert.match(tincConf(lab, m), /^DeviceType = tap$/m)
      assert.equal((await tapOf(lab, m)).kind, 'ether/tap', `${m}'s ${TAP} is not a tap device`)
    }
    // Peers' files carry no Subnet line: written so by init and join, and kept so by each daemon.
    const peerFiles = (m: string) => readdirSync(join(lab.tincFiles(m).dir, 'hosts')).filter((f) => f !== m)
    await waitFor('every node to hold every peer file', async () => (members.every((m) => peerFiles(m).length === members.length - 1) ? true : undefined), { timeoutMs: 30_000, intervalMs: 100 })
    for (const m of members) for (const f of peerFiles(m)) assert.doesNotMatch(readFileSync(join(lab.tincFiles(m).dir, 'hosts', f), 'utf8'), /^Subnet/m, `${m}'s hosts/${f}`)

    const macs = new Map(await Promise.all(members.map(async (m) => [m, (await tapOf(lab, m)).mac] as const)))
    assert.equal(new Set(macs.values()).size, members.length, `tap MACs are not distinct: ${[...macs.values()].join(' ')}`)
    await withLogs(lab, members, async () => {
      for (const from of members) {
        for (const to of members) {
          if (to === from) continue
          const ip = ipOf.get(to) ?? assert.fail(`no address for ${to}`)
          await waitFor(`${from} to ping ${to} (${ip})`, async () => ((await lab.exec(from, ['ping', '-c1', '-W1', ip], { allowFailure: true })).code === 0 ? true : undefined), { timeoutMs: 45_000 })
          // Layer 2: the ping went out after an ARP exchange over the tap device, so the peer's
          // VPN address sits in the neighbour table with the MAC of the peer's own tap device.
          assert.equal(await neighbour(lab, from, ip), macs.get(to), `${from}'s neighbour entry for ${to} (${ip})`)
        }
      }
    })

    const st = JSON.parse((await lab.cli('node3', ['status', '--json', '--net', LAB_NETNAME, '--config-dir', configDir(lab, 'node3')])).stdout) as { node: { mode?: string; tincConfMode?: string } }
    assert.equal(st.node.mode, 'switch')
    assert.equal(st.node.tincConfMode, undefined, 'tinc.conf agrees with the network')
    const table = (await lab.cli('node3', ['status', '--net', LAB_NETNAME, '--config-dir', configDir(lab, 'node3')])).stdout
    assert.match(table.split('\n')[0] ?? '', /on lab \(tinc-lab, switch mode\)/)
  })
})
