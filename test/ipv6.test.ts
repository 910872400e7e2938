import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, rm, writeFile, mkdir } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pino } from 'pino'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { allocateAddress, candidates6, firstAddress6, parseIpam, readIpam } from '../src/mesh/ipam.ts'
import { randomUla64 } from '../src/mesh/init.ts'
import { buildOwnRecord, makeRecord, validateRecord } from '../src/mesh/publish.ts'
import { reconcile } from '../src/mesh/reconcile.ts'
import { checkPeer, decodeJson, isUlaCidr6, networkRecordSchema, nodeRecordSchema, type NetworkRecord, type NodeRecord } from '../src/mesh/record.ts'
import { answer, startDnsServer } from '../src/dns/server.ts'
import { hostsLines } from '../src/dns/hosts-file.ts'
import { query } from '../src/dns/client.ts'
import { RCODE, TYPE, buildQuery, decodeMessage } from '../src/dns/wire.ts'
import { buildZone, reverseName6, reverseZone6, type ZoneInput } from '../src/dns/zone.ts'
import { hostFileText } from '../src/tinc/render.ts'
import { renderOwnHostFile, renderScripts, renderTincConf } from '../src/tinc/setup.ts'
import { parseHostFile } from '../src/tinc/hostfile.ts'
import { parseCidr6Flag } from '../src/cli/init.ts'
import { LAYOUT, NETWORK, nodeEntry, nodeRecord, reconcileInput, rsaPublicPem } from './helpers-keys.ts'

// IPv6 inside the mesh (issue 18, item 3): a network's optional cidr6, each node's optional
// vpnAddress6, and everything that carries them. Each test fails against the IPv4-only code.

const CIDR6 = 'fd12:3456:789a::/64'
const NET6: NetworkRecord = { ...NETWORK, cidr6: CIDR6 }
const pem = rsaPublicPem()
const with6 = (r: NodeRecord, address6: string): NodeRecord => ({ ...r, vpnAddress6: address6 })
const subnetLines = (text: string) =>
  parseHostFile(text)
    .entries.filter((e) => e.key.toLowerCase() === 'subnet')
    .map((e) => e.value)

