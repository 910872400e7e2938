/* eslint-disable no-console -- a benchmark prints its figures */
// npm run bench:scale -- [--sizes 100,250,500,1000] [--daemons 50] [--rounds 20] [--settle 60] [--storm 200] [--no-reference] [--json]
//
// How the daemon scales with the number of records in a network. For each size:
//
// - Propagation, bytes and blocking requests: --daemons sidecars in this process (sharing a real
//   local dev Consul agent, each with its own temp tinc dir) watch a network of that many
//   synthetic records, written straight into Consul. Each round changes one record through
//   publishRecord (the writer daemons use) and measures, for every daemon, the time from the write
//   until that daemon has written the new host file, and the body bytes it read from Consul
//   between this change and the next. Blocking requests are counted where they are made: every
//   HTTP request this process has in flight to the agent with `?index=` (Consul's blocking query),
//   divided by the number of daemons.
// - Memory and start from cache: one compiled daemon (`node dist/cli/main.js run`, what users run)
//   is started against the same number of records; once it has written every host file and
//   --settle seconds have passed (while the in-process fleets are measured), the resident memory of
//   its main process is read from /proc. It is stopped (which writes its cache) and started again
//   with Consul pointing at a closed port, and the time from spawn to its first DNS answer for one
//   of the records is the start-from-cache time.
//
// The same run measures the naive watch (`--nodes-watch recurse`: every daemon re-reads all of
// nodes/ on each change) as the reference, on a network of its own.
//
// At the largest size, a daemon is also restarted against an agent with Consul's default
// per-client connection limit (200), with no host files and no cache left, counting the 429s it
// gets. Last, a rejoin storm: --storm daemons publishing their records at the same moment into
// one network, counting the transactions and the change log's check-and-set retries. (The change log is
// the change log at `<prefix>changes`, src/mesh/change-log.ts.)
import { generateKeyPair } from 'node:crypto'
import { spawn, type ChildProcess } from 'node:child_process'
import diagnostics from 'node:diagnostics_channel'
import { Resolver } from 'node:dns/promises'
import { readFileSync } from 'node:fs'
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises'
import type { ClientRequest } from 'node:http'
import { availableParallelism, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs, promisify } from 'node:util'
import { pino } from 'pino'
import { b64, createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { freePort, startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { cachePath } from '../src/mesh/cache.ts'
import { kvLayout, type KvLayout } from '../src/mesh/kv-layout.ts'
import { createNetwork } from '../src/mesh/network.ts'
import { buildOwnRecord, makeRecord, publishRecord } from '../src/mesh/publish.ts'
import type { NetworkRecord, NodeRecord } from '../src/mesh/record.ts'
import { startSync, type SyncDaemon } from '../src/mesh/sync.ts'

const { values } = parseArgs({
  options: {
    sizes: { type: 'string', default: '100,250,500,1000' },
    daemons: { type: 'string', default: '50' },
    rounds: { type: 'string', default: '20' },
    settle: { type: 'string', default: '60' },
    storm: { type: 'string', default: '200' },
    'no-reference': { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
  },
})
const SIZES = values.sizes.split(',').map(Number)
const DAEMONS = Number(values.daemons)
const ROUNDS = Number(values.rounds)
const SETTLE_S = Number(values.settle)
const STORM = Number(values.storm)
const MODES: Mode[] = values['no-reference'] ? ['feed'] : ['feed', 'recurse']
if (!SIZES.length || SIZES.some((s) => !(s >= 1 && s <= 10_000)) || !(DAEMONS >= 1 && DAEMONS <= 250) || !(ROUNDS >= 1) || !(SETTLE_S >= 0) || !(STORM >= 0 && STORM <= 1000))
  throw new Error('usage: --sizes n,n,… (1..10000) --daemons 1..250 --rounds >=1 --settle >=0 --storm 0..1000')

type Mode = 'feed' | 'recurse'
const LABEL: Record<Mode, string> = { feed: 'change feed', recurse: 'ref: ?recurse' }
/** The targets, at 1,000 records with 50 daemons watching. */
const TARGET = { bytesPerChange: 8192, blockingPerDaemon: 8, p99Ms: 1000, rssMb: 80, cacheStartMs: 2000, restartMs: 2000 }
/** Starts from cache per figure (the median is printed). */
const CACHE_STARTS = 5
const DIST_MAIN = join(import.meta.dirname, '..', 'dist', 'cli', 'main.js')
const NETWORK: NetworkRecord = { v: 1, cidr: '10.200.0.0/16', domain: 'mesh', createdAt: new Date().toISOString() }
// With --json, stdout carries the JSON array only; the table and progress go to stderr.
const say = (line: string) => (values.json ? process.stderr.write(`${line}\n`) : console.log(line))
const note = (line: string) => process.stderr.write(`${line}\n`)
const log = pino({ level: process.env.BENCH_LOG_LEVEL ?? 'silent' })
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))
const quantile = (xs: number[], q: number) => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))] ?? NaN
}

