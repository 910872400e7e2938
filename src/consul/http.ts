import http, { type IncomingHttpHeaders } from 'node:http'
import { httpsModule } from '../util/lazy-https.ts'
import { ConsulError } from '../errors.ts'

/**
 * The one request pipeline to Consul. Every call, plain or blocking, goes through `send`:
 * one way to pass the address and token, one timeout rule, one error shape, and one
 * record of whether Consul answers (`reach`).
 *
 * node:http rather than fetch: blocking queries need the X-Consul-Index and
 * X-Consul-Results-Filtered-By-ACLs headers, an abort that ends a 300 s wait at once, and a
 * timeout that outlasts Consul's jitter; these reads are also the daemon's hot path (every
 * daemon reads on every change in the mesh), where fetch's web streams cost several times
 * more CPU per request.
 */
export interface PipelineOptions {
  /** Agent HTTP address, e.g. http://127.0.0.1:8500 */
  url: string
  token?: string
  /** Timeout of every request that doesn't block (default 10 s). */
  timeoutMs?: number
}

export interface Reachability {
  /** Outcome of the latest request that finished (any request through this client). */
  readonly ok: boolean | undefined
  readonly lastOkAt: Date | undefined
  /** Requests that failed in a row since the last success. */
  readonly failures: number
  /** Called on the first success after a failure: paused watches re-read at once. Returns an unsubscribe. */
  onRecovered(listener: () => void): () => void
}

export interface SendOptions {
  /** Query parameters, added to any already in `path`. */
  params?: Record<string, string>
  /** Sent as is: callers serialise (JSON for the API, raw bytes for a KV value). */
  body?: string
  /** Blocks when above 0 (with `waitSeconds`, default 300). */
  index?: number
  waitSeconds?: number
  signal?: AbortSignal
  /** What errors call this request (default: the path). */
  label?: string
}

export interface Reply {
  status: number
  headers: IncomingHttpHeaders
  body: Buffer
}

export interface Pipeline {
  readonly url: string
  readonly reach: Reachability
  /** Any reply Consul sends comes back, whatever its status; only a request that got no reply throws. */
  send(method: string, path: string, opts?: SendOptions): Promise<Reply>
  /** The error a non-2xx reply stands for, naming the request and the address. */
  httpError(method: string, label: string, res: Reply): ConsulError
}

/** Consul adds up to wait/16 of jitter; the HTTP timeout must outlast both. */
export function blockingTimeoutMs(waitSeconds: number): number {
  return Math.ceil((waitSeconds + waitSeconds / 16) * 1000) + 5000
}

// Keep-alive agents shared by every client: a daemon holds one long poll per peer record,
// and each should reuse its socket rather than open a new one per read. Idle sockets are
// unref'd by the agent, so a CLI command still exits when it is done.
const httpAgent = new http.Agent({ keepAlive: true })
let httpsAgent: http.Agent | undefined

/**
 * Whether a reply says Consul can't serve us now: a server error (no leader, an RPC that
 * failed) or 429 (over its per-client connection limit). Other statuses are answers from a
 * working agent, even when they refuse (403) or find nothing (404), so they count as reached.
 */
const unavailable = (status: number) => status >= 500 || status === 429

class Reach implements Reachability {
  ok: boolean | undefined
  lastOkAt: Date | undefined
  failures = 0
  private readonly listeners = new Set<() => void>()

  succeeded(): void {
    const recovered = this.ok === false
    this.ok = true
    this.lastOkAt = new Date()
    this.failures = 0
    if (!recovered) return
    for (const listener of [...this.listeners]) {
      try {
        listener()
      } catch {
        // A listener only schedules a re-read; its failure must not fail this request.
      }
    }
  }

  failed(): void {
    this.ok = false
    this.failures++
  }

  onRecovered(listener: () => void): () => void {
    // Wrapped so one listener subscribed twice still gets two independent subscriptions.
    const entry = () => listener()
    this.listeners.add(entry)
    return () => void this.listeners.delete(entry)
  }
}

interface Attempt {
  method: string
  url: URL
  headers: Record<string, string>
  body: string | undefined
  signal: AbortSignal
  retried?: boolean
}

