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
import { deriveInvite, open, seal, storedInviteSchema, type StoredInvite } from './invite.ts'
import {
  GENERIC_REFUSAL,
  MAX_FRAME,
  STATUS_ERROR,
  STATUS_OK,
  decodeRequest,
  frame,
  joinHeaderSchema,
  joinRequestSchema,
  readFrame,
  replyAad,
  requestAad,
  type JoinHeader,
  type JoinReply,
  type JoinRequest,
} from './join-wire.ts'
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

/** A refusal whose message may go back to the client as it is, once the client has authenticated. */
class Refusal extends Error {
  override name = 'Refusal'
}

/** A request whose sender has proved it holds the invite. */
interface Authenticated {
  h: JoinHeader
  header: Buffer
  /** The invite's KV key and the index it was read at: redeeming deletes it with check-and-set. */
  key: string
  modifyIndex: number
  inv: StoredInvite
  sealKey: Buffer
  req: JoinRequest
}

/**
 * The join endpoint public nodes serve. One request per connection: find the
 * invite by id, open the sealed request with the key stored for it, check the
 * token inside, then in one Consul transaction use up the invite, reserve an
 * address and create the node's record. Anything wrong before the token checks
 * out, or any failure on the way there, gets the same generic refusal and
 * nothing else: an endpoint tells no one without the invite the network's name.
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
    // A rate-limited address hears the generic refusal too: a text of its own would be the one
    // reply before authentication that isn't the generic one, and the generic one already
    // tells an honest joiner to try again later.
    if (!allow(peer)) {
      stats.rateLimited++
      log.warn({ peer }, 'join request rate-limited')
      // Its request goes unread, but is drained so the connection's close is seen; otherwise
      // each one would hold one of the server's 64 connections for good.
      socket.resume()
      socket.setTimeout(10_000, () => socket.destroy())
      await reply(STATUS_ERROR, Buffer.from(GENERIC_REFUSAL))
      return
    }
    let authed: Authenticated | undefined
    try {
      authed = await authenticate(await readFrame(socket, MAX_FRAME))
      const result = await redeem(authed)
      stats.served++
      await reply(STATUS_OK, result)
    } catch (err) {
      stats.refused++
      const known = err instanceof Refusal || (err instanceof TincConsulError && err.code.startsWith('JOIN_'))
      log.warn({ peer, authenticated: !!authed, reason: err instanceof Error ? err.message : String(err) }, 'join refused')
      if (!known) log.error({ err, peer }, 'join failed')
      // The reason reaches the sender only once it has proved it holds the invite.
      const msg = !authed ? GENERIC_REFUSAL : known ? err.message : 'the join server failed; try again or another endpoint'
      if (!socket.destroyed) await reply(STATUS_ERROR, Buffer.from(msg))
    }
  }

  /**
   * Proves the sender holds the invite: find it by id, open the sealed request
   * with the key stored for it, and check the token inside. Every way this
   * fails, a Consul read that fails included, ends in the generic refusal.
   * The header's network is compared only afterwards: a request for another
   * network then costs the same Consul read as any unknown invite id, and
   * tells the sender nothing, not even by its timing.
   */
  const authenticate = async (payload: Buffer): Promise<Authenticated> => {
    const { header, sealed } = decodeRequest(payload)
    const h = decodeJson(header, joinHeaderSchema, 1024)
    if (!h.ok) throw new Refusal(`bad request header: ${h.reason}`)
    const key = opts.layout.invite(h.value.id)
    const stored = await opts.client.kvGet(key)
    if (!stored) throw new Refusal('no such invite')
    const inv = decodeJson(stored.value, storedInviteSchema, 2048)
    if (!inv.ok) throw new Refusal(`unreadable invite: ${inv.reason}`)
    if (new Date(inv.value.expiresAt) <= new Date()) {
      await opts.client.request('DELETE', `/v1/kv/${key}?cas=${stored.modifyIndex}`).catch(() => undefined)
      throw new Refusal('expired invite')
    }
    const sealKey = Buffer.from(inv.value.key, 'base64')
    let plain: Uint8Array
    try {
      plain = open(sealKey, requestAad(header), sealed)
    } catch {
      throw new Refusal('request does not open with the invite key')
    }
    const req = decodeJson(plain, joinRequestSchema, MAX_FRAME)
    if (!req.ok) throw new Refusal(`bad join request: ${req.reason}`)
    // The stored key alone opens the box; only the invite string holds the token.
    const derived = deriveInvite(Buffer.from(req.value.token, 'base64url'))
    if (derived.id !== h.value.id || !timingSafeEqual(Buffer.from(derived.key), sealKey)) throw new Refusal('wrong token')
    return { h: h.value, header, key, modifyIndex: stored.modifyIndex, inv: inv.value, sealKey, req: req.value }
  }

  /** From here the caller has proved they hold the invite: specific errors are fine. */
  const redeem = async ({ h, header, key, modifyIndex, inv, sealKey, req }: Authenticated): Promise<Uint8Array> => {
    // Holding this network's invite, the sender knows the network's name already.
    if (h.net !== opts.net) throw new Refusal(`this endpoint serves network "${opts.net}", not "${h.net}"`)
    if (inv.name && inv.name !== h.name) throw new Refusal(`this invite is for "${inv.name}", not "${h.name}"; join with --name ${inv.name}`)
    const netEntry = await opts.client.kvGet(opts.layout.network)
    const network = netEntry && decodeJson(netEntry.value, networkRecordSchema)
    if (!network?.ok) throw new TincConsulError('NO_NETWORK', 'the network record is missing or unreadable')

    if (inv.serveJoins && req.addresses.length === 0) throw new Refusal('this invite is for a public node that serves joins: give --address')
    // Judge the record as peers will before anything is written: only its address is still
    // open, and any address the allocation can hand out passes the same checks.
    const recordFor = (address: string) => makeRecord({ name: h.name, vpnAddress: address, addresses: req.addresses, port: req.port, publicKey: req.publicKey })
    const refused = validateRecord(recordFor(intToIp(hostRange(network.value.cidr).first)), network.value)
    if (refused) throw new Refusal(`the new node's record would be refused by peers: ${refused}`)
    // Everything the reply needs is read before the transaction: once it has spent the invite,
    // a failed read could only leave the joiner with a used invite and a taken name.
    const judged = await peerHostFiles(opts.client, opts.layout, network.value, { name: h.name, fingerprint: keyFingerprint(req.publicKey) })
    if (judged.refusals.length) log.info({ name: h.name, left: judged.refusals.map((r) => `${r.key}: ${r.reason}`) }, "records left out of a joiner's host files")
    // Peers refuse a newcomer whose name differs from an established one only in case.
    const clash = judged.listed.find((n) => n !== h.name && n.toLowerCase() === h.name.toLowerCase())
    if (clash) throw new Refusal(`the name "${h.name}" differs from the existing node "${clash}" only in case, and peers would refuse it; join with another --name`)
    const hostFiles = judged.files
    const servers = await consulServers()
    const created: CreatedToken[] = []
    const acl = typeof opts.acl === 'function' ? await opts.acl() : opts.acl
    if (acl) created.push(await createNodeToken(opts.client, opts.layout, h.name))
    if (acl && inv.serveJoins) created.push(await createJoinServerToken(opts.client, opts.layout, h.name))
    try {
      const res = await allocateAddress({
        client: opts.client,
        layout: opts.layout,
        cidr: network.value.cidr,
        name: h.name,
        with: (address) => [
          // Single use: if another redemption got here first, this whole transaction rolls back.
          { KV: { Verb: 'delete-cas', Key: key, Index: modifyIndex } },
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
