import { after, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { chmod, mkdtemp, readFile, rm, writeFile, mkdir } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { readOwnRoutes, withOwnRoutes, withoutOwnRoutes } from '../src/mesh/own-routes.ts'
import { buildOwnRecord } from '../src/mesh/publish.ts'
import { checkPeer, decodeJson, nodeRecordSchema, type NodeRecord } from '../src/mesh/record.ts'
import { judgeRoutes, parseApprovals, parseRoute, routesOverlap, vpnOverlap, type Approval } from '../src/mesh/routes.ts'
import { masqueradeKeeper, masqueradeScript } from '../src/mesh/daemon/masquerade.ts'
import { routeFollower } from '../src/mesh/daemon/routes-follow.ts'
import { createLogger } from '../src/log.ts'
import { hostFileText, renderTinc } from '../src/tinc/render.ts'
import { renderOwnHostFile, renderScripts, writeSetup } from '../src/tinc/setup.ts'
import { NETWORK, nodeEntry, nodeRecord, reconcileInput, rsaPublicPem, tincDirFixture } from './helpers-keys.ts'
import { reconcile } from '../src/mesh/reconcile.ts'
import { buildStatus } from '../src/status/model.ts'
import { renderStatus } from '../src/cli/status.ts'

// Subnets behind nodes (docs/subnets.md): the pure rule, the record's compatibility, the host files,
// the own-routes block, the hook scripts and the masquerade table.

const dirs: string[] = []
after(() => Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true }))))
const layout = kvLayout('home')
const approval = (node: string, cidr: string, createIndex: number): Approval => ({ node, cidr, createIndex, at: '2026-12-01T00:00:00.000Z' })
const NET6 = { ...NETWORK, cidr6: 'fd42:7e57:1ab::/64' }

describe('parseRoute', () => {
  test('canonical CIDRs pass; host bits, non-CIDRs and mapped ranges are refused with the reason', () => {
    assert.deepEqual(parseRoute('192.168.1.0/24'), { ok: true, cidr: '192.168.1.0/24', family: 4 })
    assert.deepEqual(parseRoute('FD00:0001::/64'), { ok: true, cidr: 'fd00:1::/64', family: 6 })
    assert.deepEqual(parseRoute('192.168.1.5/32'), { ok: true, cidr: '192.168.1.5/32', family: 4 })
    const bits = parseRoute('192.168.1.7/24')
    assert.ok(!bits.ok && /host bits set: the network is 192\.168\.1\.0\/24/.test(bits.reason))
    for (const bad of ['192.168.1.0', 'nas', '192.168.1.0/33', '300.1.1.0/24', '']) assert.equal(parseRoute(bad).ok, false, bad)
    assert.equal(parseRoute('::ffff:192.168.1.0/120').ok, false)
  })

  test('overlap: nesting or equal ranges of one family', () => {
    assert.ok(routesOverlap('192.168.0.0/16', '192.168.1.0/24'))
    assert.ok(routesOverlap('192.168.1.0/24', '192.168.0.0/16'))
    assert.ok(!routesOverlap('192.168.1.0/24', '192.168.2.0/24'))
    assert.ok(!routesOverlap('192.168.1.0/24', 'fd00::/64'))
    assert.match(vpnOverlap('10.0.0.0/8', NETWORK) ?? '', /overlaps the VPN range 10\.99\.0\.0\/24/)
    assert.match(vpnOverlap('fd42:7e57:1ab::/48', NET6) ?? '', /fd42:7e57:1ab::\/64/)
    assert.equal(vpnOverlap('192.168.1.0/24', NET6), undefined)
  })
})

