/* eslint-disable no-console -- a benchmark prints its figures */
// npm run bench:dns -- [--rounds 3] [--seconds 5] [--workers auto|N] [--names 1000] [--no-consul]
//
// Three servers answer the same N names, all on 127.0.0.1: ours (src/dns), dnsmasq
// from a hosts file as the reference, and Consul's own DNS interface with the
// names registered as catalog nodes. dnsperf loads each one flat out, in
// interleaved rounds because this VM is noisy (the median q/s counts), and then
// once more at a fixed rate every one of them can sustain, for average and p99
// latency per query.
//
// Target: tinc-consul answers >= 0.6 x dnsmasq's q/s and loses no query.
import { spawn, type ChildProcess } from 'node:child_process'
import { createSocket } from 'node:dgram'
import { existsSync } from 'node:fs'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { availableParallelism, tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'
import { pino } from 'pino'
import { createConsulClient } from '../src/consul/client.ts'
import { startDnsServer } from '../src/dns/server.ts'
import { buildQuery, decodeMessage, rcodeName, TYPE, type DecodedMessage } from '../src/dns/wire.ts'
import { startDevConsul } from '../src/lab/dev-consul.ts'
import { which } from '../src/util/exec.ts'

const USAGE = 'usage: npm run bench:dns -- [--rounds 1..100] [--seconds 1..600] [--workers auto|0..16] [--names 8..65024] [--no-consul]'
const TARGET = 0.6
/** The fixed-rate run never asks for more than this, whatever the servers manage flat out. */
const MAX_RATE = 20_000

function usage(msg: string): never {
  console.error(`bench:dns: ${msg}\n${USAGE}`)
  process.exit(2)
}

function wholeNumber(flag: string, raw: string, min: number, max: number): number {
  const n = Number(raw)
  if (!/^\d+$/.test(raw) || n < min || n > max) usage(`--${flag} must be a whole number from ${min} to ${max}, not ${JSON.stringify(raw)}`)
  return n
}

function flags() {
  try {
    return parseArgs({
      options: {
        rounds: { type: 'string', default: '3' },
        seconds: { type: 'string', default: '5' },
        workers: { type: 'string', default: 'auto' },
        names: { type: 'string', default: '1000' },
        'no-consul': { type: 'boolean', default: false },
      },
    }).values
  } catch (err) {
    usage((err as Error).message)
  }
}
const values = flags()
const ROUNDS = wholeNumber('rounds', values.rounds, 1, 100)
const SECONDS = wholeNumber('seconds', values.seconds, 1, 600)
const WORKERS = values.workers === 'auto' ? 'auto' : wholeNumber('workers', values.workers, 0, 16)
// node7 is the name every server is checked with; 10.200.0.0/16 without .0 and .255 holds 256 x 254.
const NAMES = wholeNumber('names', values.names, 8, 256 * 254)
const CONSUL = !values['no-consul']

/** nodeI's address: 10.200.0.1, …, 10.200.0.254, 10.200.1.1, … */
const addressOf = (i: number) => `10.200.${Math.floor(i / 254)}.${(i % 254) + 1}`
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b)
  const mid = Math.floor(s.length / 2)
  return s.length % 2 ? (s[mid] ?? NaN) : ((s[mid - 1] ?? NaN) + (s[mid] ?? NaN)) / 2
}
const quantile = (sorted: Float64Array, q: number) => sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)] ?? NaN

// Everything started is stopped by one idempotent cleanup: from `finally`, and on SIGINT/SIGTERM.
const cleanups: Array<() => Promise<void>> = []
const dnsperfs = new Set<ChildProcess>()
let stopping = false
let cleaning: Promise<void> | undefined
function cleanup(): Promise<void> {
  stopping = true
  cleaning ??= (async () => {
    for (const child of dnsperfs) child.kill('SIGTERM')
    for (const stop of cleanups.reverse()) await stop().catch((err: unknown) => console.error(`bench:dns: cleanup: ${(err as Error).message}`))
  })()
  return cleaning
}
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => void cleanup().finally(() => process.exit(130)))

async function findTool(name: string, also: string[] = []): Promise<string> {
  const path = (await which(name)) ?? also.find((p) => existsSync(p))
  if (!path) throw new Error(`${name} not found; run \`npm run provision\``)
  return path
}

