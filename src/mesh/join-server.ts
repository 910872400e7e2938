import { parseHostPort } from '../tinc/names.ts'
import { timingSafeEqual } from 'node:crypto'
import { createServer, type Server, type Socket } from 'node:net'
import { b64, type ConsulClient } from '../consul/client.ts'
import { createJoinServerToken, createNodeToken, deleteToken, type CreatedToken } from '../consul/acl.ts'
import type { KvLayout } from './kv-layout.ts'
import { listenOn } from '../util/listen.ts'
import { TincConsulError } from '../errors.ts'
import { keyFingerprint } from '../tinc/hostfile.ts'
import type { Logger } from '../log.ts'
import { peerHostFiles } from './peer-files.ts'
import { allocateAddress, hostRange, intToIp } from './ipam.ts'
import { deriveInvite, open, seal, storedInviteSchema } from './invite.ts'
import { GENERIC_REFUSAL, MAX_FRAME, STATUS_ERROR, STATUS_OK, decodeRequest, frame, joinHeaderSchema, joinRequestSchema, readFrame, replyAad, requestAad, type JoinReply } from './join-wire.ts'
import { makeRecord, validateRecord } from './publish.ts'
import { decodeJson, networkRecordSchema } from './record.ts'

export const DEFAULT_JOIN_PORT = 8655

export interface JoinServerOptions {
  net: string
  layout: KvLayout
  /** Client with the join-server token (or none, with ACLs off). */
  client: ConsulClient
  url: string
  token?: string
  /**
   * Create a Consul token for each new node (ACLs on). A function is asked at
   * each join until it answers: the agent may still be starting when we do.
   */
  acl: boolean | (() => Promise<boolean>)
  /** The Consul gossip key, handed to new nodes for their agent's config (`install`). */
  gossipKey?: string
  host?: string
  port: number
  log: Logger
  /** Requests allowed from one source address in a burst, then one per `refillMs`. */
  burst?: number
  refillMs?: number
}

export interface JoinServer {
  readonly port: number
  readonly stats: { served: number; refused: number; rateLimited: number }
  close(): Promise<void>
}

/** A refusal whose message may go back to the client as it is. */
class Refusal extends Error {
  override name = 'Refusal'
}

/**
 * The join endpoint public nodes serve. One request per connection: find the
 * invite by id, open the sealed request with the key stored for it, check the
 * token inside, then in one Consul transaction use up the invite, reserve an
 * address and create the node's record. Anything wrong before the seal opens
 * gets the same generic refusal.
 */
