import Consul from 'consul'
import { ConsulError } from '../errors.ts'

/**
 * The one door to Consul. Everything else in the project takes a ConsulClient,
 * so tokens, timeouts and error shapes are decided here and nowhere else.
 * The npm `consul` client serves the areas it types well; `request` covers the
 * rest (ACL management) with the same token and error handling.
 */
export interface ConsulClientOptions {
  /** Agent HTTP address, e.g. http://127.0.0.1:8500 */
  url: string
  token?: string
  timeoutMs?: number
}

export interface KvEntry {
  key: string
  value: string
  modifyIndex: number
}

export interface Member {
  name: string
  addr: string
  status: number
  role: 'server' | 'client'
}

export interface ConsulClient {
  readonly url: string
  kvGet(key: string): Promise<KvEntry | undefined>
  kvPut(key: string, value: string, opts?: { cas?: number }): Promise<boolean>
  leader(): Promise<string>
  members(): Promise<Member[]>
  request<T>(method: string, path: string, body?: unknown): Promise<T>
  /** A transaction (up to 64 ops). A rollback (409) is an answer, not an error: it says which op failed. */
  txn(ops: TxnOp[]): Promise<TxnResult>
}

export type TxnOp = { KV: { Verb: string; Key: string; Value?: string; Index?: number } }
export type TxnResult = { ok: true; results: Array<{ KV?: { Key: string; ModifyIndex: number } }> } | { ok: false; errors: Array<{ OpIndex: number; What: string }> }

/** Base64 for a transaction's Value field. */
export const b64 = (s: string): string => Buffer.from(s).toString('base64')

/** Serf's member status: 1 means alive. */
export const MEMBER_ALIVE = 1

export function createConsulClient(opts: ConsulClientOptions): ConsulClient {
  const base = new URL(opts.url)
  const timeoutMs = opts.timeoutMs ?? 10_000
  const api = new Consul({
    host: base.hostname,
    port: Number(base.port || (base.protocol === 'https:' ? 443 : 80)),
    secure: base.protocol === 'https:',
    defaults: opts.token ? { token: opts.token } : {},
  })

  const wrap = async <T>(what: string, fn: () => Promise<T>): Promise<T> => {
    try {
      return await fn()
    } catch (err) {
      throw toConsulError(what, opts.url, err)
    }
  }

  return {
    url: opts.url,
    kvGet: (key) =>
      wrap(`GET kv/${key}`, async () => {
        const item = await api.kv.get({ key, timeout: timeoutMs } as { key: string })
        if (!item || Array.isArray(item)) return undefined
        // The npm client has already decoded Consul's base64 value.
        return { key: item.Key, value: item.Value ?? '', modifyIndex: item.ModifyIndex }
      }),
    kvPut: (key, value, putOpts) =>
      wrap(`PUT kv/${key}`, () => api.kv.set({ key, value, ...(putOpts?.cas !== undefined ? { cas: putOpts.cas } : {}), timeout: timeoutMs } as { key: string; value: string })),
    leader: () => wrap('GET status/leader', () => api.status.leader({ timeout: timeoutMs } as object)),
    members: () =>
      wrap('GET agent/members', async () => {
        const raw = (await api.agent.members({ timeout: timeoutMs } as object)) as Array<{ Name: string; Addr: string; Status: number; Tags?: Record<string, string> }>
        return raw.map((m) => ({ name: m.Name, addr: m.Addr, status: m.Status, role: m.Tags?.role === 'consul' ? 'server' : 'client' }))
      }),
    txn: async (ops) => {
      const res = await send('PUT', '/v1/txn', ops)
      if (res.status === 409) {
        const body = parseJson(res, 'PUT /v1/txn') as { Errors?: Array<{ OpIndex: number; What: string }> } | undefined
        return { ok: false, errors: body?.Errors ?? [] }
      }
      const body = checked(res, 'PUT /v1/txn') as { Results?: Array<{ KV?: { Key: string; ModifyIndex: number } }> } | undefined
      return { ok: true, results: body?.Results ?? [] }
    },
    request: async <T>(method: string, path: string, body?: unknown): Promise<T> => checked(await send(method, path, body), `${method} ${path}`) as T,
  }

  async function send(method: string, path: string, body?: unknown): Promise<{ status: number; text: string }> {
    const headers: Record<string, string> = { 'content-type': 'application/json' }
    if (opts.token) headers['x-consul-token'] = opts.token
    let res: Response
    try {
      res = await fetch(new URL(path, base), { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal: AbortSignal.timeout(timeoutMs) })
    } catch (err) {
      throw toConsulError(`${method} ${path}`, opts.url, err)
    }
    return { status: res.status, text: await res.text() }
  }
  function parseJson(res: { status: number; text: string }, what: string): unknown {
    try {
      return res.text ? JSON.parse(res.text) : undefined
    } catch (err) {
      throw new ConsulError('CONSUL_BAD_BODY', `${what} on ${opts.url}: response is not JSON`, res.status, { cause: err })
    }
  }
  function checked(res: { status: number; text: string }, what: string): unknown {
    if (res.status < 200 || res.status > 299) throw new ConsulError(res.status === 403 ? 'CONSUL_FORBIDDEN' : 'CONSUL_HTTP', `${what} on ${opts.url}: ${res.status} ${res.text.trim().slice(0, 200)}`, res.status)
    return parseJson(res, what)
  }
}

function toConsulError(what: string, url: string, err: unknown): ConsulError {
  if (err instanceof ConsulError) return err
  const e = err as { statusCode?: number; message?: string; response?: { statusCode?: number } }
  const status = e.statusCode ?? e.response?.statusCode
  if (status === 403) return new ConsulError('CONSUL_FORBIDDEN', `${what} on ${url}: permission denied`, status, { cause: err })
  if (status) return new ConsulError('CONSUL_HTTP', `${what} on ${url}: HTTP ${status} ${e.message ?? ''}`.trim(), status, { cause: err })
  return new ConsulError('CONSUL_UNREACHABLE', `${what}: cannot reach Consul at ${url} (${e.message ?? String(err)})`, undefined, { cause: err })
}
