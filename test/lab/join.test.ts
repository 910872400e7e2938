import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, readFileSync, readdirSync } from 'node:fs'
import { connect } from 'node:net'
import { join } from 'node:path'
import { kvLayout } from '../../src/mesh/kv-layout.ts'
import { waitFor } from '../../src/lab/daemon.ts'
import { LAB_NETNAME, type Lab } from '../../src/lab/lab.ts'
import { labConfigDir, labEventsDir } from '../../src/lab/tinc-manual.ts'
import { decodeInvite, encodeInvite } from '../../src/mesh/invite.ts'
import { frame, readFrame } from '../../src/mesh/join-wire.ts'
import { readManagedBlock } from '../../src/tinc/conf-block.ts'
import { labTest, useLab, withLogs } from './helpers.ts'

const layout = kvLayout(LAB_NETNAME)
const KEY = ['--key-size', '2048']
const node = (lab: Lab, name: string) => {
  const n = lab.state.plan.nodes.find((x) => x.name === name)
  if (!n) throw new Error(`no ${name}`)
  return n
}
const hosts = (lab: Lab, name: string) => (existsSync(join(lab.tincFiles(name).dir, 'hosts')) ? readdirSync(join(lab.tincFiles(name).dir, 'hosts')).sort() : [])
const ping = async (lab: Lab, from: string, ip: string) => (await lab.exec(from, ['ping', '-c1', '-W1', ip], { allowFailure: true })).code === 0

async function start(lab: Lab, name: string) {
  await lab.restartTincd(name)
  await lab.startSidecar(name)
}

