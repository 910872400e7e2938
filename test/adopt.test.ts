import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { inspectLocalNode, ownHostWithAddressFirst, readLocalFiles, tincUpRanges } from '../src/mesh/adopt-local.ts'
import { adoptNode, type AdoptOptions } from '../src/mesh/adopt.ts'
import { adoptionState, applyAdoption, handMadeFile } from '../src/mesh/adoption.ts'
import { parseKeepList } from '../src/mesh/keep.ts'
import { planInstall } from '../src/install/plan.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { buildOwnRecord } from '../src/mesh/publish.ts'
import type { AcceptedPeer } from '../src/mesh/record.ts'
import { checkPeer } from '../src/mesh/record.ts'
import { hostFileText } from '../src/tinc/render.ts'
import { keyFingerprint } from '../src/tinc/hostfile.ts'
import { NETWORK, nodeRecord, rsaPublicPem } from './helpers-keys.ts'

const KEY_A = rsaPublicPem()
const KEY_B = rsaPublicPem()

function accepted(name: string, octet: number, pem: string): AcceptedPeer {
  const c = checkPeer(nodeRecord(name, octet, pem), { network: NETWORK, keyName: name })
  assert.ok(c.ok)
  return { ...c.value, createIndex: 1 }
}

describe('keep list: until-adopted lines', () => {
  test('an older keep file parses as before', () => {
    const k = parseKeepList('# hand-made\nnode3\n  node4  # the NAS\n')
    assert.deepEqual([...k.names], ['node3', 'node4'])
    assert.deepEqual([...k.untilAdopted], [])
    assert.deepEqual(k.bad, [])
  })
  test('NAME until-adopted is kept apart; anything else after a name is a bad line; a plain line wins', () => {
    const k = parseKeepList('node3 until-adopted\nnode4 until-adopted\nnode4\nnode5 forever\nnode6 until-adopted extra\n../x until-adopted\n')
    assert.deepEqual([...k.names], ['node4'])
    assert.deepEqual([...k.untilAdopted], ['node3'])
    assert.equal(k.bad.length, 3)
  })
})

describe('the keep-until-adopted rule', () => {
  const handMade = (pem: string, octet = 3) => handMadeFile(`Address = 198.18.0.${octet}\nSubnet = 10.99.0.${octet}/32\n${pem}\n`)

  test('no record yet: the hand-made file stays, nothing refused', () => {
    assert.deepEqual(adoptionState(handMade(KEY_A), undefined), { state: 'hand-made', reason: 'no valid record in Consul yet: the hand-made host file is kept', refused: false })
  })
  test('a record with the hand-made file’s key: the file becomes managed', () => {
    assert.deepEqual(adoptionState(handMade(KEY_A), accepted('node3', 3, KEY_A)), { state: 'managed' })
  })
  test('a record with the same key but another VPN address is refused: a public key can be copied', () => {
    const s = adoptionState(handMade(KEY_A), accepted('node3', 7, KEY_A))
    assert.deepEqual(s, {
      state: 'hand-made',
      reason: "the record's VPN address 10.99.0.7 differs from the hand-made host file's 10.99.0.3: record refused, file kept (kept until adopted)",
      refused: true,
    })
    assert.equal(handMadeFile(`Subnet = 10.99.0.3/32#10\n${KEY_A}\n`).address, '10.99.0.3', "tinc's weight suffix is not part of the address")
  })
  test('a record with another key is refused and the hand-made file kept', () => {
    const s = adoptionState(handMade(KEY_A), accepted('node3', 3, KEY_B))
    assert.equal(s.state, 'hand-made')
    assert.ok(s.state === 'hand-made' && s.refused && s.reason.includes(keyFingerprint(KEY_B)) && s.reason.includes(keyFingerprint(KEY_A)))
  })
  test('a hand-made file with no readable key refuses any record; a missing or already rendered file is an ordinary peer', () => {
    const garbage = adoptionState(handMadeFile('Subnet = 10.99.0.3/32\n-----BEGIN RSA PUBLIC KEY-----\n!!!\n'), accepted('node3', 3, KEY_A))
    assert.ok(garbage.state === 'hand-made' && garbage.refused)
    assert.deepEqual(adoptionState(undefined, accepted('node3', 3, KEY_B)), { state: 'managed' })
    const rendered = handMadeFile(hostFileText(accepted('node3', 3, KEY_A)))
    assert.equal(rendered.rendered, true)
    assert.deepEqual(adoptionState(rendered, accepted('node3', 3, KEY_B)), { state: 'managed' })
  })
  test('applyAdoption leaves refused and not-yet-adopted names out of the view, and the others in', () => {
    const view = {
      network: NETWORK,
      peers: new Map([
        ['node2', accepted('node2', 2, KEY_A)],
        ['node3', accepted('node3', 3, KEY_B)],
        ['node4', accepted('node4', 4, rsaPublicPem())],
      ]),
    }
    const files = new Map([
      ['node2', handMade(KEY_A, 2)],
      ['node3', handMade(KEY_A)],
      ['node5', handMade(KEY_B)],
    ])
    const r = applyAdoption(view, files)
    assert.deepEqual([...r.view.peers.keys()].sort(), ['node2', 'node4'])
    assert.deepEqual([...r.handMade.keys()].sort(), ['node3', 'node5'])
    assert.equal(r.handMade.get('node3')?.refused, true)
    assert.equal(r.handMade.get('node5')?.refused, false)
  })
})

