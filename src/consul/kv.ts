import http, { type IncomingHttpHeaders } from 'node:http'
import https from 'node:https'
import { ConsulError } from '../errors.ts'

/**
 * Raw KV reads for watches. The npm client's kv.get hides the response
 * headers (X-Consul-Index) and the byte count we need, so blocking queries go
 * through fetch here, with the same token and error codes as client.ts.
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

/** Consul adds up to wait/16 of jitter; the HTTP timeout must outlast both. */
export function blockingTimeoutMs(waitSeconds: number): number {
  return Math.ceil((waitSeconds + waitSeconds / 16) * 1000) + 5000
}

interface HttpReply {
  status: number
  headers: IncomingHttpHeaders
  body: Buffer
}

// Keep-alive agents shared by every watch: a daemon holds one long poll per peer record,
// and each should reuse its socket rather than open a new one per read.
const agents = { http: new http.Agent({ keepAlive: true }), https: new https.Agent({ keepAlive: true }) }

/**
 * node:http rather than fetch: these reads are the daemon's hot path (every daemon reads on
 * every change in the mesh), and fetch's web streams cost several times more CPU per request.
 */
function httpGet(u: URL, headers: Record<string, string>, signal: AbortSignal): Promise<HttpReply> {
  return new Promise((resolve, reject) => {
    const tls = u.protocol === 'https:'
    const req = (tls ? https : http).get(u, { headers, signal, agent: tls ? agents.https : agents.http }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }))
      res.on('error', reject)
    })
    req.on('error', reject)
  })
}

function header(res: HttpReply, name: string): string | undefined {
  const v = res.headers[name]
  return Array.isArray(v) ? v[0] : v
}

interface RawRead {
  status: number
  body: Buffer
  index: number
  filtered: boolean
}

/** One GET on the KV endpoint, blocking when an index is given. */
async function kvGetRaw(path: string, params: Record<string, string>, opts: Omit<KvListOptions, 'prefix'>): Promise<RawRead> {
  const u = new URL(`/v1/kv/${path.split('/').map(encodeURIComponent).join('/')}`, opts.url)
  for (const [k, v] of Object.entries(params)) u.searchParams.set(k, v)
  const blocking = opts.index !== undefined && opts.index > 0
  if (blocking) {
    u.searchParams.set('index', String(opts.index))
    u.searchParams.set('wait', `${opts.waitSeconds ?? 300}s`)
  }
  // One controller per request, linked to the caller's signal and unlinked afterwards:
  // AbortSignal.any() on a long-lived signal piles up listeners in a daemon that reads forever.
  const request = new AbortController()
  const onAbort = () => request.abort(opts.signal?.reason)
  opts.signal?.addEventListener('abort', onAbort, { once: true })
  const timer = setTimeout(() => request.abort(new Error('timed out')), blocking ? blockingTimeoutMs(opts.waitSeconds ?? 300) : 15_000)
  // The agent is local: gzip would only spend CPU on both ends of a loopback socket.
  const headers: Record<string, string> = { 'accept-encoding': 'identity' }
  if (opts.token) headers['x-consul-token'] = opts.token
  let res: HttpReply
  try {
    res = await httpGet(u, headers, request.signal)
  } catch (err) {
    throw new ConsulError('CONSUL_UNREACHABLE', `GET ${path}: cannot reach Consul at ${opts.url} (${(err as Error).message})`, undefined, { cause: err })
  } finally {
    clearTimeout(timer)
    opts.signal?.removeEventListener('abort', onAbort)
  }
  const body = res.body
  const index = Number(header(res, 'x-consul-index') ?? NaN)
  const filtered = header(res, 'x-consul-results-filtered-by-acls') === 'true'
  if (res.status === 404) return { status: 404, body, index: Number.isFinite(index) ? index : 0, filtered }
  if (res.status < 200 || res.status > 299) throw new ConsulError(res.status === 403 ? 'CONSUL_FORBIDDEN' : 'CONSUL_HTTP', `GET ${path}: HTTP ${res.status} ${body.toString('utf8').slice(0, 200)}`, res.status)
  if (!Number.isFinite(index)) throw new ConsulError('CONSUL_BAD_BODY', `GET ${path}: response has no X-Consul-Index`, res.status)
  return { status: res.status, body, index, filtered }
}

function parseList(path: string, raw: RawRead): unknown[] {
  if (raw.status === 404) return []
  let parsed: unknown
  try {
    parsed = JSON.parse(raw.body.toString('utf8'))
  } catch (err) {
    throw new ConsulError('CONSUL_BAD_BODY', `GET ${path}: response is not JSON`, raw.status, { cause: err })
  }
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