async function invite(lab: Lab, on: string, extra: string[] = []): Promise<string> {
  const r = await lab.cli(on, ['invite', '--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, on), ...extra])
  return r.stdout.trim()
}

async function joinNode(lab: Lab, name: string, inv: string, extra: string[] = [], allowFailure = false) {
  const n = node(lab, name)
  return lab.cli(name, ['join', inv, '--name', name, ...(n.behindNat ? [] : ['--address', n.publicIp]), ...KEY, ...lab.setupFlags(name), ...extra], { allowFailure })
}

/** Sends raw bytes to a join endpoint (through the control network) and returns the error it answers with. */
async function raw(ip: string, bytes: Buffer): Promise<string> {
  const socket = connect({ host: ip, port: 8655 })
  socket.on('error', () => undefined)
  await new Promise<void>((r) => socket.once('connect', () => r()))
  socket.write(bytes)
  const reply = await readFrame(socket, 4096)
  socket.destroy()
  assert.equal(reply[0], 1)
  return reply.subarray(1).toString('utf8')
}

describe('lab, ACLs on: init on one node, invites and joins for the rest', () => {
  // node1 and node2 public; node3..node6 behind NAT.
  const get = useLab({ nodes: 6, nat: 4, consulServers: 1, acl: true, tinc: false })
  const members = ['node1', 'node2', 'node3', 'node4', 'node5']

  labTest("node1 inits, node2 joins from node1's invite, node3-5 join behind NAT from node1 or node2: every pair pings, every node has every host file, addresses are unique", async () => {
    const lab = get()
    const init = await lab.cli('node1', ['init', '--net', LAB_NETNAME, '--name', 'node1', '--cidr', '10.99.0.0/24', '--address', node(lab, 'node1').publicIp, ...KEY, ...lab.setupFlags('node1')], {
      env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' },
    })
    assert.match(init.stdout, /This node has address 10\.99\.0\.1/)
    // Idempotent: a second run changes nothing and keeps the key.
    const again = await lab.cli('node1', ['init', '--net', LAB_NETNAME, '--name', 'node1', '--address', node(lab, 'node1').publicIp, ...KEY, ...lab.setupFlags('node1')], {
      env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' },
    })
    assert.match(again.stdout, /reusing the key/)
    await start(lab, 'node1')

    await joinNode(lab, 'node2', await invite(lab, 'node1', ['--name', 'node2', '--serve-joins']))
    await start(lab, 'node2')
    for (const [name, from] of [
      ['node3', 'node1'],
      ['node4', 'node2'],
      ['node5', 'node2'],
    ] as const) {
      const out = await joinNode(lab, name, await invite(lab, from))
      assert.match(out.stdout, new RegExp(`Joined lab as ${name}`))
      await start(lab, name)
    }

    const records = (await lab.consul('node1').kvList(layout.nodesPrefix)).items.map((i) => JSON.parse(Buffer.from(i.value).toString()) as { name: string; vpnAddress: string })
    const addresses = records.map((r) => r.vpnAddress)
    assert.equal(new Set(addresses).size, members.length, `addresses are not unique: ${addresses.join(' ')}`)
    await waitFor('every node to hold every host file', async () => (members.every((m) => JSON.stringify(hosts(lab, m)) === JSON.stringify(members)) ? true : undefined), {
      timeoutMs: 30_000,
      intervalMs: 100,
    })
    // Joiners start with one ConnectTo (the node that let them in); their daemon adds the other public node.
    const connectTo = (n: string) => readManagedBlock(readFileSync(join(lab.tincFiles(n).dir, 'tinc.conf'), 'utf8'))
    await waitFor(
      'every node to ConnectTo every other public node',
      async () => (members.every((m) => JSON.stringify(connectTo(m)) === JSON.stringify(['node1', 'node2'].filter((p) => p !== m).map((p) => `ConnectTo = ${p}`))) ? true : undefined),
      { timeoutMs: 30_000, intervalMs: 100 },
    )
    // tincd's hooks told node1's daemon about the nodes that came up after it started.
    const events = () => readFileSync(join(labEventsDir(lab.state.runDir, 'node1'), LAB_NETNAME, 'tinc-events'), 'utf8')
    await waitFor("node1's hooks to report node3 reachable", async () => (/ host-up node3 /.test(events()) ? true : undefined), { timeoutMs: 30_000 })
    await withLogs(lab, members, async () => {
      for (const from of members) {
        for (const r of records) {
          if (r.name === from) continue
          await waitFor(`${from} to ping ${r.name} (${r.vpnAddress})`, async () => ((await ping(lab, from, r.vpnAddress)) ? true : undefined), { timeoutMs: 45_000 })
        }
      }
    })
    // node5's tincd reached its peers before its daemon started; tinc-up kept their host-up
    // events for it, so the status knows since when each one is up.
    const st = JSON.parse((await lab.cli('node5', ['status', '--json', '--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, 'node5')])).stdout) as {
      nodes: Array<{ name: string; path: string; lastChange?: string }>
    }
    assert.deepEqual(
      st.nodes.filter((n) => n.path !== 'self' && !n.lastChange).map((n) => n.name),
      [],
      'peers with no host-up on file at node5',
    )
  })

  labTest('a used, expired, wrong, tampered or 10 MiB join is refused; nothing crashes and nothing is left behind', async () => {
    const lab = get()
    const admin = lab.consul('node1')
    const state = async () => ({
      nodes: (await admin.kvList(layout.nodesPrefix)).items.map((i) => i.key),
      ipam: (await admin.kvList(layout.ipamPrefix)).items.map((i) => i.key),
    })
    const before = await state()
    const used = await invite(lab, 'node1')
    await joinNode(lab, 'node6', used)
    // Take node6 back out to try again: revoke it, and move its files away.
    await lab.cli('node1', ['revoke', '--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, 'node1'), 'node6'], {
      env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' },
    })
    await lab.exec('node6', ['rm', '-rf', lab.tincFiles('node6').root])
    const afterFirst = await state()

    const refused = async (inv: string, why: RegExp) => {
      const x = await joinNode(lab, 'node6', inv, [], true)
      const r = { code: x.code, out: x.stdout + x.stderr }
      assert.notEqual(r.code, 0, `join with a bad invite succeeded: ${r.out}`)
      assert.match(r.out, why)
      assert.equal(existsSync(lab.tincFiles('node6').dir), false, 'a refused join left a tinc directory')
      assert.deepEqual(existsSync(lab.tincFiles('node6').root) ? readdirSync(lab.tincFiles('node6').root) : [], [], 'a refused join left staging files')
    }
    await refused(used, /invite not valid/)
    const short = await invite(lab, 'node1', ['--ttl', '1s'])
    await new Promise((r) => setTimeout(r, 1500))
    await refused(short, /expired/)
    // The joiner's own expiry check is skipped when the clock says otherwise; the server still refuses.
    const wrong = decodeInvite(await invite(lab, 'node1'))
    await refused(encodeInvite({ ...wrong, token: new Uint8Array(32).fill(1) }), /invite not valid/)
    const n1 = node(lab, 'node1').controlIp
    const tampered = Buffer.concat([Buffer.from([0, 50]), Buffer.from(JSON.stringify({ v: 1, net: LAB_NETNAME, name: 'node6', id: 'ab'.repeat(16) }).padEnd(50)), Buffer.alloc(80, 7)])
    assert.match(await raw(n1, frame(tampered)), /bad request header|invite not valid/)
    // Before authentication every refusal is the generic one, an oversized frame included.
    assert.match(await raw(n1, frame(Buffer.alloc(10 * 1024 * 1024, 0x41))), /invite not valid/)
    assert.deepEqual(await state(), afterFirst, 'refused joins changed Consul')
    assert.equal(afterFirst.ipam.length, before.ipam.length + 1)
    // The endpoint is still up and serves the next honest join.
    const ok = await joinNode(lab, 'node6', await invite(lab, 'node1'), ['--force'])
    assert.match(ok.stdout, /Joined lab as node6/)
    // node6 was revoked and re-joined under its name: it gets its old address back.
    assert.match(ok.stdout, /address 10\.99\.0\.6/)
    await lab.cli('node1', ['revoke', '--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, 'node1'), 'node6'], {
      env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' },
    })
  })

  labTest('with node1 fully stopped, a new node still joins through node2 and reaches the rest', async () => {
    const lab = get()
    const inv = await invite(lab, 'node2')
    assert.ok(
      decodeInvite(inv).endpoints.some((e) => e.startsWith(node(lab, 'node1').publicIp)),
      'the invite should list node1 too',
    )
    lab.stopNode('node1')
    await lab.exec('node6', ['rm', '-rf', lab.tincFiles('node6').root])
    const out = await joinNode(lab, 'node6', inv)
    assert.match(out.stdout, /did not answer/)
    assert.match(out.stdout, /Joined lab as node6/)
    await start(lab, 'node6')
    for (const peer of ['node2', 'node3', 'node4', 'node5']) {
      const ip = `10.99.0.${peer.slice(4)}`
      await waitFor(`node6 to ping ${peer}`, async () => ((await ping(lab, 'node6', ip)) ? true : undefined), { timeoutMs: 45_000 })
    }
  })
})
