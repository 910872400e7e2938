import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { connect, type Socket } from 'node:net'
import { pino } from 'pino'
import { dnsArgs, dnsSettings } from '../src/cli/dns-args.ts'
import { DEFAULT_ANSWER_LIMITS, DEFAULT_TCP_LIMITS } from '../src/dns/limits.ts'
import { answer, startDnsServer, type DnsServer } from '../src/dns/server.ts'
import { TYPE, buildQuery, decodeMessage, parseQuery, reply, tcpReply, type DecodedMessage } from '../src/dns/wire.ts'
import { REPLY_OVERHEAD, buildZone, pickInstances, type ZoneInput, type ZoneServiceInstance } from '../src/dns/zone.ts'
import { waitFor } from '../src/lab/daemon.ts'

const stats = () => ({ queries: 0, formerr: 0, refused: 0, truncated: 0 })
const fingerprint = `sha256:${'b'.repeat(64)}`

/** A zone with one service, `web`, of the given instances; every node they name exists. */
function zoneInput(instances: ZoneServiceInstance[], extra: Partial<ZoneInput> = {}): ZoneInput {
  const nodes = [...new Map(instances.map((i) => [i.node, { name: i.node, address: i.address, public: false, fingerprint }])).values()]
  return {
    domain: 'mesh',
    cidr: '10.99.0.0/16',
    self: nodes[0]?.name ?? 'hub',
    nodes,
    services: [{ name: 'web', protocol: 'tcp', instances }],
    ttl: { node: 30, service: 5, negative: 5 },
    serial: 1,
    ...extra,
  }
}

/** `count` instances, one per node, on nodes named with `nameLength` characters. */
const spread = (count: number, nameLength = 8): ZoneServiceInstance[] =>
  Array.from({ length: count }, (_, i) => ({ node: `n${String(i).padStart(nameLength - 1, '0')}`, address: `10.99.${1 + (i >> 8)}.${i & 0xff}`, port: 8000 + i, tags: ['blue'] }))

/** Asks the zone over TCP, as the server would answer, and decodes the reply. */
function ask(input: ZoneInput, name: string, type: number, limits = DEFAULT_ANSWER_LIMITS): { raw: Buffer; msg: DecodedMessage } {
  const raw = answer(buildQuery(name, type, { id: 1 }), buildZone(input, limits), 'tcp', stats()) as Buffer
  return { raw, msg: decodeMessage(raw) }
}

describe('which instances an answer names', () => {
  const on = (node: string, port: number) => ({ node, port })

  test('one per node in turn, up to the total, each node and port once', () => {
    const list = [on('a', 1), on('a', 2), on('a', 3), on('b', 1), on('c', 1), on('c', 2), on('a', 1)]
    assert.deepEqual(pickInstances(list, 10, 10), [on('a', 1), on('b', 1), on('c', 1), on('a', 2), on('c', 2), on('a', 3)])
    assert.deepEqual(pickInstances(list, 4, 10), [on('a', 1), on('b', 1), on('c', 1), on('a', 2)])
  })

  test('at most perNode from one node, however many it registers', () => {
    const flood = [...Array.from({ length: 500 }, (_, i) => on('hostile', i)), on('b', 1), on('c', 1)]
    assert.deepEqual(pickInstances(flood, 64, 2), [on('hostile', 0), on('b', 1), on('c', 1), on('hostile', 1)])
    // Node names are compared as DNS labels: my_node and My-Node are one node.
    assert.equal(pickInstances([on('my_node', 1), on('My-Node', 2), on('my-node', 3)], 64, 2).length, 2)
  })

  test('the same input gives the same pick', () => {
    const list = spread(300).map((i, n) => ({ ...i, node: `n${n % 7}` }))
    assert.deepEqual(pickInstances(list, 64, 8), pickInstances([...list], 64, 8))
  })
})