async function until<T>(what: string, fn: () => T | undefined | Promise<T | undefined>, timeoutMs: number, everyMs = 20): Promise<T> {
  const end = performance.now() + timeoutMs
  for (;;) {
    const v = await fn()
    if (v !== undefined) return v
    if (performance.now() > end) throw new Error(`gave up after ${timeoutMs} ms waiting for ${what}`)
    await sleep(everyMs)
  }
}

/** What is torn down on the way out, also on Ctrl-C: the agents, the daemons, the temp dirs. */
const cleanups = new Set<() => Promise<unknown>>()
for (const signal of ['SIGINT', 'SIGTERM'] as const)
  process.once(signal, () => {
    note(`${signal}: cleaning up`)
    void Promise.allSettled([...cleanups].map((c) => c())).finally(() => process.exit(130))
  })

/**
 * A dev agent of its own for each part. Consul keeps counting a blocking query's connection
 * against the per-client limit until the query's wait ends, even after the client hung up
 * (hashicorp/consul#8524): on an agent shared by every part, the daemons of one part that was
 * stopped would take up to 5 minutes of the next part's connections.
 */
async function withConsul<T>(maxConnsPerClient: number | undefined, fn: (consul: DevConsul) => Promise<T>): Promise<T> {
  const consul = await startDevConsul(maxConnsPerClient ? { maxConnsPerClient } : {})
  cleanups.add(consul.stop)
  try {
    return await fn(consul)
  } finally {
    cleanups.delete(consul.stop)
    await consul.stop()
  }
}

// ---- synthetic records ----------------------------------------------------------------------

interface Key {
  pem: string
}

/** One key per daemon, per record (the same records at every size), the compiled daemon's, and the storm's. */
interface Keys {
  daemons: Key[]
  records: Key[]
  probe: Key
  storm: Key[]
}

/** Distinct keys (a record's fingerprint is its identity), 1024-bit: small keys are fine here. Made on libuv's threads. */
async function makeKeys(n: number): Promise<Key[]> {
  const gen = promisify(generateKeyPair)
  const one = async (): Promise<Key> => {
    const { publicKey } = await gen('rsa', { modulusLength: 1024, publicKeyEncoding: { type: 'pkcs1', format: 'pem' }, privateKeyEncoding: { type: 'pkcs1', format: 'pem' } })
    return { pem: publicKey.trim() }
  }
  const keys: Key[] = []
  while (keys.length < n) keys.push(...(await Promise.all(Array.from({ length: Math.min(32, n - keys.length) }, one))))
  return keys
}

// Address plan inside 10.200.0.0/16: daemons from .0.x, storm nodes from .8.x, the compiled daemon at .12.1, records from .16.x.
const ip = (base: number, i: number) => `10.200.${base + Math.floor(i / 250)}.${(i % 250) + 1}`
const daemonIp = (i: number) => ip(0, i)
const stormIp = (i: number) => ip(8, i)
const PROBE_IP = '10.200.12.1'
const recordIp = (i: number) => ip(16, i)

function record(name: string, vpnAddress: string, key: Key, weight = 0): NodeRecord {
  const [, , c, d] = vpnAddress.split('.')
  // The Weight option is what a change changes: a new host file, nothing else.
  return makeRecord({ name, vpnAddress, addresses: [`198.18.${c}.${d}`], port: 655, options: weight ? [{ key: 'Weight', value: String(weight) }] : [], publicKey: key.pem })
}

/** Straight into Consul, 64 keys a transaction (Consul's most): no change-log entry, as a hand-made or older writer would leave. */
async function seed(client: ConsulClient, layout: KvLayout, records: NodeRecord[]): Promise<void> {
  await createNetwork(client, layout, NETWORK)
  for (let i = 0; i < records.length; i += 64) {
    const res = await client.txn(records.slice(i, i + 64).map((r) => ({ KV: { Verb: 'set', Key: layout.node(r.name), Value: b64(JSON.stringify(r)) } })))
    if (!res.ok) throw new Error(`seeding ${layout.prefix} failed: ${JSON.stringify(res.errors)}`)
  }
}

const tincHost = (vpnAddress: string, key: Key) => {
  const [, , c, d] = vpnAddress.split('.')
  return `Address = 198.18.${c}.${d}\nPort = 655\nSubnet = ${vpnAddress}/32\n${key.pem}\n`
}

async function makeTincDir(dir: string, name: string, vpnAddress: string, key: Key): Promise<void> {
  await mkdir(join(dir, 'hosts'), { recursive: true })
  await writeFile(join(dir, 'tinc.conf'), `Name = ${name}\nStrictSubnets = yes\n`)
  await writeFile(join(dir, 'hosts', name), tincHost(vpnAddress, key))
}

// ---- blocking requests in flight ---------------------------------------------------------------