describe('judgeRoutes', () => {
  test('announced and approved is served; announced only awaits; approved only is unannounced', () => {
    const j = judgeRoutes(
      NETWORK,
      new Map([
        ['gw', ['192.168.1.0/24']],
        ['nas', ['192.168.9.0/24']],
      ]),
      [approval('gw', '192.168.1.0/24', 10), approval('gw', '192.168.5.0/24', 11)],
    )
    assert.deepEqual(
      j.verdicts.map((v) => [v.node, v.cidr, v.state]),
      [
        ['gw', '192.168.1.0/24', 'served'],
        ['gw', '192.168.5.0/24', 'unannounced'],
        ['nas', '192.168.9.0/24', 'awaiting'],
      ],
    )
    assert.match(j.verdicts[2]?.reason ?? '', /subnet approve nas 192\.168\.9\.0\/24/)
    assert.deepEqual([...j.served], [['gw', ['192.168.1.0/24']]])
  })

  test('on overlap the older approval wins, whatever the order of the nodes; the other is refused naming both', () => {
    for (const [older, newer] of [
      ['alpha', 'beta'],
      ['beta', 'alpha'],
    ] as const) {
      const j = judgeRoutes(
        NETWORK,
        new Map([
          [older, ['192.168.0.0/16']],
          [newer, ['192.168.1.0/24']],
        ]),
        [approval(newer, '192.168.1.0/24', 20), approval(older, '192.168.0.0/16', 10)],
      )
      assert.deepEqual([...j.served], [[older, ['192.168.0.0/16']]])
      const refused = j.verdicts.find((v) => v.node === newer)
      assert.equal(refused?.state, 'refused')
      assert.equal(refused?.reason, `${newer}'s 192.168.1.0/24 overlaps ${older}'s 192.168.0.0/16, approved earlier`)
    }
  })

  test('an approved route overlapping the VPN range is refused, and switch networks serve none', () => {
    const vpn = judgeRoutes(NETWORK, new Map([['gw', ['10.99.0.0/16']]]), [approval('gw', '10.99.0.0/16', 1)])
    assert.deepEqual(
      vpn.verdicts.map((v) => [v.state, v.reason]),
      [['refused', '10.99.0.0/16 overlaps the VPN range 10.99.0.0/24']],
    )
    const sw = judgeRoutes({ ...NETWORK, mode: 'switch' }, new Map([['gw', ['192.168.1.0/24']]]), [approval('gw', '192.168.1.0/24', 1)])
    assert.equal(sw.verdicts[0]?.state, 'refused')
    assert.equal(sw.served.size, 0)
  })
})

describe('approvals from consul', () => {
  test('good keys and values are read with their CreateIndex; bad ones are refused, the marker skipped', () => {
    const item = (key: string, value: string, createIndex: number) => ({
      key: `${layout.subnetApprovalsPrefix}${key}`,
      value: new Uint8Array(Buffer.from(value)),
      createIndex,
      modifyIndex: createIndex,
    })
    const read = parseApprovals(
      [
        item('', '', 1),
        item('gw/192.168.1.0_24', '{"v":1,"at":"2026-12-01T00:00:00.000Z","later":true}', 7),
        item('gw/fd00:1::_64', '{"v":1,"at":"2026-12-01T00:00:00.000Z"}', 8),
        item('gw/192.168.1.7_24', '{"v":1,"at":"2026-12-01T00:00:00.000Z"}', 9),
        item('bad-name/192.168.2.0_24', '{"v":1,"at":"2026-12-01T00:00:00.000Z"}', 10),
        item('gw/192.168.3.0_24', '{"v":2,"at":"2026-12-01T00:00:00.000Z"}', 11),
        item('gw/192.168.4.0_24', 'yes', 12),
      ],
      layout,
    )
    assert.deepEqual(
      read.approvals.map((a) => [a.node, a.cidr, a.createIndex]),
      [
        ['gw', '192.168.1.0/24', 7],
        ['gw', 'fd00:1::/64', 8],
      ],
    )
    assert.equal(read.refused.length, 4)
    assert.equal(layout.subnetApproval('gw', '192.168.1.0/24'), 'tinc-consul/home/subnet-approvals/gw/192.168.1.0_24')
  })
})

