import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { appendFileSync, existsSync, readFileSync } from 'node:fs'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { isIP } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { dumpReader, parseDump, type DumpReaderOptions, type TincDump } from '../src/tinc/dump.ts'
import { inTincdLane } from '../src/tinc/signal.ts'

const prefix = (time: string, ident = 'tinc.lab') => `2026-11-22 ${time} ${ident}[1234]: `
const logged = (time: string, lines: string[], ident?: string) => lines.map((l) => prefix(time, ident) + l + '\n').join('')

// What SIGUSR2 makes tincd 1.0.36 write: a is this node, c a direct peer, b
// reachable only through c, d known from an old edge but unreachable.
const USR2 = [
  'Statistics for Linux tun/tap device (tun mode) /dev/net/tun:',
  ' total bytes in:         738',
  ' total bytes out:        766',
  'Nodes:',
  ' a at MYSELF port 655 cipher 0 digest 0 maclength 0 compression 0 options c status 0018 nexthop a via a pmtu 1518 (min 0 max 1518)',
  ' b at 198.18.0.2 port 655 cipher 427 digest 672 maclength 4 compression 0 options c status 0012 nexthop c via c pmtu 1451 (min 1451 max 1451)',
  ' c at 198.18.0.3 port 655 cipher 427 digest 672 maclength 4 compression 0 options c status 001a nexthop a via c pmtu 1451 (min 1451 max 1451)',
  ' d at unknown port unknown cipher 0 digest 0 maclength 0 compression 0 options 0 status 0000 nexthop - via - pmtu 1518 (min 0 max 1518)',
  'End of nodes.',
  'Edges:',
  ' a to c at 198.18.0.3 port 655 options c weight 4',
  ' c to a at 198.18.0.1 port 655 options c weight 4',
  ' c to b at 2001:db8::2 port 655 options 0 weight 12',
  'End of edges.',
  'Subnet list:',
  ' 10.99.0.3/32#10 owner c',
  ' 10.99.0.1/32 owner a',
  ' fd00:99::/64#5 owner b',
  ' ff:ff:ff:ff:ff:ff owner (broadcast)',
  'End of subnet list.',
]
const USR1 = ['Connections:', ' c at 198.18.0.3 port 655 options c socket 9 status 01c2 outbuf 1042/0/0', 'End of connections.']

// An older, different dump earlier in the same log: only the last one may count.
const OLD_DUMP = logged('01:00:00', [
  'Statistics for Linux tun/tap device (tun mode) /dev/net/tun:',
  ' total bytes in:         1',
  ' total bytes out:        2',
  'Nodes:',
  ' old at 198.18.0.9 port 655 cipher 0 digest 0 maclength 0 compression 0 options 0 status 0010 nexthop old via old pmtu 1 (min 1 max 1)',
  'End of nodes.',
  'Edges:',
  'End of edges.',
  'Subnet list:',
  ' 10.99.0.9/32#10 owner old',
  'End of subnet list.',
  'Connections:',
  ' old at 198.18.0.9 port 655 options 0 socket 5 status 0002 outbuf 0/0/0',
  'End of connections.',
])

const SAMPLE =
  'tincd 1.0.36 starting, debug level 0\n' +
  logged('00:59:59', ['tincd 1.0.36 (Aug 26 2019 15:27:13) starting, debug level 0'], 'tinc') +
  OLD_DUMP +
  logged('02:04:35', ['Connection from 198.18.0.3 port 40112', 'Got ADD_EDGE from c (198.18.0.3 port 655): 12 6f2a1b c b 198.18.0.2 655 c 12']) +
  logged('02:04:36', USR2.slice(0, 3)) +
  logged('02:04:36', ['Got PING from c (198.18.0.3 port 655)']) +
  logged('02:04:36', USR2.slice(3)) +
  '\n' +
  logged('02:04:36', ['Sending PONG to c (198.18.0.3 port 655)']) +
  logged('02:04:37', USR1) +
  logged('02:04:38', ['Got ADD_EDGE from c (198.18.0.3 port 655): 12 6f2a1c c d 198.18.0.4 655 c 9'])

