import { parseHostPort } from '../tinc/names.ts'
import { b64, type ConsulClient } from '../consul/client.ts'
import { createJoinServerToken, createNodeToken, deleteToken, type CreatedToken } from '../consul/acl.ts'
import type { KvLayout } from './kv-layout.ts'
import { TincConsulError } from '../errors.ts'
import { keyFingerprint } from '../tinc/hostfile.ts'
import type { Logger } from '../log.ts'
import { peerHostFiles } from './peer-files.ts'
import { allocateAddress, firstAddress6, hostRange, intToIp } from './ipam.ts'
import { storedInviteSchema, type StoredInvite } from './invite.ts'
import { Refusal, authenticate, type Authenticated } from './join-auth.ts'
import { replySealer } from './join-crypto.ts'
import { DEFAULT_JOIN_PORT, endpointsFor, joinEndpointsValue } from './join-endpoints.ts'
import { GENERIC_REFUSAL, STATUS_ERROR, STATUS_OK, type JoinReply } from './join-wire.ts'
import { makeRecord, validateRecord } from './publish.ts'
import { decodeJson, type NetworkRecord } from './record.ts'
import { addressRanges, groupIn, readNetwork, readNetworkAndPolicy, type AddressRanges } from './network.ts'
import type { Group } from './access-policy.ts'
import { policyScopeFor } from '../services/naming.ts'

export interface JoinBrokerOptions {
  net: string
  layout: KvLayout
  /** Client with the join-server token (or none, with ACLs off). */
  client: ConsulClient
  /**
   * Create a Consul token for each new node (ACLs on). A function is asked at
   * each join until it answers: the agent may still be starting when we do.
   */
  acl: boolean | (() => Promise<boolean>)
  /** The Consul gossip key, handed to new nodes for their agent's config (`install`). */
  gossipKey?: string
  log: Logger
}

/** An open invite as the broker read it: redeeming deletes it with check-and-set at this index. */
export interface FoundInvite {
  key: Buffer
  kvKey: string
  modifyIndex: number
  inv: StoredInvite
}

/** What goes back to the joiner: the reply frame's status byte and body. */
export interface BrokerAnswer {
  status: number
  body: Buffer
  served: boolean
}

/**
 * The half of the join endpoint that holds the join-server token and never
 * touches the network. The front (src/mesh/join-front.ts) reads sockets and
 * asks two things of it:
 *
 * - `inviteKey(id)`: the sealing key of an open invite, so the front can
 *   authenticate a request before passing it on;
 * - `redeem(payload)`: authenticate the same bytes again, then use up the
 *   invite, reserve an address, create the node's record (and, with ACLs on,
 *   its tokens) in one Consul transaction, and seal the reply.
 *
 * Nothing the front says is taken on trust: a redeem runs only for bytes that
 * carry the invite's token.
 */
