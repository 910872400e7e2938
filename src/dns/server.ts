import { siblingModule } from '../util/proc.ts'
import { fork, type ChildProcess } from 'node:child_process'
import { createSocket, type Socket as UdpSocket } from 'node:dgram'
import { createServer, isIPv6, type Server, type Socket } from 'node:net'
import { availableParallelism } from 'node:os'
import { bindAll, listenOn, type Binding } from '../util/listen.ts'
import { TincConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import { DEFAULT_ANSWER_LIMITS, DEFAULT_TCP_LIMITS, type AnswerLimits, type TcpLimits } from './limits.ts'
import { buildZone, type Zone, type ZoneInput } from './zone.ts'
import { CLASS_IN, FormError, OUR_EDNS_SIZE, RCODE, errorReply, lengthPrefix, parseQuery, reply, tcpReply, type Prepared, type Question } from './wire.ts'

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
  /** Instances and bytes per answer; DEFAULT_ANSWER_LIMITS for what isn't given. */
  answers?: Partial<AnswerLimits>
  /** TCP connections at once; DEFAULT_TCP_LIMITS for what isn't given. */
  tcp?: Partial<TcpLimits>
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
  /**
   * Totals over this process and the helpers (theirs as last reported, about
   * once a second); `byHelpers` is the helpers' share of the queries. TCP is
   * served here only: `tcpOpen` connections now, `tcpRefused` over the limits.
   */
  stats(): DnsStats & { byHelpers: number; tcpOpen: number; tcpRefused: number }
  /** The addresses bound right now; the rest are being retried. */
  listening(): string[]
  readonly workers: number
  close(): Promise<void>
}

export const newStats = (): DnsStats => ({ queries: 0, formerr: 0, refused: 0, truncated: 0 })

/**
 * Everything about one query but the size of its reply: the question and its
 * pre-encoded answer, or the finished error reply, or nothing (for garbage too
 * short to answer).
 */
function resolveQuery(msg: Uint8Array, zone: Zone | undefined, stats: DnsStats): { q: Question; prepared: Prepared } | Buffer | undefined {
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
  return { q, prepared }
}

/** One query in, one reply out (or nothing, for garbage too short to answer). */
export function answer(msg: Uint8Array, zone: Zone | undefined, transport: 'udp' | 'tcp', stats: DnsStats): Buffer | undefined {
  const r = resolveQuery(msg, zone, stats)
  if (!r || Buffer.isBuffer(r)) return r
  // Over UDP: what the client can take (512 without EDNS); TCP carries up to 64 KiB.
  const out = reply(msg, r.q, r.prepared, transport === 'tcp' ? 65535 : r.q.ednsSize ? Math.min(r.q.ednsSize, OUR_EDNS_SIZE) : 512)
  if (out[2] !== undefined && out[2] & 0x02) stats.truncated++
  return out
}