describe('the record', () => {
  test('an old-shape record (no routes) still parses and checks; one with routes parses here and in an older reader', () => {
    const old = nodeRecord('gw', 2)
    const d = decodeJson(JSON.stringify(old), nodeRecordSchema)
    assert.ok(d.ok && checkPeer(d.value, { network: NETWORK, keyName: 'gw' }).ok)
    const withRoutes: NodeRecord = { ...old, routes: ['192.168.1.0/24', 'fd00:1::/64'] }
    const now = decodeJson(JSON.stringify(withRoutes), nodeRecordSchema)
    assert.ok(now.ok && checkPeer(now.value, { network: NETWORK, keyName: 'gw' }).ok)
    assert.deepEqual(now.ok && now.value.routes, ['192.168.1.0/24', 'fd00:1::/64'])
    // A reader from before the field: the same schema without it, which strips what it doesn't know.
    const older = decodeJson(JSON.stringify(withRoutes), nodeRecordSchema.omit({ routes: true }))
    assert.ok(older.ok && !('routes' in older.value) && checkPeer({ ...older.value }, { network: NETWORK, keyName: 'gw' }).ok)
  })

  test('a route with host bits, a non-CIDR or a duplicate refuses the record; more than 8 fails the schema', () => {
    const base = nodeRecord('gw', 2)
    for (const routes of [['192.168.1.7/24'], ['nas'], ['192.168.1.0/24', '192.168.1.0/24']]) {
      const c = checkPeer({ ...base, routes }, { network: NETWORK, keyName: 'gw' })
      assert.ok(!c.ok, JSON.stringify(routes))
    }
    const many = Array.from({ length: 9 }, (_, i) => `192.168.${i}.0/24`)
    assert.equal(decodeJson(JSON.stringify({ ...base, routes: many }), nodeRecordSchema).ok, false)
  })

  test('our own record: the routes block becomes `routes`, the published host file keeps the one /32', async () => {
    const dir = await tincDirFixture('gw')
    dirs.push(dir)
    const pem = rsaPublicPem()
    const own = renderOwnHostFile({ publicAddresses: ['203.0.113.5'], port: 655, address: '10.99.0.2', publicKey: pem })
    await writeFile(
      join(dir, 'hosts', 'gw'),
      withOwnRoutes(own, [
        { cidr: '192.168.1.0/24', masquerade: false },
        { cidr: '192.168.2.0/24', masquerade: true },
      ]),
    )
    const r = await buildOwnRecord(dir, 'gw')
    assert.deepEqual(r.routes, ['192.168.1.0/24', '192.168.2.0/24'])
    assert.deepEqual(r.subnets, ['10.99.0.2/32'])
    assert.deepEqual(
      r.hostFile.split('\n').filter((l) => l.startsWith('Subnet')),
      ['Subnet = 10.99.0.2/32'],
    )
    assert.ok(checkPeer(r, { network: NETWORK, keyName: 'gw' }).ok)
  })
})

