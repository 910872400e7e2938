import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { createSocket } from 'node:dgram'
import { connect } from 'node:net'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { pino } from 'pino'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { hostsLines, writeHostsBlock } from '../src/dns/hosts-file.ts'
import { answer, startDnsServer, type DnsServer } from '../src/dns/server.ts'
import { RCODE, TYPE, buildQuery, decodeMessage, encodeName, prepare, rdata } from '../src/dns/wire.ts'
import { buildZone, reverseZone, type ZoneInput } from '../src/dns/zone.ts'
import { waitFor } from '../src/lab/daemon.ts'
import { parseAliases } from '../src/mesh/aliases.ts'
import { renderScripts } from '../src/tinc/setup.ts'

const exec = promisify(execFile)
const nodes = [
  { name: 'hub', address: '10.99.0.1', public: true, fingerprint: `sha256:${'a'.repeat(64)}` },
  { name: 'my_laptop', address: '10.99.0.7', public: false, fingerprint: `sha256:${'b'.repeat(64)}` },
  { name: 'Twin', address: '10.99.0.8', public: false, fingerprint: `sha256:${'c'.repeat(64)}` },
  { name: 'twin', address: '10.99.0.9', public: false, fingerprint: `sha256:${'d'.repeat(64)}` },
]

/** A real server on a free loopback port for the tests of one describe block, and dig pointed at it. */
function useServer(input: ZoneInput, workers: number) {
  const ctx = { server: undefined as DnsServer | undefined }
  before(async () => {
    ctx.server = await startDnsServer({ hosts: ['127.0.0.1'], port: 0, workers, log: pino({ level: 'silent' }) })
    ctx.server.update(input)
  })
  after(async () => {
    await ctx.server?.close()
  })
  const server = () => {
    if (!ctx.server) throw new Error('the DNS server did not start')
    return ctx.server
  }
  const dig = async (...args: string[]) => (await exec('dig', ['@127.0.0.1', '-p', String(server().port), '+time=2', '+tries=1', ...args])).stdout
  return { server, dig }
}

/** Sends one raw packet to the server and returns the raw reply, over UDP or TCP (2-byte length prefix). */
async function exchange(port: number, packet: Buffer, transport: 'udp' | 'tcp'): Promise<Buffer> {
  if (transport === 'udp') {
    const sock = createSocket('udp4')
    try {
      return await new Promise<Buffer>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('no UDP reply')), 2000)
        sock.on('message', (m) => {
          clearTimeout(timer)
          resolve(m)
        })
        sock.send(packet, port, '127.0.0.1')
      })
    } finally {
      sock.close()
    }
  }
  const conn = connect(port, '127.0.0.1')
  try {
    return await new Promise<Buffer>((resolve, reject) => {
      let buf = Buffer.alloc(0)
      const timer = setTimeout(() => reject(new Error('no TCP reply')), 2000)
      conn.on('error', reject)
      conn.on('data', (chunk) => {
        buf = Buffer.concat([buf, chunk])
        if (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) {
          clearTimeout(timer)
          resolve(buf.subarray(2, 2 + buf.readUInt16BE(0)))
        }
      })
      conn.write(Buffer.concat([Buffer.from([packet.length >> 8, packet.length & 0xff]), packet]))
    })
  } finally {
    conn.destroy()
  }
}

/**
 * A query for NAME, type A, with RD and an OPT record spelled out byte by byte:
 * root name, type 41, UDP size 4096, then the TTL field (extended RCODE 0, the
 * version, the flags with DO = 0x80 in the high byte) and no options.
 */
const ednsQuery = (id: number, name: string, opt: { version: number; dnssecOk: boolean }) =>
  Buffer.concat([
    Buffer.from([id >> 8, id & 0xff, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]),
    encodeName(name),
    Buffer.from([0, 1, 0, 1]),
    Buffer.from([0, 0, 41, 0x10, 0x00, 0, opt.version, opt.dnssecOk ? 0x80 : 0, 0, 0, 0]),
  ])

