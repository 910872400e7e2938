import { ConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import type { ConsulClient } from './client.ts'
import { jsonBody } from './http.ts'
import type { ReadOptions } from './kv.ts'
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

export async function catalogServices(client: ConsulClient, opts: ReadOptions & { filter?: string } = {}): Promise<CatalogServicesResult> {
  const path = '/v1/catalog/services'
  const raw = await client.get(path, opts.filter ? { filter: opts.filter } : {}, opts)
  const body = jsonBody(raw, `GET ${path}`, client.url)
  if (!body || typeof body !== 'object' || Array.isArray(body)) throw new ConsulError('CONSUL_BAD_BODY', `GET ${path} on ${client.url}: expected an object`, raw.status)
  return { names: Object.keys(body).sort(), index: raw.index }
}

export interface HealthResult {
  /** Raw entries: untrusted, checked by the caller. */
  entries: unknown[]
  index: number
}

/** The instances of one service whose checks (the node's included) all pass. */
export async function passingInstances(client: ConsulClient, opts: ReadOptions & { service: string; filter?: string }): Promise<HealthResult> {
  const path = `/v1/health/service/${encodeURIComponent(opts.service)}`
  const raw = await client.get(path, { passing: 'true', ...(opts.filter ? { filter: opts.filter } : {}) }, opts)
  if (raw.status === 404) return { entries: [], index: raw.index }
  const body = jsonBody(raw, `GET ${path}`, client.url)
  if (!Array.isArray(body)) throw new ConsulError('CONSUL_BAD_BODY', `GET ${path} on ${client.url}: expected a list`, raw.status)
  return { entries: body as unknown[], index: raw.index }
}

export interface HealthWatchOptions {
  client: ConsulClient
  /** Narrows both the catalog and the health reads (e.g. to one network's services). */
  filter: { catalog: string; health: string }
  waitSeconds?: number
  /** Longest backoff after a failed read (default 30 s). */
  backoffMaxMs?: number
  log: Logger
  /** Every service's latest passing entries, after any of them changed. */
  onChange(entries: ReadonlyMap<string, unknown[]>): void
}

export function watchHealth(opts: HealthWatchOptions): Watch {
  const { client, waitSeconds } = opts
  const tuning = { client, log: opts.log, backoffMaxMs: opts.backoffMaxMs }
  const perService = new Map<string, Watch>()
  const entries = new Map<string, unknown[]>()
  const emit = () => opts.onChange(entries)
  const catalog = watchBlocking({
    ...tuning,
    label: 'catalog/services',
    read: (index, signal) => catalogServices(client, { index, waitSeconds, signal, filter: opts.filter.catalog }),
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
            ...tuning,
            label: `health/service/${service}`,
            read: (index, signal) => passingInstances(client, { service, index, waitSeconds, signal, filter: opts.filter.health }),
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