/** A hand-made tinc 1.0 node, as people write one. */
async function handMadeNode(root: string, name: string, o: { octet: number; pem?: string; hostExtra?: string[]; conf?: string; tincUp?: string; peers?: Record<string, string>; key?: boolean }) {
  const dir = join(root, 'home')
  await mkdir(join(dir, 'hosts'), { recursive: true })
  await writeFile(join(dir, 'tinc.conf'), o.conf ?? `Name = ${name}\nInterface = tinc0\nConnectTo = node2\n`)
  const subnets = o.hostExtra ?? [`Subnet = 10.99.0.${o.octet}/32`]
  await writeFile(join(dir, 'hosts', name), [`Address = 198.18.0.${o.octet}`, 'Port = 655', ...subnets, o.pem ?? KEY_A, ''].join('\n'))
  await writeFile(join(dir, 'tinc-up'), o.tincUp ?? `#!/bin/sh\nip addr add 10.99.0.${o.octet}/24 dev "$INTERFACE"\nip link set "$INTERFACE" up\n`)
  if (o.key !== false) await writeFile(join(dir, 'rsa_key.priv'), 'private')
  for (const [peer, text] of Object.entries(o.peers ?? {})) await writeFile(join(dir, 'hosts', peer), text)
  return dir
}

async function snapshot(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {}
  const walk = async (d: string) => {
    for (const e of await readdir(d, { withFileTypes: true }).catch(() => [])) {
      const p = join(d, e.name)
      if (e.isDirectory()) await walk(p)
      else out[p] = await readFile(p, 'utf8')
    }
  }
  await walk(dir)
  return out
}