test('a realistic log with two dumps and chatter in between yields the last dump, every field checked', () => {
  const dump = parseDump(SAMPLE)
  assert.equal(dump.skipped, 0)
  assert.deepEqual(dump.at, new Date(2026, 10, 22, 2, 4, 37))
  assert.equal(dump.bytesIn, 738)
  assert.equal(dump.bytesOut, 766)
  assert.deepEqual(dump.nodes, [
    { name: 'a', port: 655, status: 0x18, reachable: true, nexthop: 'a', via: 'a', pmtu: 1518, minPmtu: 0, options: 0xc },
    { name: 'b', address: '198.18.0.2', port: 655, status: 0x12, reachable: true, nexthop: 'c', via: 'c', pmtu: 1451, minPmtu: 1451, options: 0xc },
    { name: 'c', address: '198.18.0.3', port: 655, status: 0x1a, reachable: true, nexthop: 'a', via: 'c', pmtu: 1451, minPmtu: 1451, options: 0xc },
    { name: 'd', status: 0, reachable: false, pmtu: 1518, minPmtu: 0, options: 0 },
  ])
  assert.deepEqual(dump.edges, [
    { from: 'a', to: 'c', address: '198.18.0.3', port: 655, weight: 4, options: 0xc },
    { from: 'c', to: 'a', address: '198.18.0.1', port: 655, weight: 4, options: 0xc },
    { from: 'c', to: 'b', address: '2001:db8::2', port: 655, weight: 12, options: 0 },
  ])
  assert.deepEqual(dump.subnets, [
    { subnet: '10.99.0.3/32', weight: 10, owner: 'c' },
    { subnet: '10.99.0.1/32', owner: 'a' },
    { subnet: 'fd00:99::/64', weight: 5, owner: 'b' },
    { subnet: 'ff:ff:ff:ff:ff:ff', owner: '(broadcast)' },
  ])
  assert.deepEqual(dump.connections, [{ name: 'c', address: '198.18.0.3', port: 655, status: 0x1c2, options: 0xc, outbuf: '1042/0/0' }])
})

test('direct and relayed nodes are told apart by via, and reachability by status bit 0x10', () => {
  const nodes = new Map((parseDump(SAMPLE).nodes ?? []).map((n) => [n.name, n]))
  const direct = (name: string) => nodes.get(name)?.via === name
  assert.equal(direct('c'), true)
  assert.equal(direct('b'), false)
  assert.equal(nodes.get('b')?.via, 'c', 'b is relayed through c')
  assert.equal(nodes.get('d')?.reachable, false)
  assert.equal(nodes.get('d')?.address, undefined, '"unknown" is not an address')
  assert.equal(nodes.get('d')?.via, undefined)
  const unreachableWithBit = parseDump(logged('03:00:00', ['Nodes:', USR2[7]!.replace('status 0000', 'status 0012'), 'End of nodes.']))
  assert.equal(unreachableWithBit.nodes?.[0]?.reachable, true)
  const cleared = parseDump(logged('03:00:00', ['Nodes:', USR2[7]!.replace('status 0000', 'status ffef'), 'End of nodes.']))
  assert.equal(cleared.nodes?.[0]?.reachable, false)
})

test('the bare "tinc" ident, CRLF line ends and other device types are accepted', () => {
  const text = logged('04:00:00', ['Statistics for BSD tun device /dev/tun0:', ' total bytes in:  5', ' total bytes out: 6'], 'tinc').replace(/\n/g, '\r\n')
  const dump = parseDump(text)
  assert.equal(dump.bytesIn, 5)
  assert.equal(dump.bytesOut, 6)
  assert.equal(dump.skipped, 0)
  assert.deepEqual(dump.at, new Date(2026, 10, 22, 4, 0, 0))
})