export function createJoinBroker(opts: JoinBrokerOptions) {
  const log = opts.log.child({ component: 'join-broker' })

  const findInvite = async (id: string): Promise<FoundInvite | undefined> => {
    if (!/^[0-9a-f]{32}$/.test(id)) return undefined
    const kvKey = opts.layout.invite(id)
    const stored = await opts.client.kvGet(kvKey)
    if (!stored) return undefined
    const inv = decodeJson(stored.value, storedInviteSchema, 2048)
    if (!inv.ok) return undefined
    if (new Date(inv.value.expiresAt) <= new Date()) {
      await opts.client.request('DELETE', `/v1/kv/${kvKey}?cas=${stored.modifyIndex}`).catch(() => undefined)
      return undefined
    }
    return { key: Buffer.from(inv.value.key, 'base64'), kvKey, modifyIndex: stored.modifyIndex, inv: inv.value }
  }

  return {
    /** Any failure, a Consul read included, is "no key": the front then sends the generic refusal. */
    async inviteKey(id: string): Promise<Buffer | undefined> {
      return (await findInvite(id).catch(() => undefined))?.key
    },

    async redeem(payload: Buffer): Promise<BrokerAnswer> {
      let authed: Authenticated<FoundInvite>
      try {
        authed = await authenticate(payload, findInvite)
      } catch (err) {
        // The front authenticated these bytes already: the invite was spent or expired since, or
        // the front is sending what it shouldn't.
        log.warn({ reason: err instanceof Error ? err.message : String(err) }, 'join refused: the request no longer authenticates')
        return { status: STATUS_ERROR, body: Buffer.from(GENERIC_REFUSAL), served: false }
      }
      try {
        const body = await redeemAuthenticated(opts, log, authed)
        return { status: STATUS_OK, body, served: true }
      } catch (err) {
        const known = err instanceof Refusal || (err instanceof TincConsulError && err.code.startsWith('JOIN_'))
        log.warn({ name: authed.h.name, reason: err instanceof Error ? err.message : String(err) }, 'join refused')
        if (!known) log.error({ err, name: authed.h.name }, 'join failed')
        return { status: STATUS_ERROR, body: Buffer.from(known ? err.message : 'the join server failed; try again or another endpoint'), served: false }
      }
    },
  }
}
export type JoinBroker = ReturnType<typeof createJoinBroker>

/** What a join is checked against and takes its addresses from. */
interface JoinTarget {
  network: NetworkRecord
  range: AddressRanges
}

/** Holding this network's invite, the sender knows the network's name already: specific errors are fine from here. */
async function checkRequest(opts: JoinBrokerOptions, { h, found, req }: Authenticated<FoundInvite>): Promise<JoinTarget> {
  if (h.net !== opts.net) throw new Refusal(`this endpoint serves network "${opts.net}", not "${h.net}"`)
  if (found.inv.name && found.inv.name !== h.name) throw new Refusal(`this invite is for "${found.inv.name}", not "${h.name}"; join with --name ${found.inv.name}`)
  const target = await joinTarget(opts, found.inv.group)
  const { network } = target
  if (found.inv.serveJoins && req.addresses.length === 0) throw new Refusal('this invite is for a public node that serves joins: give --address')
  // Judge the record as peers will before anything is written: only its address is still
  // open, and any address the allocation can hand out passes the same checks.
  const refused = validateRecord(recordFor(h.name, req, intToIp(hostRange(network.cidr).first), firstAddress6(network.cidr6)), network)
  if (refused) throw new Refusal(`the new node's record would be refused by peers: ${refused}`)
  return target
}

/** The network, and where the joiner's addresses come from: the invite's group's ranges (read now, with the network), else the network's. */
async function joinTarget(opts: JoinBrokerOptions, group: string | undefined): Promise<JoinTarget> {
  const missing = () => new TincConsulError('NO_NETWORK', 'the network record is missing')
  if (group === undefined) {
    const network = await readNetwork(opts.client, opts.layout)
    if (!network) throw missing()
    return { network, range: addressRanges(network) }
  }
  const read = await readNetworkAndPolicy(opts.client, opts.layout)
  if (!read) throw missing()
  let g: Group
  try {
    g = groupIn(read.policy, opts.layout, group)
  } catch (err) {
    throw new Refusal(`the invite is for group ${group}, which can't be used now: ${err instanceof Error ? err.message : String(err)}`)
  }
  return { network: read.network, range: addressRanges(read.network, g) }
}

const recordFor = (name: string, req: Authenticated<FoundInvite>['req'], address: string, address6?: string) =>
  makeRecord({ name, vpnAddress: address, vpnAddress6: address6, addresses: req.addresses, port: req.port, publicKey: req.publicKey })

