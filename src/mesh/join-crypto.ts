import { createPublicKey, diffieHellman, generateKeyPairSync, type KeyObject } from 'node:crypto'
import { hkdf } from '@noble/hashes/hkdf.js'
import { sha256 } from '@noble/hashes/sha2.js'
import { TincConsulError } from '../errors.ts'
import { open, seal } from './invite.ts'
import { replyAad } from './join-wire.ts'

/**
 * Forward secrecy for the join exchange. The invite's key seals the request,
 * so whoever later finds the invite string and recorded the exchange can open
 * the request; what matters is the reply (the node's Consul token and the
 * gossip key). The joiner puts a fresh X25519 public key inside the sealed
 * request, the server answers with its own in front of the reply, and the
 * reply key comes from both ephemeral halves plus the invite key. Both
 * private halves are gone once the exchange ends, so the recording stays
 * sealed.
 */
export const EPK_BYTES = 32
const INFO = new TextEncoder().encode('tinc-consul join reply key v2')

export interface Ephemeral {
  /** Raw 32-byte public key. */
  publicKey: Buffer
  privateKey: KeyObject
}

export function ephemeral(): Ephemeral {
  const { publicKey, privateKey } = generateKeyPairSync('x25519')
  const x = publicKey.export({ format: 'jwk' }).x
  if (typeof x !== 'string') throw new TincConsulError('JOIN_CRYPTO', 'could not export an X25519 public key')
  return { publicKey: Buffer.from(x, 'base64url'), privateKey }
}

/** HKDF(X25519 shared secret, salt = invite key). Refuses a peer key that makes the shared secret all zeros (a low-order point). */
function replyKey(own: KeyObject, peer: Uint8Array, inviteKey: Uint8Array): Uint8Array {
  if (peer.length !== EPK_BYTES) throw new TincConsulError('JOIN_CRYPTO', 'ephemeral key has the wrong length')
  let shared: Buffer
  try {
    shared = diffieHellman({ privateKey: own, publicKey: createPublicKey({ key: { kty: 'OKP', crv: 'X25519', x: Buffer.from(peer).toString('base64url') }, format: 'jwk' }) })
  } catch (err) {
    throw new TincConsulError('JOIN_CRYPTO', 'ephemeral key is not an X25519 key', { cause: err })
  }
  if (shared.every((b) => b === 0)) throw new TincConsulError('JOIN_CRYPTO', 'ephemeral key is a low-order point')
  return hkdf(sha256, shared, inviteKey, INFO, 32)
}

/** The reply's associated data: the header's reply label, then both ephemeral keys, so neither can be swapped. */
const aad = (header: Uint8Array, joiner: Uint8Array, server: Uint8Array) => Buffer.concat([replyAad(header), joiner, server])

/**
 * Server side: a fresh key pair and the exchange, done before anything is
 * written, so a joiner's bad key is refused while its invite is still unspent.
 * The sealer returns `server public key || nonce || ciphertext`.
 */
export function replySealer(inviteKey: Uint8Array, header: Uint8Array, joinerEpk: Uint8Array): (plaintext: Uint8Array) => Buffer {
  const mine = ephemeral()
  const key = replyKey(mine.privateKey, joinerEpk, inviteKey)
  return (plaintext) => Buffer.concat([mine.publicKey, seal(key, aad(header, joinerEpk, mine.publicKey), plaintext)])
}

/** Joiner side: opens what sealReply made with the joiner's own ephemeral pair. Throws on anything else. */
export function openReply(inviteKey: Uint8Array, header: Uint8Array, mine: Ephemeral, body: Uint8Array): Uint8Array {
  if (body.length < EPK_BYTES) throw new TincConsulError('SEALED_TOO_SHORT', 'sealed reply is too short')
  const server = body.subarray(0, EPK_BYTES)
  return open(replyKey(mine.privateKey, server, inviteKey), aad(header, mine.publicKey, server), body.subarray(EPK_BYTES))
}