test('lines inside a section that fail to parse or validate are skipped and counted', () => {
  const text = logged('05:00:00', [
    'Nodes:',
    ' ../etc at 198.18.0.3 port 655 cipher 0 digest 0 maclength 0 compression 0 options c status 001a nexthop a via c pmtu 1 (min 1 max 1)',
    ' e at 198.18.0.3 port 70000 cipher 0 digest 0 maclength 0 compression 0 options c status 001a nexthop a via c pmtu 1 (min 1 max 1)',
    ' e at 198.18.0.3 port 655 cipher 0 digest 0 maclength 0 compression 0 options c status 001a nexthop a;b via c pmtu 1 (min 1 max 1)',
    ' e at 198.18.0.3 port 655 cipher 0 digest 0 maclength 0 compression 0 options c status 1001a0000 nexthop a via c pmtu 1 (min 1 max 1)',
    ' e at 999.1.1.1 port 655 cipher 0 digest 0 maclength 0 compression 0 options c status 001a nexthop a via c pmtu 1 (min 1 max 1)',
    ' f at 198.18.0.3 port 655 cipher 0 digest 0 maclength 0 compression 0 options c status 001a nexthop a via c',
    'Got PING from c (198.18.0.3 port 655)',
    'End of nodes.',
    'Subnet list:',
    ' 10.99.0.3/33#10 owner c',
    ' 10.99.0.3/32#x owner c',
    ' 10.99.0.3/32#10 owner $(reboot)',
    ' 1:2:3:4:5 owner c',
    ' ::/0 owner c',
    'End of subnet list.',
    'Edges:',
    ' a to c at 198.18.0.3 port 655 options c weight 9999999999999999',
    'End of edges.',
    'Connections:',
    ' <unknown> at 198.18.0.7 port 51000 options 0 socket 11 status 0000 outbuf 0/0/0',
    'End of connections.',
  ])
  // A line with no log prefix in the middle of a section is also junk.
  const withRaw = text.replace(`${prefix('05:00:00')}End of nodes.`, `garbage without a prefix\n${prefix('05:00:00')}End of nodes.`)
  const dump = parseDump(withRaw)
  // Only the bad-address node survives, with its address dropped rather than the node.
  assert.deepEqual(dump.nodes, [{ name: 'e', port: 655, status: 0x1a, reachable: true, nexthop: 'a', via: 'c', pmtu: 1, minPmtu: 1, options: 0xc }])
  assert.deepEqual(dump.subnets, [{ subnet: '::/0', owner: 'c' }])
  assert.deepEqual(dump.edges, [])
  assert.deepEqual(dump.connections, [])
  // nodes: 5 bad detail lines + chatter + raw line; subnets: 4; edges: 1; connections: 1
  assert.equal(dump.skipped, 7 + 4 + 1 + 1)
})

test('an unterminated trailing section is ignored and the previous complete one kept', () => {
  const truncated =
    SAMPLE + logged('06:00:00', ['Nodes:', ' z at 198.18.0.26 port 655 cipher 0 digest 0 maclength 0 compression 0 options 0 status 0010 nexthop z via z pmtu 1 (min 1 max 1)', ' y at 198.18'])
  const dump = parseDump(truncated)
  assert.deepEqual(
    dump.nodes?.map((n) => n.name),
    ['a', 'b', 'c', 'd'],
  )
  assert.equal(dump.skipped, 0, 'lines of the unfinished section are not counted')
  assert.deepEqual(dump.at, new Date(2026, 10, 22, 2, 4, 37))

  // A section cut short by a new header (tincd restarted mid-dump) is dropped too.
  const restarted = logged('07:00:00', ['Edges:', ' a to c at 198.18.0.3 port 655 options c weight 4', 'Edges:', ' c to a at 198.18.0.1 port 655 options c weight 4', 'End of edges.'])
  assert.deepEqual(
    parseDump(restarted).edges?.map((e) => e.from),
    ['c'],
  )

  // Statistics with only the "in" line are unfinished.
  const halfStats = logged('08:00:00', ['Statistics for Linux tun/tap device (tun mode) /dev/net/tun:', ' total bytes in:  5'])
  assert.equal(parseDump(SAMPLE + halfStats).bytesIn, 738)

  assert.deepEqual(parseDump(''), { skipped: 0 })
  assert.deepEqual(parseDump('Nodes:\nEnd of nodes.\n'), { skipped: 0 }, 'lines without the log prefix are not tincd dumps')
})

test('impossible timestamps leave at undefined but keep the data', () => {
  const dump = parseDump(logged('25:61:00', ['Edges:', 'End of edges.']))
  assert.deepEqual(dump.edges, [])
  assert.equal(dump.at, undefined)
})