/** The reply's OPT record, which the server always puts last: its UDP size, TTL bytes and DO bit. */
function replyOpt(reply: Buffer) {
  assert.ok(reply.readUInt16BE(10) >= 1, 'the reply has no additional records')
  const opt = reply.subarray(reply.length - 11)
  assert.deepEqual([...opt.subarray(0, 3)], [0, 0, 41], 'the last record is not an OPT record for the root')
  assert.equal(opt.readUInt16BE(9), 0, 'the OPT record carries options')
  return { udp: opt.readUInt16BE(3), extendedRcode: opt[5] ?? -1, version: opt[6] ?? -1, dnssecOk: ((opt[7] ?? 0) & 0x80) !== 0, otherFlags: ((opt[7] ?? 0) & 0x7f) | (opt[8] ?? 0) }
}

describe('the DNS server, asked by dig', () => {
  const input = { domain: 'mesh', cidr: '10.99.0.0/24', self: 'hub', nodes, ttl: { node: 30, service: 5, negative: 5 }, serial: 7 }
  const zone = buildZone(input)
  const { server, dig } = useServer(input, 0)

  test('node names resolve over UDP and TCP, case-insensitively, with _ as -', async () => {
    assert.match(await dig('+short', 'hub.mesh'), /^10\.99\.0\.1$/m)
    assert.match(await dig('+short', 'MY-LAPTOP.Mesh'), /^10\.99\.0\.7$/m)
    assert.match(await dig('+tcp', '+short', 'my-laptop.mesh'), /^10\.99\.0\.7$/m)
    const full = await dig('hub.mesh')
    assert.match(full, /flags: qr aa rd;/)
    assert.match(await dig('+short', '-x', '10.99.0.7'), /^my-laptop\.mesh\.$/m)
    assert.match(await dig('+short', 'my-laptop.mesh', 'TXT'), /"behind NAT" "tinc=my_laptop"/)
  })

  test('names that collide after case folding are left out of DNS', async () => {
    assert.deepEqual(zone.skipped.map((x) => x.name).sort(), ['Twin', 'twin'])
    assert.match(await dig('twin.mesh'), /status: NXDOMAIN/)
  })

  test('unknown names are NXDOMAIN and known names of the wrong type NODATA, both with the SOA', async () => {
    const nx = await dig('nobody.mesh')
    assert.match(nx, /status: NXDOMAIN/)
    assert.match(nx, /AUTHORITY SECTION:\nmesh\.\s+5\s+IN\s+SOA\s+hub\.mesh\. hostmaster\.mesh\. 7 /)
    const nodata = await dig('hub.mesh', 'AAAA')
    assert.match(nodata, /status: NOERROR/)
    assert.match(nodata, /ANSWER: 0, AUTHORITY: 1/)
    assert.match(await dig('mesh', 'NS', '+short'), /^hub\.mesh\.$/m)
    assert.match(await dig(reverseZone('10.99.0.0/24'), 'SOA'), /status: NOERROR/)
  })

  test('outside the zone is REFUSED, ANY gets one small record', async () => {
    assert.match(await dig('example.com'), /status: REFUSED/)
    const any = await dig('hub.mesh', 'ANY')
    assert.match(any, /HINFO\s+"RFC8482"/)
    assert.match(any, /ANSWER: 1,/)
  })

  test('garbage gets FORMERR or nothing, and the server keeps answering', async () => {
    const sock = createSocket('udp4')
    const replies: Buffer[] = []
    sock.on('message', (m) => replies.push(m))
    await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()))
    const send = (b: Buffer) => new Promise<void>((r) => sock.send(b, server().port, '127.0.0.1', () => r()))
    // A compression pointer loop in the question, a huge count, a label past the end, 3 bytes.
    await send(Buffer.from([0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0, 1, 0, 1]))
    await send(Buffer.from([0x12, 0x35, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0]))
    await send(Buffer.from([0x12, 0x36, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 40, 0x61]))
    await send(Buffer.from([1, 2, 3]))
    for (let i = 0; i < 2000; i++) {
      const b = Buffer.alloc(12 + Math.floor(Math.random() * 40))
      for (let j = 0; j < b.length; j++) b[j] = Math.floor(Math.random() * 256)
      b[2] = (b[2] ?? 0) & 0x7f
      await send(b)
    }
    await new Promise((r) => setTimeout(r, 200))
    sock.close()
    assert.ok(replies.length >= 3)
    for (const r of replies.slice(0, 3)) assert.equal((r[3] ?? 0) & 0x0f, 1, 'expected FORMERR')
    assert.ok(
      replies.every((r) => r.length <= 64),
      'a garbage query got a large reply',
    )
    assert.match(await dig('+short', 'hub.mesh'), /^10\.99\.0\.1$/m)
  })

  test('the DO bit of a query is echoed in the OPT record of the reply, and only then (RFC 3225)', async () => {
    for (const transport of ['udp', 'tcp'] as const) {
      // An answer, NXDOMAIN with the SOA, and REFUSED: every reply to an EDNS query has an OPT record.
      for (const [name, rcode] of [
        ['hub.mesh', RCODE.NOERROR],
        ['nobody.mesh', RCODE.NXDOMAIN],
        ['example.com', RCODE.REFUSED],
      ] as const) {
        for (const dnssecOk of [true, false]) {
          const what = `${name} over ${transport}, DO ${dnssecOk ? 'set' : 'clear'}`
          const reply = await exchange(server().port, ednsQuery(0x4242, name, { version: 0, dnssecOk }), transport)
          assert.equal(reply.readUInt16BE(0), 0x4242, what)
          assert.equal((reply[3] ?? 0) & 0x0f, rcode, what)
          assert.deepEqual(replyOpt(reply), { udp: 1232, extendedRcode: 0, version: 0, dnssecOk, otherFlags: 0 }, what)
        }
      }
    }
    assert.match(await dig('+dnssec', 'hub.mesh'), /; EDNS: version: 0, flags: do; udp: 1232\n/)
    assert.match(await dig('hub.mesh'), /; EDNS: version: 0, flags:; udp: 1232\n/)
  })

  test('a query with an EDNS version above 0 gets BADVERS, a version-0 OPT record and no answer (RFC 6891 §6.1.3)', async () => {
    for (const transport of ['udp', 'tcp'] as const) {
      for (const [name, version, dnssecOk] of [
        ['hub.mesh', 1, false],
        ['hub.mesh', 255, true],
        // Before anything else: a name we'd refuse is BADVERS too, so the client retries with 0 first.
        ['example.com', 1, false],
      ] as const) {
        const what = `${name}, EDNS version ${version}, over ${transport}`
        const query = ednsQuery(0x1701, name, { version, dnssecOk })
        const reply = await exchange(server().port, query, transport)
        const questionEnd = query.length - 11
        assert.equal(reply.readUInt16BE(0), 0x1701, what)
        assert.equal((reply[2] ?? 0) & 0x80, 0x80, `${what}: QR`)
        // BADVERS is 16: 0 in the header's RCODE, 1 in the OPT TTL's high byte.
        assert.equal((reply[3] ?? 0) & 0x0f, 0, `${what}: header RCODE`)
        assert.deepEqual([reply.readUInt16BE(4), reply.readUInt16BE(6), reply.readUInt16BE(8), reply.readUInt16BE(10)], [1, 0, 0, 1], `${what}: counts`)
        assert.deepEqual(reply.subarray(12, questionEnd), query.subarray(12, questionEnd), `${what}: the question is echoed`)
        assert.equal(reply.length, questionEnd + 11, `${what}: nothing but the question and the OPT record`)
        const opt = replyOpt(reply)
        assert.deepEqual(opt, { udp: 1232, extendedRcode: 1, version: 0, dnssecOk, otherFlags: 0 }, what)
        assert.equal((opt.extendedRcode << 4) | ((reply[3] ?? 0) & 0x0f), RCODE.BADVERS)
      }
    }
    // Version 0 still answers; a malformed OPT is still a bare FORMERR, whatever its version says.
    assert.equal(decodeMessage(await exchange(server().port, ednsQuery(1, 'hub.mesh', { version: 0, dnssecOk: false }), 'udp')).answer[0]?.data, '10.99.0.1')
    const cut = ednsQuery(2, 'hub.mesh', { version: 1, dnssecOk: false })
    cut.writeUInt16BE(4, cut.length - 2)
    const formerr = await exchange(server().port, cut, 'udp')
    assert.equal(formerr.length, 12)
    assert.equal((formerr[3] ?? 0) & 0x0f, RCODE.FORMERR)
    // dig shows the status, and with its default negotiation retries with version 0 and gets the answer.
    const badvers = await dig('+edns=1', '+noednsnegotiation', 'hub.mesh')
    assert.match(badvers, /status: BADVERS/)
    assert.match(badvers, /ANSWER: 0, AUTHORITY: 0, ADDITIONAL: 1/)
    assert.match(badvers, /; EDNS: version: 0, flags:; udp: 1232\n/)
    assert.match(await dig('+edns=1', '+short', 'hub.mesh'), /^10\.99\.0\.1$/m)
  })
})

