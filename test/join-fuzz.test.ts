import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { connect } from 'node:net'
import type { ConsulClient } from '../src/consul/client.ts'
import { createInvite, decodeInvite, deriveInvite, seal, type Invite } from '../src/mesh/invite.ts'
import { ephemeral } from '../src/mesh/join-crypto.ts'
import { redeemInvite } from '../src/mesh/join-client.ts'
import type { SeparatedJoinServer } from '../src/mesh/join-server.ts'
import { GENERIC_REFUSAL, MAGIC, STATUS_OK, encodeRequest, frame, requestAad } from '../src/mesh/join-wire.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { processAlive } from '../src/util/proc.ts'
import { rsaPublicPem } from './helpers-keys.ts'
import { separatedJoinFixture } from './sync-fixture.ts'

/**
 * Random and mutated frames against the join endpoint as `run` serves it (front
 * as nobody, broker with the join-server token, real Consul with ACLs). None
 * may be accepted, the processes must stay up, the open invite must stay
 * unspent, and Consul's KV must be exactly as before. FUZZ_FRAMES and
 * FUZZ_SEED reproduce a run.
 */
const FRAMES = Number(process.env.FUZZ_FRAMES ?? 100_000)
const SEED = Number(process.env.FUZZ_SEED ?? Date.now() % 1_000_000)
const CONCURRENCY = 32
const layout = kvLayout('test')

/** mulberry32: a small seeded PRNG, so a failing run can be replayed. */
function rng(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

interface Case {
  bytes: Buffer
  /** A whole frame: the answer must be exactly the generic refusal. Otherwise anything but acceptance. */
  complete: boolean
}

/** A real request for the open invite, the seed of the mutations: sent unchanged, it would redeem. */
function validRequest(inv: Invite): Buffer {
  const { id, key } = deriveInvite(inv.token)
  const header = Buffer.from(JSON.stringify({ v: 2, net: 'test', name: 'fuzzed', id }))
  const body = { v: 2, token: Buffer.from(inv.token).toString('base64url'), epk: ephemeral().publicKey.toString('base64url'), publicKey: rsaPublicPem(), addresses: [], port: 655 }
  return encodeRequest(header, seal(key, requestAad(header), Buffer.from(JSON.stringify(body))))
}

function generator(seed: number, valid: Buffer, id: string): () => Case {
  const r = rng(seed)
  const int = (n: number) => Math.floor(r() * n)
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)))
  const payload = valid.subarray(8)
  const mutate = (b: Buffer): Buffer => {
    let out = Buffer.from(b)
    for (let k = 1 + int(4); k > 0; k--) {
      const at = int(out.length)
      const op = int(4)
      if (op === 0) out[at] = (out[at] ?? 0) ^ (1 << int(8))
      else if (op === 1) out[at] = int(256)
      else if (op === 2) out = Buffer.concat([out.subarray(0, at), bytes(1 + int(8)), out.subarray(at)])
      else out = Buffer.concat([out.subarray(0, at), out.subarray(at + 1 + int(8))])
    }
    // A mutation that undid itself would be the valid request, which redeems (trailing bytes
    // after a whole frame are never read): change a byte of the ciphertext's tag instead.
    if (out.length >= b.length && out.subarray(0, b.length).equals(b)) out[b.length - 1] = (out[b.length - 1] ?? 0) ^ 1
    return out
  }
  const headerOf = (h: object) => Buffer.from(JSON.stringify(h))
  const kinds: Array<() => Case> = [
    () => ({ bytes: bytes(int(300)), complete: false }),
    () => ({ bytes: frame(bytes(int(2000))), complete: true }),
    () => ({ bytes: frame(mutate(payload)), complete: true }),
    () => ({ bytes: mutate(valid), complete: false }),
    () => ({ bytes: Buffer.concat([MAGIC, Buffer.from([0xff, 0xff, 0xff, int(256)])]), complete: true }),
    () => ({
      bytes: encodeRequest(
        headerOf(
          [
            { v: 2, net: 'test', name: 'x', id },
            { v: 1, net: 'test', name: 'x', id },
            { v: 2, net: 'othernet', name: 'x', id },
            { v: 2, net: 'test', name: 'x', id, extra: 1 },
          ][int(4)] ?? {},
        ),
        bytes(int(600)),
      ),
      complete: true,
    }),
    () => ({ bytes: encodeRequest(headerOf({ v: 2, net: 'test', name: 'y'.repeat(int(3000)), id: id.replace(/./, 'f') }), bytes(40)), complete: true }),
  ]
  return () => (kinds[int(kinds.length)] as () => Case)()
}

