import type { Socket } from 'node:net'
import { isGossipKey } from '../consul/gossip-key.ts'
import * as z from 'zod'
import { TincConsulError } from '../errors.ts'
import { isTincName } from '../tinc/names.ts'
import { networkRecordSchema } from './record.ts'

/**
 * The join exchange: one request frame, one reply frame, over plain TCP.
 *
 *   frame   = "TCJ1" | u32 length | payload            (length <= MAX_FRAME)
 *   request = u16 header length | header JSON | nonce(24) | XChaCha20-Poly1305 ciphertext
 *   reply   = u8 status | body
 *             status 0: server's ephemeral X25519 key(32) | nonce(24) | ciphertext of the reply JSON
 *             status 1: a short UTF-8 error message, outside the seal: the
 *                       endpoint sends GENERIC_REFUSAL for anything before the
 *                       token checks out, and the joiner prints none of it raw
 *
 * The header (net, name, invite id) travels in the clear because the server
 * needs it to find the key, and it is bound to the ciphertext as associated
 * data, so changing the name or network breaks the seal. The reply's
 * associated data is the same header with a different label, so a reply
 * can't be replayed as a request or to another join.
 *
 * The request is sealed with the invite's key; the reply is sealed with a key
 * from an ephemeral X25519 exchange (the joiner's half inside the sealed
 * request, the server's in front of the reply), so a recorded exchange stays
 * closed to whoever later finds the invite string (src/mesh/join-crypto.ts).
 */
export const MAGIC = Buffer.from('TCJ1')
export const MAX_FRAME = 64 * 1024
export const STATUS_OK = 0
export const STATUS_ERROR = 1
/**
 * The only reply an endpoint gives before the sender has proved it holds the
 * invite: a wrong, expired or used token, a request for another network, a
 * malformed or oversized frame, a rate-limited address and a failed Consul read
 * all hear this, so it says nothing about the network or which invites exist.
 */
export const GENERIC_REFUSAL = "invite not valid (wrong, expired or already used), or this endpoint can't take it now"

/** Version 2 added the ephemeral key exchange; a version-1 request hears the generic refusal. */
export const JOIN_VERSION = 2

export const joinHeaderSchema = z
  .object({
    v: z.literal(JOIN_VERSION),
    net: z.string().regex(/^[A-Za-z0-9_-]{1,32}$/),
    name: z.string().refine(isTincName),
    id: z.string().regex(/^[0-9a-f]{32}$/),
  })
  .strict()
export type JoinHeader = z.infer<typeof joinHeaderSchema>

export const joinRequestSchema = z
  .object({
    v: z.literal(JOIN_VERSION),
    token: z.string().regex(/^[A-Za-z0-9_-]{43}$/),
    /** The joiner's ephemeral X25519 public key, base64url. */
    epk: z.string().regex(/^[A-Za-z0-9_-]{43}$/),
    publicKey: z.string().max(4000),
    addresses: z.array(z.string().max(253)).max(8),
    port: z.number().int().min(1).max(65535),
  })
  .strict()
export type JoinRequest = z.infer<typeof joinRequestSchema>

/** A Consul server's host name or IP address, as `join` prints it and writes it into the settings. */
const consulServer = z.string().regex(/^[A-Za-z0-9.:-]{1,253}$/)

export const joinReplySchema = z
  .object({
    v: z.literal(1),
    name: z.string().refine(isTincName),
    address: z.ipv4(),
    /** The joiner's IPv6 VPN address, in networks with an IPv6 range (network.cidr6). */
    address6: z.ipv6().optional(),
    network: networkRecordSchema,
    prefix: z.string().max(200),
    /** Host-file text of every other node, by name; checked again by the joiner before writing. */
    hostFiles: z.record(z.string(), z.string().max(6000)),
    consul: z
      .object({ token: z.string().max(128).optional(), joinToken: z.string().max(128).optional(), servers: z.array(consulServer).max(16), gossipKey: z.string().refine(isGossipKey).optional() })
      .strict(),
  })
  .strict()
export type JoinReply = z.infer<typeof joinReplySchema>

export const requestAad = (header: Uint8Array): Uint8Array => Buffer.concat([Buffer.from('tinc-consul join request\0'), header])
export const replyAad = (header: Uint8Array): Uint8Array => Buffer.concat([Buffer.from('tinc-consul join reply\0'), header])

export function frame(payload: Uint8Array): Buffer {
  const head = Buffer.alloc(8)
  MAGIC.copy(head)
  head.writeUInt32BE(payload.length, 4)
  return Buffer.concat([head, payload])
}

export function encodeRequest(header: Uint8Array, sealed: Uint8Array): Buffer {
  const len = Buffer.alloc(2)
  len.writeUInt16BE(header.length)
  return frame(Buffer.concat([len, header, sealed]))
}

export function decodeRequest(payload: Buffer): { header: Buffer; sealed: Buffer } {
  if (payload.length < 2) throw new TincConsulError('JOIN_BAD_REQUEST', 'request too short')
  const len = payload.readUInt16BE(0)
  if (len === 0 || 2 + len > payload.length) throw new TincConsulError('JOIN_BAD_REQUEST', 'bad header length')
  return { header: payload.subarray(2, 2 + len), sealed: payload.subarray(2 + len) }
}

/**
 * Reads one frame, refusing a declared length over `max` as soon as the 8-byte
 * head arrives, so a 10 MiB body is never buffered.
 */
export function readFrame(socket: Socket, max = MAX_FRAME, timeoutMs = 10_000): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let have = 0
    let want = -1
    const done = (err: Error | undefined, value?: Buffer) => {
      clearTimeout(timer)
      socket.off('data', onData)
      socket.off('end', onEnd)
      socket.off('error', onError)
      if (err) reject(err)
      else resolve(value as Buffer)
    }
    const timer = setTimeout(() => done(new TincConsulError('JOIN_TIMEOUT', `no complete message within ${timeoutMs / 1000} s`)), timeoutMs)
    const onData = (chunk: Buffer) => {
      chunks.push(chunk)
      have += chunk.length
      if (want < 0 && have >= 8) {
        const head = Buffer.concat(chunks)
        if (!head.subarray(0, 4).equals(MAGIC)) return done(new TincConsulError('JOIN_BAD_FRAME', 'not a tinc-consul join message'))
        want = head.readUInt32BE(4)
        if (want > max) return done(new TincConsulError('JOIN_TOO_LARGE', `message of ${want} bytes is over the ${max}-byte limit`))
      }
      if (want >= 0 && have >= 8 + want) {
        const all = Buffer.concat(chunks)
        done(undefined, all.subarray(8, 8 + want))
      }
    }
    const onEnd = () => done(new TincConsulError('JOIN_CLOSED', 'connection closed mid-message'))
    const onError = (err: Error) => done(new TincConsulError('JOIN_SOCKET', err.message, { cause: err }))
    socket.on('data', onData)
    socket.on('end', onEnd)
    socket.on('error', onError)
  })
}