describe('the own routes block', () => {
  test('round trip, masquerade flags, removal leaves the rest byte for byte', () => {
    const base = 'Address = 203.0.113.5\nSubnet = 10.99.0.2/32\n'
    const text = withOwnRoutes(base, [
      { cidr: '192.168.1.0/24', masquerade: false },
      { cidr: '192.168.2.0/24', masquerade: true },
    ])
    assert.match(text, /# BEGIN tinc-consul routes\n.*\nSubnet = 192\.168\.1\.0\/24\nSubnet = 192\.168\.2\.0\/24\n# masquerade 192\.168\.2\.0\/24\n# END tinc-consul routes\n$/)
    assert.deepEqual(readOwnRoutes(text), [
      { cidr: '192.168.1.0/24', masquerade: false },
      { cidr: '192.168.2.0/24', masquerade: true },
    ])
    assert.equal(withOwnRoutes(text, []), base)
    assert.equal(withoutOwnRoutes(text), base)
    assert.throws(() => readOwnRoutes(text.replace('192.168.1.0/24', '192.168.1.7/24')), /not a canonical CIDR/)
  })
})

describe('setup', () => {
  test('writing a node again keeps the routes block of its own host file', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tc-setup-'))
    dirs.push(dir)
    const setup = {
      net: 'home',
      name: 'gw',
      address: '10.99.0.2',
      prefixLength: 24,
      port: 655,
      publicAddresses: [],
      publicKey: rsaPublicPem(),
      connectTo: [],
      peerHostFiles: {},
      interface: 'tinc-home',
      eventsFile: join(dir, 'events'),
    }
    await writeSetup(dir, setup)
    const own = join(dir, 'hosts', 'gw')
    await writeFile(own, withOwnRoutes(await readFile(own, 'utf8'), [{ cidr: '192.168.1.0/24', masquerade: true }]))
    await writeSetup(dir, setup)
    assert.deepEqual(readOwnRoutes(await readFile(own, 'utf8')), [{ cidr: '192.168.1.0/24', masquerade: true }])
  })
})

describe('host files', () => {
  test("served routes are extra Subnet lines of the peer's file; none in switch mode; a change asks for a HUP", async () => {
    const gw = nodeRecord('gw', 2)
    const view = reconcile(undefined, reconcileInput([['gw', nodeEntry(gw, 1)]], { self: { name: 'self' } })).view
    const peer = view.peers.get('gw') ?? assert.fail('no gw')
    assert.deepEqual(
      hostFileText(peer, 'router', ['192.168.1.0/24'])
        .split('\n')
        .filter((l) => l.startsWith('Subnet')),
      ['Subnet = 10.99.0.2/32', 'Subnet = 192.168.1.0/24'],
    )
    assert.ok(!hostFileText(peer, 'switch', ['192.168.1.0/24']).includes('Subnet'))
    const dir = await tincDirFixture('self')
    dirs.push(dir)
    const written = new Map()
    const base = { tincDir: dir, self: 'self', keep: new Set<string>(), removed: [], prune: false, written }
    await renderTinc(view, base)
    const served = await renderTinc(view, { ...base, routes: new Map([['gw', ['192.168.1.0/24']]]) })
    assert.deepEqual(served.written, ['gw'])
    assert.ok(served.hupNeeded)
    assert.match(await readFile(join(dir, 'hosts', 'gw'), 'utf8'), /Subnet = 192\.168\.1\.0\/24/)
    const withdrawn = await renderTinc(view, { ...base, routes: new Map() })
    assert.ok(withdrawn.hupNeeded && !(await readFile(join(dir, 'hosts', 'gw'), 'utf8')).includes('192.168.1.0'))
  })
})