export async function startJoinServer(opts: JoinServerOptions): Promise<JoinServer> {
  const log = opts.log.child({ component: 'join' })
  const stats = { served: 0, refused: 0, rateLimited: 0 }
  const burst = opts.burst ?? 5
  const refillMs = opts.refillMs ?? 2000
  const buckets = new Map<string, { tokens: number; at: number }>()
  const allow = (ip: string): boolean => {
    const now = Date.now()
    const b = buckets.get(ip) ?? { tokens: burst, at: now }
    b.tokens = Math.min(burst, b.tokens + (now - b.at) / refillMs)
    b.at = now
    buckets.set(ip, b)
    // Forget buckets that have refilled by now (stored tokens only refill when their address
    // asks again), so a scan from many addresses can't grow the map forever.
    if (buckets.size > 10_000) for (const [k, v] of buckets) if (k !== ip && v.tokens + (now - v.at) / refillMs >= burst) buckets.delete(k)
    if (b.tokens < 1) return false
    b.tokens -= 1
    return true
  }

  const handle = async (socket: Socket) => {
    const peer = socket.remoteAddress ?? '?'
    socket.setNoDelay(true)
    const reply = (status: number, body: Uint8Array) => new Promise<void>((resolve) => socket.end(frame(Buffer.concat([Buffer.from([status]), body])), () => resolve()))
    if (!allow(peer)) {
      stats.rateLimited++
      log.warn({ peer }, 'join request rate-limited')
      await reply(STATUS_ERROR, Buffer.from('too many requests from your address; wait a few seconds'))
      return
    }
    try {
      const payload = await readFrame(socket, MAX_FRAME)
      const { header, sealed } = decodeRequest(payload)
      const h = decodeJson(header, joinHeaderSchema, 1024)
      if (!h.ok) throw new Refusal(`bad request header: ${h.reason}`)
      if (h.value.net !== opts.net) throw new Refusal(`this endpoint serves network "${opts.net}", not "${h.value.net}"`)
      const result = await redeem(h.value, header, sealed)
      stats.served++
      await reply(STATUS_OK, result)
    } catch (err) {
      stats.refused++
      const msg = err instanceof Refusal || (err instanceof TincConsulError && err.code.startsWith('JOIN_')) ? err.message : 'the join server failed; try again or another endpoint'
      log.warn({ peer, reason: err instanceof Error ? err.message : String(err) }, 'join refused')
      if (!(err instanceof Refusal) && !(err instanceof TincConsulError && err.code.startsWith('JOIN_'))) log.error({ err, peer }, 'join failed')
      if (!socket.destroyed) await reply(STATUS_ERROR, Buffer.from(msg))
    }
  }

  const redeem = async (h: { net: string; name: string; id: string }, header: Buffer, sealed: Buffer): Promise<Uint8Array> => {
    const key = opts.layout.invite(h.id)
    const stored = await opts.client.kvGet(key)
    if (!stored) throw new Refusal(GENERIC_REFUSAL)
    const inv = decodeJson(stored.value, storedInviteSchema, 2048)
    if (!inv.ok) throw new Refusal(GENERIC_REFUSAL)
    if (new Date(inv.value.expiresAt) <= new Date()) {
      await opts.client.request('DELETE', `/v1/kv/${key}?cas=${stored.modifyIndex}`).catch(() => undefined)
      throw new Refusal(GENERIC_REFUSAL)
    }
    const sealKey = Buffer.from(inv.value.key, 'base64')
    let plain: Uint8Array
    try {
      plain = open(sealKey, requestAad(header), sealed)
    } catch {
      throw new Refusal(GENERIC_REFUSAL)
    }
    const req = decodeJson(plain, joinRequestSchema, MAX_FRAME)
    if (!req.ok) throw new Refusal(`bad join request: ${req.reason}`)
    const token = Buffer.from(req.value.token, 'base64url')
    // The stored key alone opens the box; only the invite string holds the token.
    const derived = deriveInvite(token)
    if (derived.id !== h.id || !timingSafeEqual(Buffer.from(derived.key), sealKey)) throw new Refusal(GENERIC_REFUSAL)
    // From here the caller has proved they hold the invite: specific errors are fine.
    if (inv.value.name && inv.value.name !== h.name) throw new Refusal(`this invite is for "${inv.value.name}", not "${h.name}"; join with --name ${inv.value.name}`)
    const netEntry = await opts.client.kvGet(opts.layout.network)
    const network = netEntry && decodeJson(netEntry.value, networkRecordSchema)
    if (!network?.ok) throw new TincConsulError('NO_NETWORK', 'the network record is missing or unreadable')

    if (inv.value.serveJoins && req.value.addresses.length === 0) throw new Refusal('this invite is for a public node that serves joins: give --address')
    // Judge the record as peers will before anything is written: only its address is still
    // open, and any address the allocation can hand out passes the same checks.
    const recordFor = (address: string) => makeRecord({ name: h.name, vpnAddress: address, addresses: req.value.addresses, port: req.value.port, publicKey: req.value.publicKey })
    const refused = validateRecord(recordFor(intToIp(hostRange(network.value.cidr).first)), network.value)
    if (refused) throw new Refusal(`the new node's record would be refused by peers: ${refused}`)
    // Everything the reply needs is read before the transaction: once it has spent the invite,
    // a failed read could only leave the joiner with a used invite and a taken name.
    const judged = await peerHostFiles(opts.client, opts.layout, network.value, { name: h.name, fingerprint: keyFingerprint(req.value.publicKey) })
    if (judged.refusals.length) log.info({ name: h.name, left: judged.refusals.map((r) => `${r.key}: ${r.reason}`) }, "records left out of a joiner's host files")
    // Peers refuse a newcomer whose name differs from an established one only in case.
    const clash = judged.listed.find((n) => n !== h.name && n.toLowerCase() === h.name.toLowerCase())
    if (clash) throw new Refusal(`the name "${h.name}" differs from the existing node "${clash}" only in case, and peers would refuse it; join with another --name`)
    const hostFiles = judged.files
    const servers = await consulServers()
    const created: CreatedToken[] = []
    const acl = typeof opts.acl === 'function' ? await opts.acl() : opts.acl
    if (acl) created.push(await createNodeToken(opts.client, opts.layout, h.name))
    if (acl && inv.value.serveJoins) created.push(await createJoinServerToken(opts.client, opts.layout, h.name))
    try {
      const res = await allocateAddress({
        client: opts.client,
        layout: opts.layout,
        cidr: network.value.cidr,
        name: h.name,
        with: (address) => [
          // Single use: if another redemption got here first, this whole transaction rolls back.
          { KV: { Verb: 'delete-cas', Key: key, Index: stored.modifyIndex } },
          { KV: { Verb: 'cas', Key: opts.layout.node(h.name), Value: b64(JSON.stringify(recordFor(address))), Index: 0 } },
        ],
      })
      if (!res.ok) throw new Refusal(res.op === 0 ? GENERIC_REFUSAL : `the name "${h.name}" is taken; join with another --name, or revoke the old node first`)
      log.info({ name: h.name, address: res.address }, 'a new node joined')
      const body: JoinReply = {
        v: 1,
        name: h.name,
        address: res.address,
        network: network.value,
        prefix: opts.layout.prefix,
        hostFiles,
        consul: { ...(created[0] ? { token: created[0].secretId } : {}), ...(created[1] ? { joinToken: created[1].secretId } : {}), servers, ...(opts.gossipKey ? { gossipKey: opts.gossipKey } : {}) },
      }
      return seal(sealKey, replyAad(header), Buffer.from(JSON.stringify(body)))
    } catch (err) {
      for (const t of created) await deleteToken(opts.client, t.accessorId).catch((e: unknown) => log.error({ err: e }, 'could not delete the token of a failed join'))
      throw err
    }
  }

  const consulServers = async (): Promise<string[]> => {
    const peers = await opts.client.request<string[]>('GET', '/v1/status/peers').catch(() => [])
    // A first server still on loopback (installed with --bootstrap, before init) is no use to a joiner.
    return peers.flatMap((p) => parseHostPort(p)?.host ?? []).filter((h) => !h.startsWith('127.'))
  }

  const server: Server = createServer((socket) => {
    socket.on('error', () => undefined)
    void handle(socket)
  })
  server.maxConnections = 64
  await listenOn(server, opts.port, opts.host ?? '0.0.0.0', log, 'join').catch((err: Error) => {
    throw new TincConsulError('JOIN_LISTEN', `cannot serve joins on ${opts.host ?? '0.0.0.0'}:${opts.port}: ${err.message}`, { cause: err })
  })
  const address = server.address()
  log.info({ port: typeof address === 'object' && address ? address.port : opts.port }, 'serving joins')
  return {
    port: typeof address === 'object' && address ? address.port : opts.port,
    stats,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve())
      }),
  }
}
