import * as z from 'zod'
import { MAX_FRAME } from './join-wire.ts'

/**
 * Messages between the join front (no token, unprivileged user, reads the
 * internet) and the join broker (join-server token, no sockets of its own).
 * The broker checks every message from the front against these schemas: a
 * front that has been taken over is just another untrusted sender.
 */
const q = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER)
const stats = z.object({ served: z.number().int().min(0), refused: z.number().int().min(0), rateLimited: z.number().int().min(0) }).strict()

export const fromFrontSchema = z.discriminatedUnion('t', [
  z.object({ t: z.literal('ready') }).strict(),
  z.object({ t: z.literal('key'), q, id: z.string().max(64) }).strict(),
  z
    .object({
      t: z.literal('redeem'),
      q,
      payload: z
        .string()
        .max(Math.ceil(MAX_FRAME / 3) * 4)
        .regex(/^[A-Za-z0-9+/]*={0,2}$/),
    })
    .strict(),
  z.object({ t: z.literal('stats'), stats }).strict(),
])
export type FromFront = z.infer<typeof fromFrontSchema>

export const toFrontSchema = z.discriminatedUnion('t', [
  z.object({ t: z.literal('key'), q, key: z.string().optional() }).strict(),
  z.object({ t: z.literal('answer'), q, status: z.number().int().min(0).max(255), body: z.string(), served: z.boolean() }).strict(),
  z.object({ t: z.literal('server') }).strict(),
])
export type ToFront = z.infer<typeof toFrontSchema>

/** What `run` tells the broker process; the token travels in its environment, never in argv or here. */
export const brokerConfigSchema = z
  .object({
    net: z.string(),
    prefix: z.string(),
    consulUrl: z.string(),
    gossipKey: z.string().optional(),
    self: z.string(),
    host: z.string(),
    port: z.number().int().min(0).max(65535),
    /** Where joiners reach this server: published under join-endpoints/<self>. */
    endpoints: z.array(z.string()),
    /** The user the front runs as; '' keeps the daemon's own. */
    user: z.string(),
    burst: z.number().optional(),
    refillMs: z.number().optional(),
  })
  .strict()
export type BrokerConfig = z.infer<typeof brokerConfigSchema>

export const fromBrokerSchema = z.discriminatedUnion('t', [
  z.object({ t: z.literal('ready'), port: z.number().int(), frontPid: z.number().int(), frontUid: z.number().int() }).strict(),
  z.object({ t: z.literal('failed'), code: z.string(), message: z.string() }).strict(),
  z.object({ t: z.literal('stats'), stats, frontPid: z.number().int() }).strict(),
])
export type FromBroker = z.infer<typeof fromBrokerSchema>