/**
 * Every HTTP request this process has in flight to the agent, as node:http reports them
 * (diagnostics_channel), and which of them are blocking queries (they carry `index=`). Counting
 * requests, not sockets: an idle keep-alive socket holds no query, and a query is what the agent
 * holds a connection and a goroutine for. A request leaves the set on 'close': answered, aborted
 * or its socket gone.
 */
function inflightTracker() {
  const blocking = new Set<ClientRequest>()
  let peak = 0
  let agent = ''
  diagnostics.subscribe('http.client.request.start', (message) => {
    const req = (message as { request: ClientRequest }).request
    if (req.getHeader('host') !== agent || !/[?&]index=/.test(req.path)) return
    blocking.add(req)
    peak = Math.max(peak, blocking.size)
    req.once('close', () => blocking.delete(req))
  })
  return {
    /** Count the requests to this agent from now on. */
    follow: (url: string) => void (agent = new URL(url).host),
    /** The most at once since the last call. */
    takePeak: () => {
      const p = peak
      peak = blocking.size
      return p
    },
  }
}
type Tracker = ReturnType<typeof inflightTracker>

// ---- in-process daemons: propagation, bytes, blocking requests -----------------------------------

interface FleetFigures {
  bytesPerChange: number
  /** Median over the changes of the first daemon's latency: one daemon's own, without queueing behind the others in this process. */
  fastest: number
  /** Median over the changes of this process's CPU time per daemon. */
  cpuMs: number
  p50: number
  p99: number
  max: number
  blockingPerDaemon: number
}

interface Fleet {
  daemons: SyncDaemon[]
  /** Called with every apply, with the daemon's index. */
  listeners: Set<(written: string[], i: number) => void>
  stop(): Promise<void>
}

/** The daemons' tinc dirs, and the records they will publish: seeded with the rest, so no daemon's start wakes the others. */
async function fleetNodes(root: string, net: string, keys: Key[]): Promise<Array<{ dir: string; own: NodeRecord }>> {
  const nodes: Array<{ dir: string; own: NodeRecord }> = []
  for (const [i, key] of keys.entries()) {
    const dir = join(root, net, `n${i}`)
    await makeTincDir(dir, `n${i}`, daemonIp(i), key)
    nodes.push({ dir, own: await buildOwnRecord(dir, `n${i}`) })
  }
  return nodes
}

async function startFleet(p: { consul: DevConsul; net: string; mode: Mode; dirs: string[]; expect: number }): Promise<Fleet> {
  const listeners = new Set<(written: string[], i: number) => void>()
  const seen = p.dirs.map(() => new Set<string>())
  const daemons: SyncDaemon[] = []
  const fleet = { daemons, listeners, stop: async () => void (await Promise.all(daemons.map((d) => d.stop()))) }
  try {
    for (const [i, dir] of p.dirs.entries()) {
      const daemon = await startSync({
        net: p.net,
        tincDir: dir,
        stateDir: join(dir, 'state'),
        pidFile: join(dir, 'none.pid'),
        consulUrl: p.consul.url,
        nodesWatch: p.mode,
        log,
        onApplied: (e) => {
          for (const n of e.render.written) seen[i]?.add(n)
          for (const l of listeners) l(e.render.written, i)
        },
      })
      daemons.push(daemon)
    }
    // Ready: every daemon has written every record's file and every other daemon's.
    await until(`${p.net}: every daemon to write ${p.expect} host files`, () => (seen.every((s) => s.size >= p.expect) ? true : undefined), 300_000, 100)
    // Then quiet: a second without an apply anywhere.
    let last = performance.now()
    const quiet = () => (last = performance.now())
    listeners.add(quiet)
    await until(`${p.net}: a second without applies`, () => (performance.now() - last > 1000 ? true : undefined), 30_000, 100)
    listeners.delete(quiet)
    return fleet
  } catch (err) {
    await fleet.stop()
    throw err
  }
}

/** One change to `name`, through the shipped writer; resolves with each daemon's latency to writing its file. */
function change(fleet: Fleet, writer: ConsulClient, layout: KvLayout, rec: NodeRecord): Promise<number[]> {
  return new Promise((resolve, reject) => {
    const latencies: number[] = new Array<number>(DAEMONS)
    let done = 0
    const t0 = performance.now()
    const guard = setTimeout(() => {
      fleet.listeners.delete(l)
      reject(new Error(`${layout.prefix}: only ${done} of ${DAEMONS} daemons wrote ${rec.name} within 30 s (a lost wake-up)`))
    }, 30_000)
    const l = (written: string[], i: number) => {
      if (latencies[i] !== undefined || !written.includes(rec.name)) return
      latencies[i] = performance.now() - t0
      if (++done < DAEMONS) return
      clearTimeout(guard)
      fleet.listeners.delete(l)
      resolve(latencies)
    }
    fleet.listeners.add(l)
    publishRecord(writer, layout, NETWORK, rec, log).catch((err: unknown) => {
      clearTimeout(guard)
      fleet.listeners.delete(l)
      reject(err instanceof Error ? err : new Error(String(err)))
    })
  })
}