describe('answer limits in the zone', () => {
  test('a service of 100 instances answers with the default 64, with glue for exactly those', () => {
    const input = zoneInput(spread(100))
    const srv = ask(input, 'web.service.mesh', TYPE.SRV).msg
    assert.equal(srv.answer.length, DEFAULT_ANSWER_LIMITS.maxInstances)
    const targets = srv.answer.map((a) => a.data.split(' ')[3])
    assert.deepEqual(
      srv.additional.filter((a) => a.type === TYPE.A).map((a) => `${a.name}.`),
      targets,
    )
    assert.equal(ask(input, 'web.service.mesh', TYPE.A).msg.answer.length, 64)
    assert.equal(ask(input, '_web._tcp.service.mesh', TYPE.SRV).msg.answer.length, 64)
    assert.equal(ask(input, 'blue.web.service.mesh', TYPE.SRV).msg.answer.length, 64)
    // Every query gets the same 64, over UDP (where they don't fit and come back with TC) and TCP alike.
    assert.deepEqual(ask(input, 'web.service.mesh', TYPE.SRV).msg.answer, srv.answer)
    const udp = decodeMessage(answer(buildQuery('web.service.mesh', TYPE.SRV), buildZone(input), 'udp', stats()) as Buffer)
    assert.equal(udp.flags.tc, true)
  })

  test('a node with many instances gets at most 8 of them, and the other nodes still appear', () => {
    const hostile = Array.from({ length: 200 }, (_, i) => ({ node: 'hostile', address: '10.99.0.66', port: 1000 + i, tags: [] }))
    const input = zoneInput([...hostile, ...spread(3)])
    const ports = ask(input, 'web.service.mesh', TYPE.SRV).msg.answer.map((a) => a.data)
    assert.equal(ports.length, 8 + 3)
    assert.equal(ports.filter((p) => p.endsWith(' hostile.mesh.')).length, 8)
    for (const n of ['n0000000', 'n0000001', 'n0000002'])
      assert.ok(
        ports.some((p) => p.endsWith(` ${n}.mesh.`)),
        `${n} is missing`,
      )
    // One A record per address: the hostile node's 8 instances share one.
    assert.equal(ask(input, 'web.service.mesh', TYPE.A).msg.answer.length, 4)
  })

  test('an answer over the byte limit keeps the longest run of records from the front that fits, with their glue, and no TC', () => {
    const instances = spread(64, 60)
    const input = zoneInput(instances)
    const whole = ask(input, 'web.service.mesh', TYPE.SRV, { ...DEFAULT_ANSWER_LIMITS, maxAnswerBytes: 65535 })
    assert.equal(whole.msg.answer.length, 64)
    const question = parseQuery(buildQuery('web.service.mesh', TYPE.SRV)).end
    for (const limit of [512, 1232, 2000, 4096, 8000]) {
      const cut = ask(input, 'web.service.mesh', TYPE.SRV, { ...DEFAULT_ANSWER_LIMITS, maxAnswerBytes: limit })
      assert.ok(cut.raw.length <= limit, `${cut.raw.length} bytes over a limit of ${limit}`)
      assert.equal(cut.msg.flags.tc, false)
      const n = cut.msg.answer.length
      assert.ok(n >= 1 && n < 64)
      assert.deepEqual(cut.msg.answer, whole.msg.answer.slice(0, n), 'not a prefix of the whole answer')
      assert.deepEqual(cut.msg.additional.slice(0, -1), whole.msg.additional.slice(0, n), 'the glue is not for exactly the records kept')
      // And the longest: one more record with its glue would not have fitted the room the zone
      // leaves for the records (the limit less the longest question and the OPT record).
      const records = (raw: Buffer) => raw.length - question - 11
      const more = ask(input, 'web.service.mesh', TYPE.SRV, { ...DEFAULT_ANSWER_LIMITS, maxInstances: n + 1, maxAnswerBytes: 65535 })
      assert.ok(records(cut.raw) <= limit - REPLY_OVERHEAD)
      assert.ok(records(more.raw) > limit - REPLY_OVERHEAD, `${n + 1} records would have fitted under ${limit}`)
    }
  })

  test('the default limits keep 64 instances on nodes with 63-character names whole, within 16 KiB', () => {
    const input = zoneInput(spread(64, 63))
    const srv = ask(input, 'web.service.mesh', TYPE.SRV)
    assert.equal(srv.msg.answer.length, 64)
    assert.ok(srv.raw.length <= DEFAULT_ANSWER_LIMITS.maxAnswerBytes, `${srv.raw.length} bytes`)
  })

  test('an alias of a big service is the CNAME first, then as many of the records as fit', () => {
    const input = zoneInput(spread(64, 40), { aliases: [{ name: 'www', target: 'web.service' }] })
    const limits = { ...DEFAULT_ANSWER_LIMITS, maxAnswerBytes: 1500 }
    const www = ask(input, 'www.mesh', TYPE.SRV, limits)
    assert.ok(www.raw.length <= 1500)
    assert.equal(www.msg.answer[0]?.type, TYPE.CNAME)
    assert.ok(www.msg.answer.length > 2)
    assert.deepEqual(
      www.msg.answer.slice(1).map((a) => a.data),
      ask(input, 'web.service.mesh', TYPE.SRV, limits)
        .msg.answer.slice(0, www.msg.answer.length - 1)
        .map((a) => a.data),
    )
  })

  test('a tcp and a udp service of one name on the same node and port are one SRV record', () => {
    const input = zoneInput(spread(2))
    input.services?.push({ name: 'web', protocol: 'udp', instances: spread(2) })
    assert.equal(ask(input, 'web.service.mesh', TYPE.SRV).msg.answer.length, 2)
    assert.equal(ask(input, '_web._udp.service.mesh', TYPE.SRV).msg.answer.length, 2)
  })
})

