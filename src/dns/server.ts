import { createSocket, type Socket as UdpSocket } from 'node:dgram'
import { createServer, type Server, type Socket } from 'node:net'
import { TincConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import type { Zone } from './zone.ts'
import { CLASS_IN, FormError, OUR_EDNS_SIZE, RCODE, errorReply, parseQuery, reply, type Question } from './wire.ts'

export interface DnsServerOptions {
  /** Addresses to listen on (the VPN address and 127.0.0.1); each gets UDP and TCP. */
  hosts: string[]
  /** 0 picks a free port (tests); the same port is used for every host and both protocols. */
  port: number
  zone(): Zone | undefined
  log: Logger
  tcpIdleMs?: number
}

export interface DnsStats {
  queries: number
  formerr: number
  refused: number
  truncated: number
}

export interface DnsServer {
  readonly port: number
  readonly stats: DnsStats
  close(): Promise<void>
}

/** One query in, one reply out (or nothing, for garbage too short to answer). */
export function answer(msg: Uint8Array, zone: Zone | undefined, transport: 'udp' | 'tcp', stats: DnsStats): Buffer | undefined {
  stats.queries++
  let q: Question
  try {
    q = parseQuery(msg)
  } catch (err) {
    if (!(err instanceof FormError)) throw err
    stats.formerr++
    // A reply is only as long as the header it echoes: no amplification from garbage.
    return msg.length >= 12 && !((msg[2] ?? 0) & 0x80) ? errorReply(msg, RCODE.FORMERR) : undefined
  }
  if (q.opcode !== 0) return errorReply(msg, RCODE.NOTIMP, q)
  if (q.class !== CLASS_IN || !zone) return errorReply(msg, q.class !== CLASS_IN ? RCODE.REFUSED : RCODE.SERVFAIL, q)
  const prepared = zone.lookup(q.name, q.type)
  if (!prepared) {
    stats.refused++
    return errorReply(msg, RCODE.REFUSED, q)
  }
  // Over UDP: what the client can take (512 without EDNS); TCP carries up to 64 KiB.
  const out = reply(msg, q, prepared, transport === 'tcp' ? 65535 : q.ednsSize ? Math.min(q.ednsSize, OUR_EDNS_SIZE) : 512)
  if (out[2] !== undefined && out[2] & 0x02) stats.truncated++
  return out
}

export async function startDnsServer(opts: DnsServerOptions): Promise<DnsServer> {
  const log = opts.log.child({ component: 'dns' })
  const stats: DnsStats = { queries: 0, formerr: 0, refused: 0, truncated: 0 }
  const udp: UdpSocket[] = []
  const tcp: Server[] = []
  let port = opts.port
  const idle = opts.tcpIdleMs ?? 10_000

  const closeAll = async () => {
    await Promise.all([...udp.map((s) => new Promise<void>((r) => s.close(() => r()))), ...tcp.map((s) => new Promise<void>((r) => s.close(() => r())))])
  }
  try {
    for (const host of opts.hosts) {
      const sock = createSocket({ type: 'udp4' })
      sock.on('message', (msg, rinfo) => {
        try {
          const out = answer(msg, opts.zone(), 'udp', stats)
          if (out?.length) sock.send(out, rinfo.port, rinfo.address)
        } catch (err) {
          log.error({ err }, 'dns query failed')
        }
      })
      sock.on('error', (err) => log.warn({ err }, 'dns udp socket error'))
      await new Promise<void>((resolve, reject) => {
        sock.once('error', reject)
        sock.bind(port, host, () => {
          sock.off('error', reject)
          resolve()
        })
      })
      port = sock.address().port
      udp.push(sock)
      const server = createServer((conn) => serveTcp(conn, opts, stats, idle, log))
      server.maxConnections = 256
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject)
        server.listen(port, host, () => {
          server.off('error', reject)
          resolve()
        })
      })
      tcp.push(server)
    }
  } catch (err) {
    await closeAll()
    throw new TincConsulError('DNS_LISTEN', `cannot serve DNS on ${opts.hosts.join(', ')} port ${port}: ${(err as Error).message}`, { cause: err })
  }
  log.info({ hosts: opts.hosts, port }, 'serving DNS')
  return { port, stats, close: closeAll }
}

/** DNS over TCP: 2-byte length prefixes, several queries per connection, closed when idle. */
function serveTcp(conn: Socket, opts: DnsServerOptions, stats: DnsStats, idleMs: number, log: Logger): void {
  let buf: Buffer = Buffer.alloc(0)
  conn.setTimeout(idleMs, () => conn.destroy())
  conn.on('error', () => undefined)
  conn.on('data', (chunk: Buffer) => {
    buf = buf.length ? Buffer.concat([buf, chunk]) : chunk
    while (buf.length >= 2) {
      const len = buf.readUInt16BE(0)
      if (buf.length < 2 + len) break
      const msg = buf.subarray(2, 2 + len)
      buf = buf.subarray(2 + len)
      try {
        const out = answer(msg, opts.zone(), 'tcp', stats)
        if (!out?.length) {
          conn.destroy()
          return
        }
        const head = Buffer.alloc(2)
        head.writeUInt16BE(out.length)
        conn.write(Buffer.concat([head, out]))
      } catch (err) {
        log.error({ err }, 'dns query failed')
        conn.destroy()
        return
      }
    }
  })
}