/**
 * Warm-up, then --rounds isolated changes to record r0. Bytes are each daemon's reads from one
 * change to the next; CPU is this process's from one change to the next, over the daemons (the
 * agent runs apart; the writer's share is one publish).
 */
async function rounds(fleet: Fleet, writer: ConsulClient, layout: KvLayout, key: Key): Promise<{ latencies: number[]; fastest: number[]; bytes: number[]; cpu: number[] }> {
  const latencies: number[] = []
  const fastest: number[] = []
  const bytes: number[] = []
  const cpu: number[] = []
  await change(fleet, writer, layout, record('r0', recordIp(0), key, 1000)) // warm-up: every daemon learns the change's shape
  await sleep(250)
  let before = fleet.daemons.map((d) => d.stats.bytesRead)
  let cpuBefore = process.cpuUsage()
  for (let r = 1; r <= ROUNDS; r++) {
    const each = await change(fleet, writer, layout, record('r0', recordIp(0), key, r))
    latencies.push(...each)
    fastest.push(Math.min(...each))
    // 250 ms apart: back to back, the daemons' rate limits would be what is measured. What a
    // daemon reads until the next change starts (a rate-limited full read included) is this change's.
    await sleep(250)
    const after = fleet.daemons.map((d) => d.stats.bytesRead)
    bytes.push(...after.map((b, i) => b - (before[i] ?? 0)))
    before = after
    const used = process.cpuUsage(cpuBefore)
    cpu.push((used.user + used.system) / 1000 / DAEMONS)
    cpuBefore = process.cpuUsage()
  }
  return { latencies, fastest, bytes, cpu }
}

const records = (keys: Keys, size: number) => keys.records.slice(0, size).map((k, i) => record(`r${i}`, recordIp(i), k))

/**
 * Each daemon holds 8 blocking queries and a few plain requests; on a real mesh they are on as
 * many machines. The agent's per-client limit is raised for them, far below what the open-file
 * limit (ulimit -n) allows this process and the agent.
 */
const measureFleet = (p: { tracker: Tracker; root: string; size: number; mode: Mode; keys: Keys }) => withConsul(DAEMONS * 12 + 100, (consul) => fleetOn({ ...p, consul }))

async function fleetOn(p: { consul: DevConsul; tracker: Tracker; root: string; size: number; mode: Mode; keys: Keys }): Promise<FleetFigures> {
  const net = `s${p.size}${p.mode === 'feed' ? 'f' : 'r'}`
  const layout = kvLayout(net)
  const writer = createConsulClient({ url: p.consul.url })
  const nodes = await fleetNodes(p.root, net, p.keys.daemons)
  await seed(writer, layout, [...records(p.keys, p.size), ...nodes.map((n) => n.own)])
  const started = performance.now()
  p.tracker.follow(p.consul.url)
  const fleet = await startFleet({ consul: p.consul, net, mode: p.mode, dirs: nodes.map((n) => n.dir), expect: p.size + DAEMONS - 1 })
  try {
    note(`  ${net}: ${DAEMONS} daemons (${p.mode}) have all ${p.size} records after ${((performance.now() - started) / 1000).toFixed(1)} s; ${ROUNDS} changes…`)
    p.tracker.takePeak()
    const { latencies, fastest, bytes, cpu } = await rounds(fleet, writer, layout, p.keys.records[0] as Key)
    // Blocking requests: the most in flight at once during the changes and 3 s of quiet after them.
    await sleep(3000)
    const blocking = p.tracker.takePeak()
    return {
      bytesPerChange: quantile(bytes, 0.5),
      fastest: quantile(fastest, 0.5),
      cpuMs: quantile(cpu, 0.5),
      p50: quantile(latencies, 0.5),
      p99: quantile(latencies, 0.99),
      max: Math.max(...latencies),
      blockingPerDaemon: blocking / DAEMONS,
    }
  } finally {
    await fleet.stop()
    await rm(join(p.root, net), { recursive: true, force: true })
  }
}

// ---- the compiled daemon: memory, start from cache, restart ---------------------------------------

interface Child {
  proc: ChildProcess
  output: string[]
  exited: Promise<number | null>
}
const children = new Set<ChildProcess>()
process.once('exit', () => children.forEach((c) => c.kill('SIGKILL')))

/** A 429 counter loaded into the restarted daemon only (--import): it counts answers, not log lines, which are throttled. */
const COUNT_429 = `data:text/javascript,${encodeURIComponent(
  "import dc from 'node:diagnostics_channel'; let n = 0; dc.subscribe('http.client.response.finish', (m) => { if (m.response.statusCode === 429) process.stderr.write('bench-429 ' + ++n + '\\n') })",
)}`