test('the TCP reply is the UDP-style reply with a length prefix, its records not copied', () => {
  const input = zoneInput(spread(40), { aliases: [{ name: 'www', target: 'web.service' }] })
  const zone = buildZone(input)
  for (const [name, type] of [
    ['web.service.mesh', TYPE.SRV],
    ['www.mesh', TYPE.A],
    ['nobody.mesh', TYPE.A],
    ['n0000001.mesh', TYPE.TXT],
  ] as const) {
    for (const opts of [{ edns: 0 }, { edns: 1232 }]) {
      const query = buildQuery(name, type, { id: 77, ...opts })
      const q = parseQuery(query)
      const p = zone.lookup(q.name, q.type)
      assert.ok(p)
      const parts = tcpReply(query, q, p)
      const whole = reply(query, q, p, 65535)
      assert.deepEqual(Buffer.concat(parts), Buffer.concat([Buffer.from([whole.length >> 8, whole.length & 0xff]), whole]), `${name} ${opts.edns}`)
      assert.equal(parts[1], p.body, 'the records were copied')
    }
  }
})

describe('TCP connections are limited in all and per source address', () => {
  let server: DnsServer | undefined
  const open: Socket[] = []
  before(async () => {
    server = await startDnsServer({ hosts: ['127.0.0.1'], port: 0, workers: 0, tcp: { connections: 3, perSource: 2 }, log: pino({ level: 'silent' }) })
    server.update(zoneInput(spread(2)))
  })
  after(async () => {
    for (const s of open) s.destroy()
    await server?.close()
  })

  /** Connects from `from` and asks one question: the answer's first A record, or "closed" when the server shuts the door. */
  const tryOne = (from: string) =>
    new Promise<string>((resolve) => {
      const conn = connect({ port: server?.port ?? 0, host: '127.0.0.1', localAddress: from })
      open.push(conn)
      let buf = Buffer.alloc(0)
      conn.on('error', () => resolve('closed'))
      conn.on('close', () => resolve('closed'))
      conn.on('data', (chunk) => {
        buf = Buffer.concat([buf, chunk])
        if (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) resolve(decodeMessage(buf.subarray(2)).answer[0]?.data ?? 'empty')
      })
      const q = buildQuery('n0000000.mesh', TYPE.A)
      conn.write(Buffer.concat([Buffer.from([0, q.length]), q]))
    })

  test('a third connection from one address and a fourth in all are closed unanswered, and counted', async () => {
    assert.equal(await tryOne('127.0.0.1'), '10.99.1.0')
    assert.equal(await tryOne('127.0.0.1'), '10.99.1.0')
    assert.equal(await tryOne('127.0.0.1'), 'closed')
    assert.equal(await tryOne('127.0.0.2'), '10.99.1.0')
    assert.equal(await tryOne('127.0.0.3'), 'closed')
    assert.equal(server?.stats().tcpOpen, 3)
    assert.equal(server?.stats().tcpRefused, 2)
    // A slot that closes is free again.
    open[0]?.destroy()
    await waitFor('the server to see the connection close', async () => (server?.stats().tcpOpen === 2 ? true : undefined), { timeoutMs: 5000, intervalMs: 10 })
    assert.equal(await tryOne('127.0.0.3'), '10.99.1.0')
  })
})

test('the limits are flags with TINC_CONSUL_* variables, and out-of-range values are refused', () => {
  assert.deepEqual(dnsSettings({}).answers, DEFAULT_ANSWER_LIMITS)
  assert.deepEqual(dnsSettings({}).tcp, DEFAULT_TCP_LIMITS)
  const s = dnsSettings({ 'dns-max-instances': '10', 'dns-max-instances-per-node': '2', 'dns-max-answer-bytes': '4096', 'dns-tcp-connections': '32', 'dns-tcp-per-source': '4' })
  assert.deepEqual(s.answers, { maxInstances: 10, maxInstancesPerNode: 2, maxAnswerBytes: 4096 })
  assert.deepEqual(s.tcp, { connections: 32, perSource: 4 })
  process.env.TINC_CONSUL_DNS_MAX_INSTANCES = '5'
  try {
    assert.equal(dnsSettings({ 'dns-max-instances': dnsArgs['dns-max-instances'].default }).answers.maxInstances, 5)
  } finally {
    delete process.env.TINC_CONSUL_DNS_MAX_INSTANCES
  }
  assert.throws(() => dnsSettings({ 'dns-max-answer-bytes': '511' }), /--dns-max-answer-bytes must be a whole number from 512 to 65535/)
  assert.throws(() => dnsSettings({ 'dns-tcp-per-source': '0' }), /--dns-tcp-per-source/)
})