/** A port free for both UDP and TCP on 127.0.0.1, as dnsmasq binds both. */
async function freePort(): Promise<number> {
  for (;;) {
    const port = await new Promise<number>((resolve, reject) => {
      const s = createServer()
      s.once('error', reject)
      s.listen(0, '127.0.0.1', () => {
        const p = (s.address() as { port: number }).port
        s.close(() => resolve(p))
      })
    })
    const udp = createSocket('udp4')
    const ok = await new Promise<boolean>((resolve) => {
      udp.once('error', () => resolve(false))
      udp.bind(port, '127.0.0.1', () => resolve(true))
    })
    await new Promise<void>((resolve) => udp.close(() => resolve()))
    if (ok) return port
  }
}

/** One A query over UDP; undefined if nothing answers in time. */
async function ask(port: number, name: string, timeoutMs: number): Promise<DecodedMessage | undefined> {
  const sock = createSocket('udp4')
  const id = Math.floor(Math.random() * 0x10000)
  try {
    return await new Promise<DecodedMessage | undefined>((resolve, reject) => {
      const timer = setTimeout(() => resolve(undefined), timeoutMs)
      sock.once('error', reject)
      sock.on('message', (msg) => {
        const m = decodeMessage(msg)
        if (m.id !== id) return
        clearTimeout(timer)
        resolve(m)
      })
      sock.send(buildQuery(name, TYPE.A, { id }), port, '127.0.0.1')
    })
  } finally {
    sock.close()
  }
}

async function waitForAnswer(label: string, port: number, name: string, dead: () => string | undefined): Promise<void> {
  const deadline = Date.now() + 15_000
  while (Date.now() < deadline) {
    const why = dead()
    if (why) throw new Error(`${label}: ${why}`)
    if (await ask(port, name, 200)) return
  }
  throw new Error(`${label} did not answer ${name} on 127.0.0.1 port ${port} within 15 s`)
}

async function checkAnswer(label: string, port: number, name: string, expected: string): Promise<void> {
  const m = await ask(port, name, 2000)
  if (!m) throw new Error(`${label} did not answer ${name} (port ${port})`)
  const got = m.answer.filter((rr) => rr.type === TYPE.A).map((rr) => rr.data)
  if (m.rcode !== 0 || got.length !== 1 || got[0] !== expected) {
    throw new Error(`${label} answered ${name} with ${rcodeName(m.rcode)} [${got.join(', ')}]; expected ${expected}`)
  }
}