function spawnDaemon(args: string[], nodeArgs: string[] = []): Child {
  // Nothing of this shell's TINC_CONSUL_* settings: the daemon runs on its flags alone.
  const env: NodeJS.ProcessEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('TINC_CONSUL_')))
  const proc = spawn(process.execPath, [...nodeArgs, DIST_MAIN, 'run', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...env, TINC_CONSUL_LOG_LEVEL: 'info' } })
  children.add(proc)
  const output: string[] = []
  for (const stream of [proc.stdout, proc.stderr]) {
    let buf = ''
    stream?.setEncoding('utf8').on('data', (d: string) => {
      const lines = (buf + d).split('\n')
      buf = lines.pop() ?? ''
      output.push(...lines)
    })
  }
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)))
  void exited.then(() => children.delete(proc))
  return { proc, output, exited }
}

async function stopDaemon(c: Child, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (c.proc.exitCode === null && c.proc.signalCode === null) c.proc.kill(signal)
  const code = await Promise.race([c.exited, sleep(10_000).then(() => 'timeout' as const)])
  if (code === 'timeout') {
    c.proc.kill('SIGKILL')
    await c.exited
  }
}

interface Probe {
  dir: string
  hosts: string
  stateDir: string
  dnsPort: number
  args(consulUrl: string): string[]
}

/** A node directory for the compiled daemon; its argv points every path into `root`. */
async function probeNode(root: string, net: string, mode: Mode, key: Key): Promise<Probe> {
  const dir = join(root, `probe-${net}`)
  const tincDir = join(dir, 'tinc', net)
  await makeTincDir(tincDir, 'probe', PROBE_IP, key)
  await mkdir(join(dir, 'etc'), { recursive: true })
  const dnsPort = await freePort()
  const statusPort = await freePort()
  const stateDir = join(dir, 'state')
  const args = (consulUrl: string) => [
    ...['--net', net, '--dir', join(dir, 'tinc'), '--config-dir', join(dir, 'etc'), '--state-dir', stateDir, '--pidfile', join(dir, 'tinc.pid')],
    ...['--run-dir', join(dir, 'run'), '--tinc-log', join(dir, 'tinc.log'), '--services-dir', join(dir, 'services'), '--join-port', '0'],
    ...['--dns-port', String(dnsPort), '--status-port', String(statusPort), '--consul', consulUrl, '--nodes-watch', mode],
  ]
  return { dir, hosts: join(tincDir, 'hosts'), stateDir, dnsPort, args }
}

const allFiles = (hosts: string, names: string[]) => async () => {
  const present = new Set(await readdir(hosts).catch(() => [] as string[]))
  return names.every((n) => present.has(n)) ? true : undefined
}
const rssMb = (pid: number) => Number(/^VmRSS:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN) / 1024

/** Spawn to the first DNS answer with the record's address, polled every 10 ms. */
async function firstAnswer(c: Child, port: number, name: string, address: string): Promise<number> {
  const resolver = new Resolver({ timeout: 200, tries: 1 })
  resolver.setServers([`127.0.0.1:${port}`])
  const t0 = performance.now()
  await until(
    `an answer for ${name}`,
    async () => {
      if (c.proc.exitCode !== null) throw new Error(`the daemon exited (${c.proc.exitCode}): ${c.output.slice(-5).join('\n')}`)
      const a = await resolver.resolve4(name).catch(() => [] as string[])
      return a.includes(address) ? true : undefined
    },
    30_000,
    10,
  )
  return performance.now() - t0
}

interface Compiled {
  c: Child
  probe: Probe
  recs: NodeRecord[]
  /** When it had written every host file. */
  readyAt: number
}

/** The compiled daemon started against `size` records, once it has written every host file. */
async function startCompiled(p: { consul: DevConsul; root: string; size: number; mode: Mode; keys: Keys }): Promise<Compiled> {
  const net = `c${p.size}${p.mode === 'feed' ? 'f' : 'r'}`
  const recs = records(p.keys, p.size)
  await seed(createConsulClient({ url: p.consul.url }), kvLayout(net), recs)
  const probe = await probeNode(p.root, net, p.mode, p.keys.probe)
  const c = spawnDaemon(probe.args(p.consul.url))
  const names = recs.map((r) => r.name)
  await until(`${net}: the compiled daemon to write ${p.size} host files`, allFiles(probe.hosts, names), 120_000).catch(async (err: unknown) => {
    await stopDaemon(c)
    throw err
  })
  return { c, probe, recs, readyAt: performance.now() }
}

/** Its memory once settled; then, stopped (which writes its cache), the time from spawn to DNS answering from the cache alone. */
async function finishCompiled(x: Compiled): Promise<{ rssMb: number; cacheStartMs: number }> {
  let c = x.c
  try {
    // Start-up's garbage goes in the first minute (V8's memory reducer, as bench:idle found): what stays is the cost.
    await sleep(Math.max(0, x.readyAt + SETTLE_S * 1000 - performance.now()))
    const rss = rssMb(c.proc.pid ?? 0)
    await stopDaemon(c)
    // Consul at a closed port: only the cache can answer. The median of a few starts: one is at the mercy of the machine.
    const last = x.recs[x.recs.length - 1] as NodeRecord
    const starts: number[] = []
    for (let i = 0; i < CACHE_STARTS; i++) {
      c = spawnDaemon(x.probe.args(`http://127.0.0.1:${await freePort()}`))
      starts.push(await firstAnswer(c, x.probe.dnsPort, `${last.name}.${NETWORK.domain}`, last.vpnAddress))
      await stopDaemon(c)
    }
    return { rssMb: rss, cacheStartMs: quantile(starts, 0.5) }
  } finally {
    await stopDaemon(c)
    await rm(x.probe.dir, { recursive: true, force: true })
  }
}