/** mulberry32: a seeded generator, so a failing case can be replayed. */
function rng(seed: number): () => number {
  let a = seed
  return () => {
    a = (a + 0x6d2b79f5) | 0
    let t = Math.imul(a ^ (a >>> 15), 1 | a)
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

function assertSane(dump: TincDump, input: string) {
  const where = JSON.stringify(input.slice(0, 200))
  assert.ok(Number.isSafeInteger(dump.skipped) && dump.skipped >= 0, where)
  const name = /^[A-Za-z0-9_]{1,64}$/
  const okPort = (p: number | undefined) => p === undefined || (Number.isInteger(p) && p >= 0 && p <= 65535)
  const okAddr = (a: string | undefined) => a === undefined || isIP(a) !== 0
  for (const n of dump.nodes ?? []) {
    assert.ok(name.test(n.name) && okPort(n.port) && okAddr(n.address) && Number.isFinite(n.status), where)
    assert.ok((n.via === undefined || name.test(n.via)) && (n.nexthop === undefined || name.test(n.nexthop)), where)
  }
  for (const e of dump.edges ?? []) assert.ok(name.test(e.from) && name.test(e.to) && okPort(e.port) && okAddr(e.address) && Number.isFinite(e.weight), where)
  for (const s of dump.subnets ?? []) assert.ok((s.owner === '(broadcast)' || name.test(s.owner)) && !/[\s#]/.test(s.subnet), where)
  for (const c of dump.connections ?? []) assert.ok(name.test(c.name) && okPort(c.port) && okAddr(c.address), where)
  for (const v of [dump.bytesIn, dump.bytesOut]) assert.ok(v === undefined || Number.isSafeInteger(v), where)
  assert.ok(dump.at === undefined || !Number.isNaN(dump.at.getTime()), where)
}

test('random and mutated input never throws and never yields invalid fields', () => {
  const rand = rng(0x7153)
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)] as T
  const alphabet = [...' \n\r\t#/:.-()[]$;<>abcdefxyz0123456789', '\u0000', '\u00e9', '\ud800', '\uffff']
  const tokens = [...USR2, ...USR1, prefix('02:04:36'), ' port ', ' unknown', ' via ', ' status ', 'End of nodes.', '4294967296', '-1', '99999']
  let parsed = 0
  for (let i = 0; i < 3000; i++) {
    let input: string
    if (i % 3 === 0) {
      input = Array.from({ length: Math.floor(rand() * 400) }, () => pick(alphabet)).join('')
    } else {
      const chars = [...SAMPLE]
      for (let k = 1 + Math.floor(rand() * 8); k > 0; k--) {
        const at = Math.floor(rand() * chars.length)
        const op = rand()
        if (op < 0.3) chars.splice(at, 1 + Math.floor(rand() * 20))
        else if (op < 0.6) chars.splice(at, 0, pick(alphabet))
        else if (op < 0.8) chars.splice(at, 0, pick(tokens))
        else chars.length = at
      }
      input = chars.join('')
    }
    const dump = parseDump(input)
    assertSane(dump, input)
    if (dump.nodes) parsed++
  }
  assert.ok(parsed > 100, 'mutations should mostly leave some sections intact')
  // Pathological lines must not blow up the lazy host pattern either.
  const long = logged('02:04:36', ['Nodes:', ' a at ' + ' cipher 1'.repeat(50_000), 'End of nodes.'])
  const t0 = performance.now()
  assert.equal(parseDump(long).skipped, 1)
  assert.ok(performance.now() - t0 < 1000)
  assert.deepEqual(parseDump(undefined as unknown as string), { skipped: 0 })
  // Log text that names Object.prototype members must not be taken for headers or End lines.
  assert.deepEqual(parseDump(logged('02:04:36', ['constructor', '__proto__', 'toString', 'Edges:', 'hasOwnProperty', 'End of edges.'])), {
    edges: [],
    skipped: 1,
    at: new Date(2026, 10, 22, 2, 4, 36),
  })
})

async function withDir(fn: (dir: string) => Promise<void>) {
  const dir = await mkdtemp(join(tmpdir(), 'tc-dump-'))
  try {
    await fn(dir)
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}

/** A stand-in for tincd: answers each signal by appending its dump to the log a little later, as the real one would. */
function fakeTincd(logFile: string, opts: { delayMs?: number; usr1?: string[]; usr2?: string[] } = {}) {
  const calls: string[] = []
  const signal = (pid: number, sig: NodeJS.Signals) => {
    calls.push(`${pid} ${sig}`)
    const lines = sig === 'SIGUSR2' ? (opts.usr2 ?? USR2) : (opts.usr1 ?? USR1)
    setTimeout(() => appendFileSync(logFile, logged('09:00:00', lines)), opts.delayMs ?? 30)
  }
  const reads = () => calls.filter((c) => c.endsWith('SIGUSR2')).length
  return { calls, signal, reads }
}

test('the reader reports down when the pidfile is missing, without signalling anything', async () => {
  await withDir(async (dir) => {
    const fake = fakeTincd(join(dir, 'tinc.log'))
    const read = dumpReader({ logFile: join(dir, 'tinc.log'), pidFile: join(dir, 'missing.pid'), signal: fake.signal, comm: () => 'tincd' })
    const r = await read()
    assert.equal(r.state, 'down')
    assert.match(r.state === 'down' ? r.reason : '', /pidfile/)
    await writeFile(join(dir, 'bad.pid'), 'not a pid\n')
    const bad = await dumpReader({ logFile: join(dir, 'tinc.log'), pidFile: join(dir, 'bad.pid'), signal: fake.signal, comm: () => 'tincd' })()
    assert.equal(bad.state, 'down')
    assert.deepEqual(fake.calls, [])
  })
})

test('the reader refuses to signal a live process that is not tincd', async () => {
  await withDir(async (dir) => {
    const child = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)'], { stdio: 'ignore' })
    try {
      await once(child, 'spawn')
      assert.ok(child.pid)
      await writeFile(join(dir, 'tinc.pid'), `${child.pid}\n`)
      const fake = fakeTincd(join(dir, 'tinc.log'))
      // The real /proc check, not an injected one: the child's comm is "node" (or whatever the binary is called).
      const comm = readFileSync(`/proc/${child.pid}/comm`, 'utf8').trim()
      assert.notEqual(comm, 'tincd')
      const r = await dumpReader({ logFile: join(dir, 'tinc.log'), pidFile: join(dir, 'tinc.pid'), signal: fake.signal })()
      assert.equal(r.state, 'down')
      assert.equal(r.state === 'down' && r.reason, `pid ${child.pid} is "${comm}", not tincd`)
      assert.deepEqual(fake.calls, [])
      assert.equal(child.exitCode, null, 'the child must not have been signalled')
    } finally {
      child.kill()
    }
  })
})

test('a signal that fails (the process just exited) reports down', async () => {
  await withDir(async (dir) => {
    await writeFile(join(dir, 'tinc.pid'), '4242\n')
    const r = await dumpReader({
      logFile: join(dir, 'tinc.log'),
      pidFile: join(dir, 'tinc.pid'),
      comm: () => 'tincd',
      signal: () => {
        throw Object.assign(new Error('kill ESRCH'), { code: 'ESRCH' })
      },
    })()
    assert.deepEqual(r, { state: 'down', reason: 'cannot signal tincd 4242: ESRCH' })
  })
})

test('the reader signals USR2 and USR1, reads only what tincd wrote after that, shares and caches reads', async () => {
  await withDir(async (dir) => {
    const logFile = join(dir, 'tinc.log')
    const pidFile = join(dir, 'tinc.pid')
    // An old dump already in the log must not be mistaken for the answer.
    await writeFile(logFile, OLD_DUMP)
    await writeFile(pidFile, '4242\n')
    const fake = fakeTincd(logFile)
    const opts: DumpReaderOptions = { logFile, pidFile, signal: fake.signal, comm: (pid) => (pid === 4242 ? 'tincd' : undefined), minIntervalMs: 300 }
    const read = dumpReader(opts)

    const [r1, r2] = await Promise.all([read(), read()])
    assert.equal(r1, r2, 'concurrent calls share one read')
    assert.deepEqual(fake.calls, ['4242 SIGUSR2', '4242 SIGUSR1'])
    assert.equal(r1.state, 'up')
    if (r1.state !== 'up') return
    assert.equal(r1.pid, 4242)
    assert.equal(r1.dump.skipped, 0)
    assert.equal(r1.dump.bytesIn, 738)
    assert.deepEqual(
      r1.dump.nodes?.map((n) => n.name),
      ['a', 'b', 'c', 'd'],
    )
    assert.deepEqual(r1.dump.subnets?.length, 4)
    assert.deepEqual(
      r1.dump.connections?.map((c) => c.name),
      ['c'],
    )
    assert.deepEqual(r1.dump.at, new Date(2026, 10, 22, 9, 0, 0))

    const r3 = await read()
    assert.equal(r3, r1, 'a call right after is served from cache')
    assert.equal(fake.reads(), 1)

    await new Promise((r) => setTimeout(r, 350))
    const r4 = await read()
    assert.equal(fake.reads(), 2, 'after minIntervalMs the reader signals again')
    assert.notEqual(r4, r1)
    assert.equal(r4.state, 'up')
    assert.equal(r4.state === 'up' && r4.dump.connections?.length, 1)
  })
})

test("USR1 goes out only after USR2's dump has ended, and other signals to that tincd wait for both", async () => {
  await withDir(async (dir) => {
    const logFile = join(dir, 'tinc.log')
    const pidFile = join(dir, 'tinc.pid')
    await writeFile(pidFile, '4242\n')
    const calls: string[] = []
    let hup: Promise<void> | undefined
    const signal = (_pid: number, sig: NodeJS.Signals) => {
      // A reload queued while the dump is under way.
      hup ??= inTincdLane(pidFile, async () => void calls.push('SIGHUP'))
      // What tinc 1.0 can't survive: a signal arriving while its handler is still writing a dump.
      const log = existsSync(logFile) ? readFileSync(logFile, 'utf8') : ''
      calls.push(`${sig} ${sig === 'SIGUSR1' ? log.includes('End of subnet list.') : ''}`.trim())
      if (sig === 'SIGUSR1') setTimeout(() => appendFileSync(logFile, logged('10:00:02', USR1)), 10)
      else {
        // USR2's answer arrives in two pieces, the first cut mid-line.
        const text = logged('10:00:01', USR2)
        const cut = text.indexOf('owner c') + 3
        setTimeout(() => appendFileSync(logFile, text.slice(0, cut)), 60)
        setTimeout(() => appendFileSync(logFile, text.slice(cut)), 150)
      }
    }
    // No log file exists yet: tincd may create it on the first write.
    const r = await dumpReader({ logFile, pidFile, signal, comm: () => 'tincd' })()
    await hup
    assert.deepEqual(calls, ['SIGUSR2', 'SIGUSR1 true', 'SIGHUP'])
    assert.equal(r.state, 'up')
    assert.equal(r.state === 'up' && r.dump.skipped, 0)
    assert.deepEqual(r.state === 'up' && r.dump.subnets?.map((s) => s.owner), ['c', 'a', 'b', '(broadcast)'])
    assert.deepEqual(r.state === 'up' && r.dump.at, new Date(2026, 10, 22, 10, 0, 2))
  })
})

test('a tincd that writes nothing, or only half, gives timeout after timeoutMs', async () => {
  await withDir(async (dir) => {
    const logFile = join(dir, 'tinc.log')
    const pidFile = join(dir, 'tinc.pid')
    await writeFile(logFile, OLD_DUMP)
    await writeFile(pidFile, '4242\n')
    let signals = 0
    const silent = dumpReader({ logFile, pidFile, comm: () => 'tincd', signal: () => void signals++, timeoutMs: 200 })
    const t0 = performance.now()
    const r = await silent()
    const took = performance.now() - t0
    assert.equal(r.state, 'timeout')
    assert.equal(r.state === 'timeout' && r.dump, undefined, 'the old dump before the offset is not returned')
    assert.ok(took >= 190, `gave up after ${took} ms, before timeoutMs`)
    assert.equal(signals, 1, 'USR1 is not sent while USR2 is unanswered')

    const half = fakeTincd(logFile, { usr1: ['Connections:', ' c at 198.18.0.3 port 655 options c socket 9 status 01c2 outbuf 1042/0/0'] })
    const r2 = await dumpReader({ logFile, pidFile, comm: () => 'tincd', signal: half.signal, timeoutMs: 200 })()
    assert.equal(r2.state, 'timeout')
    if (r2.state !== 'timeout') return
    assert.match(r2.reason, /within 200 ms/)
    assert.deepEqual(
      r2.dump?.nodes?.map((n) => n.name),
      ['a', 'b', 'c', 'd'],
      'what did arrive is handed back',
    )
    assert.equal(r2.dump?.connections, undefined)
  })
})