/** Sends one case and returns the reply bytes (possibly none). */
function send(port: number, c: Case): Promise<Buffer> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = []
    const s = connect({ host: '127.0.0.1', port })
    s.on('data', (d) => chunks.push(d))
    s.on('error', () => undefined)
    s.on('close', () => resolve(Buffer.concat(chunks)))
    s.once('connect', () => (c.complete ? s.write(c.bytes) : s.end(c.bytes)))
  })
}

const refusal = frame(Buffer.concat([Buffer.from([1]), Buffer.from(GENERIC_REFUSAL)]))

describe('fuzzing the join endpoint', { skip: process.getuid?.() === 0 ? false : 'needs root to run the front as nobody' }, () => {
  let fx: Awaited<ReturnType<typeof separatedJoinFixture>>
  let admin: ConsulClient
  let server: SeparatedJoinServer
  let inv: Invite

  before(async () => {
    // The helpers inherit this: 100,000 refusals are logged in summary lines anyway.
    process.env.TINC_CONSUL_LOG_LEVEL = 'error'
    fx = await separatedJoinFixture({ burst: 1e9 })
    ;({ admin, server } = fx)
    inv = decodeInvite((await createInvite({ client: admin, layout, net: 'test', endpoints: [`127.0.0.1:${server.port}`], ttlMs: 3_600_000, createdBy: 'test' })).invite)
  })
  after(() => fx?.stop())

  test(`${FRAMES} random and mutated frames: none accepted, nothing written, the invite unspent, both processes up`, { timeout: 900_000 }, async (t) => {
    const kv = async () => JSON.stringify(await admin.request('GET', '/v1/kv/?recurse'))
    const before = await kv()
    const next = generator(SEED, validRequest(inv), deriveInvite(inv.token).id)
    const front = server.front.pid
    let sent = 0
    let exact = 0
    const started = Date.now()
    const worker = async () => {
      while (sent < FRAMES) {
        sent++
        const c = next()
        const reply = await send(server.port, c)
        assert.ok(!(reply.length > 8 && reply[8] === STATUS_OK), `seed ${SEED}: accepted ${c.bytes.toString('hex').slice(0, 200)}`)
        if (c.complete) assert.ok(reply.equals(refusal), `seed ${SEED}: a whole frame heard something other than the generic refusal: ${reply.toString('hex').slice(0, 200)}`)
        if (reply.equals(refusal)) exact++
      }
    }
    await Promise.all(Array.from({ length: CONCURRENCY }, worker))
    t.diagnostic(`seed ${SEED}: ${sent} frames in ${((Date.now() - started) / 1000).toFixed(1)} s, ${exact} answered with the generic refusal; stats ${JSON.stringify(server.stats)}`)
    assert.ok(processAlive(front), 'the join front died')
    assert.ok(processAlive(server.brokerPid), 'the join broker died')
    assert.equal(await kv(), before, 'the fuzz changed Consul KV')
    // The invite was never spent: its holder still gets in.
    assert.equal((await redeemInvite(inv, { name: 'honest', publicKey: rsaPublicPem(), addresses: [], port: 655 })).name, 'honest')
  })
})