test('an answer too big for the client over UDP is cut to the question with TC; TCP gets it whole', () => {
  const zone = buildZone({ domain: 'mesh', cidr: '10.99.0.0/24', self: 'hub', nodes: nodes.slice(0, 2), ttl: { node: 30, service: 5, negative: 5 }, serial: 1 })
  const big = prepare(
    RCODE.NOERROR,
    Array.from({ length: 40 }, (_, i) => ({ name: null, type: TYPE.A, ttl: 5, data: rdata.a(`10.99.0.${i + 1}`) })),
  )
  const query = (edns?: number) => {
    const name = encodeName('hub.mesh')
    const head = Buffer.from([0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, edns ? 1 : 0])
    const opt = edns ? Buffer.from([0, 0, 41, edns >> 8, edns & 0xff, 0, 0, 0, 0, 0, 0]) : Buffer.alloc(0)
    return Buffer.concat([head, name, Buffer.from([0, 1, 0, 1]), opt])
  }
  const stub = { ...zone, lookup: () => big }
  const stats = { queries: 0, formerr: 0, refused: 0, truncated: 0 }
  const plain = answer(query(), stub, 'udp', stats) as Buffer
  assert.equal((plain[2] ?? 0) & 0x02, 0x02, 'TC not set on a 600-byte answer for a 512-byte client')
  assert.equal(plain.readUInt16BE(6), 0)
  const edns = answer(query(4096), stub, 'udp', stats) as Buffer
  assert.equal((edns[2] ?? 0) & 0x02, 0, 'an EDNS client with room was truncated')
  assert.equal(edns.readUInt16BE(6), 40)
  const tcp = answer(query(), stub, 'tcp', stats) as Buffer
  assert.equal(tcp.readUInt16BE(6), 40)
  assert.equal(tcp.readUInt16BE(0), 0xabcd)
})