async function startDnsmasq(bin: string, hostsFile: string): Promise<number> {
  const port = await freePort()
  const args = [
    '-k',
    `--port=${port}`,
    '--listen-address=127.0.0.1',
    '--bind-interfaces',
    '--no-resolv',
    '--no-hosts',
    `--addn-hosts=${hostsFile}`,
    '--conf-file=/dev/null',
    '--pid-file=',
    '--local=/mesh/',
    '--log-facility=/dev/null',
  ]
  // As root dnsmasq would drop to "nobody", who may not read the hosts file in our temp dir.
  if (process.getuid?.() === 0) args.push('--user=root')
  const child = spawn(bin, args, { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  let exited: string | undefined
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const gone = new Promise<void>((resolve) => {
    child.once('error', (err) => {
      exited = `cannot run ${bin}: ${err.message}`
      resolve()
    })
    child.once('exit', (code, signal) => {
      exited ??= `dnsmasq exited (${signal ?? `code ${code}`}): ${stderr.trim()}`
      resolve()
    })
  })
  cleanups.push(async () => {
    if (!exited) child.kill('SIGTERM')
    await gone
  })
  await waitForAnswer('dnsmasq', port, 'node0.mesh', () => exited)
  return port
}

/** Registers nodeI at addressOf(i) in the catalog, a few requests at a time. */
async function registerNodes(url: string, count: number): Promise<void> {
  const client = createConsulClient({ url })
  let next = 0
  const worker = async () => {
    while (next < count && !stopping) {
      const i = next++
      await client.request('PUT', '/v1/catalog/register', { Node: `node${i}`, Address: addressOf(i) })
    }
  }
  await Promise.all(Array.from({ length: 20 }, worker))
}

interface Run {
  qps: number
  lost: number
  avgMs: number
}

/**
 * Runs dnsperf and parses its summary. With `perQuery`, the `-v` lines
 * ("> NOERROR node0.mesh A 0.000298", "> T node0.mesh A" for a timeout) go
 * there one at a time instead: a run can print hundreds of thousands.
 */
async function dnsperf(bin: string, port: number, file: string, seconds: number, extra: string[], perQuery?: (fields: string[]) => void): Promise<Run> {
  if (stopping) throw new Error('interrupted')
  const args = ['-s', '127.0.0.1', '-p', String(port), '-d', file, '-c', '4', '-l', String(seconds), ...extra]
  const child = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  dnsperfs.add(child)
  let stderr = ''
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const closed = new Promise<number | null>((resolve, reject) => {
    child.once('error', reject)
    child.once('close', (code) => resolve(code))
  })
  closed.catch(() => undefined) // awaited below; this only keeps an early failure from being "unhandled"
  let summary = ''
  try {
    for await (const line of createInterface({ input: child.stdout, crlfDelay: Infinity })) {
      if (perQuery && line.startsWith('> ')) perQuery(line.split(' '))
      else summary += `${line}\n`
    }
    const code = await closed
    if (stopping) throw new Error('interrupted')
    if (code !== 0) throw new Error(`dnsperf ${args.join(' ')} failed (exit ${code}): ${stderr.trim() || summary.trim()}`)
  } finally {
    dnsperfs.delete(child)
  }
  const num = (re: RegExp) => {
    const m = re.exec(summary)?.[1]
    if (m === undefined) throw new Error(`no "${re.source}" in dnsperf's output:\n${summary}`)
    return Number(m)
  }
  return { qps: num(/Queries per second:\s+([\d.]+)/), lost: num(/Queries lost:\s+(\d+)/), avgMs: num(/Average Latency \(s\):\s+([\d.]+)/) * 1000 }
}

interface FixedRate {
  avgMs: number
  p99Ms: number
  lost: number
  /** Responses other than NOERROR, by code. */
  others: Map<string, number>
}

async function fixedRate(bin: string, port: number, file: string, rate: number): Promise<FixedRate> {
  let latencies = new Float64Array(rate * SECONDS + 1024)
  let n = 0
  const others = new Map<string, number>()
  const run = await dnsperf(bin, port, file, SECONDS, ['-Q', String(rate), '-v'], (f) => {
    const code = f[1] ?? '?'
    if (code === 'T') return // a timeout: counted in dnsperf's "Queries lost"
    if (code !== 'NOERROR') others.set(code, (others.get(code) ?? 0) + 1)
    if (n === latencies.length) {
      const bigger = new Float64Array(n * 2)
      bigger.set(latencies)
      latencies = bigger
    }
    latencies[n++] = Number(f[f.length - 1]) * 1000
  })
  const sorted = latencies.subarray(0, n).sort()
  let sum = 0
  for (const x of sorted) sum += x
  return { avgMs: sum / n, p99Ms: quantile(sorted, 0.99), lost: run.lost, others }
}

interface Server {
  label: string
  port: number
  file: string
  rounds: Run[]
  fixed?: FixedRate
}

async function main(): Promise<void> {
  const dnsmasqBin = await findTool('dnsmasq', ['/usr/sbin/dnsmasq', '/usr/local/sbin/dnsmasq'])
  const dnsperfBin = await findTool('dnsperf')
  const dir = await mkdtemp(join(tmpdir(), 'tc-bench-dns-'))
  cleanups.push(() => rm(dir, { recursive: true, force: true }))

  const ids = Array.from({ length: NAMES }, (_, i) => i)
  const meshQueries = join(dir, 'mesh.queries')
  const consulQueries = join(dir, 'consul.queries')
  const hostsFile = join(dir, 'hosts')
  await writeFile(meshQueries, ids.map((i) => `node${i}.mesh A\n`).join(''))
  await writeFile(consulQueries, ids.map((i) => `node${i}.node.consul A\n`).join(''))
  await writeFile(hostsFile, ids.map((i) => `${addressOf(i)} node${i}.mesh\n`).join(''))
  const servers: Server[] = []

  process.stderr.write('starting dnsmasq…\n')
  servers.push({ label: 'dnsmasq', port: await startDnsmasq(dnsmasqBin, hostsFile), file: meshQueries, rounds: [] })

  process.stderr.write('starting tinc-consul DNS…\n')
  const ours = await startDnsServer({ hosts: ['127.0.0.1'], port: 0, workers: WORKERS, log: pino({ level: process.env.BENCH_LOG_LEVEL ?? 'silent' }) })
  cleanups.push(() => ours.close())
  const nodes = ids.map((i) => ({ name: `node${i}`, address: addressOf(i), public: false, fingerprint: `sha256:${'a'.repeat(64)}` }))
  ours.update({ domain: 'mesh', cidr: '10.200.0.0/16', self: 'node0', nodes, ttl: { node: 30, service: 5, negative: 5 }, serial: 1 })
  servers.push({ label: 'tinc-consul', port: ours.port, file: meshQueries, rounds: [] })

  if (CONSUL) {
    process.stderr.write(`starting a dev Consul agent and registering ${NAMES} nodes…\n`)
    const consul = await startDevConsul()
    cleanups.push(() => consul.stop())
    await registerNodes(consul.url, NAMES)
    servers.push({ label: 'consul', port: consul.dnsPort, file: consulQueries, rounds: [] })
  }

  for (const s of servers) await checkAnswer(s.label, s.port, s.label === 'consul' ? 'node7.node.consul' : 'node7.mesh', addressOf(7))

  // A short warm-up each: our helper processes take a moment to boot and pick up the socket.
  process.stderr.write('warming up…\n')
  for (const s of servers) await dnsperf(dnsperfBin, s.port, s.file, 1, [])
  for (let r = 1; r <= ROUNDS; r++) {
    for (const s of servers) {
      process.stderr.write(`round ${r}/${ROUNDS}: ${s.label}…\n`)
      s.rounds.push(await dnsperf(dnsperfBin, s.port, s.file, SECONDS, []))
    }
  }
  const qps = new Map(servers.map((s) => [s, median(s.rounds.map((x) => x.qps))]))
  const rate = Math.min(MAX_RATE, Math.floor(0.5 * Math.min(...qps.values())))
  if (rate < 1) throw new Error(`a server answered almost nothing flat out (${servers.map((s) => `${s.label} ${Math.round(qps.get(s) ?? 0)} q/s`).join(', ')})`)
  for (const s of servers) {
    process.stderr.write(`${rate} q/s for ${SECONDS} s: ${s.label}…\n`)
    s.fixed = await fixedRate(dnsperfBin, s.port, s.file, rate)
  }

  const ref = qps.get(servers[0] as Server) ?? NaN
  const table = [['server', 'q/s (median)', 'lost', 'avg ms flat out', `avg / p99 ms at ${rate} q/s`, `lost / not NOERROR at ${rate} q/s`, 'x dnsmasq']]
  for (const s of servers) {
    const f = s.fixed as FixedRate
    const bad = [...f.others].map(([code, count]) => `${code} ${count}`).join(', ') || '0'
    const lost = s.rounds.reduce((a, x) => a + x.lost, 0)
    table.push([
      s.label,
      (qps.get(s) ?? NaN).toFixed(0),
      String(lost),
      median(s.rounds.map((x) => x.avgMs)).toFixed(3),
      `${f.avgMs.toFixed(3)} / ${f.p99Ms.toFixed(3)}`,
      `${f.lost} / ${bad}`,
      ((qps.get(s) ?? NaN) / ref).toFixed(2),
    ])
  }
  const widths = (table[0] ?? []).map((_, i) => Math.max(...table.map((r) => (r[i] ?? '').length)))
  console.log(`dns: ${NAMES} names, ${ROUNDS} interleaved rounds of ${SECONDS} s flat out (dnsperf -c 4) per server, then ${SECONDS} s each at ${rate} q/s; all on 127.0.0.1`)
  for (const r of table) console.log(r.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join('   '))
  const mine = servers[1] as Server
  const ratio = (qps.get(mine) ?? NaN) / ref
  const lostOurs = mine.rounds.reduce((a, x) => a + x.lost, 0) + (mine.fixed?.lost ?? 0)
  console.log(`DNS helper processes: ${ours.workers} (--workers ${WORKERS}); os.availableParallelism() = ${availableParallelism()}`)
  console.log(`target: tinc-consul >= ${TARGET} x dnsmasq q/s with 0 lost: ${ratio >= TARGET && lostOurs === 0 ? 'MET' : 'NOT MET'} (ratio ${ratio.toFixed(2)}${lostOurs ? `, ${lostOurs} lost` : ''})`)
}

try {
  await main()
} catch (err) {
  if (!stopping) {
    console.error(`bench:dns: ${(err as Error).message}`)
    process.exitCode = 1
  }
} finally {
  await cleanup()
}