interface Restart {
  records: number
  allFilesMs: number
  http429: number
  logLines429: number
}

/**
 * A daemon killed (-9) at `size` records and started again with no host files and no cache, so
 * every file comes from Consul: on an agent of its own with Consul's default per-client
 * connection limit, as a real node has.
 */
function measureRestart(root: string, size: number, keys: Keys): Promise<Restart> {
  return withConsul(undefined, async (consul) => {
    const net = 'restart'
    const recs = records(keys, size)
    await seed(createConsulClient({ url: consul.url }), kvLayout(net), recs)
    const probe = await probeNode(root, net, 'feed', keys.probe)
    const names = recs.map((r) => r.name)
    // Killed, not stopped: the agent goes on counting its blocking queries against the limit until
    // their wait ends (hashicorp/consul#8524), so the restarted daemon shares the limit with them.
    const first = spawnDaemon(probe.args(consul.url))
    await until(`${net}: the first run to write ${size} host files`, allFiles(probe.hosts, names), 120_000).finally(() => stopDaemon(first, 'SIGKILL'))
    for (const f of await readdir(probe.hosts)) if (f !== 'probe') await rm(join(probe.hosts, f))
    await rm(cachePath(probe.stateDir), { force: true })
    const c = spawnDaemon(probe.args(consul.url), ['--import', COUNT_429])
    try {
      const t0 = performance.now()
      await until(`${net}: the restarted daemon to write ${size} host files`, allFiles(probe.hosts, names), 120_000)
      const allFilesMs = performance.now() - t0
      await sleep(3000) // 429s come from the watches settling in too
      const counted = c.output.filter((l) => l.startsWith('bench-429 ')).length
      const logged = c.output.filter((l) => !l.startsWith('bench-429 ') && /HTTP 429|Too Many Requests|too many concurrent/i.test(l)).length
      return { records: size, allFilesMs, http429: counted, logLines429: logged }
    } finally {
      await stopDaemon(c)
    }
  })
}

// ---- rejoin storm ------------------------------------------------------------------------------

interface Storm {
  daemons: number
  written: number
  unchanged: number
  failed: number
  txnAttempts: number
  logRetries: number
  /** Records written without the change log (its attempts ran out): every daemon reads all records once for each. Null when the writer didn't say. */
  unlogged: number | null
  wallMs: number
}

/** `records` published at the same moment, each by its own client, as daemons starting together do. */
async function publishAll(url: string, layout: KvLayout, records: NodeRecord[]): Promise<Storm> {
  const clients = records.map(() => createConsulClient({ url }))
  // publishRecord says whether the change log went with the record only in its log line.
  let said = 0
  let unlogged = 0
  const counting = pino(
    { level: 'info' },
    {
      write: (line: string) => {
        const l = JSON.parse(line) as { msg?: string; logged?: boolean }
        if (l.msg !== 'published our record') return
        said++
        if (l.logged === false) unlogged++
      },
    },
  )
  const t0 = performance.now()
  const results = await Promise.allSettled(records.map((r, i) => publishRecord(clients[i] as ConsulClient, layout, NETWORK, r, counting)))
  const wallMs = performance.now() - t0
  const ok = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []))
  return {
    daemons: records.length,
    written: ok.filter((r) => r.outcome === 'written').length,
    unchanged: ok.filter((r) => r.outcome === 'unchanged').length,
    failed: results.length - ok.length,
    txnAttempts: ok.reduce((a, r) => a + r.attempts, 0),
    logRetries: ok.reduce((a, r) => a + r.logRetries, 0),
    unlogged: said > 0 || ok.every((r) => r.outcome !== 'written') ? unlogged : null,
    wallMs,
  }
}

/** New nodes (every one writes), then the same nodes starting again with nothing changed (none should). */
function rejoinStorm(keys: Key[]): Promise<{ fresh: Storm; again: Storm }> {
  // The publishers hold a connection each; on a real mesh they are on as many machines.
  return withConsul(keys.length + 100, async (consul) => {
    const layout = kvLayout('storm')
    await createNetwork(createConsulClient({ url: consul.url }), layout, NETWORK)
    const records = () => keys.map((k, i) => record(`j${i}`, stormIp(i), k))
    const fresh = await publishAll(consul.url, layout, records())
    const again = await publishAll(consul.url, layout, records())
    return { fresh, again }
  })
}

// ---- the run ------------------------------------------------------------------------------------