test('a "." byte inside one label is not a label boundary: "hub.mesh" as one label is not hub.mesh', () => {
  const zone = buildZone({ domain: 'mesh', cidr: '10.99.0.0/24', self: 'hub', nodes: nodes.slice(0, 2), ttl: { node: 30, service: 5, negative: 5 }, serial: 1 })
  const one = Buffer.concat([Buffer.from([0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]), Buffer.from([8]), Buffer.from('hub.mesh'), Buffer.from([0, 0, 1, 0, 1])])
  const stats = { queries: 0, formerr: 0, refused: 0, truncated: 0 }
  const reply = decodeMessage(answer(one, zone, 'udp', stats) as Buffer)
  assert.equal(reply.rcode, RCODE.REFUSED)
  assert.equal(reply.answer.length, 0)
  assert.equal(decodeMessage(answer(buildQuery('hub.mesh', TYPE.A), zone, 'udp', stats) as Buffer).answer[0]?.data, '10.99.0.1', 'the real name still answers')
})

describe('services and aliases, through a server with a helper process', () => {
  const web = Array.from({ length: 60 }, (_, i) => ({ node: `n${i}`, address: `10.99.1.${i + 1}`, port: 8000 + i, tags: i % 2 ? ['blue'] : ['green'] }))
  const input = {
    domain: 'mesh',
    cidr: '10.99.0.0/16',
    self: 'hub',
    nodes: [
      { name: 'hub', address: '10.99.0.1', public: true, fingerprint: `sha256:${'a'.repeat(64)}` },
      ...web.map((w) => ({ name: w.node, address: w.address, public: false, fingerprint: `sha256:${'b'.repeat(64)}` })),
    ],
    services: [
      { name: 'nfs', protocol: 'tcp' as const, instances: [{ node: 'hub', address: '10.99.0.1', port: 2049, tags: ['primary'] }] },
      { name: 'web', protocol: 'tcp' as const, instances: web },
      { name: 'ghost', protocol: 'udp' as const, instances: [{ node: 'not_a_node', address: '10.99.9.9', port: 1, tags: [] }] },
    ],
    aliases: [
      { name: 'files', target: 'nfs.service' },
      { name: 'gateway', target: 'hub.mesh' },
      { name: 'dangling', target: 'nobody' },
      { name: 'hub', target: 'n1' },
    ],
    ttl: { node: 30, service: 5, negative: 5 },
    serial: 9,
  }
  const { server, dig } = useServer(input, 1)

  test('SVC.service.mesh gives A records, SRV gives port and NODE.mesh with the A records as additional data', async () => {
    assert.match(await dig('+short', 'nfs.service.mesh'), /^10\.99\.0\.1$/m)
    const srv = await dig('nfs.service.mesh', 'SRV')
    assert.match(srv, /SRV\s+1 1 2049 hub\.mesh\./)
    assert.match(srv, /ADDITIONAL SECTION:[\s\S]*hub\.mesh\.\s+30\s+IN\s+A\s+10\.99\.0\.1/)
    assert.match(await dig('+short', '_nfs._tcp.service.mesh', 'SRV'), /^1 1 2049 hub\.mesh\.$/m)
    assert.match(await dig('+short', 'primary.nfs.service.mesh'), /^10\.99\.0\.1$/m)
    assert.equal((await dig('+short', 'blue.web.service.mesh')).trim().split('\n').length, 30)
    // Instances on nodes we don't know are left out; a service with none doesn't exist.
    assert.match(await dig('ghost.service.mesh'), /status: NXDOMAIN/)
    assert.match(await dig('service.mesh'), /status: NOERROR[\s\S]*ANSWER: 0, AUTHORITY: 1/)
  })

  test('a 60-instance SRV answer is truncated over UDP and whole over TCP', async () => {
    const udp = await dig('+ignore', '+bufsize=1232', 'web.service.mesh', 'SRV')
    assert.match(udp, /flags: qr aa tc rd;/)
    assert.match(udp, /ANSWER: 0,/)
    const tcp = await dig('+tcp', 'web.service.mesh', 'SRV')
    assert.match(tcp, /ANSWER: 60,/)
    assert.match(tcp, /ADDITIONAL: 61/)
    const plain = await dig('+ignore', '+noedns', 'web.service.mesh', 'A')
    assert.match(plain, /flags: qr aa tc rd;/, 'sixty A records are over 512 bytes')
  })

  test("aliases are CNAMEs with the target's records; a dangling one is NXDOMAIN and one that shadows a node is left out", async () => {
    const files = await dig('files.mesh')
    assert.match(files, /files\.mesh\.\s+30\s+IN\s+CNAME\s+nfs\.service\.mesh\.\nnfs\.service\.mesh\.\s+5\s+IN\s+A\s+10\.99\.0\.1/)
    assert.match(await dig('+short', 'gateway.mesh'), /^hub\.mesh\.\n10\.99\.0\.1$/m)
    const dangling = await dig('dangling.mesh')
    assert.match(dangling, /status: NXDOMAIN/)
    assert.match(dangling, /CNAME\s+nobody\.mesh\./)
    assert.match(await dig('+short', 'hub.mesh'), /^10\.99\.0\.1$/m)
    assert.ok(
      server()
        .zone()
        ?.skipped.some((s) => s.name === 'hub' && /already a node/.test(s.reason)),
    )
  })

  test('the helper answers too, from the same zone, and its counts reach the daemon', async () => {
    const sock = createSocket('udp4')
    const replies: Buffer[] = []
    sock.on('message', (m) => replies.push(m))
    await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()))
    // In bursts a socket buffer can hold, each answered before the next.
    for (let burst = 0; burst < 8; burst++) {
      for (let i = 0; i < 50; i++) sock.send(buildQuery('gateway.mesh', TYPE.A, { id: burst * 50 + i }), server().port, '127.0.0.1')
      await waitFor('a burst of replies', async () => (replies.length >= (burst + 1) * 50 ? true : undefined), { timeoutMs: 10_000, intervalMs: 5 })
    }
    // The helper may still be starting: keep asking until its reported count shows it answered.
    await waitFor(
      'the helper to report answers',
      async () => {
        sock.send(buildQuery('gateway.mesh', TYPE.A, { id: 9999 }), server().port, '127.0.0.1')
        return server().stats().byHelpers > 0 ? true : undefined
      },
      { timeoutMs: 30_000, intervalMs: 20 },
    )
    sock.close()
    for (const r of replies)
      assert.deepEqual(
        decodeMessage(r).answer.map((a) => a.data),
        ['hub.mesh.', '10.99.0.1'],
      )
    assert.equal(server().workers, 1)
    assert.ok(server().stats().queries >= 400)
  })
})