describe('records', () => {
  test('a network record keeps a unique local /64 and refuses any other range', () => {
    const ok = networkRecordSchema.safeParse(NET6)
    assert.ok(ok.success)
    assert.equal(ok.data.cidr6, CIDR6)
    assert.equal(networkRecordSchema.parse(NETWORK).cidr6, undefined, 'a network without the field is IPv4 only, as before')
    for (const bad of ['2001:db8::/64', 'fd12:3456:789a::/48', 'fd12:3456:789a::1/64', 'FD12:3456:789A::/64', 'fd12:3456:789a:0::/64', '10.0.0.0/24', 'auto'])
      assert.equal(networkRecordSchema.safeParse({ ...NETWORK, cidr6: bad }).success, false, `accepted ${bad}`)
  })

  test('a node record carries a canonical /128 from cidr6; anything else is refused with a reason', () => {
    const r = with6(nodeRecord('laptop', 7, pem), 'fd12:3456:789a::7')
    const d = decodeJson(JSON.stringify(r), nodeRecordSchema)
    assert.ok(d.ok)
    assert.equal(d.value.vpnAddress6, 'fd12:3456:789a::7')
    assert.ok(checkPeer(d.value, { network: NET6, keyName: 'laptop' }).ok)
    assert.ok(checkPeer(nodeRecord('old', 8, pem), { network: NET6, keyName: 'old' }).ok, 'a record without the field (an older node) is still accepted')
    assert.equal(decodeJson(JSON.stringify({ ...r, vpnAddress6: 'not-an-address' }), nodeRecordSchema).ok, false)
    const refused = (rec: NodeRecord, network = NET6) => {
      const c = checkPeer(rec, { network, keyName: rec.name })
      return c.ok ? 'accepted' : c.reason
    }
    assert.match(refused(r, NETWORK), /network without an IPv6 range/)
    assert.match(refused(with6(r, 'fd12:3456:789b::7')), /outside the network's fd12:3456:789a::\/64/)
    assert.match(refused(with6(r, 'fd12:3456:789a:0:0:0:0:7')), /not written canonically \(fd12:3456:789a::7\)/)
    assert.match(refused(with6(r, 'fd12:3456:789a::')), /subnet-router anycast/)
  })

  test('the /128 is a record field only: subnets and the host file stay as older readers accept them', () => {
    const r = makeRecord({ name: 'laptop', vpnAddress: '10.99.0.7', vpnAddress6: 'fd12:3456:789a::7', addresses: [], port: 655, publicKey: pem })
    assert.equal(r.vpnAddress6, 'fd12:3456:789a::7')
    assert.deepEqual(r.subnets, ['10.99.0.7/32'])
    assert.deepEqual(subnetLines(r.hostFile), ['10.99.0.7/32'])
    assert.equal(validateRecord(r, NET6), undefined)
  })

  test('the daemon reads its /128 back from its own host file', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tinc-consul-v6-'))
    try {
      await mkdir(join(dir, 'hosts'))
      await writeFile(join(dir, 'hosts', 'laptop'), renderOwnHostFile({ publicAddresses: [], port: 655, address: '10.99.0.7', address6: 'fd12:3456:789a::7', publicKey: pem }))
      const r = await buildOwnRecord(dir, 'laptop')
      assert.equal(r.vpnAddress, '10.99.0.7')
      assert.equal(r.vpnAddress6, 'fd12:3456:789a::7')
      assert.deepEqual(r.subnets, ['10.99.0.7/32'])
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })

  test('--cidr6: auto makes a random fd00::/8 /64, explicit ranges must be unique local /64s', () => {
    const a = randomUla64()
    const b = randomUla64()
    assert.ok(isUlaCidr6(a), a)
    assert.match(a, /^fd[0-9a-f]{2}:/)
    assert.notEqual(a, b)
    assert.equal(parseCidr6Flag('auto'), 'auto')
    assert.equal(parseCidr6Flag(CIDR6), CIDR6)
    assert.equal(parseCidr6Flag(undefined), undefined)
    assert.throws(() => parseCidr6Flag('2001:db8::/64'), { code: 'BAD_FLAG' })
  })
})

describe('IPv6 allocation', () => {
  test('candidates are canonical: the name its own first, then the lowest free hosts, released ones last', () => {
    const entry = (name: string, released = false) => ({ name, at: '2026-01-01T00:00:00.000Z', ...(released ? { releasedAt: '2026-01-02T00:00:00.000Z' } : {}) })
    const held = new Map([
      ['fd12:3456:789a::1', { address: 'fd12:3456:789a::1', index: 5, entry: entry('a') }],
      ['fd12:3456:789a::2', { address: 'fd12:3456:789a::2', index: 6, entry: entry('b', true) }],
    ])
    const first = (name: string, n: number) => {
      const out: string[] = []
      for (const c of candidates6(CIDR6, name, held)) if (out.push(c.address) >= n) break
      return out
    }
    assert.deepEqual(first('c', 3), ['fd12:3456:789a::3', 'fd12:3456:789a::4', 'fd12:3456:789a::5'])
    assert.deepEqual(first('b', 1), ['fd12:3456:789a::2'])
    assert.equal(firstAddress6(CIDR6), 'fd12:3456:789a::1')
    // A group's small cidr6: every fresh host inside it (the last one too), and none past its end.
    const small = [...candidates6('fd12:3456:789a::10/126', 'c', new Map())].map((c) => c.address)
    assert.deepEqual(small, ['fd12:3456:789a::11', 'fd12:3456:789a::12', 'fd12:3456:789a::13'])
  })

  test('ipam/ keys for IPv6 are read only in canonical form', () => {
    const item = (address: string) => ({
      key: `${kvLayout('t').ipamPrefix}${address}`,
      value: Buffer.from(JSON.stringify({ name: 'a', at: '2026-01-01T00:00:00.000Z' })),
      modifyIndex: 3,
      createIndex: 3,
      flags: 0,
    })
    const held = parseIpam([item('fd12:3456:789a::9'), item('FD12:3456:789A:0:0:0:0:A'), item('10.0.0.1')], kvLayout('t'))
    assert.deepEqual([...held.keys()].sort(), ['10.0.0.1', 'fd12:3456:789a::9'])
  })

  describe('against a real Consul agent', () => {
    let consul: DevConsul
    let admin: ConsulClient
    before(async () => {
      consul = await startDevConsul()
      admin = createConsulClient({ url: consul.url })
    })
    after(async () => {
      await consul?.stop()
    })
    const alloc = (net: string, name: string) => allocateAddress({ client: admin, layout: kvLayout(net), cidr: '10.60.0.0/24', cidr6: CIDR6, name })

    test('concurrent allocations get distinct /128s in the same transaction as the IPv4 address', async () => {
      const results = await Promise.all(Array.from({ length: 12 }, (_, i) => alloc('race6', `n${i}`)))
      const v6 = results.map((r) => (r.ok ? r.address6 : `failed: ${r.what}`))
      assert.equal(new Set(v6).size, 12, `duplicates in ${v6.join(' ')}`)
      assert.deepEqual([...v6].sort(), Array.from({ length: 12 }, (_, i) => `fd12:3456:789a::${(i + 1).toString(16)}`).sort())
      const held = await readIpam(admin, kvLayout('race6'))
      for (const r of results) {
        assert.ok(r.ok && r.address6)
        assert.equal(held.get(r.address6)?.entry?.name, held.get(r.address)?.entry?.name, 'both addresses name the same node')
      }
    })

    test('an address held by another node is never taken (CAS), and the same name gets its own again', async () => {
      const layout = kvLayout('cas6')
      await admin.kvPut(layout.ipam('fd12:3456:789a::1'), JSON.stringify({ name: 'squatter', at: '2026-01-01T00:00:00.000Z' }))
      const first = await alloc('cas6', 'laptop')
      assert.deepEqual(first, { ok: true, address: '10.60.0.1', address6: 'fd12:3456:789a::2' })
      assert.deepEqual(await alloc('cas6', 'laptop'), first, 'allocating twice must be idempotent')
    })

    test("when the caller's own operation fails, neither address is reserved", async () => {
      const layout = kvLayout('atomic6')
      await admin.kvPut(layout.node('taken'), '{}')
      const res = await allocateAddress({
        client: admin,
        layout,
        cidr: '10.61.0.0/24',
        cidr6: CIDR6,
        name: 'taken',
        with: () => [{ KV: { Verb: 'cas', Key: layout.node('taken'), Value: '', Index: 0 } }],
      })
      assert.deepEqual(res.ok ? 'reserved' : res.op, 0)
      assert.equal((await readIpam(admin, layout)).size, 0)
    })
  })
})

describe('tinc files', () => {
  test("a peer's host file gets its /128 as a second Subnet line in router mode, none in switch mode", () => {
    const peer = { record: with6(nodeRecord('laptop', 7, pem), 'fd12:3456:789a::7'), publicKey: pem, options: [] }
    assert.deepEqual(subnetLines(hostFileText(peer, 'router')), ['10.99.0.7/32', 'fd12:3456:789a::7/128'])
    assert.deepEqual(subnetLines(hostFileText(peer, 'switch')), [])
    assert.deepEqual(subnetLines(hostFileText({ ...peer, record: nodeRecord('laptop', 7, pem) }, 'router')), ['10.99.0.7/32'], 'a node without one keeps one line')
  })

  test('our own host file, tinc-up and tinc-down carry the IPv6 address; tinc.conf allows an IPv6 underlay', () => {
    const s = { publicAddresses: [], port: 655, address: '10.99.0.7', address6: 'fd12:3456:789a::7', prefixLength: 24, publicKey: pem, eventsFile: '/run/x/tinc-events' }
    assert.deepEqual(subnetLines(renderOwnHostFile(s)), ['10.99.0.7/32', 'fd12:3456:789a::7/128'])
    const scripts = renderScripts({ ...s, splitDns: { domain: 'mesh', port: 5353 } })
    assert.match(scripts['tinc-up'] ?? '', /^ip -6 addr add fd12:3456:789a::7\/64 dev "\$INTERFACE" nodad /m)
    assert.match(scripts['tinc-up'] ?? '', /resolvectl dns "\$INTERFACE" 10\.99\.0\.7:5353 \[fd12:3456:789a::7\]:5353 /)
    assert.match(scripts['tinc-down'] ?? '', /^ip -6 addr del fd12:3456:789a::7\/64 dev "\$INTERFACE"/m)
    assert.doesNotMatch(renderScripts({ ...s, address6: undefined })['tinc-up'] ?? '', /ip -6/)
    assert.match(renderTincConf({ name: 'laptop', interface: 'tinc-x', connectTo: [] }), /^AddressFamily = any$/m)
  })
})

describe('DNS', () => {
  const fp = `sha256:${'a'.repeat(64)}`
  const input: ZoneInput = {
    domain: 'mesh',
    cidr: '10.99.0.0/24',
    cidr6: CIDR6,
    self: 'hub',
    nodes: [
      { name: 'hub', address: '10.99.0.1', address6: 'fd12:3456:789a::1', public: true, fingerprint: fp },
      { name: 'old', address: '10.99.0.2', public: false, fingerprint: fp },
    ],
    ttl: { node: 30, service: 5, negative: 5 },
    serial: 1,
  }
  const ask = (name: string, type: number, zoneInput = input) =>
    decodeMessage(answer(buildQuery(name, type), buildZone(zoneInput), 'udp', { queries: 0, formerr: 0, refused: 0, truncated: 0 }) as Buffer)

  test('AAAA for a node with an IPv6 address, NODATA for one without', () => {
    const hub = ask('hub.mesh', TYPE.AAAA)
    assert.equal(hub.rcode, RCODE.NOERROR)
    assert.deepEqual(
      hub.answer.map((a) => a.data),
      ['fd12:3456:789a::1'],
    )
    const old = ask('old.mesh', TYPE.AAAA)
    assert.equal(old.rcode, RCODE.NOERROR)
    assert.equal(old.answer.length, 0)
    assert.equal(ask('old.mesh', TYPE.A).answer[0]?.data, '10.99.0.2')
  })

  test('ip6.arpa PTR for addresses in cidr6; unknown ones NXDOMAIN, the nibbles between NODATA', () => {
    assert.equal(reverseZone6(CIDR6), '0.0.0.0.a.9.8.7.6.5.4.3.2.1.d.f.ip6.arpa')
    const name = reverseName6('fd12:3456:789a::1') ?? ''
    assert.equal(name, `1.${'0.'.repeat(19)}a.9.8.7.6.5.4.3.2.1.d.f.ip6.arpa`)
    const ptr = ask(name, TYPE.PTR)
    assert.equal(ptr.rcode, RCODE.NOERROR)
    assert.deepEqual(
      ptr.answer.map((a) => a.data),
      ['hub.mesh.'],
    )
    assert.equal(ask(reverseName6('fd12:3456:789a::99') ?? '', TYPE.PTR).rcode, RCODE.NXDOMAIN)
    assert.equal(ask(name.split('.').slice(4).join('.'), TYPE.PTR).rcode, RCODE.NOERROR)
    assert.equal(ask(name, TYPE.PTR, { ...input, cidr6: undefined }).rcode, RCODE.REFUSED, 'a network without cidr6 serves no ip6.arpa zone')
  })

  test('the opt-in hosts block has a line for each address', () => {
    assert.deepEqual(hostsLines('mesh', input.nodes), ['10.99.0.1\thub.mesh', 'fd12:3456:789a::1\thub.mesh', '10.99.0.2\told.mesh'])
  })

  test('the server listens on an IPv6 address too', async () => {
    const server = await startDnsServer({ hosts: ['::1'], port: 0, workers: 0, log: pino({ level: 'silent' }) })
    try {
      server.update(input)
      const res = await query('hub.mesh', TYPE.AAAA, { server: '::1', port: server.port, timeoutMs: 2000 })
      assert.deepEqual(
        res.answer.map((a) => a.data),
        ['fd12:3456:789a::1'],
      )
    } finally {
      await server.close()
    }
  })
})

describe('reconciler', () => {
  const [pa, pb] = [rsaPublicPem(), rsaPublicPem()]
  const a = with6(nodeRecord('alpha', 2, pa), 'fd12:3456:789a::2')
  const b = with6(nodeRecord('beta', 3, pb), 'fd12:3456:789a::2')

  test('one node per IPv6 address: the junior claimant is refused, naming the senior', () => {
    const r = reconcile(
      undefined,
      reconcileInput(
        [
          ['alpha', nodeEntry(a, 10)],
          ['beta', nodeEntry(b, 11)],
        ],
        { network: NET6 },
      ),
    )
    assert.deepEqual([...r.view.peers.keys()], ['alpha'])
    assert.match(r.refusals.find((x) => x.name === 'beta')?.reason ?? '', /address fd12:3456:789a::2 is already held by alpha/)
  })

  test("this node's own IPv6 address and one ipam/ gives another node are refused", () => {
    const self = reconcile(undefined, reconcileInput([['alpha', nodeEntry(a, 10)]], { network: NET6, self: { name: 'self', vpnAddress6: 'fd12:3456:789a::2' } }))
    assert.deepEqual([...self.view.peers.keys()], [])
    const allocations = new Map([
      ['10.99.0.2', 'alpha'],
      ['fd12:3456:789a::2', 'gamma'],
    ])
    const held = reconcile(undefined, reconcileInput([['alpha', nodeEntry(a, 10)]], { network: NET6, allocations }))
    assert.match(held.refusals[0]?.reason ?? '', /address fd12:3456:789a::2 is allocated to gamma/)
    assert.equal(LAYOUT.ipam('fd12:3456:789a::2'), `${LAYOUT.ipamPrefix}fd12:3456:789a::2`)
  })
})