interface Figures {
  bytesPerChange: number
  blockingPerDaemon: number
  p50Ms: number
  p99Ms: number
  /** Printed, not in the JSON: a lost wake-up shows only in the tail. */
  maxMs: number
  /** Printed, not in the JSON: the fastest daemon's latency (median over the changes). */
  fastestMs: number
  /** Printed, not in the JSON: CPU time per change per daemon, in this process (median over the changes). */
  cpuMs: number
  rssMb: number
  cacheStartMs: number
}

/**
 * Both watches at one size. The compiled daemons start first, on an agent with Consul's default
 * per-client limit, and settle while the in-process fleets are measured on agents of their own.
 */
const measureSize = (p: { tracker: Tracker; root: string; size: number; keys: Keys }) => withConsul(undefined, (consul) => sizeOn({ ...p, consul }))

async function sizeOn(p: { consul: DevConsul; tracker: Tracker; root: string; size: number; keys: Keys }): Promise<Partial<Record<Mode, Figures>>> {
  const compiled: Partial<Record<Mode, Compiled>> = {}
  try {
    for (const mode of MODES) compiled[mode] = await startCompiled({ ...p, mode })
    const fleets: Partial<Record<Mode, FleetFigures>> = {}
    for (const mode of MODES) fleets[mode] = await measureFleet({ tracker: p.tracker, root: p.root, size: p.size, keys: p.keys, mode })
    const out: Partial<Record<Mode, Figures>> = {}
    for (const mode of MODES) {
      const f = fleets[mode]
      const x = compiled[mode]
      if (!f || !x) continue
      delete compiled[mode]
      const c = await finishCompiled(x)
      out[mode] = { bytesPerChange: f.bytesPerChange, blockingPerDaemon: f.blockingPerDaemon, p50Ms: f.p50, p99Ms: f.p99, maxMs: f.max, fastestMs: f.fastest, cpuMs: f.cpuMs, ...c }
    }
    return out
  } finally {
    for (const x of Object.values(compiled)) {
      await stopDaemon(x.c)
      await rm(x.probe.dir, { recursive: true, force: true })
    }
  }
}

const fmt = {
  bytes: (b: number) => (b >= 10_240 ? `${(b / 1024).toFixed(0)} KB` : `${Math.round(b)} B`),
  n: (x: number, digits = 1) => x.toFixed(digits),
}
const ratio = (a: number, b: number | undefined) => (b ? `${(a / b).toFixed(a / b < 0.1 ? 3 : 2)}x` : '-')
const verdict = (ok: boolean) => (ok ? 'met' : 'MISSED')

/** The table's figure columns: heading, width, the cell. */
const COLUMNS: Array<[string, number, (f: Figures) => number, (x: number) => string]> = [
  ['bytes/change', 12, (f) => f.bytesPerChange, fmt.bytes],
  ['blocking/daemon', 15, (f) => f.blockingPerDaemon, (x) => fmt.n(x, 2)],
  ['CPU ms/change', 13, (f) => f.cpuMs, (x) => fmt.n(x)],
  ['fastest ms', 10, (f) => f.fastestMs, (x) => fmt.n(x)],
  ['p50 ms', 8, (f) => f.p50Ms, (x) => fmt.n(x)],
  ['p99 ms', 8, (f) => f.p99Ms, (x) => fmt.n(x)],
  ['max ms', 8, (f) => f.maxMs, (x) => fmt.n(x)],
  ['RSS MB', 7, (f) => f.rssMb, (x) => fmt.n(x)],
  ['cache start ms', 14, (f) => f.cacheStartMs, (x) => fmt.n(x, 0)],
]

function printTable(rows: Array<{ records: number; figures: Partial<Record<Mode, Figures>> }>): void {
  const line = (records: string, watch: string, cells: string[]) => say([records.padStart(7), watch.padEnd(14), ...cells.map((c, i) => c.padStart(COLUMNS[i]?.[1] ?? 0))].join('  '))
  line(
    'records',
    'watch',
    COLUMNS.map(([head]) => head),
  )
  for (const { records, figures } of rows) {
    for (const mode of MODES) {
      const f = figures[mode]
      if (f)
        line(
          mode === 'feed' ? String(records) : '',
          LABEL[mode],
          COLUMNS.map(([, , get, show]) => show(get(f))),
        )
    }
    const f = figures.feed
    const ref = figures.recurse
    if (f && ref)
      line(
        '',
        'ratio to ref',
        COLUMNS.map(([, , get]) => ratio(get(f), get(ref))),
      )
  }
}