function attempt(a: Attempt): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const tls = a.url.protocol === 'https:'
    const agent = tls ? (httpsAgent ??= new (httpsModule().Agent)({ keepAlive: true })) : httpAgent
    const req = (tls ? httpsModule() : http).request(a.url, { method: a.method, headers: a.headers, signal: a.signal, agent }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }))
      res.on('error', reject)
    })
    req.on('error', (err: NodeJS.ErrnoException) => {
      // A kept-alive socket the agent closed while idle: the request never reached it, so a GET is safe to send again.
      if (req.reusedSocket && err.code === 'ECONNRESET' && a.method === 'GET' && !a.signal.aborted && !a.retried) attempt({ ...a, retried: true }).then(resolve, reject)
      else reject(err)
    })
    req.end(a.body)
  })
}

function requestUrl(base: URL, path: string, opts: SendOptions): URL {
  const u = new URL(path, base)
  for (const [k, v] of Object.entries(opts.params ?? {})) u.searchParams.set(k, v)
  if (opts.index !== undefined && opts.index > 0) {
    u.searchParams.set('index', String(opts.index))
    u.searchParams.set('wait', `${opts.waitSeconds ?? 300}s`)
  }
  return u
}

export function createPipeline(opts: PipelineOptions): Pipeline {
  const base = new URL(opts.url)
  const timeoutMs = opts.timeoutMs ?? 10_000
  const reach = new Reach()

  const send = async (method: string, path: string, so: SendOptions = {}): Promise<Reply> => {
    const url = requestUrl(base, path, so)
    const blocking = so.index !== undefined && so.index > 0
    const what = `${method} ${so.label ?? path}`
    // One controller per request, linked to the caller's signal and unlinked afterwards:
    // AbortSignal.any() on a long-lived signal piles up listeners in a daemon that reads forever.
    const request = new AbortController()
    const onAbort = () => request.abort(so.signal?.reason)
    so.signal?.addEventListener('abort', onAbort, { once: true })
    const limit = blocking ? blockingTimeoutMs(so.waitSeconds ?? 300) : timeoutMs
    const timer = setTimeout(() => request.abort(new Error(`no answer within ${limit} ms`)), limit)
    // The agent is normally local: gzip would only spend CPU on both ends of a loopback socket.
    const headers: Record<string, string> = { 'accept-encoding': 'identity' }
    if (so.body !== undefined) headers['content-type'] = 'application/json'
    if (opts.token) headers['x-consul-token'] = opts.token
    try {
      const res = await attempt({ method, url, headers, body: so.body, signal: request.signal })
      if (unavailable(res.status)) reach.failed()
      else reach.succeeded()
      return res
    } catch (err) {
      // The caller gave up (a watch stopping): that says nothing about Consul.
      if (!so.signal?.aborted) reach.failed()
      const reason = request.signal.aborted && request.signal.reason instanceof Error ? request.signal.reason.message : (err as Error).message
      throw new ConsulError('CONSUL_UNREACHABLE', `${what}: cannot reach Consul at ${opts.url} (${reason})`, undefined, { cause: err })
    } finally {
      clearTimeout(timer)
      so.signal?.removeEventListener('abort', onAbort)
    }
  }

  const httpError = (method: string, label: string, res: Reply): ConsulError => {
    const text = res.body.toString('utf8').trim().slice(0, 200)
    return new ConsulError(res.status === 403 ? 'CONSUL_FORBIDDEN' : 'CONSUL_HTTP', `${method} ${label} on ${opts.url}: HTTP ${res.status} ${text}`.trim(), res.status)
  }

  return { url: opts.url, reach, send, httpError }
}

/** A header's first value. */
export function header(res: Reply, name: string): string | undefined {
  const v = res.headers[name]
  return Array.isArray(v) ? v[0] : v
}

/** The body as JSON (undefined when empty), or a CONSUL_BAD_BODY error naming the request. */
export function jsonBody(res: { status: number; body: Buffer }, what: string, url: string): unknown {
  if (res.body.length === 0) return undefined
  try {
    return JSON.parse(res.body.toString('utf8'))
  } catch (err) {
    throw new ConsulError('CONSUL_BAD_BODY', `${what} on ${url}: response is not JSON`, res.status, { cause: err })
  }
}
