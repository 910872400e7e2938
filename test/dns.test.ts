import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { createSocket } from 'node:dgram'
import { promisify } from 'node:util'
import { pino } from 'pino'
import { answer, startDnsServer, type DnsServer } from '../src/dns/server.ts'
import { RCODE, TYPE, encodeName, prepare, rdata } from '../src/dns/wire.ts'
import { buildZone, reverseZone } from '../src/dns/zone.ts'

const exec = promisify(execFile)
const nodes = [
  { name: 'hub', address: '10.99.0.1', public: true, fingerprint: `sha256:${'a'.repeat(64)}` },
  { name: 'my_laptop', address: '10.99.0.7', public: false, fingerprint: `sha256:${'b'.repeat(64)}` },
  { name: 'Twin', address: '10.99.0.8', public: false, fingerprint: `sha256:${'c'.repeat(64)}` },
  { name: 'twin', address: '10.99.0.9', public: false, fingerprint: `sha256:${'d'.repeat(64)}` },
]

describe('the DNS server, asked by dig', () => {
  let server: DnsServer
  const zone = buildZone({ domain: 'mesh', cidr: '10.99.0.0/24', self: 'hub', nodes, ttl: { node: 30, negative: 5 }, serial: 7 })
  const dig = async (...args: string[]) => (await exec('dig', ['@127.0.0.1', '-p', String(server.port), '+time=2', '+tries=1', ...args])).stdout
  before(async () => {
    server = await startDnsServer({ hosts: ['127.0.0.1'], port: 0, zone: () => zone, log: pino({ level: 'silent' }) })
  })
  after(async () => {
    await server?.close()
  })

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
    assert.deepEqual([...zone.collisions].sort(), ['Twin', 'twin'])
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
    const send = (b: Buffer) => new Promise<void>((r) => sock.send(b, server.port, '127.0.0.1', () => r()))
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
    assert.ok(replies.every((r) => r.length <= 64), 'a garbage query got a large reply')
    assert.match(await dig('+short', 'hub.mesh'), /^10\.99\.0\.1$/m)
  })
})

test('an answer too big for the client over UDP is cut to the question with TC; TCP gets it whole', () => {
  const zone = buildZone({ domain: 'mesh', cidr: '10.99.0.0/24', self: 'hub', nodes: nodes.slice(0, 2), ttl: { node: 30, negative: 5 }, serial: 1 })
  const big = prepare(RCODE.NOERROR, Array.from({ length: 40 }, (_, i) => ({ name: null, type: TYPE.A, ttl: 5, data: rdata.a(`10.99.0.${i + 1}`) })))
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
