import { fork, type ChildProcess } from 'node:child_process'
import { createSocket, type Socket as UdpSocket } from 'node:dgram'
import { createServer, type Server, type Socket } from 'node:net'
import { availableParallelism } from 'node:os'
import { fileURLToPath } from 'node:url'
import { bindAll, listenOn, type Binding } from '../util/listen.ts'
import { TincConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import { buildZone, type Zone, type ZoneInput } from './zone.ts'
import { CLASS_IN, FormError, OUR_EDNS_SIZE, RCODE, errorReply, parseQuery, reply, type Question } from './wire.ts'

export interface DnsServerOptions {
  /**
   * Addresses to listen on; each gets UDP and TCP on the same port. An address
   * that doesn't exist yet (the VPN address before tinc-up ran) is retried in
   * the background instead of failing the daemon.
   */
  hosts: string[]
  /** 0 picks a free port (tests); the same port is used for every host and both protocols. */
  port: number
  /**
   * Helper processes that share the UDP sockets. Node spends most of a query in
   * its per-datagram machinery, so one process tops out well below dnsmasq; a
   * second one on a second core closes the gap. 'auto' is one fewer than the
   * cores, at most 3.
   */
  workers?: number | 'auto'
  log: Logger
  tcpIdleMs?: number
  /** How often an address that could not be bound yet is tried again. */
  retryMs?: number
}

export interface DnsStats {
  queries: number
  formerr: number
  refused: number
  truncated: number
}

export interface DnsServer {
  readonly port: number
  /** Replaces the zone here and in every helper. */
  update(input: ZoneInput): Zone
  zone(): Zone | undefined
  /** Totals over this process and the helpers (theirs as last reported, about once a second); `byHelpers` is the helpers' share of the queries. */
  stats(): DnsStats & { byHelpers: number }
  /** The addresses bound right now; the rest are being retried. */
  listening(): string[]
  readonly workers: number
  close(): Promise<void>
}

export const newStats = (): DnsStats => ({ queries: 0, formerr: 0, refused: 0, truncated: 0 })

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
  // We speak EDNS version 0 only: a later one gets BADVERS before anything else is looked at,
  // and the client falls back to 0 (RFC 6891 §6.1.3).
  if (q.ednsVersion > 0) return errorReply(msg, RCODE.BADVERS, q)
  if (q.opcode !== 0) return errorReply(msg, RCODE.NOTIMP, q)
  if (q.class !== CLASS_IN) {
    stats.refused++
    return errorReply(msg, RCODE.REFUSED, q)
  }
  // No view yet (first start, no cache): say so instead of claiming names don't exist.
  if (!zone) return errorReply(msg, RCODE.SERVFAIL, q)
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

/** Answers every datagram on `sock` from whatever `zone()` returns at that moment. */
export function serveUdp(sock: UdpSocket, zone: () => Zone | undefined, stats: DnsStats, log: Logger): void {
  sock.on('message', (msg, rinfo) => {
    try {
      const out = answer(msg, zone(), 'udp', stats)
      if (out?.length) sock.send(out, rinfo.port, rinfo.address)
    } catch (err) {
      log.error({ err }, 'dns query failed')
    }
  })
}

/** IP literals only: skip dgram's asynchronous resolver step on every send. */
const literalLookup = (host: string, _family: unknown, cb: (err: Error | null, address: string, family: number) => void) => cb(null, host, 4)

function resolveWorkers(w: number | 'auto' | undefined): number {
  if (w === undefined || w === 'auto') return Math.max(0, Math.min(3, availableParallelism() - 1))
  return w
}

export async function startDnsServer(opts: DnsServerOptions): Promise<DnsServer> {
  const log = opts.log.child({ component: 'dns' })
  const own = newStats()
  const theirs = new Map<ChildProcess, DnsStats>()
  const udp = new Map<string, UdpSocket>()
  const tcp = new Map<string, Server>()
  const conns = new Set<Socket>()
  const idle = opts.tcpIdleMs ?? 10_000
  const wanted = resolveWorkers(opts.workers)
  let port = opts.port
  let zone: Zone | undefined
  let input: ZoneInput | undefined
  let closing = false
  const children = new Set<ChildProcess>()

  const bindOne = async (host: string): Promise<void> => {
    const sock = createSocket({ type: 'udp4', lookup: literalLookup })
    await new Promise<void>((resolve, reject) => {
      sock.once('error', reject)
      sock.bind({ port, address: host, exclusive: true }, () => {
        sock.off('error', reject)
        resolve()
      })
    }).catch((err: unknown) => {
      sock.close()
      throw err
    })
    if (port === 0) port = sock.address().port
    const server = createServer((conn) => serveTcp(conn, () => zone, own, idle, conns, log))
    server.maxConnections = 256
    try {
      await listenOn(server, port, host, log, 'DNS TCP')
    } catch (err) {
      sock.close()
      throw err
    }
    sock.on('error', (err) => log.warn({ err, host }, 'dns udp socket error'))
    serveUdp(sock, () => zone, own, log)
    udp.set(host, sock)
    tcp.set(host, server)
    for (const child of children) shareSocket(child, host, sock)
  }

  const ready = new Set<ChildProcess>()
  const shareSocket = (child: ChildProcess, host: string, sock: UdpSocket) => {
    if (child.connected && ready.has(child)) child.send({ t: 'udp', host }, sock as never)
  }

  const spawnWorker = () => {
    const file = fileURLToPath(new URL(`./worker${import.meta.url.endsWith('.ts') ? '.ts' : '.js'}`, import.meta.url))
    const child = fork(file, [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
    children.add(child)
    child.on('message', (m: { t?: string; stats?: DnsStats }) => {
      if (m?.t === 'stats' && m.stats) theirs.set(child, m.stats)
      // Hand over the sockets only once the helper listens for them: a socket that arrives
      // before its code has loaded starts reading with nobody to answer, and drops queries.
      if (m?.t === 'ready') {
        ready.add(child)
        if (input) child.send({ t: 'zone', input })
        for (const [host, sock] of udp) shareSocket(child, host, sock)
      }
    })
    child.on('exit', (code, signal) => {
      children.delete(child)
      ready.delete(child)
      // Keep their counts: totals must not go backwards when a helper is replaced.
      const last = theirs.get(child)
      theirs.delete(child)
      if (last) for (const k of Object.keys(own) as Array<keyof DnsStats>) own[k] += last[k]
      if (closing) return
      log.warn({ code, signal }, 'a DNS helper process exited; starting another')
      setTimeout(() => {
        if (!closing) spawnWorker()
      }, 1000).unref()
    })
  }

  let binding: Binding | undefined
  const closeAll = async () => {
    closing = true
    binding?.stop()
    // The helpers hold copies of the UDP sockets: the port is free only once they are gone,
    // which a restart in the same process (SIGHUP) needs.
    const exited = [...children].filter((c) => c.exitCode === null && c.signalCode === null).map((c) => new Promise<void>((r) => c.once('exit', () => r())))
    for (const child of children) child.kill('SIGTERM')
    for (const c of conns) c.destroy()
    await Promise.all([...exited, ...[...udp.values()].map((s) => new Promise<void>((r) => s.close(() => r()))), ...[...tcp.values()].map((s) => new Promise<void>((r) => s.close(() => r())))])
  }

  try {
    binding = await bindAll(opts.hosts, bindOne, { log, what: 'DNS', port, retryMs: opts.retryMs })
  } catch (err) {
    await closeAll()
    const code = (err as NodeJS.ErrnoException).code
    const hint =
      code === 'EADDRINUSE' ? ' (something else serves DNS there; pick another --dns-port or --dns-listen)' : code === 'EACCES' ? ' (ports below 1024 need root or CAP_NET_BIND_SERVICE)' : ''
    throw new TincConsulError('DNS_LISTEN', `cannot serve DNS on port ${port}: ${(err as Error).message}${hint}`, { cause: err })
  }
  for (let i = 0; i < wanted; i++) spawnWorker()
  log.info({ hosts: [...udp.keys()], pending: binding.pending(), port, workers: wanted }, 'serving DNS')

  return {
    get port() {
      return port
    },
    workers: wanted,
    update(next) {
      zone = buildZone(next)
      input = next
      for (const child of ready) if (child.connected) child.send({ t: 'zone', input: next })
      return zone
    },
    zone: () => zone,
    stats() {
      const total = { ...own, byHelpers: 0 }
      for (const s of theirs.values()) {
        for (const k of Object.keys(own) as Array<keyof DnsStats>) total[k] += s[k]
        total.byHelpers += s.queries
      }
      return total
    },
    listening: () => [...udp.keys()],
    close: closeAll,
  }
}

/** DNS over TCP: 2-byte length prefixes, several queries per connection, closed when idle. */
function serveTcp(conn: Socket, zone: () => Zone | undefined, stats: DnsStats, idleMs: number, conns: Set<Socket>, log: Logger): void {
  let buf: Buffer = Buffer.alloc(0)
  conns.add(conn)
  conn.on('close', () => conns.delete(conn))
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
        const out = answer(msg, zone(), 'tcp', stats)
        if (!out?.length) {
          conn.destroy()
          return
        }
        const head = Buffer.alloc(2)
        head.writeUInt16BE(out.length)
        // A client that sends without reading would make us buffer without end: stop reading
        // until it has taken its answers.
        if (!conn.write(Buffer.concat([head, out])) && !conn.isPaused()) {
          conn.pause()
          conn.once('drain', () => conn.resume())
        }
      } catch (err) {
        log.error({ err }, 'dns query failed')
        conn.destroy()
        return
      }
    }
  })
}
