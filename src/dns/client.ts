import { createSocket } from 'node:dgram'
import { connect, isIPv6 } from 'node:net'
import { TincConsulError } from '../errors.ts'
import { TYPE, buildQuery, decodeMessage, type DecodedMessage } from './wire.ts'

export interface QueryOptions {
  server: string
  port: number
  tcp?: boolean
  timeoutMs?: number
}

/**
 * One question to one server: UDP first, and TCP when the answer comes back
 * truncated (or when asked). Used by `tinc-consul resolve` and the tests.
 */
export async function query(name: string, type: number, opts: QueryOptions): Promise<DecodedMessage & { transport: 'udp' | 'tcp' }> {
  const id = Math.floor(Math.random() * 0x10000)
  const msg = buildQuery(name, type, { id })
  const ask = async (transport: 'udp' | 'tcp') => {
    const raw = await (transport === 'udp' ? udpExchange : tcpExchange)(msg, opts)
    // A reply is as untrusted as any packet: a broken one is an error with a code, not a crash.
    let res: DecodedMessage
    try {
      res = decodeMessage(raw)
    } catch (err) {
      throw new TincConsulError('DNS_BAD_REPLY', `the reply from ${opts.server}:${opts.port} is malformed: ${(err as Error).message}`, { cause: err })
    }
    if (res.id !== id) throw new TincConsulError('DNS_BAD_REPLY', `the reply from ${opts.server}:${opts.port} has the wrong ID`)
    return { ...res, transport }
  }
  if (!opts.tcp) {
    const res = await ask('udp')
    if (!res.flags.tc) return res
  }
  return ask('tcp')
}

function udpExchange(msg: Buffer, opts: QueryOptions): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const sock = createSocket(isIPv6(opts.server) ? 'udp6' : 'udp4')
    const timer = setTimeout(
      () => done(new TincConsulError('DNS_TIMEOUT', `no answer from ${opts.server}:${opts.port} over UDP within ${opts.timeoutMs ?? 2000} ms (is \`tinc-consul run\` serving DNS there?)`)),
      opts.timeoutMs ?? 2000,
    )
    const done = (err?: Error, reply?: Buffer) => {
      clearTimeout(timer)
      sock.close()
      if (err) reject(err)
      else resolve(reply as Buffer)
    }
    sock.on('error', (err) => done(new TincConsulError('DNS_UNREACHABLE', `cannot ask ${opts.server}:${opts.port}: ${err.message}`, { cause: err })))
    sock.on('message', (reply) => done(undefined, reply))
    sock.send(msg, opts.port, opts.server)
  })
}

function tcpExchange(msg: Buffer, opts: QueryOptions): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const sock = connect(opts.port, opts.server)
    let buf = Buffer.alloc(0)
    const timer = setTimeout(() => done(new TincConsulError('DNS_TIMEOUT', `no answer from ${opts.server}:${opts.port} over TCP within ${opts.timeoutMs ?? 2000} ms`)), opts.timeoutMs ?? 2000)
    const done = (err?: Error, reply?: Buffer) => {
      clearTimeout(timer)
      sock.destroy()
      if (err) reject(err)
      else resolve(reply as Buffer)
    }
    sock.on('error', (err) => done(new TincConsulError('DNS_UNREACHABLE', `cannot ask ${opts.server}:${opts.port} over TCP: ${err.message}`, { cause: err })))
    sock.on('connect', () => {
      const head = Buffer.alloc(2)
      head.writeUInt16BE(msg.length)
      sock.write(Buffer.concat([head, msg]))
    })
    sock.on('data', (chunk) => {
      buf = Buffer.concat([buf, chunk])
      if (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) done(undefined, buf.subarray(2, 2 + buf.readUInt16BE(0)))
    })
    sock.on('end', () => done(new TincConsulError('DNS_BAD_REPLY', `${opts.server}:${opts.port} closed the TCP connection without a whole answer`)))
  })
}

export const QUERY_TYPES: Record<string, number> = { A: TYPE.A, AAAA: TYPE.AAAA, CNAME: TYPE.CNAME, NS: TYPE.NS, PTR: TYPE.PTR, SOA: TYPE.SOA, SRV: TYPE.SRV, TXT: TYPE.TXT, ANY: TYPE.ANY }
