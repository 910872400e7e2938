import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { newGroupValue } from '../src/mesh/groups.ts'
import { activeHolders, readIpam, type HeldAddress } from '../src/mesh/ipam.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { createNetwork } from '../src/mesh/network.ts'
import { renumberer } from '../src/mesh/daemon/renumber.ts'
import { assignedAddresses, planRenumber, renumberHostFile, renumberScript, type Renumbering } from '../src/mesh/renumber.ts'
import { renderScripts } from '../src/tinc/setup.ts'
import { NETWORK, nodeRecord } from './helpers-keys.ts'
import { quiet, startNode, tempRoot, type TestNode } from './sync-fixture.ts'

const entry = (name: string, index: number, released = false): Omit<HeldAddress, 'address'> => ({
  index,
  entry: { name, at: '2026-12-02T00:00:00.000Z', ...(released ? { releasedAt: '2026-12-02T00:00:00.000Z' } : {}) },
})
const heldOf = (rows: Array<[string, Omit<HeldAddress, 'address'>]>): Map<string, HeldAddress> => new Map(rows.map(([address, h]) => [address, { address, ...h }]))

describe('group move, the pure parts', () => {
  test('the address ipam/ gives a node is its active entry written last, per family', () => {
    const held = heldOf([
      ['10.99.0.2', entry('beta', 10)],
      ['10.99.0.65', entry('beta', 30)],
      ['10.99.0.66', entry('beta', 40, true)],
      ['10.99.0.3', entry('gamma', 50)],
      ['fd00::2', entry('beta', 11)],
      ['fd00::9', entry('beta', 5)],
    ])
    held.set('10.99.0.70', { address: '10.99.0.70', index: 99, entry: undefined })
    assert.deepEqual(assignedAddresses(held, 'beta'), { address: '10.99.0.65', address6: 'fd00::2' })
    assert.deepEqual(assignedAddresses(held, 'nobody'), {})
  })

  test('a node renumbers only to a newer assignment inside the network, never to a hand-written one outside', () => {
    const self = { name: 'beta', vpnAddress: '10.99.0.2' }
    const moved = heldOf([
      ['10.99.0.2', entry('beta', 10)],
      ['10.99.0.65', entry('beta', 30)],
    ])
    assert.deepEqual(planRenumber(moved, self, NETWORK), { from: '10.99.0.2', to: '10.99.0.65' })
    assert.equal(planRenumber(moved, { ...self, vpnAddress: '10.99.0.65' }, NETWORK), undefined, 'moved already')
    assert.equal(planRenumber(heldOf([['10.99.0.2', entry('beta', 10)]]), self, NETWORK), undefined, 'one entry, in use')
    assert.equal(planRenumber(new Map(), self, NETWORK), undefined, 'a network without ipam/ never renumbers')
    for (const outside of ['10.98.0.5', '10.99.0.0', '10.99.0.255'])
      assert.equal(
        planRenumber(
          heldOf([
            ['10.99.0.2', entry('beta', 10)],
            [outside, entry('beta', 30)],
          ]),
          self,
          NETWORK,
        ),
        undefined,
        outside,
      )
    assert.equal(planRenumber(moved, { name: 'beta' }, NETWORK), undefined, 'no address of our own yet')
    // IPv6 moves with IPv4 when the group has a cidr6; a /128 outside the network's cidr6 is ignored.
    const net6 = { ...NETWORK, cidr6: 'fd00::/64' }
    const both = heldOf([
      ['10.99.0.2', entry('beta', 10)],
      ['fd00::2', entry('beta', 11)],
      ['10.99.0.65', entry('beta', 30)],
      ['fd00::41', entry('beta', 31)],
    ])
    assert.deepEqual(planRenumber(both, { ...self, vpnAddress6: 'fd00::2' }, net6), { from: '10.99.0.2', to: '10.99.0.65', from6: 'fd00::2', to6: 'fd00::41' })
    both.set('fe80::1', { address: 'fe80::1', ...entry('beta', 90) })
    assert.deepEqual(planRenumber(both, { ...self, vpnAddress6: 'fd00::2' }, net6), { from: '10.99.0.2', to: '10.99.0.65' })
    both.set('fd00::', { address: 'fd00::', ...entry('beta', 91) })
    assert.deepEqual(planRenumber(both, { ...self, vpnAddress6: 'fd00::2' }, net6), { from: '10.99.0.2', to: '10.99.0.65' }, "the range's subnet-router anycast address, which peers refuse")
  })

  const plan: Renumbering = { from: '10.99.0.2', to: '10.99.0.65', from6: 'fd00::2', to6: 'fd00::41' }

  test('our host file: only the Subnet lines of the old addresses change', () => {
    const text = ['# mine', 'Address = 198.18.0.2', 'Subnet = 10.99.0.2/32', 'Subnet = 10.99.0.23/32', 'subnet=fd00:0::2/128', '-----BEGIN RSA PUBLIC KEY-----', 'x', ''].join('\n')
    const out = renumberHostFile(text, plan)
    assert.equal(out.missing, undefined)
    assert.equal(out.text, ['# mine', 'Address = 198.18.0.2', 'Subnet = 10.99.0.65/32', 'Subnet = 10.99.0.23/32', 'subnet=fd00::41/128', '-----BEGIN RSA PUBLIC KEY-----', 'x', ''].join('\n'))
    assert.deepEqual(renumberHostFile('Subnet = 10.99.0.3/32\n', plan), { text: 'Subnet = 10.99.0.3/32\n', missing: '10.99.0.2' })
    assert.equal(renumberHostFile('Subnet = 10.99.0.2/24\n', { from: '10.99.0.2', to: '10.99.0.65' }).missing, '10.99.0.2', 'a /24 is not our address')
  })

  test('the hook scripts init and join write: every mention of the old addresses, nothing else', () => {
    const scripts = renderScripts({ address: '10.99.0.2', prefixLength: 24, address6: 'fd00::2', eventsFile: '/run/tinc-consul/x/events', splitDns: { domain: 'mesh', port: 53 } })
    const want = renderScripts({ address: '10.99.0.65', prefixLength: 24, address6: 'fd00::41', eventsFile: '/run/tinc-consul/x/events', splitDns: { domain: 'mesh', port: 53 } })
    for (const name of ['tinc-up', 'tinc-down']) {
      const before = scripts[name] ?? assert.fail(`no ${name}`)
      const out = renumberScript(before, plan)
      assert.ok(out.count > 0, `${name} names the address`)
      assert.equal(out.text, want[name], name)
    }
    assert.deepEqual(renumberScript('ip addr add 10.99.0.23/24 dev x; ping 110.99.0.2; 10.99.0.2.1\n', plan), { text: 'ip addr add 10.99.0.23/24 dev x; ping 110.99.0.2; 10.99.0.2.1\n', count: 0 })
  })
})

