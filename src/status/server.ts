import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { TincConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import { bindAll, listenOn, type Binding } from '../util/listen.ts'
import { createSvgCache, renderDot, renderSvg, type SvgResult } from './graph.ts'
import type { Metrics } from './metrics.ts'
import { tincstat, type Status } from './model.ts'

/**
 * The read-only status endpoints, on 127.0.0.1 and the VPN address only:
 * /tincstat (tincstat's exact shape), /status, /metrics, /graph.dot and
 * /graph.svg. Nothing here changes anything, so every method but GET and HEAD
 * is refused. Any VPN peer may ask for /graph.svg, so Graphviz runs only when
 * the graph changes, one process at a time, and the bytes are served from a
 * cache (createSvgCache).
 */
export const DEFAULT_STATUS_PORT = 9000

export interface StatusServerOptions {
  hosts: string[]
  port: number
  /** Builds the current status; the collector rate-limits what is expensive in it. */
  snapshot(): Promise<Status>
  log: Logger
  dotBin?: string
  /** For tests: renders DOT to SVG in place of Graphviz, e.g. to count renders. */
  renderSvg?: (dot: string) => Promise<SvgResult>
}

export interface StatusServer {
  readonly port: number
  close(): Promise<void>
}

const PATHS = ['/tincstat', '/status', '/metrics', '/graph.dot', '/graph.svg'] as const

const send = (res: ServerResponse, status: number, type: string, body: string) => {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store', 'x-content-type-options': 'nosniff' })
  res.end(body)
}
const json = (res: ServerResponse, status: number, body: unknown) => send(res, status, 'application/json; charset=utf-8', `${JSON.stringify(body, null, 2)}\n`)

/** The request handler: one snapshot per request, rendered as the path asks. */
function statusHandler(opts: StatusServerOptions, log: Logger): (req: IncomingMessage, res: ServerResponse) => Promise<void> {
  // prom-client is loaded on the first scrape: a node nobody scrapes doesn't hold it in memory.
  let metrics: Promise<Metrics> | undefined
  const loadMetrics = () => (metrics ??= import('./metrics.ts').then((m) => m.createMetrics()))
  const render = opts.renderSvg ?? ((dot: string) => renderSvg(dot, opts.dotBin))
  const graph = createSvgCache({
    // Logged here, once per render, rather than once for every request the cached failure answers.
    render: async (dot) => {
      const r = await render(dot)
      if (!r.ok && !r.missing) log.warn({ err: r.error }, 'rendering the graph failed')
      return r
    },
  })
  return async (req, res) => {
    const path = new URL(req.url ?? '/', 'http://status').pathname
    if (!(PATHS as readonly string[]).includes(path)) return json(res, 404, { error: `no such endpoint; try ${PATHS.join(', ')}` })
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.setHeader('allow', 'GET, HEAD')
      return json(res, 405, { error: 'read-only: only GET' })
    }
    const s = await opts.snapshot()
    if (path === '/tincstat') return json(res, 200, tincstat(s))
    if (path === '/status') return json(res, 200, s)
    if (path === '/metrics') {
      const m = await loadMetrics()
      return send(res, 200, m.registry.contentType, await m.render(s))
    }
    const dot = renderDot(s)
    if (path === '/graph.dot') return send(res, 200, 'text/vnd.graphviz; charset=utf-8', dot)
    const svg = await graph.svg(dot)
    if (svg.ok) return send(res, 200, 'image/svg+xml', svg.svg)
    if (svg.missing)
      return json(res, 501, { error: 'Graphviz is not installed here', hint: 'install it (Debian: apt install graphviz), or fetch /graph.dot and render it elsewhere: dot -Tsvg graph.dot > mesh.svg' })
    return json(res, 500, { error: svg.error })
  }
}

export async function startStatusServer(opts: StatusServerOptions): Promise<StatusServer> {
  const log = opts.log.child({ component: 'status' })
  const handle = statusHandler(opts, log)
  const servers: Server[] = []
  let port = opts.port

  const bindOne = async (host: string) => {
    const server = createServer((req, res) => {
      handle(req, res).catch((err: unknown) => {
        log.error({ err, url: req.url }, 'a status request failed')
        if (!res.headersSent) json(res, 500, { error: 'internal error; see the daemon log' })
        else res.destroy()
      })
    })
    // Status pages are small and quick: a slow or idle client has no reason to hold a socket.
    server.requestTimeout = 10_000
    server.headersTimeout = 5_000
    server.keepAliveTimeout = 5_000
    server.maxConnections = 64
    await listenOn(server, port, host, log, 'status')
    // With port 0 (tests), every address shares the port the first one got.
    port = (server.address() as { port: number }).port
    servers.push(server)
  }

  const closeAll = () => Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r())))).then(() => undefined)
  let binding: Binding
  try {
    binding = await bindAll(opts.hosts, bindOne, { log, what: 'status', port: opts.port })
  } catch (err) {
    await closeAll()
    const code = (err as NodeJS.ErrnoException).code
    const hint = code === 'EADDRINUSE' ? ' (something else listens there, tincstat perhaps; pick another --status-port)' : ''
    throw new TincConsulError('STATUS_LISTEN', `cannot serve status on port ${opts.port}: ${(err as Error).message}${hint}`, { cause: err })
  }
  log.info({ hosts: opts.hosts.filter((h) => !binding.pending().includes(h)), pending: binding.pending(), port }, 'serving status')
  return {
    get port() {
      return port
    },
    async close() {
      binding.stop()
      for (const s of servers) s.closeAllConnections()
      await closeAll()
    },
  }
}
