import { connect } from 'node:net'
import ipaddr from 'ipaddr.js'
import { TincConsulError } from '../errors.ts'
import { ALLOWED_OPTIONS, isPlausibleRsaKey, parseHostFile, renderHostFile } from '../tinc/hostfile.ts'
import { isTincName } from '../tinc/names.ts'
import { deriveInvite, open, seal, type Invite } from './invite.ts'
import { STATUS_OK, encodeRequest, joinReplySchema, readFrame, replyAad, requestAad, type JoinReply } from './join-wire.ts'
import { decodeJson, type NetworkRecord } from './record.ts'

/** The largest reply we accept: the host files of every public node. */
const MAX_REPLY = 1024 * 1024

export interface RedeemRequest {
  name: string
  publicKey: string
  addresses: string[]
  port: number
}

export class JoinRefusedError extends TincConsulError {
  override name = 'JoinRefusedError'
  constructor(endpoint: string, message: string) {
    super('JOIN_REFUSED', `${endpoint} refused the join: ${message}`)
  }
}

/**
 * Redeems an invite at the first endpoint that answers. An endpoint that can't
 * be reached is skipped; a refusal ends the attempt, since every endpoint
 * consults the same invite.
 */
export async function redeemInvite(inv: Invite, req: RedeemRequest, opts: { timeoutMs?: number; onTry?(endpoint: string, err?: Error): void } = {}): Promise<JoinReply & { endpoint: string }> {
  const { id, key } = deriveInvite(inv.token)
  const header = Buffer.from(JSON.stringify({ v: 1, net: inv.net, name: req.name, id }))
  const body = Buffer.from(JSON.stringify({ v: 1, token: Buffer.from(inv.token).toString('base64url'), publicKey: req.publicKey, addresses: req.addresses, port: req.port }))
  const message = encodeRequest(header, seal(key, requestAad(header), body))
  const failures: string[] = []
  for (const endpoint of inv.endpoints) {
    opts.onTry?.(endpoint)
    let payload: Buffer
    try {
      payload = await exchange(endpoint, message, opts.timeoutMs ?? 15_000)
    } catch (err) {
      failures.push(`${endpoint}: ${(err as Error).message}`)
      opts.onTry?.(endpoint, err as Error)
      continue
    }
    if (payload[0] !== STATUS_OK) throw new JoinRefusedError(endpoint, payload.subarray(1, 300).toString('utf8'))
    let plain: Uint8Array
    try {
      plain = open(key, replyAad(header), payload.subarray(1))
    } catch {
      throw new TincConsulError('JOIN_BAD_REPLY', `${endpoint} sent a reply that does not open with this invite's key (tampered with, or not a tinc-consul endpoint)`)
    }
    const d = decodeJson(plain, joinReplySchema, MAX_REPLY)
    if (!d.ok) throw new TincConsulError('JOIN_BAD_REPLY', `${endpoint} sent a malformed reply: ${d.reason}`)
    if (d.value.name !== req.name) throw new TincConsulError('JOIN_BAD_REPLY', `${endpoint} answered for "${d.value.name}", not "${req.name}"`)
    return { ...d.value, endpoint }
  }
  throw new TincConsulError('JOIN_UNREACHABLE', `no join endpoint answered:\n  ${failures.join('\n  ')}`)
}

function exchange(endpoint: string, message: Buffer, timeoutMs: number): Promise<Buffer> {
  const m = /^\[?([^\]]+)\]?:(\d+)$/.exec(endpoint)
  if (!m) return Promise.reject(new Error('not host:port'))
  return new Promise((resolve, reject) => {
    const socket = connect({ host: m[1], port: Number(m[2]), timeout: timeoutMs })
    socket.once('timeout', () => socket.destroy(new Error(`no answer within ${timeoutMs / 1000} s`)))
    socket.once('error', reject)
    socket.once('connect', () => {
      socket.setTimeout(0)
      socket.write(message)
      readFrame(socket, MAX_REPLY, timeoutMs)
        .then(resolve, reject)
        .finally(() => socket.destroy())
    })
  })
}

/**
 * Rebuilds a node's host file from a join reply with the same
 * allow-list peers' records get: the reply is sealed, but the joiner still
 * writes nothing it wouldn't accept from Consul.
 */
export function sanitizeHostFile(name: string, text: string, network: NetworkRecord): string | undefined {
  if (!isTincName(name)) return undefined
  const h = parseHostFile(text)
  if (h.errors.length || !h.publicKey || !isPlausibleRsaKey(h.publicKey)) return undefined
  const values = (k: string) => h.entries.filter((e) => e.key.toLowerCase() === k).map((e) => e.value)
  const subnets = values('subnet').map((s) => s.split('#')[0]?.trim() ?? '')
  const own = subnets[0]?.replace(/\/32$/, '') ?? ''
  if (subnets.length !== 1 || !subnets[0]?.endsWith('/32') || !ipaddr.IPv4.isValidFourPartDecimal(own) || !ipaddr.IPv4.parse(own).match(ipaddr.IPv4.parseCIDR(network.cidr))) return undefined
  const options = h.entries.flatMap((e) => {
    const k = Object.keys(ALLOWED_OPTIONS).find((o) => o.toLowerCase() === e.key.toLowerCase())
    return k && ALLOWED_OPTIONS[k]?.test(e.value) ? [{ key: k, value: e.value }] : []
  })
  const addresses = values('address').map((a) => a.split(/\s+/)[0] ?? '').filter((a) => /^[A-Za-z0-9.:-]{1,253}$/.test(a))
  const port = Number(values('port')[0] ?? 655)
  if (!(port >= 1 && port <= 65535)) return undefined
  return renderHostFile({ addresses, port, subnets: subnets as string[], options, publicKey: h.publicKey })
}