describe("group move, the node's half: files, interface, tincd", () => {
  let dir: string
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tc-renumber-'))
  })
  after(async () => {
    if (dir) await rm(dir, { recursive: true, force: true })
  })

  /** A tinc directory for beta at .2 with these files, and a renumberer whose ip, tincd and restart calls land in `calls`. */
  async function fixture(name: string, files: { host: string; tincUp?: string }, o: { ip?: (args: string[]) => Promise<void> } = {}) {
    const tinc = join(dir, name)
    await mkdir(join(tinc, 'hosts'), { recursive: true })
    await writeFile(join(tinc, 'hosts', 'beta'), files.host, { mode: 0o644 })
    if (files.tincUp !== undefined) await writeFile(join(tinc, 'tinc-up'), files.tincUp, { mode: 0o755 })
    const calls: string[] = []
    const self = { name: 'beta', vpnAddress: '10.99.0.2' }
    const held = heldOf([
      ['10.99.0.2', entry('beta', 10)],
      ['10.99.0.65', entry('beta', 30)],
    ])
    const r = renumberer({
      tincDir: tinc,
      self: () => self,
      network: () => NETWORK,
      held: () => held,
      iface: async () => 'tinc-test',
      ip: o.ip ?? (async (args) => void calls.push(`ip ${args.join(' ')}`)),
      reloadTincd: async () => void calls.push('hup'),
      onRenumbered: (p) => void calls.push(`renumbered ${p.from} ${p.to}`),
      log: quiet,
    })
    const read = (file: string) => readFile(join(tinc, file), 'utf8')
    return { tinc, calls, self, r, read }
  }

  test('rewrites the host file and scripts (modes kept), swaps the address, reloads tincd, says so; a second check does nothing', async () => {
    const f = await fixture('ok', { host: 'Port = 655\nSubnet = 10.99.0.2/32\nKEY\n', tincUp: '#!/bin/sh\nip addr add 10.99.0.2/24 dev "$INTERFACE"\n' })
    await f.r.check()
    assert.equal(await f.read('hosts/beta'), 'Port = 655\nSubnet = 10.99.0.65/32\nKEY\n')
    assert.equal(await f.read('tinc-up'), '#!/bin/sh\nip addr add 10.99.0.65/24 dev "$INTERFACE"\n')
    assert.equal((await stat(join(f.tinc, 'tinc-up'))).mode & 0o777, 0o755)
    assert.deepEqual(f.calls, [
      'ip addr add 10.99.0.65/24 dev tinc-test',
      'ip addr del 10.99.0.2/24 dev tinc-test',
      'ip addr add 10.99.0.65/24 dev tinc-test',
      'hup',
      'renumbered 10.99.0.2 10.99.0.65',
    ])
    assert.equal(f.r.state()?.state, 'done')
    f.calls.length = 0
    await f.r.check()
    assert.deepEqual(f.calls, [], 'moved, though our identity has not caught up yet: nothing more to do')
    assert.equal(f.r.state()?.state, 'done')
    f.self.vpnAddress = '10.99.0.65'
    await f.r.check()
    assert.deepEqual(f.calls, [], 'moved: nothing more to do')
  })

  test('a tinc-up that sets the address some other way stops the move before anything is written', async () => {
    const f = await fixture('own-up', { host: 'Subnet = 10.99.0.2/32\n', tincUp: '#!/bin/sh\nip addr add "$(cat /etc/my-vpn-address)" dev "$INTERFACE"\n' })
    await f.r.check()
    assert.deepEqual(f.calls, [])
    assert.equal(await f.read('hosts/beta'), 'Subnet = 10.99.0.2/32\n')
    assert.match(f.r.state()?.reason ?? '', /tinc-up doesn't name 10\.99\.0\.2, so it would set the old address again/)
  })

  test('a move cut short after tinc-up was written is finished; an interface that refuses still leaves the files moved and the parts restarted', async () => {
    const refuse = async () => {
      throw new Error('Cannot find device "tinc-test"')
    }
    const f = await fixture('half', { host: 'Subnet = 10.99.0.2/32\n', tincUp: '#!/bin/sh\nip addr add 10.99.0.65/24 dev "$INTERFACE"\n' }, { ip: refuse })
    await f.r.check()
    assert.equal(await f.read('hosts/beta'), 'Subnet = 10.99.0.65/32\n')
    assert.equal(f.r.state()?.state, 'failed')
    assert.match(f.r.state()?.reason ?? '', /Cannot find device/)
    assert.deepEqual(f.calls, ['renumbered 10.99.0.2 10.99.0.65'], 'the parts follow the files')
  })

  test('a network record whose range has no room for nodes is logged, never thrown: the daemon goes on', async () => {
    const r = renumberer({
      tincDir: join(dir, 'none'),
      self: () => ({ name: 'beta', vpnAddress: '10.99.0.2' }),
      network: () => ({ ...NETWORK, cidr: '10.99.0.2/32' }),
      held: () => heldOf([['10.99.0.3', entry('beta', 30)]]),
      iface: async () => 'tinc-test',
      ip: async () => assert.fail('no ip command'),
      reloadTincd: async () => assert.fail('no reload'),
      log: quiet,
    })
    await r.check()
    await r.check()
    assert.equal(r.state(), undefined)
  })

  test('a host file without our Subnet line is left alone, and the failure is shown', async () => {
    const f = await fixture('odd', { host: 'Port = 655\nKEY\n' })
    await f.r.check()
    assert.deepEqual(f.calls, [])
    assert.equal(await f.read('hosts/beta'), 'Port = 655\nKEY\n')
    assert.equal(f.r.state()?.state, 'failed')
    assert.match(f.r.state()?.reason ?? '', /no "Subnet = 10\.99\.0\.2" line/)
  })
})