test('a compression pointer loop in a reply is an error for the decoder, not a hang', () => {
  const msg = Buffer.from([0, 1, 0x84, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, 4])
  assert.throws(() => decodeMessage(msg), /compression pointer/)
  const ok = decodeMessage(Buffer.concat([Buffer.from([0, 1, 0x84, 0, 0, 1, 0, 1, 0, 0, 0, 0]), encodeName('a.mesh'), Buffer.from([0, 1, 0, 1, 0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, 4])]))
  assert.deepEqual(ok.answer, [{ name: 'a.mesh', type: 1, class: 1, ttl: 5, data: '1.2.3.4' }])
})

test('aliases from Consul are checked: bad keys and targets are refused, names are normalised', () => {
  const layout = kvLayout('home')
  const item = (k: string, v: string) => ({ key: `${layout.aliasesPrefix}${k}`, value: Buffer.from(v), modifyIndex: 1, createIndex: 1 })
  const read = parseAliases(
    [item('', ''), item('files', 'NAS.mesh.'), item('media', 'jellyfin.service'), item('Bad_Key', 'nas'), item('evil', '../../etc'), item('long', 'x'.repeat(300))],
    layout,
    'mesh',
  )
  assert.deepEqual(read.aliases, [
    { name: 'files', target: 'nas' },
    { name: 'media', target: 'jellyfin.service' },
  ])
  assert.deepEqual(
    read.refused.map((r) => r.key.slice(layout.aliasesPrefix.length)),
    ['Bad_Key', 'evil', 'long'],
  )
})

