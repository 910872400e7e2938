import { connect } from 'node:net'
import { TincConsulError } from '../errors.ts'
import { hostFileFields, parseHostFile } from '../tinc/hostfile.ts'
import { makeRecord, validateRecord } from './publish.ts'
import { isTincName, parseHostPort } from '../tinc/names.ts'
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
  const hp = parseHostPort(endpoint)
  if (!hp?.port) return Promise.reject(new Error('not host:port'))
  const { host, port } = hp
  return new Promise((resolve, reject) => {
    const socket = connect({ host, port, timeout: timeoutMs })
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
 * Rebuilds a node's host file from a join reply through the checks a record
 * from Consul gets: the reply is sealed, but the joiner still writes nothing
 * it wouldn't accept from Consul.
 */
export function sanitizeHostFile(name: string, text: string, network: NetworkRecord): string | undefined {
  if (!isTincName(name)) return undefined
  const h = parseHostFile(text)
  if (h.errors.length || !h.publicKey) return undefined
  const f = hostFileFields(h)
  const vpn = f.subnets.length === 1 && f.subnets[0]?.endsWith('/32') ? f.subnets[0].slice(0, -3) : undefined
  if (!vpn) return undefined
  const record = makeRecord({ name, vpnAddress: vpn, addresses: f.addresses, port: f.port, options: f.options, publicKey: h.publicKey })
  if (validateRecord(record, network)) return undefined
  return record.hostFile
}
