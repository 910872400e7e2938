/**
 * The join front as its own process: the broker forks it as an unprivileged
 * user with an empty environment (no token), hands it the listening socket,
 * and answers its two questions over IPC. This is the only process of
 * tinc-consul that reads bytes from outside the VPN.
 */
import type { Server } from 'node:net'
import { createLogger } from '../log.ts'
import { serveJoinFront, type BrokerPort, type JoinStats } from './join-front.ts'
import { toFrontSchema, type FromFront } from './join-ipc.ts'

const log = createLogger({ fd: 1 }).child({ process: 'join-front' })
const send = (m: FromFront) => process.send?.(m)
const pending = new Map<number, (m: unknown) => void>()
let next = 0

/** One question to the broker; a broker that doesn't answer within 15 s counts as a failure. */
function ask<T>(question: { t: 'key'; id: string } | { t: 'redeem'; payload: string }): Promise<T> {
  const q = next++
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => {
      pending.delete(q)
      reject(new Error('the join broker did not answer within 15 s'))
    }, 15_000)
    pending.set(q, (m) => {
      clearTimeout(timer)
      pending.delete(q)
      resolve(m as T)
    })
    send({ ...question, q })
  })
}

const broker: BrokerPort = {
  async inviteKey(id) {
    const m = await ask<{ key?: string }>({ t: 'key', id })
    return m.key === undefined ? undefined : Buffer.from(m.key, 'base64')
  },
  async redeem(payload) {
    const m = await ask<{ status: number; body: string; served: boolean }>({ t: 'redeem', payload: payload.toString('base64') })
    return { status: m.status, body: Buffer.from(m.body, 'base64'), served: m.served }
  },
}

let stats: JoinStats | undefined
let reported = ''
const report = () => {
  const now = JSON.stringify(stats)
  if (stats && now !== reported) {
    reported = now
    send({ t: 'stats', stats: { ...stats } })
  }
}
setInterval(report, 1000).unref()

const burst = Number(process.env.TINC_CONSUL_JOIN_BURST ?? '') || undefined
const refillMs = Number(process.env.TINC_CONSUL_JOIN_REFILL_MS ?? '') || undefined

process.on('message', (raw: unknown, handle: unknown) => {
  const m = toFrontSchema.safeParse(raw)
  if (!m.success) return log.error({ reason: m.error.message }, 'unexpected message from the join broker')
  if (m.data.t === 'server') {
    stats = serveJoinFront(handle as Server, { broker, log, burst, refillMs }).stats
    return
  }
  pending.get(m.data.q)?.(m.data)
})
// The broker owns this process: when it goes, so does the front.
process.on('disconnect', () => process.exit(0))
send({ t: 'ready' })