function printTargets(size: number, f: Figures, restart: Restart | undefined): void {
  const at = size === 1000 && DAEMONS === 50 ? '' : ` (the targets are for 1,000 records and 50 daemons; this run: ${size} records, ${DAEMONS} daemons)`
  say(`targets at ${size} records, change feed${at}:`)
  say(`  bytes per change per daemon (median) ${fmt.bytes(f.bytesPerChange)} <= 8 KB: ${verdict(f.bytesPerChange <= TARGET.bytesPerChange)}`)
  say(`  blocking requests per daemon ${fmt.n(f.blockingPerDaemon, 2)} <= ${TARGET.blockingPerDaemon}: ${verdict(f.blockingPerDaemon <= TARGET.blockingPerDaemon)}`)
  say(`  propagation p99 ${fmt.n(f.p99Ms)} ms <= ${TARGET.p99Ms} ms: ${verdict(f.p99Ms <= TARGET.p99Ms)}`)
  say(`  daemon RSS ${fmt.n(f.rssMb)} MB <= ${TARGET.rssMb} MB: ${verdict(f.rssMb <= TARGET.rssMb)}`)
  say(`  start from cache to DNS answering ${fmt.n(f.cacheStartMs, 0)} ms <= ${TARGET.cacheStartMs} ms: ${verdict(f.cacheStartMs <= TARGET.cacheStartMs)}`)
  if (restart)
    say(
      `  restart at ${restart.records} records (default per-client limit, no files, no cache): all files in ${fmt.n(restart.allFilesMs, 0)} ms <= ${TARGET.restartMs} ms: ${verdict(restart.allFilesMs <= TARGET.restartMs)}; ` +
        `429s ${restart.http429} (log lines naming one: ${restart.logLines429}), target 0: ${verdict(restart.http429 === 0 && restart.logLines429 === 0)}`,
    )
}

function printStorm(s: { fresh: Storm; again: Storm }): void {
  const line = (label: string, x: Storm) =>
    say(
      `  ${label.padEnd(34)} ${x.written} written, ${x.unchanged} unchanged, ${x.failed} failed; ${x.txnAttempts} transactions (${(x.txnAttempts / Math.max(1, x.daemons)).toFixed(2)} a daemon), ` +
        `${x.logRetries} change-log CAS retries, ${x.unlogged ?? 'unknown'} written without the change log; ${fmt.n(x.wallMs, 0)} ms for all`,
    )
  say(`rejoin storm: ${s.fresh.daemons} daemons publishing at the same moment into one network on one agent`)
  line('new nodes (every record written):', s.fresh)
  line('the same nodes again (no change):', s.again)
}

const jsonFigures = (f: Figures) => ({ bytesPerChange: f.bytesPerChange, blockingPerDaemon: f.blockingPerDaemon, p50Ms: f.p50Ms, p99Ms: f.p99Ms, rssMb: f.rssMb, cacheStartMs: f.cacheStartMs })

async function main(): Promise<void> {
  const largest = Math.max(...SIZES)
  note(`generating ${DAEMONS + largest + 1 + STORM} 1024-bit keys…`)
  const all = await makeKeys(DAEMONS + largest + 1 + STORM)
  const keys: Keys = { daemons: all.slice(0, DAEMONS), records: all.slice(DAEMONS, DAEMONS + largest), probe: all[DAEMONS + largest] as Key, storm: all.slice(DAEMONS + largest + 1) }
  const root = await mkdtemp(join(tmpdir(), 'tc-scale-'))
  cleanups.add(() => rm(root, { recursive: true, force: true }))
  try {
    const tracker = inflightTracker()
    const rows: Array<{ records: number; figures: Partial<Record<Mode, Figures>> }> = []
    for (const size of SIZES) {
      note(`${size} records:`)
      rows.push({ records: size, figures: await measureSize({ tracker, root, size, keys }) })
    }
    note(`restarting a daemon at ${largest} records…`)
    const restart = await measureRestart(root, largest, keys)
    note(`rejoin storm of ${STORM}…`)
    const storm = STORM ? await rejoinStorm(keys.storm) : undefined
    say(`scale: ${DAEMONS} daemons in one process on a local dev Consul agent, ${ROUNDS} changes 250 ms apart through publishRecord, 1024-bit keys`)
    say(`  bytes: each daemon's body bytes read from Consul per change (median); blocking: most ?index= requests in flight at once / daemons`)
    say(`  CPU: this process's CPU time from one change to the next / daemons (median); all daemons share its event loop, on ${availableParallelism()} cores`)
    say(`  latency: publishRecord called -> that daemon wrote the host file; fastest: the first daemon each change (median)`)
    say(`  RSS and cache start: one compiled daemon (dist/), settled ${SETTLE_S} s; cache start is the median of ${CACHE_STARTS} starts`)
    printTable(rows)
    const top = rows.find((r) => r.records === largest)?.figures.feed
    if (top) printTargets(largest, top, restart)
    if (storm) printStorm(storm)
    if (values.json)
      console.log(
        JSON.stringify(
          rows.map((r) => ({
            records: r.records,
            ...(r.figures.feed ? jsonFigures(r.figures.feed) : {}),
            reference: r.figures.recurse ? jsonFigures(r.figures.recurse) : null,
            ...(r.records === largest ? { restart, rejoinStorm: storm ?? null } : {}),
          })),
        ),
      )
  } finally {
    for (const c of [...cleanups].reverse()) await c()
  }
}

await main()
