import { timingSafeEqual } from 'node:crypto'
import { deriveInvite, open } from './invite.ts'
import { MAX_FRAME, decodeRequest, joinHeaderSchema, joinRequestSchema, requestAad, type JoinHeader, type JoinRequest } from './join-wire.ts'
import { decodeJson } from './record.ts'

/** A refusal whose message may go back to the client as it is, once the client has authenticated. */
export class Refusal extends Error {
  override name = 'Refusal'
}

/** A request whose sender has proved it holds the invite. */
export interface Authenticated<T> {
  h: JoinHeader
  header: Buffer
  req: JoinRequest
  /** The invite's sealing key, which opened the request. */
  sealKey: Buffer
  /** What the lookup returned for the invite. */
  found: T
}

/**
 * Proves the sender holds the invite: find its key by id, open the sealed
 * request with it, and check the token inside. The front runs this before it
 * passes anything on, and the broker runs it again on the same bytes, so a
 * front that has been taken over still can't redeem without the invite. Every
 * way this fails throws a Refusal, and the caller answers all of them with the
 * same generic text. The header's network is compared only after this: a
 * request for another network costs the same lookup as an unknown invite id.
 */
export async function authenticate<T extends { key: Buffer }>(payload: Buffer, lookup: (id: string) => Promise<T | undefined>): Promise<Authenticated<T>> {
  let parts: { header: Buffer; sealed: Buffer }
  try {
    parts = decodeRequest(payload)
  } catch (err) {
    throw new Refusal(`bad request: ${(err as Error).message}`)
  }
  const { header, sealed } = parts
  const h = decodeJson(header, joinHeaderSchema, 1024)
  if (!h.ok) throw new Refusal(`bad request header: ${h.reason}`)
  const found = await lookup(h.value.id)
  if (!found) throw new Refusal('no such invite, or it expired')
  let plain: Uint8Array
  try {
    plain = open(found.key, requestAad(header), sealed)
  } catch {
    throw new Refusal('request does not open with the invite key')
  }
  const req = decodeJson(plain, joinRequestSchema, MAX_FRAME)
  if (!req.ok) throw new Refusal(`bad join request: ${req.reason}`)
  // The stored key alone opens the box; only the invite string holds the token.
  const derived = deriveInvite(Buffer.from(req.value.token, 'base64url'))
  if (derived.id !== h.value.id || !timingSafeEqual(Buffer.from(derived.key), found.key)) throw new Refusal('wrong token')
  return { h: h.value, header, req: req.value, sealKey: found.key, found }
}
