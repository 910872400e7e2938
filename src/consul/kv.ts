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

export async function kvList(opts: KvListOptions): Promise<KvListResult> {
  const u = new URL(`/v1/kv/${opts.prefix.split('/').map(encodeURIComponent).join('/')}`, opts.url)
  u.searchParams.set('recurse', 'true')
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
  const signal = request.signal
  // The agent is local: gzip would only spend CPU on both ends of a loopback socket.
  const headers: Record<string, string> = { 'accept-encoding': 'identity' }
  if (opts.token) headers['x-consul-token'] = opts.token
  let res: Response
  let body: Buffer
  try {
    res = await fetch(u, { headers, signal })
    body = Buffer.from(await res.arrayBuffer())
  } catch (err) {
    throw new ConsulError('CONSUL_UNREACHABLE', `GET ${opts.prefix}: cannot reach Consul at ${opts.url} (${(err as Error).message})`, undefined, { cause: err })
  } finally {
    clearTimeout(timer)
    opts.signal?.removeEventListener('abort', onAbort)
  }
  const index = Number(res.headers.get('x-consul-index') ?? NaN)
  const filtered = res.headers.get('x-consul-results-filtered-by-acls') === 'true'
  if (res.status === 404) return { items: [], index: Number.isFinite(index) ? index : 0, bytes: body.length, filtered }
  if (!res.ok) throw new ConsulError(res.status === 403 ? 'CONSUL_FORBIDDEN' : 'CONSUL_HTTP', `GET ${opts.prefix}: HTTP ${res.status} ${body.toString('utf8').slice(0, 200)}`, res.status)
  if (!Number.isFinite(index)) throw new ConsulError('CONSUL_BAD_BODY', `GET ${opts.prefix}: response has no X-Consul-Index`, res.status)
  let raw: unknown
  try {
    raw = JSON.parse(body.toString('utf8'))
  } catch (err) {
    throw new ConsulError('CONSUL_BAD_BODY', `GET ${opts.prefix}: response is not JSON`, res.status, { cause: err })
  }
  if (!Array.isArray(raw)) throw new ConsulError('CONSUL_BAD_BODY', `GET ${opts.prefix}: expected a list`, res.status)
  const items: KvItem[] = []
  for (const e of raw as Array<{ Key?: unknown; Value?: unknown; ModifyIndex?: unknown }>) {
    if (typeof e.Key !== 'string' || typeof e.ModifyIndex !== 'number') continue
    items.push({ key: e.Key, value: typeof e.Value === 'string' ? new Uint8Array(Buffer.from(e.Value, 'base64')) : new Uint8Array(), modifyIndex: e.ModifyIndex })
  }
  return { items, index, bytes: body.length, filtered }
}
