import { randomBytes } from 'node:crypto'

/** Consul's gossip encryption key: 32 bytes in base64, as `consul keygen` prints. */
export const GOSSIP_KEY_RE = /^[A-Za-z0-9+/]{43}=$/

export const isGossipKey = (v: string): boolean => GOSSIP_KEY_RE.test(v) && Buffer.from(v, 'base64').length === 32

export const newGossipKey = (): string => randomBytes(32).toString('base64')
