import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { fork, type ChildProcess } from 'node:child_process'
import { readFile, writeFile } from 'node:fs/promises'
import { connect, type Socket } from 'node:net'
import { join } from 'node:path'
import { TYPE, buildQuery, decodeMessage } from '../src/dns/wire.ts'
import type { ZoneInput } from '../src/dns/zone.ts'

/**
 * The flood: CONNECTIONS connections each pipeline QUERY_BYTES of SRV queries
 * for a service of INSTANCES instances (answers of about 38 KB each, as big as
 * the answer limits given to the server let through). Half the clients never
 * read past the first answer; the other half read READ_ANSWERS of them,
 * pausing between reads, and then stop. The server runs in a child process,
 * and its peak RSS (VmHWM, reset just before the flood) may grow by at most
 * RSS_BOUND_MIB over its RSS before it.
 *
 * Where the bound comes from: a connection holds at most about 224 KiB (one
 * partial query and a read or two of input, one write buffer mark of output;
 * the answers' records are the zone's own, written without a copy), so 9
 * connections need about 2 MiB, and the rest is room for garbage the
 * collector has not yet returned. Measured: about 1-2 MiB. The server that
 * answered every query of a read at once grew by about 390 MiB here; one that
 * bounds the connection but copies each answer, by about 30 MiB.
 */
const CONNECTIONS = 8
const QUERY_BYTES = 1 << 20
const INSTANCES = 400
const READ_ANSWERS = 100
const RSS_BOUND_MIB = 16

const FIXTURE = join(import.meta.dirname, 'fixtures', 'dns-tcp-server.ts')
const NAME = 'web.service.mesh'

const farm = Array.from({ length: INSTANCES }, (_, i) => ({ node: `node-${String(i).padStart(3, '0')}-of-the-web-farm`, address: `10.99.${1 + (i >> 8)}.${i & 0xff}`, port: 8000 + i, tags: [] }))
const input: ZoneInput = {
  domain: 'mesh',
  cidr: '10.99.0.0/16',
  self: 'hub',
  nodes: [
    { name: 'hub', address: '10.99.0.1', public: true, fingerprint: `sha256:${'a'.repeat(64)}` },
    ...farm.map((f) => ({ name: f.node.replace(/-/g, '_'), address: f.address, public: false, fingerprint: `sha256:${'b'.repeat(64)}` })),
  ],
  services: [{ name: 'web', protocol: 'tcp', instances: farm.map((f) => ({ ...f, node: f.node.replace(/-/g, '_') })) }],
  ttl: { node: 30, service: 5, negative: 5 },
  serial: 1,
}

/** Length-prefixed queries, back to back, `bytes` of them. */
function pipelined(bytes: number): Buffer {
  const one = buildQuery(NAME, TYPE.SRV, { id: 7 })
  const framed = Buffer.concat([Buffer.from([one.length >> 8, one.length & 0xff]), one])
  return Buffer.concat(Array.from({ length: Math.ceil(bytes / framed.length) }, () => framed))
}

/** Counts whole length-prefixed messages in a stream, and keeps the first one. */
function frameCounter() {
  let pending = Buffer.alloc(0)
  let count = 0
  let first: Buffer | undefined
  return {
    push(chunk: Buffer) {
      pending = Buffer.concat([pending, chunk])
      while (pending.length >= 2 && pending.length >= 2 + pending.readUInt16BE(0)) {
        const len = pending.readUInt16BE(0)
        first ??= Buffer.from(pending.subarray(2, 2 + len))
        count++
        pending = pending.subarray(2 + len)
      }
      return count
    },
    first: () => first,
  }
}

/**
 * A client that writes `bytes` of queries and then reads `answers` answers,
 * pausing between reads, and stops reading for good. Resolves with the first
 * answer once it has them all (with answers = 1 it reads only as far as the
 * first answer, as good as not reading at all).
 */
