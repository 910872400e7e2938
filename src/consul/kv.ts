import { ConsulError } from '../errors.ts'
import { consulGet, jsonBody, type RawRead } from './http.ts'

export { blockingTimeoutMs } from './http.ts'

/**
 * Raw KV reads for watches. The npm client's kv.get hides the response
 * headers (X-Consul-Index) and the byte count we need, so blocking queries go
 * through http.ts, with the same token and error codes as client.ts.
 */
export interface KvItem {
  key: string
  /** Raw bytes; decoding is the caller's job because values are untrusted. */
  value: Uint8Array
  modifyIndex: number
}

export interface KvListResult {
  items: KvItem[]
  index: number
  /** Body bytes received, for the propagation benchmark. */
  bytes: number
  /** Consul hid some keys from this token (X-Consul-Results-Filtered-By-ACLs). */
  filtered: boolean
}

export interface KvListOptions {
  url: string
  token?: string
  prefix: string
  index?: number
  /** Blocking wait, in seconds. */
  waitSeconds?: number
  signal?: AbortSignal
}

/** One GET on the KV endpoint, blocking when an index is given. */
function kvGetRaw(path: string, params: Record<string, string>, opts: Omit<KvListOptions, 'prefix'>): Promise<RawRead> {
  return consulGet(`/v1/kv/${path.split('/').map(encodeURIComponent).join('/')}`, params, opts, path)
}

function parseList(path: string, raw: RawRead): unknown[] {
  if (raw.status === 404) return []
  const parsed = jsonBody(raw, path)
  if (!Array.isArray(parsed)) throw new ConsulError('CONSUL_BAD_BODY', `GET ${path}: expected a list`, raw.status)
  return parsed as unknown[]
}

function toItems(entries: unknown[]): KvItem[] {
  const items: KvItem[] = []
  for (const e of entries as Array<{ Key?: unknown; Value?: unknown; ModifyIndex?: unknown }>) {
    if (typeof e?.Key !== 'string' || typeof e.ModifyIndex !== 'number') continue
    items.push({ key: e.Key, value: typeof e.Value === 'string' ? new Uint8Array(Buffer.from(e.Value, 'base64')) : new Uint8Array(), modifyIndex: e.ModifyIndex })
  }
  return items
}

/** Every key and value under a prefix (`?recurse`). */
export async function kvList(opts: KvListOptions): Promise<KvListResult> {
  const raw = await kvGetRaw(opts.prefix, { recurse: 'true' }, opts)
  return { items: toItems(parseList(opts.prefix, raw)), index: raw.index, bytes: raw.body.length, filtered: raw.filtered }
}

export interface KvKeysResult {
  keys: string[]
  index: number
  bytes: number
  filtered: boolean
}

/** The key names under a prefix (`?keys`), without values: a few bytes per key. */
export async function kvKeys(opts: KvListOptions): Promise<KvKeysResult> {
  const raw = await kvGetRaw(opts.prefix, { keys: 'true' }, opts)
  const keys = parseList(opts.prefix, raw).filter((k): k is string => typeof k === 'string')
  return { keys, index: raw.index, bytes: raw.body.length, filtered: raw.filtered }
}

export interface KvOneResult {
  /** Undefined when the key does not exist (404). */
  item: KvItem | undefined
  /** For an existing key, its ModifyIndex: a blocking read on it wakes only when that key changes. */
  index: number
  bytes: number
}

/** One key, raw. `prefix` is the exact key here. */
export async function kvGetOne(opts: KvListOptions): Promise<KvOneResult> {
  const raw = await kvGetRaw(opts.prefix, {}, opts)
  const item = toItems(parseList(opts.prefix, raw)).find((i) => i.key === opts.prefix)
  return { item, index: raw.index, bytes: raw.body.length }
}
