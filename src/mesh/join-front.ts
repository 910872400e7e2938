import type { Server, Socket } from 'node:net'
import type { Logger } from '../log.ts'
import { authenticate } from './join-auth.ts'
import { GENERIC_REFUSAL, MAX_FRAME, STATUS_ERROR, frame, readFrame } from './join-wire.ts'

/** What the front needs from the broker: both answers come from the process holding the join-server token. */
export interface BrokerPort {
  inviteKey(id: string): Promise<Buffer | undefined>
  redeem(payload: Buffer): Promise<{ status: number; body: Buffer; served: boolean }>
}

export interface JoinFrontOptions {
  broker: BrokerPort
  log: Logger
  /** Requests allowed from one source address in a burst, then one per `refillMs`. */
  burst?: number
  refillMs?: number
}

export interface JoinStats {
  served: number
  refused: number
  rateLimited: number
}

/** Token buckets per source address, forgetting full ones so a scan from many addresses can't grow the map forever. */
function rateLimiter(burst: number, refillMs: number): (ip: string) => boolean {
  const buckets = new Map<string, { tokens: number; at: number }>()
  return (ip) => {
    const now = Date.now()
    const b = buckets.get(ip) ?? { tokens: burst, at: now }
    b.tokens = Math.min(burst, b.tokens + (now - b.at) / refillMs)
    b.at = now
    buckets.set(ip, b)
    if (buckets.size > 10_000) for (const [k, v] of buckets) if (k !== ip && v.tokens + (now - v.at) / refillMs >= burst) buckets.delete(k)
    if (b.tokens < 1) return false
    b.tokens -= 1
    return true
  }
}

/**
 * Logs at most `max` lines per `windowMs`, then one line counting what it left out: a
 * scan of the join port must not become a flood in the journal.
 */
function throttled(log: Logger, max = 10, windowMs = 10_000): (fields: object, msg: string) => void {
  let start = 0
  let count = 0
  let dropped = 0
  return (fields, msg) => {
    const now = Date.now()
    if (now - start > windowMs) {
      if (dropped) log.warn({ dropped }, `${dropped} more join requests refused in the last ${windowMs / 1000} s, not logged one by one`)
      start = now
      count = 0
      dropped = 0
    }
    if (++count <= max) log.warn(fields, msg)
    else dropped++
  }
}

/**
 * The internet-facing half of the join endpoint: it holds no Consul token.
 * One request per connection: rate-limit the source, read one frame, prove
 * the sender holds the invite (the broker lends the invite's key), and only
 * then hand the bytes to the broker, which checks them again and redeems.
 * Everything before that point hears the same generic refusal, so an
 * endpoint tells no one without the invite the network's name.
 */
export function serveJoinFront(server: Server, opts: JoinFrontOptions): { stats: JoinStats } {
  const log = opts.log.child({ component: 'join' })
  const stats: JoinStats = { served: 0, refused: 0, rateLimited: 0 }
  const allow = rateLimiter(opts.burst ?? 5, opts.refillMs ?? 2000)
  const warn = throttled(log)

  const handle = async (socket: Socket) => {
    const peer = socket.remoteAddress ?? '?'
    socket.setNoDelay(true)
    const reply = (status: number, body: Uint8Array) => new Promise<void>((resolve) => socket.end(frame(Buffer.concat([Buffer.from([status]), body])), () => resolve()))
    if (!allow(peer)) {
      stats.rateLimited++
      warn({ peer }, 'join request rate-limited')
      // Its request goes unread, but is drained so the connection's close is seen; otherwise
      // each one would hold one of the server's 64 connections for good.
      socket.resume()
      socket.setTimeout(10_000, () => socket.destroy())
      await reply(STATUS_ERROR, Buffer.from(GENERIC_REFUSAL))
      return
    }
    let payload: Buffer
    try {
      payload = await readFrame(socket, MAX_FRAME)
      await authenticate(payload, async (id) => {
        const key = await opts.broker.inviteKey(id)
        return key && { key }
      })
    } catch (err) {
      stats.refused++
      warn({ peer, reason: err instanceof Error ? err.message : String(err) }, 'join refused before authentication')
      if (!socket.destroyed) await reply(STATUS_ERROR, Buffer.from(GENERIC_REFUSAL))
      return
    }
    const answer = await opts.broker.redeem(payload).catch((err: unknown) => {
      log.error({ err, peer }, 'the join broker did not answer')
      return { status: STATUS_ERROR, body: Buffer.from('the join server failed; try again or another endpoint'), served: false }
    })
    if (answer.served) stats.served++
    else stats.refused++
    if (!socket.destroyed) await reply(answer.status, answer.body)
  }

  server.maxConnections = 64
  server.on('connection', (socket: Socket) => {
    socket.on('error', () => undefined)
    void handle(socket)
  })
  return { stats }
}