async function redeemAuthenticated(opts: JoinBrokerOptions, log: Logger, authed: Authenticated<FoundInvite>): Promise<Buffer> {
  const { h, header, found, req, sealKey } = authed
  const { network, range } = await checkRequest(opts, authed)
  const sealReply = replySealer(sealKey, header, Buffer.from(req.epk, 'base64url'))
  // Everything the reply needs is read before the transaction: once it has spent the invite,
  // a failed read could only leave the joiner with a used invite and a taken name.
  // The reply carries each peer's file as its record has it, the /32 Subnet line included, whatever
  // the network's mode: the joiner checks every file as a record (which needs the VPN address) and
  // renders it for the mode itself, and a joiner of an older release expects that form.
  const judged = await peerHostFiles(opts.client, opts.layout, network, { name: h.name, fingerprint: keyFingerprint(req.publicKey) }, 'record')
  if (judged.refusals.length) log.info({ name: h.name, left: judged.refusals.map((r) => `${r.key}: ${r.reason}`) }, "records left out of a joiner's host files")
  // Peers refuse a newcomer whose name differs from an established one only in case.
  const clash = judged.listed.find((n) => n !== h.name && n.toLowerCase() === h.name.toLowerCase())
  if (clash) throw new Refusal(`the name "${h.name}" differs from the existing node "${clash}" only in case, and peers would refuse it; join with another --name`)
  const servers = await consulServers(opts.client)
  const created: CreatedToken[] = []
  try {
    const acl = typeof opts.acl === 'function' ? await opts.acl() : opts.acl
    if (acl) created.push(await createNodeToken(opts.client, policyScopeFor(opts.layout, opts.net, network), h.name))
    if (acl && found.inv.serveJoins) created.push(await createJoinServerToken(opts.client, opts.layout, h.name))
    const res = await allocateAddress({
      client: opts.client,
      layout: opts.layout,
      ...range,
      name: h.name,
      records: [h.name],
      with: (address, address6) => [
        // Single use: if another redemption got here first, this whole transaction rolls back.
        { KV: { Verb: 'delete-cas', Key: found.kvKey, Index: found.modifyIndex } },
        { KV: { Verb: 'cas', Key: opts.layout.node(h.name), Value: b64(JSON.stringify(recordFor(h.name, req, address, address6))), Index: 0 } },
        // A new join server is listed at once, on the default port; its own broker corrects
        // the entry when it starts if it serves elsewhere.
        ...(found.inv.serveJoins ? [{ KV: { Verb: 'set', Key: opts.layout.joinEndpoint(h.name), Value: b64(joinEndpointsValue(endpointsFor(req.addresses, DEFAULT_JOIN_PORT))) } }] : []),
      ],
    })
    if (!res.ok) throw new Refusal(res.op === 0 ? GENERIC_REFUSAL : `the name "${h.name}" is taken; join with another --name, or revoke the old node first`)
    log.info({ name: h.name, address: res.address }, 'a new node joined')
    const body: JoinReply = {
      v: 1,
      name: h.name,
      address: res.address,
      // Only in networks with an IPv6 range: a joiner of an older release refuses a reply field it doesn't know.
      ...(res.address6 ? { address6: res.address6 } : {}),
      network,
      prefix: opts.layout.prefix,
      hostFiles: judged.files,
      consul: { ...(created[0] ? { token: created[0].secretId } : {}), ...(created[1] ? { joinToken: created[1].secretId } : {}), servers, ...(opts.gossipKey ? { gossipKey: opts.gossipKey } : {}) },
    }
    return sealReply(Buffer.from(JSON.stringify(body)))
  } catch (err) {
    for (const t of created) await deleteToken(opts.client, t.accessorId).catch((e: unknown) => log.error({ err: e }, 'could not delete the token of a failed join'))
    throw err
  }
}

async function consulServers(client: ConsulClient): Promise<string[]> {
  const peers = await client.request<string[]>('GET', '/v1/status/peers').catch(() => [])
  // A first server still on loopback (installed with --bootstrap, before init) is no use to a joiner.
  return peers.flatMap((p) => parseHostPort(p)?.host ?? []).filter((h) => !h.startsWith('127.'))
}
