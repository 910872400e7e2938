import { connect } from 'node:net'
import { TincConsulError } from '../errors.ts'
import { hostFileFields, parseHostFile, renderHostFile } from '../tinc/hostfile.ts'
import { peerSubnets } from '../tinc/mode.ts'
import { makeRecord, validateRecord } from './publish.ts'
import { isTincName, parseHostPort } from '../tinc/names.ts'
import { deriveInvite, seal, type Invite } from './invite.ts'
import { ephemeral, openReply, type Ephemeral } from './join-crypto.ts'
import { JOIN_VERSION, STATUS_OK, encodeRequest, joinReplySchema, readFrame, requestAad, type JoinReply } from './join-wire.ts'
import { decodeJson, networkMode, type NetworkRecord } from './record.ts'
import { printable, printableBytes } from '../util/text.ts'

/** The largest reply we accept: the host files of every public node. */
const MAX_REPLY = 1024 * 1024

export interface RedeemRequest {
  name: string
  publicKey: string
  addresses: string[]
  port: number
}

/** What one endpoint did with a join request, in words safe to print. */
export interface EndpointOutcome {
  endpoint: string
  /** It answered with a refusal (unauthenticated), rather than failing to answer usefully. */
  refused: boolean
  reason: string
}

/** Every endpoint refused the join or failed, and at least one refused. */
export class JoinRefusedError extends TincConsulError {
  override name = 'JoinRefusedError'
  readonly outcomes: readonly EndpointOutcome[]
  constructor(outcomes: readonly EndpointOutcome[]) {
    super('JOIN_REFUSED', `no join endpoint accepted the invite:\n  ${summarize(outcomes).join('\n  ')}`)
    this.outcomes = outcomes
  }
}

type Attempt = { ok: true; reply: JoinReply } | { ok: false; outcome: EndpointOutcome }

/**
 * Redeems an invite at the first endpoint that accepts it, asking each in turn.
 * A refusal travels outside the seal, so anyone who can answer on an endpoint's
 * address (or a node that listed itself as one) can send it: it rules out that
 * endpoint only. The attempt fails when every endpoint refused or failed, and
 * the error lists each one's reason. A refusal that concerns the joiner (a name
 * that is taken) comes from every endpoint alike and is listed once.
 */
export async function redeemInvite(
  inv: Invite,
  req: RedeemRequest,
  /** `onTry` hears of each endpoint before it is asked, and again with the reason (printable; code JOIN_REFUSED for a refusal) when it didn't let us in. */
  opts: {
    timeoutMs?: number
    /** How long to keep trying while no endpoint answers at all (default 30 s). */
    retryForMs?: number
    onTry?(endpoint: string, err?: TincConsulError): void
    onRetry?(delayMs: number): void
  } = {},
): Promise<JoinReply & { endpoint: string }> {
  const { id, key } = deriveInvite(inv.token)
  const header = Buffer.from(JSON.stringify({ v: JOIN_VERSION, net: inv.net, name: req.name, id }))
  // One ephemeral pair for all endpoints: only one of them can redeem the invite, and the
  // private half is dropped with this function's scope.
  const mine = ephemeral()
  const body = Buffer.from(
    JSON.stringify({
      v: JOIN_VERSION,
      token: Buffer.from(inv.token).toString('base64url'),
      epk: mine.publicKey.toString('base64url'),
      publicKey: req.publicKey,
      addresses: req.addresses,
      port: req.port,
    }),
  )
  const message = encodeRequest(header, seal(key, requestAad(header), body))
  const deadline = Date.now() + (opts.retryForMs ?? 30_000)
  for (let round = 0; ; round++) {
    const outcomes: EndpointOutcome[] = []
    for (const endpoint of inv.endpoints) {
      opts.onTry?.(endpoint)
      const attempt = await tryEndpoint(endpoint, { message, key, mine, header, name: req.name, timeoutMs: opts.timeoutMs ?? 15_000 })
      if (attempt.ok) return { ...attempt.reply, endpoint }
      outcomes.push(attempt.outcome)
      opts.onTry?.(endpoint, new TincConsulError(attempt.outcome.refused ? 'JOIN_REFUSED' : 'JOIN_UNREACHABLE', attempt.outcome.reason))
    }
    // Nobody answered at all: join servers may be starting or restarting, so a new round
    // follows while time is left. A refusal ends it: asking again would hear the same.
    // The delay grows from a quarter second: a join server that is starting is usually up
    // within a second, one that is down for longer needn't be asked more than every 2 s.
    const delay = Math.min(RETRY_MAX_DELAY_MS, 250 * 2 ** round)
    if (outcomes.some((o) => o.refused) || Date.now() + delay > deadline) return giveUp(outcomes)
    opts.onRetry?.(delay)
    await new Promise((r) => setTimeout(r, delay))
  }
}