describe('subnet-up and subnet-down', () => {
  const shell = spawnSync('sh', ['-c', 'command -v grep && command -v tr'], { encoding: 'utf8' }).status === 0
  test('route only subnets of other nodes outside the VPN range, with SUBNET checked first', { skip: !shell && 'no sh/grep/tr' }, async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tc-hook-'))
    dirs.push(dir)
    await mkdir(join(dir, 'bin'))
    await writeFile(join(dir, 'bin', 'ip'), '#!/bin/sh\necho "ip $*"\n')
    await chmod(join(dir, 'bin', 'ip'), 0o755)
    const scripts = renderScripts({ address: '10.99.0.3', prefixLength: 24, address6: 'fd42:7e57:1ab::3', eventsFile: join(dir, 'events', 'events') })
    for (const s of ['subnet-up', 'subnet-down']) await writeFile(join(dir, s), scripts[s] ?? '', { mode: 0o755 })
    const hook = (script: string, env: Record<string, string>) =>
      spawnSync('sh', [join(dir, script)], { encoding: 'utf8', env: { PATH: `${join(dir, 'bin')}:${process.env.PATH ?? ''}`, NAME: 'self', INTERFACE: 'tinc-home', ...env } }).stdout.trim()
    assert.equal(hook('subnet-up', { NODE: 'gw', SUBNET: '192.168.1.0/24' }), 'ip -4 route replace 192.168.1.0/24 dev tinc-home')
    assert.equal(hook('subnet-down', { NODE: 'gw', SUBNET: '192.168.1.0/24' }), 'ip -4 route del 192.168.1.0/24 dev tinc-home')
    // tinc 1.0 prints IPv6 subnets as eight uncompressed groups.
    assert.equal(hook('subnet-up', { NODE: 'gw', SUBNET: 'fd00:1:0:0:0:0:0:0/64' }), 'ip -6 route replace fd00:1:0:0:0:0:0:0/64 dev tinc-home')
    for (const SUBNET of [
      '10.99.0.2/32',
      'fd42:7e57:1ab:0:0:0:0:2/128',
      '192.168.1.0/24;reboot',
      '192.168.1.0/24\n1.2.3.0/24',
      '010.1.1.0/24',
      '1.2.3.0/33',
      '2:0:0:0:0:0:0:0:9/64',
      'ab:cd:ef:12:34:56',
    ])
      assert.equal(hook('subnet-up', { NODE: 'gw', SUBNET }), '', JSON.stringify(SUBNET))
    assert.equal(hook('subnet-up', { NODE: 'self', SUBNET: '192.168.1.0/24' }), '', 'our own subnet')
    // The daemon's event line is still appended.
    await mkdir(join(dir, 'events'))
    hook('subnet-up', { NODE: 'gw', SUBNET: '192.168.1.0/24' })
    assert.match(await readFile(join(dir, 'events', 'events'), 'utf8'), /^\d+ subnet-up gw 192\.168\.1\.0\/24 -\n$/)
  })
})

