import { randomBytes } from 'node:crypto'
import { xchacha20poly1305 } from '@noble/ciphers/chacha.js'
import { hkdf } from '@noble/hashes/hkdf.js'
import { sha256 } from '@noble/hashes/sha2.js'
import * as z from 'zod'
import { b64, type ConsulClient } from '../consul/client.ts'
import { defaultPrefix, isGroupName, type KvLayout } from './kv-layout.ts'
import { TincConsulError, UsageError } from '../errors.ts'
import { isTincName, parseHostPort } from '../tinc/names.ts'
import { decodeJson } from './record.ts'

/**
 * One-time invites.
 *
 * The invite string carries a random 256-bit token. Consul never sees the
 * token: `invites/<id>` holds two one-way derivations of it (the id, and the
 * key that seals the join exchange), the invited name and the expiry. The join
 * request carries the token itself inside the sealed box, so whoever can read
 * `invites/` (join servers and operators only, by ACL) still can't redeem an
 * invite without the string.
 */
const SALT = new TextEncoder().encode('tinc-consul invite v1')
const INFO_ID = new TextEncoder().encode('id')
const INFO_SEAL = new TextEncoder().encode('seal')
const INVITE_PREFIX = 'tcinv1_'
export const TOKEN_BYTES = 32
export const NONCE_BYTES = 24

export interface InviteSecrets {
  /** Names the invite in KV: 16 bytes of HKDF output, hex. */
  id: string
  /** XChaCha20-Poly1305 key for the join exchange. */
  key: Uint8Array
}

export function deriveInvite(token: Uint8Array): InviteSecrets {
  const id = Buffer.from(hkdf(sha256, token, SALT, INFO_ID, 16)).toString('hex')
  return { id, key: hkdf(sha256, token, SALT, INFO_SEAL, 32) }
}

/** Seals with a fresh random nonce from the system RNG, returned in front of the ciphertext. */
export function seal(key: Uint8Array, aad: Uint8Array, plaintext: Uint8Array): Uint8Array {
  const nonce = randomBytes(NONCE_BYTES)
  const ct = xchacha20poly1305(key, nonce, aad).encrypt(plaintext)
  return Buffer.concat([nonce, ct])
}

/** Opens `nonce || ciphertext`; throws on any tampering, a wrong key or wrong associated data. */
export function open(key: Uint8Array, aad: Uint8Array, sealed: Uint8Array): Uint8Array {
  if (sealed.length < NONCE_BYTES + 16) throw new TincConsulError('SEALED_TOO_SHORT', 'sealed message is too short')
  return xchacha20poly1305(key, sealed.subarray(0, NONCE_BYTES), aad).decrypt(sealed.subarray(NONCE_BYTES))
}

const endpoint = z.string().refine((s) => parseHostPort(s)?.port !== undefined, 'expected HOST:PORT')

const inviteSchema = z
  .object({
    v: z.literal(1),
    net: z.string().regex(/^[A-Za-z0-9_-]{1,32}$/),
    prefix: z.string().max(200).optional(),
    endpoints: z.array(endpoint).min(1).max(16),
    token: z.string().regex(/^[A-Za-z0-9_-]{43}$/),
    name: z.string().refine(isTincName).optional(),
    exp: z.iso.datetime(),
  })
  .strict()

export interface Invite {
  net: string
  prefix?: string
  endpoints: string[]
  token: Uint8Array
  name?: string
  expiresAt: Date
}

export function encodeInvite(inv: Invite): string {
  const body = {
    v: 1,
    net: inv.net,
    ...(inv.prefix ? { prefix: inv.prefix } : {}),
    endpoints: inv.endpoints,
    token: Buffer.from(inv.token).toString('base64url'),
    ...(inv.name ? { name: inv.name } : {}),
    exp: inv.expiresAt.toISOString(),
  }
  return INVITE_PREFIX + Buffer.from(JSON.stringify(body)).toString('base64url')
}

