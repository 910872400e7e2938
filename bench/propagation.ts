/* eslint-disable no-console -- a benchmark prints its figures */
// npm run bench:propagation -- [--nodes 50] [--rounds 20] [--key-bits 2048]
//
// N sidecar daemons (in one process, sharing one real local Consul agent, each
// with its own temp tinc dir) watch the same network. Each round changes one
// record and measures, for every daemon, the time from the KV write until that
// daemon has written the new host file, and the bytes it read from Consul for
// that change.
import { generateKeyPairSync } from 'node:crypto'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { pino } from 'pino'
import { createConsulClient } from '../src/consul/client.ts'
import { kvLayout } from '../src/consul/kv-layout.ts'
import { startDevConsul } from '../src/lab/dev-consul.ts'
import { startSync, type AppliedEvent, type SyncDaemon } from '../src/mesh/sync.ts'
import { keyFingerprint, renderHostFile } from '../src/tinc/hostfile.ts'

const { values } = parseArgs({ options: { nodes: { type: 'string', default: '50' }, rounds: { type: 'string', default: '20' }, 'key-bits': { type: 'string', default: '2048' } } })
const N = Number(values.nodes)
const ROUNDS = Number(values.rounds)
const BITS = Number(values['key-bits'])
if (!(N >= 2 && N <= 250) || !(ROUNDS >= 1) || !(BITS >= 1024)) throw new Error('usage: --nodes 2..250 --rounds >=1 --key-bits >=1024')

const pem = () => generateKeyPairSync('rsa', { modulusLength: BITS, publicKeyEncoding: { type: 'pkcs1', format: 'pem' }, privateKeyEncoding: { type: 'pkcs1', format: 'pem' } }).publicKey.trim()
const quantile = (xs: number[], q: number) => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)] ?? NaN
}

const log = pino({ level: process.env.BENCH_LOG_LEVEL ?? 'silent' })
const consul = await startDevConsul({ maxConnsPerClient: 20 * N + 100 })
const root = await mkdtemp(join(tmpdir(), 'tc-bench-'))
const daemons: SyncDaemon[] = []
try {
  const layout = kvLayout('bench')
  const admin = createConsulClient({ url: consul.url })
  await admin.kvPut(layout.network, JSON.stringify({ v: 1, cidr: '10.200.0.0/16', domain: 'mesh', createdAt: new Date().toISOString() }))
  process.stderr.write(`generating ${N} ${BITS}-bit keys and starting ${N} daemons…\n`)
  const started = performance.now()
  const listeners: Array<(e: AppliedEvent, i: number) => void> = []
  for (let i = 0; i < N; i++) {
    const name = `n${i}`
    const dir = join(root, name)
    await mkdir(join(dir, 'hosts'), { recursive: true })
    await writeFile(join(dir, 'tinc.conf'), `Name = ${name}\nStrictSubnets = yes\n`)
    const ip = `10.200.${Math.floor((i + 1) / 250)}.${((i + 1) % 250) + 1}`
    await writeFile(join(dir, 'hosts', name), `Address = 198.18.${Math.floor(i / 250)}.${(i % 250) + 1}\nPort = 655\nSubnet = ${ip}/32\n${pem()}\n`)
    daemons.push(await startSync({ net: 'bench', tincDir: dir, stateDir: join(dir, 'state'), pidFile: join(dir, 'none.pid'), consulUrl: consul.url, log, onApplied: (e) => listeners.forEach((l) => l(e, i)) }))
  }
  const key = pem()
  const peer = (round: number) => {
    const hostFile = renderHostFile({ addresses: ['198.18.255.1'], port: 655, subnets: ['10.200.255.1/32'], options: [{ key: 'Weight', value: String(round) }], publicKey: key })
    return { v: 1, name: 'bench_peer', vpnAddress: '10.200.255.1', subnets: ['10.200.255.1/32'], addresses: ['198.18.255.1'], port: 655, hostFile, fingerprint: keyFingerprint(key), updatedAt: new Date().toISOString() }
  }
  const round = (r: number) =>
    new Promise<{ latencies: number[]; bytes: number[] }>((resolve) => {
      const latencies: number[] = new Array(N)
      const bytes: number[] = new Array(N).fill(0)
      let done = 0
      let t0 = 0
      const l = (e: AppliedEvent, i: number) => {
        bytes[i] = (bytes[i] ?? 0) + e.bytesRead
        if (latencies[i] === undefined && e.render.written.includes('bench_peer')) {
          latencies[i] = performance.now() - t0
          if (++done === N) {
            listeners.splice(listeners.indexOf(l), 1)
            resolve({ latencies, bytes })
          }
        }
      }
      listeners.push(l)
      t0 = performance.now()
      void admin.kvPut(layout.node('bench_peer'), JSON.stringify(peer(r)))
    })
  process.stderr.write(`daemons started in ${((performance.now() - started) / 1000).toFixed(1)} s; warming up…\n`)
  await round(0) // warm-up: every daemon learns the peer and pins its key
  process.stderr.write(`warm-up done at ${((performance.now() - started) / 1000).toFixed(1)} s; measuring…\n`)
  const lat: number[] = []
  const bytes: number[] = []
  for (let r = 1; r <= ROUNDS; r++) {
    // Isolated changes, 250 ms apart: back to back, each watch's rate limit (a burst of 5, then
    // 20 reads/s) would be what we measure.
    await new Promise((resolve) => setTimeout(resolve, 250))
    const res = await round(r)
    lat.push(...res.latencies)
    bytes.push(...res.bytes)
  }
  const meanBytes = bytes.reduce((a, b) => a + b, 0) / bytes.length
  const recordBytes = JSON.stringify(peer(1)).length
  console.log(`propagation: ${N} daemons, ${ROUNDS} changes 250 ms apart, ${BITS}-bit keys, one local Consul agent, all daemons in one process`)
  console.log(`  latency write → host file on every daemon: p50 ${quantile(lat, 0.5).toFixed(1)} ms, p99 ${quantile(lat, 0.99).toFixed(1)} ms, max ${Math.max(...lat).toFixed(1)} ms`)
  console.log(`  bytes read from Consul per change per daemon: ${Math.round(meanBytes)} (one record is ${recordBytes} bytes; ?recurse returns all ${N + 1})`)
  console.log(`  reference, computed not measured: polling every 10 s (tinc-boot) averages 5000 ms, every 60 s (innernet) 30000 ms: p50 here is ${(5000 / quantile(lat, 0.5)).toFixed(0)}x and ${(30000 / quantile(lat, 0.5)).toFixed(0)}x faster`)
  console.log(`  target p99 <= 250 ms: ${quantile(lat, 0.99) <= 250 ? 'met' : 'MISSED'}`)
} finally {
  const t = performance.now()
  await Promise.all(daemons.map((d) => d.stop()))
  process.stderr.write(`daemons stopped in ${((performance.now() - t) / 1000).toFixed(1)} s\n`)
  await consul.stop()
  process.stderr.write(`consul stopped in ${((performance.now() - t) / 1000).toFixed(1)} s\n`)
  await rm(root, { recursive: true, force: true })
}