const RETRY_MAX_DELAY_MS = 2000

function giveUp(outcomes: EndpointOutcome[]): never {
  if (outcomes.some((o) => o.refused)) throw new JoinRefusedError(outcomes)
  throw new TincConsulError('JOIN_UNREACHABLE', `no join endpoint answered:\n  ${summarize(outcomes).join('\n  ')}`)
}

/**
 * One endpoint's answer. Only a reply that opens with the invite's key comes
 * from a holder of the invite: a malformed one then ends the attempt, since the
 * invite is likely spent and other endpoints could only refuse it.
 */
async function tryEndpoint(endpoint: string, x: { message: Buffer; key: Uint8Array; mine: Ephemeral; header: Buffer; name: string; timeoutMs: number }): Promise<Attempt> {
  const shown = printable(endpoint)
  const failed = (reason: string, refused = false): Attempt => ({ ok: false, outcome: { endpoint: shown, refused, reason } })
  let payload: Buffer
  try {
    payload = await exchange(endpoint, x.message, x.timeoutMs)
  } catch (err) {
    return failed(printable((err as Error).message))
  }
  if (payload[0] !== STATUS_OK) return failed(printableBytes(payload.subarray(1)) || '(no reason given)', true)
  let plain: Uint8Array
  try {
    plain = openReply(x.key, x.header, x.mine, payload.subarray(1))
  } catch {
    return failed("its reply does not open with this invite's key (tampered with, or not a tinc-consul endpoint)")
  }
  const d = decodeJson(plain, joinReplySchema, MAX_REPLY)
  if (!d.ok) throw new TincConsulError('JOIN_BAD_REPLY', `${shown} sent a malformed reply: ${printable(d.reason)}`)
  if (d.value.name !== x.name) throw new TincConsulError('JOIN_BAD_REPLY', `${shown} answered for "${printable(d.value.name)}", not "${x.name}"`)
  return { ok: true, reply: d.value }
}

/** One line per distinct reason, naming every endpoint that gave it, in the order first seen. */
function summarize(outcomes: readonly EndpointOutcome[]): string[] {
  const groups = new Map<string, { endpoints: string[]; outcome: EndpointOutcome }>()
  for (const o of outcomes) {
    const k = `${o.refused}\0${o.reason}`
    const g = groups.get(k)
    if (g) g.endpoints.push(o.endpoint)
    else groups.set(k, { endpoints: [o.endpoint], outcome: o })
  }
  return [...groups.values()].map(({ endpoints, outcome }) => `${endpoints.join(', ')}${outcome.refused ? ' refused' : ''}: ${outcome.reason}`)
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
 * it wouldn't accept from Consul. The reply's file carries the node's /32 (its
 * record's form); what is written is rendered for the network's mode, as the
 * daemon renders it (no Subnet line in switch mode).
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
  return renderHostFile({ addresses: record.addresses, port: record.port, subnets: peerSubnets(networkMode(network), record.subnets), options: f.options, publicKey: h.publicKey })
}