/** Parses an invite string as pasted by a person: surrounding whitespace and quotes are forgiven. */
export function decodeInvite(text: string): Invite {
  const s = text.trim().replace(/^['"]|['"]$/g, '')
  const bad = (why: string) => new UsageError('BAD_INVITE', `that is not a usable invite (${why}); an invite is one line starting with ${INVITE_PREFIX}`)
  if (!s.startsWith(INVITE_PREFIX)) throw bad(`no "${INVITE_PREFIX}" prefix`)
  if (s.length > 4096) throw bad('too long')
  const raw = s.slice(INVITE_PREFIX.length)
  if (!/^[A-Za-z0-9_-]+$/.test(raw)) throw bad('it was cut or mangled in copying')
  const d = decodeJson(Buffer.from(raw, 'base64url'), inviteSchema, 4096)
  if (!d.ok) throw bad(d.reason)
  return { net: d.value.net, prefix: d.value.prefix, endpoints: d.value.endpoints, token: Buffer.from(d.value.token, 'base64url'), name: d.value.name, expiresAt: new Date(d.value.exp) }
}

export const storedInviteSchema = z
  .object({
    v: z.literal(1),
    name: z.string().refine(isTincName).optional(),
    createdAt: z.iso.datetime(),
    expiresAt: z.iso.datetime(),
    createdBy: z.string().max(64),
    /** The operator chose to let this node serve joins: it gets a join-server token too. */
    serveJoins: z.boolean().optional(),
    /**
     * The group (docs/groups.md) whose range the joiner's address comes from. Strict parsing
     * makes a broker of an older release refuse such an invite rather than place the node
     * outside its group.
     */
    group: z.string().refine(isGroupName).optional(),
    key: z.string().regex(/^[A-Za-z0-9+/]{43}=$/),
  })
  .strict()
export type StoredInvite = z.infer<typeof storedInviteSchema>

export interface CreateInviteOptions {
  client: ConsulClient
  layout: KvLayout
  net: string
  endpoints: string[]
  name?: string
  ttlMs: number
  createdBy: string
  serveJoins?: boolean
  /** The group the joiner's address is allocated in; the caller checked that it exists. */
  group?: string
  now?: Date
}

export async function createInvite(opts: CreateInviteOptions): Promise<{ invite: string; id: string; expiresAt: Date }> {
  if (opts.endpoints.length === 0)
    throw new TincConsulError(
      'NO_JOIN_ENDPOINTS',
      'no join server is listed in Consul (join-endpoints/): start `tinc-consul run` on the node that ran init, or on one joined with `invite --serve-joins`; it lists itself when it starts serving joins on port 8655',
    )
  if (opts.name !== undefined && !isTincName(opts.name)) throw new UsageError('BAD_NAME', `not a valid tinc node name: ${JSON.stringify(opts.name)} (letters, digits and _ only)`)
  const now = opts.now ?? new Date()
  const token = randomBytes(TOKEN_BYTES)
  const { id, key } = deriveInvite(token)
  const expiresAt = new Date(now.getTime() + opts.ttlMs)
  const stored: StoredInvite = {
    v: 1,
    ...(opts.name ? { name: opts.name } : {}),
    createdAt: now.toISOString(),
    expiresAt: expiresAt.toISOString(),
    createdBy: opts.createdBy,
    ...(opts.serveJoins ? { serveJoins: true } : {}),
    ...(opts.group ? { group: opts.group } : {}),
    key: Buffer.from(key).toString('base64'),
  }
  const res = await opts.client.txn([{ KV: { Verb: 'cas', Key: opts.layout.invite(id), Value: b64(JSON.stringify(stored)), Index: 0 } }])
  if (!res.ok) throw new TincConsulError('INVITE_COLLISION', 'could not store the invite; try again')
  const prefix = opts.layout.prefix === defaultPrefix(opts.net) ? undefined : opts.layout.prefix
  return { invite: encodeInvite({ net: opts.net, prefix, endpoints: opts.endpoints, token, name: opts.name, expiresAt }), id, expiresAt }
}

export interface ListedInvite {
  id: string
  modifyIndex: number
  invite: StoredInvite | undefined
  expired: boolean
}

export async function listInvites(client: ConsulClient, layout: KvLayout, now = new Date()): Promise<ListedInvite[]> {
  const list = await client.kvList(layout.invitesPrefix)
  return list.items.map((item) => {
    const d = decodeJson(item.value, storedInviteSchema, 2048)
    const invite = d.ok ? d.value : undefined
    return { id: item.key.slice(layout.invitesPrefix.length), modifyIndex: item.modifyIndex, invite, expired: !invite || new Date(invite.expiresAt) <= now }
  })
}

/** Cancels invites whose id starts with `idPrefix` (at least 6 hex digits, and it must match exactly one). */
export async function revokeInvite(client: ConsulClient, layout: KvLayout, idPrefix: string): Promise<string> {
  if (!/^[0-9a-f]{6,32}$/.test(idPrefix)) throw new UsageError('BAD_INVITE_ID', `give at least 6 hex digits of the invite id, as \`invite list\` shows it; got ${JSON.stringify(idPrefix)}`)
  const matches = (await listInvites(client, layout)).filter((i) => i.id.startsWith(idPrefix))
  if (matches.length === 0) throw new TincConsulError('NO_SUCH_INVITE', `no open invite with id ${idPrefix}…`)
  if (matches.length > 1) throw new UsageError('AMBIGUOUS_INVITE', `${matches.length} invites start with ${idPrefix}; give more digits`)
  const hit = matches[0] as ListedInvite
  await client.request('DELETE', `/v1/kv/${layout.invite(hit.id)}?cas=${hit.modifyIndex}`)
  return hit.id
}
