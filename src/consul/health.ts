import { ConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import type { ConsulClient } from './client.ts'
import { jsonBody } from './http.ts'
import type { ReadOptions } from './kv.ts'
import { backoffMs, watchBlocking, watchGroup, type Watch } from './watch.ts'

/**
 * Which services exist (the catalog) and which of their instances pass every check (the
 * health endpoint), with a fixed number of connections to the agent however many service
 * names there are. Each blocking query holds a connection, and the agent allows 200 per
 * client address by default (limits.http_max_conns_per_client); past that it answers 429 to
 * every request, the daemon's record reads included. So there is no blocking query per name:
 *
 * - one blocking query on `/v1/catalog/services` says which names exist;
 * - one blocking query on `/v1/health/state/any` sees every check of this network's services
 *   and every node check that isn't passing. Consul has no endpoint that returns all instances
 *   of all services with their health in one answer, but a check list does say which names
 *   changed: a check added, removed or changed state, a node going critical (every name with
 *   an instance there), and a registration that changed, since the registrar puts its hash in
 *   the check's notes (src/services/registration.ts);
 * - the names that changed are read with ordinary, non-blocking reads of
 *   `/v1/health/service/NAME?passing`, at most `concurrency` at a time.
 *
 * At most 2 + `concurrency` connections, 6 by default. A check that fails wakes the state
 * query at once, and one read of that name follows, so DNS still follows a check in
 * milliseconds. Every `resyncMs` all names are read again, which bounds how long anything the
 * two queries can't see (an instance without checks, registered by hand) stays stale.
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

/** What a check says about which service names may have changed. Only used to decide what to read again. */
export interface CheckState {
  node: string
  checkId: string
  serviceName: string
  status: string
  modifyIndex: number
}

export async function checkStates(client: ConsulClient, opts: ReadOptions & { filter?: string } = {}): Promise<{ checks: CheckState[]; index: number }> {
  const path = '/v1/health/state/any'
  const raw = await client.get(path, opts.filter ? { filter: opts.filter } : {}, opts)
  const body = jsonBody(raw, `GET ${path}`, client.url)
  if (!Array.isArray(body)) throw new ConsulError('CONSUL_BAD_BODY', `GET ${path} on ${client.url}: expected a list`, raw.status)
  const text = (v: unknown) => (typeof v === 'string' ? v : '')
  const checks: CheckState[] = []
  for (const c of body as unknown[]) {
    if (!c || typeof c !== 'object') continue
    const x = c as Record<string, unknown>
    checks.push({ node: text(x.Node), checkId: text(x.CheckID), serviceName: text(x.ServiceName), status: text(x.Status), modifyIndex: typeof x.ModifyIndex === 'number' ? x.ModifyIndex : 0 })
  }
  return { checks, index: raw.index }
}

/** Reads of /v1/health/service/NAME in flight at once, by default. */
export const DEFAULT_SERVICE_READS = 4

export interface HealthWatchOptions {
  client: ConsulClient
  /** Narrows the catalog, the check list and the health reads (e.g. to one network's services). */
  filter: { catalog: string; checks: string; health: string }
  waitSeconds?: number
  /** Longest backoff after a failed read (default 30 s). */
  backoffMaxMs?: number
  /** Health reads in flight at once (default DEFAULT_SERVICE_READS). */
  concurrency?: number
  /** How often every name is read again regardless (default 5 minutes). */
  resyncMs?: number
  log: Logger
  /** Every service's latest passing entries, after any of them changed. */
  onChange(entries: ReadonlyMap<string, unknown[]>): void
}

export function watchHealth(opts: HealthWatchOptions): Watch {
  const { client, waitSeconds } = opts
  const tuning = { client, log: opts.log, backoffMaxMs: opts.backoffMaxMs }
  let names = new Set<string>()
  const entries = new Map<string, unknown[]>()
  const emit = () => opts.onChange(entries)
  // Reads that found what was there already (a resync, a wake-up for another network's check) emit nothing.
  let changed = false
  const changes = checkChanges()
  const reads = readPool({
    ...tuning,
    concurrency: opts.concurrency ?? DEFAULT_SERVICE_READS,
    read: async (service, signal) => {
      const h = await passingInstances(client, { service, signal, filter: opts.filter.health })
      // A late answer for a service the catalog has since dropped must not bring it back.
      if (!names.has(service)) return
      const before = entries.get(service)
      if (before && JSON.stringify(before) === JSON.stringify(h.entries)) return
      entries.set(service, h.entries)
      changed = true
    },
    onIdle: () => {
      if (changed) emit()
      changed = false
    },
  })
  const catalog = watchBlocking({
    ...tuning,
    label: 'catalog/services',
    read: (index, signal) => catalogServices(client, { index, waitSeconds, signal, filter: opts.filter.catalog }),
    onChange: (r) => {
      const next = new Set(r.names)
      const gone = [...names].filter((n) => !next.has(n))
      const added = r.names.filter((n) => !names.has(n))
      names = next
      for (const n of gone) entries.delete(n)
      for (const n of added) reads.mark(n)
      if (gone.length) emit()
    },
  })
  const checks = watchBlocking({
    ...tuning,
    label: 'health/state/any',
    read: (index, signal) => checkStates(client, { index, waitSeconds, signal, filter: opts.filter.checks }),
    onChange: (r) => {
      for (const n of changes.apply(r.checks)) if (names.has(n)) reads.mark(n)
    },
  })
  const resync = setInterval(() => names.forEach((n) => reads.mark(n)), opts.resyncMs ?? 300_000)
  resync.unref()
  return watchGroup(
    catalog,
    () => [checks, reads],
    async () => {
      clearInterval(resync)
      await Promise.all([catalog.stop(), checks.stop(), reads.stop()])
    },
  )
}

/**
 * Turns successive check lists into the service names whose passing instances may have
 * changed. A service check is compared by its state and index; a node check (no service) that
 * appears, changes or goes away marks every name that has a check on that node.
 */
export function checkChanges(): { apply(checks: CheckState[]): Set<string> } {
  let byService = new Map<string, string>()
  let byNode = new Map<string, string>()
  let namesOn = new Map<string, Set<string>>()
  return {
    apply(checks) {
      const services = new Map<string, string[]>()
      const nodes = new Map<string, string[]>()
      const on = new Map<string, Set<string>>()
      // Appended in place: one list per name or node can hold thousands of checks.
      const append = (m: Map<string, string[]>, key: string, sig: string) => {
        const list = m.get(key)
        if (list) list.push(sig)
        else m.set(key, [sig])
      }
      for (const c of checks) {
        const sig = `${c.node}\0${c.checkId}\0${c.status}\0${c.modifyIndex}`
        if (!c.serviceName) {
          append(nodes, c.node, sig)
          continue
        }
        append(services, c.serviceName, sig)
        on.set(c.node, (on.get(c.node) ?? new Set()).add(c.serviceName))
      }
      const joined = (m: Map<string, string[]>) => new Map([...m].map(([k, v]) => [k, v.sort().join('\n')]))
      const nextServices = joined(services)
      const nextNodes = joined(nodes)
      const changed = new Set<string>()
      for (const key of new Set([...byService.keys(), ...nextServices.keys()])) if (byService.get(key) !== nextServices.get(key)) changed.add(key)
      for (const node of new Set([...byNode.keys(), ...nextNodes.keys()])) {
        if (byNode.get(node) === nextNodes.get(node)) continue
        for (const n of [...(namesOn.get(node) ?? []), ...(on.get(node) ?? [])]) changed.add(n)
      }
      byService = nextServices
      byNode = nextNodes
      namesOn = on
      return changed
    },
  }
}

interface ReadPoolOptions {
  client: Pick<ConsulClient, 'reach'>
  concurrency: number
  read(name: string, signal: AbortSignal): Promise<void>
  /** Nothing in flight and nothing waiting to start (failed names may wait for their retry). */
  onIdle(): void
  backoffMaxMs?: number
  log: Logger
}

/**
 * Non-blocking reads of names marked as changed, at most `concurrency` at once. A name marked
 * while its read is in flight is read once more afterwards; a failed read is retried after a
 * backoff, or as soon as the client sees Consul answer again.
 */
export function readPool(o: ReadPoolOptions): Watch & { mark(name: string): void } {
  const controller = new AbortController()
  const queued = new Set<string>()
  const inFlight = new Set<string>()
  const again = new Set<string>()
  const failed = new Set<string>()
  const pending = new Set<Promise<void>>()
  let failures = 0
  let lastReadAt: Date | undefined
  let retry: NodeJS.Timeout | undefined
  const retryNow = () => {
    clearTimeout(retry)
    retry = undefined
    for (const n of failed) queued.add(n)
    failed.clear()
    pump()
  }
  const unsubscribe = o.client.reach.onRecovered(retryNow)
  const finish = (name: string, ok: boolean, err?: unknown) => {
    inFlight.delete(name)
    if (ok) {
      failures = 0
      lastReadAt = new Date()
    } else if (!controller.signal.aborted) {
      failures++
      if (failures <= 3 || failures % 60 === 0) o.log.warn({ err, service: name, attempt: failures }, 'consul health read failed; keeping the last answer and retrying')
      failed.add(name)
      retry ??= setTimeout(retryNow, backoffMs(failures, 250, o.backoffMaxMs ?? 30_000))
    }
    // Marked again while in flight: read once more (a failed one is retried anyway).
    if (again.delete(name) && ok) queued.add(name)
    pump()
    if (inFlight.size === 0 && queued.size === 0 && !controller.signal.aborted) o.onIdle()
  }
  const pump = () => {
    for (const name of queued) {
      if (inFlight.size >= o.concurrency || controller.signal.aborted) return
      queued.delete(name)
      inFlight.add(name)
      const p = o.read(name, controller.signal).then(
        () => finish(name, true),
        (err: unknown) => finish(name, false, err),
      )
      pending.add(p)
      void p.finally(() => pending.delete(p))
    }
  }
  return {
    mark(name) {
      if (inFlight.has(name)) again.add(name)
      else if (!failed.has(name)) queued.add(name)
      pump()
    },
    get index() {
      return 0
    },
    get failures() {
      return failures
    },
    get lastReadAt() {
      return lastReadAt
    },
    async stop() {
      controller.abort()
      clearTimeout(retry)
      unsubscribe()
      queued.clear()
      await Promise.all(pending)
    },
  }
}