/** `answer` for TCP, framed, as pieces to write together (see tcpReply). */
export function answerTcp(msg: Uint8Array, zone: Zone | undefined, stats: DnsStats): Buffer[] | undefined {
  const r = resolveQuery(msg, zone, stats)
  if (!r) return undefined
  if (Buffer.isBuffer(r)) return r.length ? [lengthPrefix(r.length), r] : undefined
  return tcpReply(msg, r.q, r.prepared)
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
const literalLookup = (host: string, _family: unknown, cb: (err: Error | null, address: string, family: number) => void) => cb(null, host, isIPv6(host) ? 6 : 4)

function resolveWorkers(w: number | 'auto' | undefined): number {
  if (w === undefined || w === 'auto') return Math.max(0, Math.min(3, availableParallelism() - 1))
  return w
}

/**
 * Holds the forked helpers: starts them, replaces one that dies, hands them the
 * UDP sockets and every zone, and keeps the counts they report.
 */
function helpers(log: Logger, own: DnsStats, isClosing: () => boolean) {
  const children = new Set<ChildProcess>()
  const ready = new Set<ChildProcess>()
  const theirs = new Map<ChildProcess, DnsStats>()
  const sockets = new Map<string, UdpSocket>()
  let zone: { input: ZoneInput; limits: AnswerLimits } | undefined
  const share = (child: ChildProcess, host: string, sock: UdpSocket) => {
    if (child.connected && ready.has(child)) child.send({ t: 'udp', host }, sock as never)
  }
  const spawn = () => {
    const file = siblingModule(import.meta.url, 'worker')
    const child = fork(file, [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
    children.add(child)
    child.on('message', (m: { t?: string; stats?: DnsStats }) => {
      if (m?.t === 'stats' && m.stats) theirs.set(child, m.stats)
      // Hand over the sockets only once the helper listens for them: a socket that arrives
      // before its code has loaded starts reading with nobody to answer, and drops queries.
      if (m?.t === 'ready') {
        ready.add(child)
        if (zone) child.send({ t: 'zone', ...zone })
        for (const [host, sock] of sockets) share(child, host, sock)
      }
    })
    child.on('exit', (code, signal) => {
      children.delete(child)
      ready.delete(child)
      // Keep their counts: totals must not go backwards when a helper is replaced.
      const last = theirs.get(child)
      theirs.delete(child)
      if (last) for (const k of Object.keys(own) as Array<keyof DnsStats>) own[k] += last[k]
      if (isClosing()) return
      log.warn({ code, signal }, 'a DNS helper process exited; starting another')
      setTimeout(() => {
        if (!isClosing()) spawn()
      }, 1000).unref()
    })
  }
  return {
    spawn,
    addSocket(host: string, sock: UdpSocket) {
      sockets.set(host, sock)
      for (const child of children) share(child, host, sock)
    },
    setZone(input: ZoneInput, limits: AnswerLimits) {
      zone = { input, limits }
      for (const child of ready) if (child.connected) child.send({ t: 'zone', input, limits })
    },
    reported: () => theirs.values(),
    /** Stops them all; resolves once they are gone, and with them their copies of the UDP sockets. */
    stop() {
      const exited = [...children].filter((c) => c.exitCode === null && c.signalCode === null).map((c) => new Promise<void>((r) => c.once('exit', () => r())))
      for (const child of children) child.kill('SIGTERM')
      return Promise.all(exited)
    },
  }
}

/**
 * Binds UDP and TCP on one port of one address. Port 0 (tests, the benchmark)
 * takes whatever port UDP is given, which TCP may already have in use (as the
 * local end of some connection): then it tries again with another.
 */
async function bindPair(host: string, port: number, onTcp: (conn: Socket) => void, log: Logger): Promise<{ sock: UdpSocket; server: Server }> {
  for (let attempt = 1; ; attempt++) {
    // The IPv6 VPN address (networks with cidr6) gets a udp6 socket; everything else udp4.
    const sock = createSocket({ type: isIPv6(host) ? 'udp6' : 'udp4', lookup: literalLookup })
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
    const server = createServer(onTcp)
    try {
      await listenOn(server, sock.address().port, host, log, 'DNS TCP')
      return { sock, server }
    } catch (err) {
      sock.close()
      if (port !== 0 || attempt >= 5 || (err as NodeJS.ErrnoException).code !== 'EADDRINUSE') throw err
    }
  }
}

export async function startDnsServer(opts: DnsServerOptions): Promise<DnsServer> {
  const log = opts.log.child({ component: 'dns' })
  const own = newStats()
  const answers: AnswerLimits = { ...DEFAULT_ANSWER_LIMITS, ...opts.answers }
  const tcpLimits: TcpLimits = { ...DEFAULT_TCP_LIMITS, ...opts.tcp }
  const udp = new Map<string, UdpSocket>()
  const tcp = new Map<string, Server>()
  const wanted = resolveWorkers(opts.workers)
  let port = opts.port
  let zone: Zone | undefined
  let closing = false
  const workers = helpers(log, own, () => closing)
  const admission = tcpAdmission(tcpLimits, log)
  const tcpContext: TcpContext = { zone: () => zone, stats: own, idleMs: opts.tcpIdleMs ?? 10_000, log }

  const bindOne = async (host: string): Promise<void> => {
    const { sock, server } = await bindPair(
      host,
      port,
      (conn) => {
        if (admission.admit(conn)) serveTcp(conn, tcpContext)
      },
      log,
    )
    port = sock.address().port
    sock.on('error', (err) => log.warn({ err, host }, 'dns udp socket error'))
    serveUdp(sock, () => zone, own, log)
    udp.set(host, sock)
    tcp.set(host, server)
    workers.addSocket(host, sock)
  }

  let binding: Binding | undefined
  const closeAll = async () => {
    closing = true
    binding?.stop()
    // The helpers hold copies of the UDP sockets: the port is free only once they are gone,
    // which a restart in the same process (SIGHUP) needs.
    const helpersGone = workers.stop()
    admission.closeAll()
    await Promise.all([helpersGone, ...[...udp.values()].map((s) => new Promise<void>((r) => s.close(() => r()))), ...[...tcp.values()].map((s) => new Promise<void>((r) => s.close(() => r())))])
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
  for (let i = 0; i < wanted; i++) workers.spawn()
  log.info({ hosts: [...udp.keys()], pending: binding.pending(), port, workers: wanted, answers, tcp: tcpLimits }, 'serving DNS')

  return {
    get port() {
      return port
    },
    workers: wanted,
    update(next) {
      zone = buildZone(next, answers)
      workers.setZone(next, answers)
      return zone
    },
    zone: () => zone,
    stats() {
      const total = { ...own, byHelpers: 0, tcpOpen: admission.open(), tcpRefused: admission.refused() }
      for (const s of workers.reported()) {
        for (const k of Object.keys(own) as Array<keyof DnsStats>) total[k] += s[k]
        total.byHelpers += s.queries
      }
      return total
    },
    listening: () => [...udp.keys()],
    close: closeAll,
  }
}

/**
 * Counts TCP connections in all and by source address, and closes at once any
 * connection over either limit. A refusal is counted, and logged at most once
 * a minute: a peer that keeps trying must not fill the log either.
 */
function tcpAdmission(limits: TcpLimits, log: Logger) {
  const conns = new Set<Socket>()
  const bySource = new Map<string, number>()
  let refused = 0
  let lastWarned = 0
  return {
    admit(conn: Socket): boolean {
      const from = conn.remoteAddress ?? ''
      const mine = bySource.get(from) ?? 0
      if (conns.size >= limits.connections || mine >= limits.perSource) {
        refused++
        if (Date.now() - lastWarned > 60_000) {
          lastWarned = Date.now()
          log.warn({ from, fromSource: mine, open: conns.size, limits }, 'refusing DNS over TCP connections: too many open (counted in status as tcpRefused)')
        }
        conn.destroy()
        return false
      }
      conns.add(conn)
      bySource.set(from, mine + 1)
      conn.once('close', () => {
        conns.delete(conn)
        const left = (bySource.get(from) ?? 1) - 1
        if (left > 0) bySource.set(from, left)
        else bySource.delete(from)
      })
      return true
    },
    open: () => conns.size,
    refused: () => refused,
    closeAll() {
      for (const c of conns) c.destroy()
    },
  }
}

interface TcpContext {
  zone: () => Zone | undefined
  stats: DnsStats
  idleMs: number
  log: Logger
}

/**
 * DNS over TCP (RFC 7766): 2-byte length prefixes, several queries per
 * connection, closed after `idleMs` without traffic either way.
 *
 * Memory per connection is fixed, however much a client pipelines and however
 * slowly it reads. Queries are answered one at a time, and the next only while
 * the socket's write buffer is under its mark (16 KiB); past it, reading stops
 * until 'drain', so a client that doesn't take its answers gets no more of its
 * queries read. New input is taken only when no whole query is left, so what
 * waits unprocessed here is at most one partial message (under 64 KiB + 2)
 * and one read from the kernel (64 KiB), and Node's own read buffer holds at
 * most its mark (16 KiB) and one more read once paused. Queued output is at
 * most the mark and one answer's header, since the records themselves are
 * the zone's, written without a copy (tcpReply). About 224 KiB in all; a
 * connection stalled like that sees no traffic and is closed when idle.
 */
function serveTcp(conn: Socket, ctx: TcpContext): void {
  let pending: Buffer = Buffer.alloc(0)
  conn.setTimeout(ctx.idleMs, () => conn.destroy())
  conn.on('error', () => undefined)
  const nextQuery = (): Buffer | undefined => {
    if (pending.length < 2) return undefined
    const end = 2 + pending.readUInt16BE(0)
    if (pending.length < end) return undefined
    const msg = pending.subarray(2, end)
    pending = pending.subarray(end)
    return msg
  }
  const pump = () => {
    while (!conn.destroyed) {
      if (conn.writableNeedDrain) {
        conn.pause()
        return
      }
      const msg = nextQuery()
      if (!msg) {
        conn.resume()
        return
      }
      if (!respond(conn, msg, ctx)) {
        conn.destroy()
        return
      }
    }
  }
  conn.on('drain', pump)
  conn.on('data', (chunk: Buffer) => {
    pending = pending.length ? Buffer.concat([pending, chunk]) : chunk
    pump()
  })
}

/** Writes the answer to one query; false when the connection should be closed instead (garbage too short to answer, or a bug). */
function respond(conn: Socket, msg: Buffer, ctx: TcpContext): boolean {
  let parts: Buffer[] | undefined
  try {
    parts = answerTcp(msg, ctx.zone(), ctx.stats)
  } catch (err) {
    ctx.log.error({ err }, 'dns query failed')
    return false
  }
  if (!parts) return false
  // Corked, the pieces leave in one writev.
  conn.cork()
  for (const part of parts) conn.write(part)
  conn.uncork()
  return true
}
