import { ConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import { consulGet, jsonBody, type ConsulGetOptions } from './http.ts'
import { watchBlocking, watchGroup, type Watch } from './watch.ts'

/**
 * Which services exist (the catalog) and which of their instances pass every check
 * (the health endpoint), both as blocking queries. The service watch set follows the
 * catalog: one blocking query per service name, started and stopped as names come and go.
 */
export interface CatalogServicesResult {
  names: string[]
  index: number
}

export async function catalogServices(opts: ConsulGetOptions & { filter?: string }): Promise<CatalogServicesResult> {
  const raw = await consulGet('/v1/catalog/services', opts.filter ? { filter: opts.filter } : {}, opts)
  const body = jsonBody(raw, '/v1/catalog/services')
  if (!body || typeof body !== 'object' || Array.isArray(body)) throw new ConsulError('CONSUL_BAD_BODY', 'GET /v1/catalog/services: expected an object', raw.status)
  return { names: Object.keys(body).sort(), index: raw.index }
}

export interface HealthResult {
  /** Raw entries: untrusted, checked by the caller. */
  entries: unknown[]
  index: number
}

/** The instances of one service whose checks (the node's included) all pass. */
export async function passingInstances(opts: ConsulGetOptions & { service: string; filter?: string }): Promise<HealthResult> {
  const path = `/v1/health/service/${encodeURIComponent(opts.service)}`
  const raw = await consulGet(path, { passing: 'true', ...(opts.filter ? { filter: opts.filter } : {}) }, opts)
  if (raw.status === 404) return { entries: [], index: raw.index }
  const body = jsonBody(raw, path)
  if (!Array.isArray(body)) throw new ConsulError('CONSUL_BAD_BODY', `GET ${path}: expected a list`, raw.status)
  return { entries: body as unknown[], index: raw.index }
}

export interface HealthWatchOptions {
  url: string
  token?: string
  /** Narrows both the catalog and the health reads (e.g. to one network's services). */
  filter: { catalog: string; health: string }
  waitSeconds?: number
  log: Logger
  /** Every service's latest passing entries, after any of them changed. */
  onChange(entries: ReadonlyMap<string, unknown[]>): void
}

export function watchHealth(opts: HealthWatchOptions): Watch {
  const common = { url: opts.url, token: opts.token }
  const perService = new Map<string, Watch>()
  const entries = new Map<string, unknown[]>()
  const emit = () => opts.onChange(entries)
  const catalog = watchBlocking({
    label: 'catalog/services',
    log: opts.log,
    read: (index, signal) => catalogServices({ ...common, index, waitSeconds: opts.waitSeconds, signal, filter: opts.filter.catalog }),
    onChange: async (r) => {
      const names = new Set(r.names)
      const gone = [...perService.keys()].filter((n) => !names.has(n))
      for (const n of gone) {
        const w = perService.get(n)
        perService.delete(n)
        entries.delete(n)
        void w?.stop()
      }
      for (const service of names) {
        if (perService.has(service)) continue
        perService.set(
          service,
          watchBlocking({
            label: `health/service/${service}`,
            log: opts.log,
            read: (index, signal) => passingInstances({ ...common, service, index, waitSeconds: opts.waitSeconds, signal, filter: opts.filter.health }),
            onChange: (h) => {
              // A late answer for a service the catalog has since dropped must not bring it back.
              if (!perService.has(service)) return
              entries.set(service, h.entries)
              emit()
            },
          }),
        )
      }
      if (gone.length) emit()
    },
  })
  return watchGroup(
    catalog,
    () => perService.values(),
    async () => {
      await catalog.stop()
      await Promise.all([...perService.values()].map((w) => w.stop()))
      perService.clear()
    },
  )
}
