import { ConsulError } from '../errors.ts'
import type { ConsulClient, RawRead } from './client.ts'
import { jsonBody } from './http.ts'

export { blockingTimeoutMs } from './http.ts'

/**
 * Raw KV reads, on the client's GET (which keeps the X-Consul-Index and the ACL-filter
 * header the watches need). Values stay bytes: they are untrusted, decoding is the
 * caller's job.
 */
export interface KvItem {
  key: string
  /** Raw bytes; decoding is the caller's job because values are untrusted. */
  value: Uint8Array
  modifyIndex: number
  /** When the key was created: what tells an established record from a newcomer. */
  createIndex: number
}

/** How a KV read is made: blocking when `index` is above 0. */
export interface ReadOptions {
  index?: number
  /** Blocking wait, in seconds (default 300). */
  waitSeconds?: number
  signal?: AbortSignal
}

export interface KvListResult {
  items: KvItem[]
  index: number
  /** Body bytes received, for the propagation benchmark. */
  bytes: number
  /** Consul hid some keys from this token (X-Consul-Results-Filtered-By-ACLs). */
  filtered: boolean
}

export interface KvKeysResult {
  keys: string[]
  index: number
  bytes: number
  filtered: boolean
}

export interface KvOneResult {
  /** Undefined when the key does not exist (404). */
  item: KvItem | undefined
  /** For an existing key, its ModifyIndex: a blocking read on it wakes only when that key changes. */
  index: number
  bytes: number
}

/** What the reads need of a client: its GET, and its address for error messages. */
type Reader = Pick<ConsulClient, 'get' | 'url'>

/** The URL path of a key, each segment encoded. */
export const kvPath = (key: string): string => `/v1/kv/${key.split('/').map(encodeURIComponent).join('/')}`

function parseList(c: Reader, label: string, raw: RawRead): unknown[] {
  if (raw.status === 404) return []
  const parsed = jsonBody(raw, `GET ${label}`, c.url)
  if (!Array.isArray(parsed)) throw new ConsulError('CONSUL_BAD_BODY', `GET ${label} on ${c.url}: expected a list`, raw.status)
  return parsed as unknown[]
}

function toItems(entries: unknown[]): KvItem[] {
  const items: KvItem[] = []
  for (const e of entries as Array<{ Key?: unknown; Value?: unknown; ModifyIndex?: unknown; CreateIndex?: unknown }>) {
    if (typeof e?.Key !== 'string' || typeof e.ModifyIndex !== 'number') continue
    const value = typeof e.Value === 'string' ? new Uint8Array(Buffer.from(e.Value, 'base64')) : new Uint8Array()
    items.push({ key: e.Key, value, modifyIndex: e.ModifyIndex, createIndex: typeof e.CreateIndex === 'number' ? e.CreateIndex : e.ModifyIndex })
  }
  return items
}

export async function readKvList(c: Reader, prefix: string, opts: ReadOptions = {}): Promise<KvListResult> {
  const label = `kv/${prefix}`
  const raw = await c.get(kvPath(prefix), { recurse: 'true' }, { ...opts, label })
  return { items: toItems(parseList(c, label, raw)), index: raw.index, bytes: raw.body.length, filtered: raw.filtered }
}

/**
 * The key names under a prefix (`?keys`): a few bytes per key. With a separator, names are cut
 * after its first occurrence past the prefix and repeats dropped, while the index still covers
 * every key under the prefix: `nodes` with "/" answers `["…/nodes/"]` and wakes on any record.
 */
export async function readKvKeys(c: Reader, prefix: string, opts: ReadOptions & { separator?: string } = {}): Promise<KvKeysResult> {
  const label = `kv/${prefix}`
  const { separator, ...read } = opts
  const raw = await c.get(kvPath(prefix), separator ? { keys: 'true', separator } : { keys: 'true' }, { ...read, label })
  const keys = parseList(c, label, raw).filter((k): k is string => typeof k === 'string')
  return { keys, index: raw.index, bytes: raw.body.length, filtered: raw.filtered }
}

/**
 * The index of everything under `prefix` (a trailing slash is dropped), deletions included, for
 * about 30 bytes: a `?keys` read with "/" as separator answers with one name. Blocking on it
 * wakes on any change under the prefix.
 */
export function readPrefixIndex(c: Reader, prefix: string, opts: ReadOptions = {}): Promise<KvKeysResult> {
  return readKvKeys(c, prefix.replace(/\/$/, ''), { ...opts, separator: '/' })
}

export async function readKvOne(c: Reader, key: string, opts: ReadOptions = {}): Promise<KvOneResult> {
  const label = `kv/${key}`
  const raw = await c.get(kvPath(key), {}, { ...opts, label })
  const item = toItems(parseList(c, label, raw)).find((i) => i.key === key)
  return { item, index: raw.index, bytes: raw.body.length }
}
