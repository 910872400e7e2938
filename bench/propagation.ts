/* eslint-disable no-console -- a benchmark prints its figures */
// npm run bench:propagation -- [--nodes 50] [--rounds 20] [--key-bits 2048] [--no-reference]
//
// N sidecar daemons (in one process, sharing one real local Consul agent, each
// with its own temp tinc dir) watch the same network. Each round changes one
// record and measures, for every daemon, the time from the KV write until that
// daemon has written the new host file, and the bytes it read from Consul for
// that change.
//
// The same run first measures the naive way as the reference: every daemon
// re-reads all of nodes/ (`?recurse`) on each change, where the shipped daemon
// blocks on one small query and reads the change log and only the records it names.
import { generateKeyPairSync } from 'node:crypto'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { pino } from 'pino'
import { b64, createConsulClient } from '../src/consul/client.ts'
import { txnWithChangeLog } from '../src/mesh/change-log.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { createNetwork } from '../src/mesh/network.ts'
import { startSync, type AppliedEvent, type SyncDaemon } from '../src/mesh/sync.ts'
import { keyFingerprint, renderHostFile } from '../src/tinc/hostfile.ts'

const { values } = parseArgs({
  options: {
    nodes: { type: 'string', default: '50' },
    rounds: { type: 'string', default: '20' },
    'key-bits': { type: 'string', default: '2048' },
    'no-reference': { type: 'boolean', default: false },
  },
})
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

interface Figures {
  p50: number
  p99: number
  max: number
  bytesPerChange: number
}

process.stderr.write(`generating ${N + 1} ${BITS}-bit keys…\n`)
const keys = Array.from({ length: N }, pem)
const peerKey = pem()
const peer = (round: number) => {
  const hostFile = renderHostFile({ addresses: ['198.18.255.1'], port: 655, subnets: ['10.200.255.1/32'], options: [{ key: 'Weight', value: String(round) }], publicKey: peerKey })
  return {
    v: 1,
    name: 'bench_peer',
    vpnAddress: '10.200.255.1',
    subnets: ['10.200.255.1/32'],
    addresses: ['198.18.255.1'],
    port: 655,
    hostFile,
    fingerprint: keyFingerprint(peerKey),
    updatedAt: new Date().toISOString(),
  }
}

async function measure(consul: DevConsul, root: string, net: string, nodesWatch: 'feed' | 'recurse'): Promise<Figures> {
  const layout = kvLayout(net)
  const admin = createConsulClient({ url: consul.url })
  await createNetwork(admin, layout, { v: 1, cidr: '10.200.0.0/16', domain: 'mesh', createdAt: new Date().toISOString() })
  const daemons: SyncDaemon[] = []
  const listeners: Array<(e: AppliedEvent, i: number) => void> = []
  try {
    const started = performance.now()
    for (let i = 0; i < N; i++) {
      const name = `n${i}`
      const dir = join(root, net, name)
      await mkdir(join(dir, 'hosts'), { recursive: true })
      await writeFile(join(dir, 'tinc.conf'), `Name = ${name}\nStrictSubnets = yes\n`)
      const ip = `10.200.${Math.floor((i + 1) / 250)}.${((i + 1) % 250) + 1}`
      await writeFile(join(dir, 'hosts', name), `Address = 198.18.${Math.floor(i / 250)}.${(i % 250) + 1}\nPort = 655\nSubnet = ${ip}/32\n${keys[i]}\n`)
      daemons.push(
        await startSync({
          net,
          tincDir: dir,
          stateDir: join(dir, 'state'),
          pidFile: join(dir, 'none.pid'),
          consulUrl: consul.url,
          nodesWatch,
          services: false,
          log,
          onApplied: (e) => listeners.forEach((l) => l(e, i)),
        }),
      )
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
        // Written the way every writer of ours writes a record: with its change-log entry.
        void txnWithChangeLog(admin, layout, [{ KV: { Verb: 'set', Key: layout.node('bench_peer'), Value: b64(JSON.stringify(peer(r))) } }], ['bench_peer'])
      })
    process.stderr.write(`${net}: ${N} daemons started in ${((performance.now() - started) / 1000).toFixed(1)} s; warming up…\n`)
    await round(0) // warm-up: every daemon learns the peer and pins its key
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
    return { p50: quantile(lat, 0.5), p99: quantile(lat, 0.99), max: Math.max(...lat), bytesPerChange: bytes.reduce((a, b) => a + b, 0) / bytes.length }
  } finally {
    await Promise.all(daemons.map((d) => d.stop()))
  }
}

const show = (label: string, f: Figures) =>
  console.log(
    `  ${label.padEnd(30)} p50 ${f.p50.toFixed(1).padStart(6)} ms   p99 ${f.p99.toFixed(1).padStart(6)} ms   max ${f.max.toFixed(1).padStart(6)} ms   ${String(Math.round(f.bytesPerChange)).padStart(6)} bytes read per change per daemon`,
  )

// Each daemon holds a handful of blocking queries (fewer than 12) and a few plain requests to the
// agent; in real life they are on N machines. Far below the open-file limit even at N = 250.
const consul = await startDevConsul({ maxConnsPerClient: N * 12 + 100 })
const root = await mkdtemp(join(tmpdir(), 'tc-bench-'))
try {
  const reference = values['no-reference'] ? undefined : await measure(consul, root, 'benchref', 'recurse')
  const shipped = await measure(consul, root, 'bench', 'feed')
  console.log(`propagation: ${N} daemons, ${ROUNDS} changes 250 ms apart, ${BITS}-bit keys, one local Consul agent, all daemons in one process`)
  console.log(`  latency is from the KV write until each daemon has written the new host file; one record is ${JSON.stringify(peer(1)).length} bytes`)
  if (reference) show('reference: ?recurse per change', reference)
  show('tinc-consul: change feed', shipped)
  if (reference) console.log(`  ratio to the reference: p99 ${(shipped.p99 / reference.p99).toFixed(2)}x, bytes ${(shipped.bytesPerChange / reference.bytesPerChange).toFixed(3)}x`)
  console.log(`  polling, computed not measured: every 10 s (tinc-boot) averages 5000 ms, every 60 s (innernet) 30000 ms`)
  console.log(`  target p99 <= 250 ms at N = 50: ${shipped.p99 <= 250 ? 'met' : 'MISSED'}`)
  // A lost or backed-off wake-up shows only in the tail: every daemon must have every change within 2 s.
  console.log(`  target max <= 2000 ms (no lost wake-up): ${shipped.max <= 2000 ? 'met' : 'MISSED'}`)
} finally {
  await consul.stop()
  await rm(root, { recursive: true, force: true })
}