describe("adopt's read and plan step, on fixture files", () => {
  let root: string
  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'tinc-consul-adopt-'))
  })
  after(() => rm(root, { recursive: true, force: true }))
  const inspect = async (sub: string, o: Parameters<typeof handMadeNode>[2], vpnAddress?: string) =>
    inspectLocalNode(await readLocalFiles(await handMadeNode(join(root, sub), 'node1', o)), { vpnAddress })

  test('a plain hand-made node: name, mode, key, its one /32, the range from tinc-up, its peers; other subnets are routes to announce', async () => {
    const n = await inspect('plain', { octet: 1, hostExtra: ['Subnet = 192.168.7.0/24', 'Subnet = 10.99.0.1/32'], peers: { node2: `Subnet = 10.99.0.2/32\n${KEY_B}\n`, 'x.pre': 'junk' } })
    assert.equal(n.name, 'node1')
    assert.equal(n.mode, 'router')
    assert.equal(n.address, '10.99.0.1')
    assert.equal(n.tincUpCidr, '10.99.0.1/24')
    assert.deepEqual(n.extraSubnets, ['192.168.7.0/24'])
    assert.deepEqual(n.peers, [{ name: 'node2', fingerprint: keyFingerprint(KEY_B) }])
    assert.equal(n.fingerprint, keyFingerprint(KEY_A))
  })
  test('several /32s need --vpn-address; none needs it too; a wrong one is refused', async () => {
    const two = { octet: 1, hostExtra: ['Subnet = 10.99.0.1/32', 'Subnet = 10.99.0.9/32'] }
    await assert.rejects(inspect('two', two), /several \/32 subnets \(10\.99\.0\.1, 10\.99\.0\.9\).*--vpn-address/)
    const chosen = await inspect('two-chosen', two, '10.99.0.9')
    assert.equal(chosen.address, '10.99.0.9')
    assert.deepEqual(chosen.extraSubnets, ['10.99.0.1/32'])
    await assert.rejects(inspect('none', { octet: 1, hostExtra: [] }), /no "Subnet = <address>\/32" line: give this node's VPN address with --vpn-address \(tinc-up sets 10\.99\.0\.1\/24\)/)
    assert.equal((await inspect('none-chosen', { octet: 1, hostExtra: [] }, '10.99.0.1')).address, '10.99.0.1')
    await assert.rejects(inspect('two-wrong', two, '10.99.0.5'), /not one of this node's \/32 subnets/)
  })
  test('hostile or garbage files stop it with a clear error', async () => {
    await assert.rejects(inspect('garbage-conf', { octet: 1, conf: 'Name = node1\n\u0000\u0001 rm -rf /\n' }), /ADOPT|unreadable line/)
    await assert.rejects(inspect('bad-name', { octet: 1, conf: 'Name = ../../etc/passwd\n' }), /no valid "Name =" line/)
    await assert.rejects(inspect('hub', { octet: 1, conf: 'Name = node1\nMode = hub\n' }), /Mode = hub; tinc-consul runs router and switch networks only/)
    await assert.rejects(inspect('no-key', { octet: 1, key: false }), /no private key/)
    await assert.rejects(inspect('two-keys', { octet: 1, pem: `${KEY_A}\n${KEY_B}` }), /more than one public key block/)
    await assert.rejects(inspect('no-pub', { octet: 1, pem: '' }), /no usable RSA public key/)
    await assert.rejects(inspect('bad-port', { octet: 1, hostExtra: ['Port = 99999', 'Subnet = 10.99.0.1/32'] }), /Port is not a port number/)
    await assert.rejects(async () => inspectLocalNode(await readLocalFiles(join(root, 'nothing-here')), {}), /no .*tinc\.conf: adopt runs on a node of a hand-made tinc network/)
  })
  test('tinc-up ranges and the own host file with its address first', () => {
    assert.deepEqual(tincUpRanges('ip addr add 10.1.2.3/16 dev $INTERFACE\nifconfig $INTERFACE 10.5.0.1 netmask 255.255.255.0\nip -4 a a 10.6.0.1/24 dev x\n'), [
      '10.1.2.3/16',
      '10.6.0.1/24',
      '10.5.0.1/24',
    ])
    const text = 'Address = a\nSubnet = 192.168.7.0/24\nSubnet = 10.99.0.1/32\n-----BEGIN RSA PUBLIC KEY-----\n'
    assert.equal(ownHostWithAddressFirst(text, '10.99.0.1'), 'Address = a\nSubnet = 10.99.0.1/32\nSubnet = 192.168.7.0/24\n-----BEGIN RSA PUBLIC KEY-----\n')
    assert.equal(ownHostWithAddressFirst('Subnet = 10.99.0.1/32\nSubnet = 10.9.0.0/16\n', '10.99.0.1'), 'Subnet = 10.99.0.1/32\nSubnet = 10.9.0.0/16\n')
    assert.equal(ownHostWithAddressFirst('Address = a\n-----BEGIN RSA PUBLIC KEY-----\n', '10.99.0.1'), 'Address = a\nSubnet = 10.99.0.1/32\n-----BEGIN RSA PUBLIC KEY-----\n')
  })
})