const MAIN = join(import.meta.dirname, '..', 'src', 'cli', 'main.ts')

/** The real CLI as a child process, so the daemons in this process keep running while it waits. */
function cli(consulUrl: string, configDir: string, ...args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const env = { PATH: process.env.PATH, HOME: process.env.HOME, TINC_CONSUL_CONSUL: consulUrl, TINC_CONSUL_NET: 'test', TINC_CONSUL_CONFIG_DIR: configDir }
    const child = spawn(process.execPath, ['--import', 'tsx', MAIN, 'group', ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d))
    child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d))
    child.on('close', (code) => resolve({ code, out, err }))
  })
}

// alpha (.1) and beta (.2) in "left" (10.99.0.0/28), "right" is 10.99.0.64/28; gamma (.5) has no ipam/ entry.
describe('group move against a real Consul agent, with real daemons (ip and nft recorded)', () => {
  const layout = kvLayout('test')
  let consul: DevConsul
  let admin: ConsulClient
  let root: string
  const nodes: TestNode[] = []
  const ipCalls: string[] = []

  before(async () => {
    consul = await startDevConsul()
    admin = createConsulClient({ url: consul.url })
    root = await tempRoot()
    await createNetwork(admin, layout, NETWORK)
    for (const [name, octet] of [
      ['alpha', 1],
      ['beta', 2],
    ] as const)
      await admin.kvPut(layout.ipam(`10.99.0.${octet}`), JSON.stringify({ name, at: new Date().toISOString() }))
    await admin.kvPut(layout.group('left'), JSON.stringify(newGroupValue({ cidr: '10.99.0.0/28' })))
    await admin.kvPut(layout.group('right'), JSON.stringify(newGroupValue({ cidr: '10.99.0.64/28' })))
    nodes.push(await startNode({ root, name: 'alpha', octet: 1, isPublic: true, consulUrl: consul.url }))
    nodes.push(await startNode({ root, name: 'beta', octet: 2, isPublic: true, consulUrl: consul.url, ip: async (args) => void ipCalls.push(args.join(' ')) }))
  })
  after(async () => {
    for (const n of nodes) await n.daemon.stop()
    await consul?.stop()
    if (root) await rm(root, { recursive: true, force: true })
  })

  test('beta moves from left to right: it renumbers itself, alpha follows, the old address is released', async () => {
    const [alpha, beta] = nodes as [TestNode, TestNode]
    await alpha.until(() => alpha.daemon.view()?.peers.get('beta')?.record.vpnAddress === '10.99.0.2', 'alpha sees beta at .2')
    assert.deepEqual(alpha.daemon.access().hidden, [], 'same group')

    const r = await cli(consul.url, root, 'move', 'beta', 'right', '--wait', '20')
    assert.equal(r.code, 0, r.err)
    assert.match(r.out, /moving beta from group left \(10\.99\.0\.2\) to group right: reserved 10\.99\.0\.65/)
    assert.match(r.out, /beta now has 10\.99\.0\.65/)
    assert.match(r.out, /released 10\.99\.0\.2/)

    assert.match(await readFile(join(beta.tincDir, 'hosts', 'beta'), 'utf8'), /^Subnet = 10\.99\.0\.65\/32$/m)
    assert.deepEqual(ipCalls.slice(0, 3), ['addr add 10.99.0.65/24 dev tinc-test', 'addr del 10.99.0.2/24 dev tinc-test', 'addr add 10.99.0.65/24 dev tinc-test'])
    assert.equal(beta.daemon.access().renumber?.state, 'done')
    const holders = activeHolders(await readIpam(admin, layout))
    assert.equal(holders.get('10.99.0.65'), 'beta')
    assert.equal(holders.get('10.99.0.2'), undefined, 'the old address is released')
    await alpha.until(() => alpha.daemon.view()?.peers.get('beta')?.record.vpnAddress === '10.99.0.65', 'alpha sees beta at .65')
    await alpha.until(() => alpha.daemon.access().hidden.join() === 'beta', 'beta is in right now: hidden from alpha (left)')
    await beta.until(() => beta.daemon.access().group === 'right', "beta's status shows its new group")

    const again = await cli(consul.url, root, 'move', 'beta', 'right')
    assert.equal(again.code, 0, again.err)
    assert.match(again.out, /beta is in group right already, with 10\.99\.0\.65/)
  })

  test('a node that is off: --wait 0 reserves and returns, group ls shows the move, a second run reserves nothing new', async () => {
    await admin.kvPut(layout.ipam('10.99.0.7'), JSON.stringify({ name: 'delta', at: new Date().toISOString() }))
    await admin.kvPut(layout.node('delta'), JSON.stringify(nodeRecord('delta', 7)))
    const first = await cli(consul.url, root, 'move', 'delta', 'right', '--wait', '0')
    assert.equal(first.code, 0, first.err)
    assert.match(first.out, /moving delta from group left \(10\.99\.0\.7\) to group right: reserved 10\.99\.0\.66/)
    assert.match(first.out, /delta has not taken 10\.99\.0\.66 yet: its sidecar renumbers it when it next reads Consul\. 10\.99\.0\.7 stays delta's until then/)
    const ls = await cli(consul.url, root, 'ls', '--json')
    assert.deepEqual((JSON.parse(ls.out) as { moving: unknown }).moving, [{ node: 'delta', from: '10.99.0.7', to: '10.99.0.66', group: 'right' }])
    assert.match((await cli(consul.url, root, 'ls')).out, /^moving: delta from 10\.99\.0\.7 to 10\.99\.0\.66 \(right\); its sidecar hasn't renumbered it yet$/m)
    const second = await cli(consul.url, root, 'move', 'delta', 'right', '--wait', '0')
    assert.match(second.out, /reserved 10\.99\.0\.66/)
    const holders = activeHolders(await readIpam(admin, layout))
    assert.deepEqual(
      [...holders]
        .filter(([, n]) => n === 'delta')
        .map(([a]) => a)
        .sort(),
      ['10.99.0.66', '10.99.0.7'],
      'both held until delta has moved',
    )
  })

  test('refusals: a node without an ipam/ entry, a node or group that does not exist', async () => {
    await admin.kvPut(layout.node('gamma'), JSON.stringify(nodeRecord('gamma', 5)))
    const noIpam = await cli(consul.url, root, 'move', 'gamma', 'right', '--wait', '0')
    assert.equal(noIpam.code, 1)
    assert.match(noIpam.err, /10\.99\.0\.5 is not gamma's in .*ipam\/10\.99\.0\.5/)
    const noNode = await cli(consul.url, root, 'move', 'nobody', 'right', '--wait', '0')
    assert.match(noNode.err, /no node nobody/)
    const noGroup = await cli(consul.url, root, 'move', 'alpha', 'nowhere', '--wait', '0')
    assert.match(noGroup.err, /no group nowhere/)
    assert.equal(activeHolders(await readIpam(admin, layout)).size, 4, 'nothing was reserved (alpha, beta, and delta twice)')
  })
})