describe('masquerade', () => {
  test('one table of our own, replaced whole; an empty set removes it; nft runs only on a change', async () => {
    const script = masqueradeScript('home', '10.99.0.0/24', [
      { cidr: '192.168.1.0/24', masquerade: false },
      { cidr: '192.168.2.0/24', masquerade: true },
    ])
    assert.match(script, /^table ip tinc-consul-home \{\}\ndelete table ip tinc-consul-home\ntable ip tinc-consul-home \{/)
    assert.match(script, /ip saddr 10\.99\.0\.0\/24 ip daddr 192\.168\.2\.0\/24 masquerade/)
    assert.ok(!script.includes('192.168.1.0'))
    const calls: string[] = []
    const keeper = masqueradeKeeper('home', createLogger({ level: 'silent' }), async (s) => void calls.push(s))
    await keeper.apply('10.99.0.0/24', [{ cidr: '192.168.1.0/24', masquerade: false }])
    assert.equal(calls.length, 0, 'a node that never masquerades never runs nft')
    await keeper.apply('10.99.0.0/24', [{ cidr: '192.168.2.0/24', masquerade: true }])
    await keeper.apply('10.99.0.0/24', [{ cidr: '192.168.2.0/24', masquerade: true }])
    await keeper.apply('10.99.0.0/24', [])
    assert.equal(calls.length, 2)
    assert.equal(calls[1], 'table ip tinc-consul-home {}\ndelete table ip tinc-consul-home\n')
  })

  test('the daemon keeps the last approvals it read (or the cache) when none is given', () => {
    const f = routeFollower('home', createLogger({ level: 'silent' }), { apply: async () => {} })
    const gw = nodeRecord('gw', 2)
    const view = reconcile(undefined, reconcileInput([['gw', nodeEntry({ ...gw, routes: ['192.168.1.0/24'] }, 1)]], { self: { name: 'self' } })).view
    f.setCachedApprovals([approval('gw', '192.168.1.0/24', 3)])
    assert.deepEqual([...f.judge(NETWORK, view, undefined, undefined)], [['gw', ['192.168.1.0/24']]])
    assert.deepEqual([...f.judge(NETWORK, view, undefined, { approvals: [], refused: [] })], [])
  })
})

describe('the subnet command', () => {
  const cli = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { encoding: 'utf8', env: { ...process.env, NO_COLOR: '1' } })

  test('bad CIDRs are usage errors, said before anything asks Consul', () => {
    for (const [args, message] of [
      [['subnet', 'add', '192.168.1.7/24'], /host bits set: the network is 192\.168\.1\.0\/24/],
      [['subnet', 'approve', 'gw', 'nas'], /"nas" is not a CIDR/],
      [['subnet', 'unapprove', 'gw', '10.0.0.0/33'], /is not a CIDR/],
      [['subnet', 'approve', 'bad-name', '192.168.1.0/24'], /not a valid tinc node name/],
    ] as const) {
      const r = cli(...args, '--net', 'home', '--consul', 'http://127.0.0.1:1', '--config-dir', tmpdir())
      assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`)
      assert.match(r.stderr, message)
    }
  })

  test('--help on every subcommand names the env variables', () => {
    for (const sub of ['add', 'rm', 'ls', 'approve', 'unapprove']) {
      const r = cli('subnet', sub, '--help')
      assert.equal(r.status, 0, sub)
      assert.match(r.stdout, /TINC_CONSUL_NET/)
    }
    assert.match(cli('subnet', 'add', '--help').stdout, /--masquerade.*TINC_CONSUL_MASQUERADE/s)
  })
})

describe('status', () => {
  const base = {
    net: 'home',
    self: 'gw',
    iface: 'tinc-home',
    links: new Map(),
    tinc: { state: 'down' as const, reason: 'no tincd' },
    consul: { reachable: true, index: 1, failures: 0 },
    refusals: new Map(),
    sync: { refusedTotal: 0, servicesRefusedTotal: 0, emptyReadsIgnored: 0, bytesRead: 0, fullReads: 0, applies: 1, hups: 0 },
    services: [],
    allocations: new Map(),
    now: new Date('2026-12-01T00:00:00.000Z'),
  }
  const verdicts = judgeRoutes(
    NETWORK,
    new Map([
      ['gw', ['192.168.1.0/24']],
      ['nas', ['192.168.1.128/25', '172.16.0.0/24']],
    ]),
    [approval('gw', '192.168.1.0/24', 1), approval('nas', '192.168.1.128/25', 2)],
  ).verdicts

  test('routes per node in JSON and the table; a warning while this node announces without forwarding', () => {
    const s = buildStatus({ ...base, routes: { verdicts, refusedApprovals: [{ key: 'k', reason: 'bad' }] }, forwarding: { ipv4: '0', ipv6: '1' } })
    assert.deepEqual(
      s.routes.map((r) => [r.node, r.cidr, r.state]),
      [
        ['gw', '192.168.1.0/24', 'served'],
        ['nas', '172.16.0.0/24', 'awaiting'],
        ['nas', '192.168.1.128/25', 'refused'],
      ],
    )
    assert.match(s.node.forwardingOff ?? '', /net\.ipv4\.ip_forward is 0/)
    const text = renderStatus(s, { colour: false })
    assert.match(text, /nas\s+192\.168\.1\.128\/25\s+refused\s+nas's 192\.168\.1\.128\/25 overlaps gw's 192\.168\.1\.0\/24, approved earlier/)
    assert.match(text, /refused approval k: bad/)
    assert.equal(buildStatus({ ...base, routes: { verdicts, refusedApprovals: [] }, forwarding: { ipv4: '1' } }).node.forwardingOff, undefined)
    assert.equal(
      buildStatus({ ...base, self: 'other', routes: { verdicts, refusedApprovals: [] }, forwarding: { ipv4: '0' } }).node.forwardingOff,
      undefined,
      'no warning for a node that announces nothing',
    )
  })
})