describe('adopt against a real Consul agent (ACLs off)', () => {
  let consul: DevConsul
  let admin: ConsulClient
  let root: string
  const layout = kvLayout('home')
  const kv = async () => (await admin.kvList('tinc-consul/')).items.map((i) => `${i.key}=${Buffer.from(i.value).toString()}`).sort()
  const opts = (sub: string, extra: Partial<AdoptOptions> = {}): AdoptOptions => ({
    net: 'home',
    root: join(root, sub),
    configDir: join(root, sub, 'etc-tinc-consul'),
    runDir: join(root, sub, 'run'),
    consulUrl: consul.url,
    domain: 'mesh',
    dryRun: false,
    progress: () => undefined,
    ...extra,
  })
  before(async () => {
    consul = await startDevConsul()
    admin = createConsulClient({ url: consul.url })
    root = await mkdtemp(join(tmpdir(), 'tinc-consul-adopt-kv-'))
  })
  after(async () => {
    await consul.stop()
    await rm(root, { recursive: true, force: true })
  })

  test('--dry-run reads and plans, and changes nothing in Consul or on disk', async () => {
    await handMadeNode(join(root, 'n1'), 'node1', { octet: 1, peers: { node2: `Subnet = 10.99.0.2/32\n${KEY_B}\n` } })
    const before = await snapshot(join(root, 'n1'))
    const r = await adoptNode(opts('n1', { dryRun: true }))
    assert.equal(r.plan.createNetwork, true)
    assert.equal(r.plan.network.cidr, '10.99.0.0/24')
    assert.deepEqual(r.keepNames, ['node2'])
    assert.ok(r.files.some((f) => f.path.endsWith('tinc-up') && f.backup))
    assert.deepEqual(await kv(), [])
    assert.deepEqual(await snapshot(join(root, 'n1')), before)
  })

  test('the first adopter creates the network from tinc-up, claims its address and publishes its record; peers go on the keep list', async () => {
    const r = await adoptNode(opts('n1'))
    assert.equal(r.plan.createNetwork, true)
    const rec = await admin.kvGet(layout.node('node1'))
    assert.equal((JSON.parse(rec?.value ?? '{}') as { fingerprint?: string }).fingerprint, keyFingerprint(KEY_A))
    assert.match((await admin.kvGet(layout.ipam('10.99.0.1')))?.value ?? '', /"name":"node1"/)
    const dir = join(root, 'n1', 'home')
    assert.match(await readFile(join(dir, 'tinc.conf'), 'utf8'), /^Name = node1\nInterface = tinc0\nConnectTo = node2\n# BEGIN tinc-consul\n/)
    assert.match(await readFile(join(dir, 'tinc-up.pre-adopt'), 'utf8'), /ip addr add 10\.99\.0\.1\/24/)
    assert.match(await readFile(join(dir, 'tinc-up'), 'utf8'), /ip addr add 10\.99\.0\.1\/24 dev "\$INTERFACE"/)
    assert.equal(
      await readFile(join(root, 'n1', 'etc-tinc-consul', 'home.keep'), 'utf8'),
      '# Added by tinc-consul adopt: hand-made peers, kept until they adopt with the key in their hand-made file.\nnode2 until-adopted\n',
    )
    // Run again: nothing new, the first backup kept.
    const again = await adoptNode(opts('n1'))
    assert.equal(again.plan.createNetwork, false)
    assert.deepEqual(again.keepNames, [])
    assert.match(await readFile(join(dir, 'tinc-up.pre-adopt'), 'utf8'), /ip addr add/)
  })

  test('an address another node holds, another mode or a range that misses the address stops adopt, naming both nodes, and writes nothing', async () => {
    await handMadeNode(join(root, 'n2'), 'node2', { octet: 1, pem: KEY_B })
    const before = { kv: await kv(), files: await snapshot(join(root, 'n2')) }
    await assert.rejects(adoptNode(opts('n2')), /address 10\.99\.0\.1 is held by node "node1" .*node "node2" has it in its tinc config/)
    await handMadeNode(join(root, 'n3'), 'node3', { octet: 3, pem: rsaPublicPem(), conf: 'Name = node3\nMode = switch\n' })
    await assert.rejects(adoptNode(opts('n3')), /runs in router mode, but node3's tinc.conf says switch/)
    await handMadeNode(join(root, 'n4'), 'node4', { octet: 4, pem: rsaPublicPem(), hostExtra: ['Subnet = 10.98.0.4/32'] })
    await assert.rejects(adoptNode(opts('n4')), /is 10\.99\.0\.0\/24, and node4's address 10\.98\.0\.4 is not a host address in it/)
    // Garbage in a node's own files: refused before any read of Consul or any write.
    await handMadeNode(join(root, 'n6'), 'node6', { octet: 6, pem: `${KEY_A}\n${KEY_B}` })
    const n6 = await snapshot(join(root, 'n6'))
    await assert.rejects(adoptNode(opts('n6')), /hosts\/node6: more than one public key block/)
    await handMadeNode(join(root, 'n7'), 'node7', { octet: 7, conf: 'Name = node7\nPort = 655 ; rm -rf /\n\u0007\n' })
    await assert.rejects(adoptNode(opts('n7')), /tinc\.conf: unreadable line/)
    assert.deepEqual(await snapshot(join(root, 'n6')), n6)
    // Same name, another key.
    await handMadeNode(join(root, 'n5'), 'node1', { octet: 5, pem: KEY_B })
    await assert.rejects(adoptNode(opts('n5')), /"node1" is already in the network with another key/)
    assert.deepEqual(await kv(), before.kv)
    assert.deepEqual(await snapshot(join(root, 'n2')), before.files)
  })

  test("a home router's LAN subnets keep being routed: announced, approved by the adopting operator; the rest stays in the file", async () => {
    const extra = ['Subnet = 192.168.8.0/24', 'Subnet = 10.99.0.0/16', 'Subnet = 172.16.8.1/24']
    await handMadeNode(join(root, 'n8'), 'node8', { octet: 8, pem: rsaPublicPem(), hostExtra: ['Subnet = 10.99.0.8/32', ...extra] })
    const steps: string[] = []
    const r = await adoptNode({ ...opts('n8'), progress: (l) => steps.push(l) })
    assert.deepEqual(r.plan.routes.routes, ['192.168.8.0/24'])
    assert.deepEqual(
      r.plan.routes.kept.map((k) => k.subnet),
      ['10.99.0.0/16', '172.16.8.1/24'],
    )
    assert.ok(steps.some((l) => /192\.168\.8\.0\/24: announced as this node's route and approved/.test(l)))
    assert.deepEqual((JSON.parse((await admin.kvGet(layout.node('node8')))?.value ?? '{}') as { routes?: string[] }).routes, ['192.168.8.0/24'])
    assert.match((await admin.kvGet(layout.subnetApproval('node8', '192.168.8.0/24')))?.value ?? '', /^\{"v":1,"at":"/)
    const own = await readFile(join(root, 'n8', 'home', 'hosts', 'node8'), 'utf8')
    assert.match(own, /# BEGIN tinc-consul routes\n# Managed by tinc-consul.*\nSubnet = 192\.168\.8\.0\/24\n# END tinc-consul routes/)
    assert.equal(own.match(/192\.168\.8\.0\/24/g)?.length, 1, 'moved into the block, not repeated')
    assert.match(own, /^Subnet = 10\.99\.0\.0\/16$/m, 'what is no route stays as it was')
    // The daemon publishes the same record from the file adopt wrote.
    assert.deepEqual((await buildOwnRecord(join(root, 'n8', 'home'), 'node8')).routes, ['192.168.8.0/24'])
  })
})

describe("adopt's install step never restarts tincd", () => {
  test('with keepTincd, tinc@ is enabled and started (a running one is left alone), only the sidecar restarts', async () => {
    const base = {
      net: 'home',
      node: { name: 'node1', vpnAddress: '10.99.0.1' },
      unitDir: '/tmp/units',
      tincRoot: '/etc/tinc',
      settingsDir: '/etc/tinc-consul',
      bin: '/usr/local/bin/tinc-consul',
      consulBin: '/usr/local/bin/consul',
      systemctl: true,
    }
    const commands = async (keepTincd: boolean) => (await planInstall({ ...base, keepTincd })).flatMap((s) => (s.kind === 'command' && s.argv[0] === 'systemctl' ? [s.argv.join(' ')] : []))
    assert.deepEqual(await commands(true), [
      'systemctl daemon-reload',
      'systemctl enable tinc@home.service tinc-consul@home.service',
      'systemctl start tinc@home.service',
      'systemctl restart tinc-consul@home.service',
    ])
    assert.ok((await commands(false)).includes('systemctl restart tinc@home.service tinc-consul@home.service'))
  })
})