test('the hosts block is added, kept, replaced and removed without touching other lines', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tc-hosts-'))
  const file = join(dir, 'hosts')
  const mine = '127.0.0.1 localhost\n# my own comment\n'
  await writeFile(file, mine)
  // A node called "service" is left out here as in DNS, where service.mesh is the services' subdomain.
  const input = {
    domain: 'mesh',
    cidr: '10.99.0.0/24',
    self: 'hub',
    nodes: [...nodes, { name: 'service', address: '10.99.0.60', public: false, fingerprint: `sha256:${'0'.repeat(64)}` }],
    ttl: { node: 30, service: 5, negative: 5 },
    serial: 1,
  }
  assert.equal(await writeHostsBlock(file, 'home', hostsLines(input.domain, input.nodes)), true)
  const text = await readFile(file, 'utf8')
  assert.ok(text.startsWith(mine))
  assert.match(text, /# BEGIN tinc-consul home\n.*\n10\.99\.0\.1\thub\.mesh\n10\.99\.0\.7\tmy-laptop\.mesh\n# END tinc-consul home\n$/)
  assert.doesNotMatch(text, /twin/i, 'colliding names must not be written either')
  assert.equal(await writeHostsBlock(file, 'home', hostsLines(input.domain, input.nodes)), false)
  assert.equal(await writeHostsBlock(file, 'work', ['10.1.0.1\tbox.corp']), true)
  assert.equal(await writeHostsBlock(file, 'home', undefined), true)
  assert.equal(await readFile(file, 'utf8'), `${mine}# BEGIN tinc-consul work\n${(await readFile(file, 'utf8')).split('\n').slice(3).join('\n')}`)
  assert.doesNotMatch(await readFile(file, 'utf8'), /home/)
  await rm(dir, { recursive: true, force: true })
})

