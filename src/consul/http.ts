import http, { type IncomingHttpHeaders } from 'node:http'
import https from 'node:https'
import { ConsulError } from '../errors.ts'

/**
 * The GET under every blocking query (KV, catalog, health): index and wait handling,
 * timeouts that outlast Consul's jitter, and one error shape.
 */
export interface ConsulGetOptions {
  url: string
  token?: string
  /** Blocks when above 0. */
  index?: number
  /** Blocking wait, in seconds. */
  waitSeconds?: number
  signal?: AbortSignal
}

export interface RawRead {
  status: number
  body: Buffer
  index: number
  filtered: boolean
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

/** One GET on `path` (already encoded), blocking when an index is given. A 404 is returned, not thrown. */
export async function consulGet(path: string, params: Record<string, string>, opts: ConsulGetOptions, label = path): Promise<RawRead> {
  const u = new URL(path, opts.url)
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
    throw new ConsulError('CONSUL_UNREACHABLE', `GET ${label}: cannot reach Consul at ${opts.url} (${(err as Error).message})`, undefined, { cause: err })
  } finally {
    clearTimeout(timer)
    opts.signal?.removeEventListener('abort', onAbort)
  }
  const body = res.body
  const index = Number(header(res, 'x-consul-index') ?? NaN)
  const filtered = header(res, 'x-consul-results-filtered-by-acls') === 'true'
  if (res.status === 404) return { status: 404, body, index: Number.isFinite(index) ? index : 0, filtered }
  if (res.status < 200 || res.status > 299) throw new ConsulError(res.status === 403 ? 'CONSUL_FORBIDDEN' : 'CONSUL_HTTP', `GET ${label}: HTTP ${res.status} ${body.toString('utf8').slice(0, 200)}`, res.status)
  if (!Number.isFinite(index)) throw new ConsulError('CONSUL_BAD_BODY', `GET ${label}: response has no X-Consul-Index`, res.status)
  return { status: res.status, body, index, filtered }
}

/** The body as JSON, or a CONSUL_BAD_BODY error naming the request. */
export function jsonBody(raw: RawRead, label: string): unknown {
  try {
    return JSON.parse(raw.body.toString('utf8'))
  } catch (err) {
    throw new ConsulError('CONSUL_BAD_BODY', `GET ${label}: response is not JSON`, raw.status, { cause: err })
  }
}