function client(port: number, bytes: number, answers: number, sockets: Socket[]): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const conn = connect(port, '127.0.0.1')
    sockets.push(conn)
    const frames = frameCounter()
    conn.on('error', reject)
    conn.on('close', () => reject(new Error(`the server closed a connection after ${frames.push(Buffer.alloc(0))} answers`)))
    conn.write(pipelined(bytes))
    const onData = (chunk: Buffer) => {
      const n = frames.push(chunk)
      conn.pause()
      if (n >= answers) {
        conn.off('data', onData)
        resolve(frames.first() as Buffer)
      } else setTimeout(() => conn.resume(), 1)
    }
    conn.on('data', onData)
  })
}

async function memory(pid: number): Promise<{ rss: number; hwm: number }> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8')
  const kib = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN)
  return { rss: kib('VmRSS') * 1024, hwm: kib('VmHWM') * 1024 }
}

describe('DNS over TCP under a flood of pipelined queries for big answers', () => {
  let child: ChildProcess | undefined
  let port = 0
  const ping = () =>
    new Promise<void>((resolve, reject) => {
      if (!child?.connected) return reject(new Error('the DNS server process is gone'))
      child.once('message', () => resolve())
      child.send('ping')
    })

  before(async () => {
    const c = fork(FIXTURE, [], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
    child = c
    port = await new Promise<number>((resolve, reject) => {
      c.once('exit', (code) => reject(new Error(`the DNS server process exited with ${code}`)))
      c.once('message', (m: { t: string; port?: number; message?: string }) => (m.t === 'ready' ? resolve(m.port ?? 0) : reject(new Error(m.message))))
      c.send({ input, options: { answers: { maxInstances: INSTANCES, maxInstancesPerNode: INSTANCES, maxAnswerBytes: 65535 }, tcpIdleMs: 120_000 } })
    })
  })
  after(() => {
    child?.removeAllListeners('exit')
    child?.kill('SIGKILL')
  })

  test(`${CONNECTIONS} connections pipelining ${(CONNECTIONS * QUERY_BYTES) >> 20} MiB of queries grow the server by less than ${RSS_BOUND_MIB} MiB`, async (t) => {
    const pid = child?.pid as number
    const sockets: Socket[] = []
    try {
      // Warm up (code paths, the first big answer), then start the peak over from here.
      await client(port, 100, 1, sockets)
      await ping()
      await writeFile(`/proc/${pid}/clear_refs`, '5')
      const before = await memory(pid)
      assert.ok(before.hwm - before.rss < 2 ** 20, 'the peak RSS could not be reset (/proc/PID/clear_refs), so it would not show the flood')

      const firsts = await Promise.all(Array.from({ length: CONNECTIONS }, (_, i) => client(port, QUERY_BYTES, i % 2 ? READ_ANSWERS : 1, sockets)))
      // Every connection has had its answers; let the server finish whatever it is doing.
      await ping()
      const peak = await memory(pid)
      const growth = peak.hwm - before.rss
      t.diagnostic(
        `server RSS ${(before.rss / 2 ** 20).toFixed(1)} MiB before the flood, peak ${(peak.hwm / 2 ** 20).toFixed(1)} MiB, growth ${(growth / 2 ** 20).toFixed(1)} MiB (bound ${RSS_BOUND_MIB} MiB)`,
      )

      // The flood carried big answers, or it proves nothing.
      for (const first of firsts) {
        assert.ok(first.length > 30_000, `an answer of ${first.length} bytes is too small for this test`)
        assert.equal(decodeMessage(first).answer.length, INSTANCES)
      }
      assert.ok(growth < RSS_BOUND_MIB * 2 ** 20, `the server grew by ${(growth / 2 ** 20).toFixed(1)} MiB, more than ${RSS_BOUND_MIB} MiB`)
      // And it still answers a newcomer while the flooders hold their connections.
      assert.equal(decodeMessage(await client(port, 100, 1, sockets)).answer.length, INSTANCES)
    } finally {
      for (const s of sockets) s.destroy()
    }
  })
})