describe('tinc-up and tinc-down with systemd-resolved', () => {
  const render = (eventsFile: string) => renderScripts({ address: '10.99.0.7', prefixLength: 24, eventsFile, splitDns: { domain: 'mesh', port: 53 } })
  const runWith = async (resolvedUp: boolean, script: string) => {
    const dir = await mkdtemp(join(tmpdir(), 'tc-resolved-'))
    // tinc-up makes the events directory: inside the temp dir, never on the machine.
    const scripts = render(join(dir, 'run', 'tinc-events'))
    const log = join(dir, 'calls')
    // Stand-ins record their argv; `resolvectl status` fails like it does when resolved isn't running.
    await writeFile(join(dir, 'ip'), `#!/bin/sh\necho "ip $*" >> ${log}\n`, { mode: 0o755 })
    await writeFile(join(dir, 'resolvectl'), `#!/bin/sh\n[ "$1" = status ] && exit ${resolvedUp ? 0 : 1}\necho "resolvectl $*" >> ${log}\n`, { mode: 0o755 })
    await writeFile(join(dir, 'script'), scripts[script] ?? '', { mode: 0o755 })
    await exec('/bin/sh', [join(dir, 'script')], { env: { PATH: `${dir}:/usr/bin:/bin`, INTERFACE: 'tinc-home' } })
    const calls = await readFile(log, 'utf8').catch(() => '')
    await rm(dir, { recursive: true, force: true })
    return calls.trim().split('\n')
  }

  test("with resolved running, tinc-up sends only ~mesh to this node's server on the VPN interface, and tinc-down reverts it", async () => {
    assert.deepEqual(await runWith(true, 'tinc-up'), ['ip addr add 10.99.0.7/24 dev tinc-home', 'ip link set tinc-home up', 'resolvectl dns tinc-home 10.99.0.7', 'resolvectl domain tinc-home ~mesh'])
    assert.deepEqual(await runWith(true, 'tinc-down'), ['resolvectl revert tinc-home', 'ip addr del 10.99.0.7/24 dev tinc-home', 'ip link set tinc-home down'])
  })

  test('without resolved, DNS settings are left alone; nothing writes resolv.conf or hosts', async () => {
    assert.deepEqual(await runWith(false, 'tinc-up'), ['ip addr add 10.99.0.7/24 dev tinc-home', 'ip link set tinc-home up'])
    for (const text of Object.values(render('/run/x/tinc-events'))) assert.doesNotMatch(text, /resolv\.conf|\/etc\/hosts/)
    const other = renderScripts({ address: '10.99.0.7', prefixLength: 24, eventsFile: '/x', splitDns: { domain: 'corp.mesh', port: 5353 } })
    assert.match(other['tinc-up'] ?? '', /resolvectl dns "\$INTERFACE" 10\.99\.0\.7:5353 && resolvectl domain "\$INTERFACE" '~corp\.mesh'/)
    assert.doesNotMatch(renderScripts({ address: '10.99.0.7', prefixLength: 24, eventsFile: '/x' })['tinc-up'] ?? '', /resolvectl/)
  })
})

test('`tinc-consul resolve` prints the answer, and fails clearly on NXDOMAIN and REFUSED', async () => {
  const input = { domain: 'mesh', cidr: '10.99.0.0/24', self: 'hub', nodes, ttl: { node: 30, service: 5, negative: 5 }, serial: 1 }
  const server = await startDnsServer({ hosts: ['127.0.0.1'], port: 0, workers: 0, log: pino({ level: 'silent' }) })
  server.update(input)
  const cli = (...args: string[]) =>
    exec(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'resolve', ...args, '--dns-port', String(server.port)]).then(
      (r) => ({ code: 0, ...r }),
      (e: { code: number; stdout: string; stderr: string }) => e,
    )
  try {
    const a = await cli('my-laptop.mesh')
    assert.equal(a.code, 0)
    assert.equal(a.stdout, 'my-laptop.mesh.\t30\tA\t10.99.0.7\n')
    assert.match((await cli('10.99.0.1')).stdout, /^1\.0\.99\.10\.in-addr\.arpa\.\t30\tPTR\thub\.mesh\.$/m)
    assert.match((await cli('hub.mesh', '--type', 'txt', '--tcp')).stdout, /TXT\t"public" "tinc=hub"/)
    const nx = await cli('nobody.mesh')
    assert.equal(nx.code, 1)
    assert.match(nx.stderr, /nobody\.mesh: no such name/)
    const refused = await cli('example.com')
    assert.match(refused.stderr, /REFUSED \(it only answers for the mesh's own zone\)/)
    const bad = await cli('hub.mesh', '--type', 'MX')
    assert.equal(bad.code, 2)
  } finally {
    await server.close()
  }
})
