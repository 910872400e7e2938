import { ConsulError } from '../errors.ts'
import { createPipeline, header, jsonBody, type Pipeline, type Reachability, type Reply } from './http.ts'
import { kvPath, readKvKeys, readKvList, readKvOne, type KvKeysResult, type KvListResult, type KvOneResult, type ReadOptions } from './kv.ts'

export type { Reachability } from './http.ts'

/**
 * The one door to Consul. Everything else in the project takes a ConsulClient, so the
 * address, token, timeouts and error shapes are decided here (on the pipeline in http.ts)
 * and nowhere else. Plain calls and blocking reads share that pipeline, so `reach` sees
 * every request the process makes to this agent.
 */
export interface ConsulClientOptions {
  /** Agent HTTP address, e.g. http://127.0.0.1:8500 */
  url: string
  token?: string
  /** Timeout of every request that doesn't block (default 10 s). */
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

/** A GET's reply as the watches need it: the body and the blocking-query headers. */
export interface RawRead {
  /** 200-299, or 404 (an answer: nothing there). */
  status: number
  body: Buffer
  /** X-Consul-Index (0 on a 404 without one). */
  index: number
  /** Consul hid some results from this token (X-Consul-Results-Filtered-By-ACLs). */
  filtered: boolean
}

export interface GetOptions extends ReadOptions {
  /** What errors call this read (default: the path). */
  label?: string
}

export interface ConsulClient {
  readonly url: string
  /** Whether Consul answers, from the latest request through this client. */
  readonly reach: Reachability
  kvGet(key: string): Promise<KvEntry | undefined>
  kvPut(key: string, value: string, opts?: { cas?: number }): Promise<boolean>
  leader(): Promise<string>
  members(): Promise<Member[]>
  /** Any API call with a JSON body and answer. Throws a ConsulError on a non-2xx status. */
  request<T>(method: string, path: string, body?: unknown): Promise<T>
  /** A transaction (up to 64 ops). A rollback (409) is an answer, not an error: it says which op failed. */
  txn(ops: TxnOp[]): Promise<TxnResult>
  /** A GET on `path` (already encoded), blocking when `index` is above 0. A 404 is returned, not thrown. */
  get(path: string, params: Record<string, string>, opts?: GetOptions): Promise<RawRead>
  /** Every key and value under a prefix (`?recurse`). */
  kvList(prefix: string, opts?: ReadOptions): Promise<KvListResult>
  /** The key names under a prefix (`?keys`), without values. */
  kvKeys(prefix: string, opts?: ReadOptions & { separator?: string }): Promise<KvKeysResult>
  /** One key, raw bytes. */
  kvGetOne(key: string, opts?: ReadOptions): Promise<KvOneResult>
}

export type TxnOp = { KV: { Verb: string; Key: string; Value?: string; Index?: number } }
export type TxnResult = { ok: true; results: Array<{ KV?: { Key: string; ModifyIndex: number } }> } | { ok: false; errors: Array<{ OpIndex: number; What: string }> }

/** Whether a failed transaction operation's `What` says the token may not do it (Consul's wording for an ACL refusal). */
export const isAclDenied = (what: string): boolean => /permission denied|ACL not found/i.test(what)

/** Base64 for a transaction's Value field. */
export const b64 = (s: string): string => Buffer.from(s).toString('base64')

/** Serf's member status: 1 means alive. */
export const MEMBER_ALIVE = 1

export function createConsulClient(opts: ConsulClientOptions): ConsulClient {
  const pipe = createPipeline(opts)
  const json = (res: Reply, what: string) => jsonBody(res, what, opts.url)
  /** The JSON answer of a 2xx reply; anything else is thrown as the error it stands for. */
  const answer = (method: string, label: string, res: Reply): unknown => {
    if (res.status < 200 || res.status > 299) throw pipe.httpError(method, label, res)
    return json(res, `${method} ${label}`)
  }
  const get = (path: string, params: Record<string, string>, o: GetOptions = {}) => blockingGet(pipe, path, params, o)
  const client: ConsulClient = {
    url: opts.url,
    reach: pipe.reach,
    get,
    kvList: (prefix, o) => readKvList(client, prefix, o),
    kvKeys: (prefix, o) => readKvKeys(client, prefix, o),
    kvGetOne: (key, o) => readKvOne(client, key, o),
    kvGet: async (key) => {
      const r = await readKvOne(client, key)
      return r.item && { key: r.item.key, value: Buffer.from(r.item.value).toString('utf8'), modifyIndex: r.item.modifyIndex }
    },
    kvPut: async (key, value, putOpts) => {
      const params: Record<string, string> = putOpts?.cas !== undefined ? { cas: String(putOpts.cas) } : {}
      const res = await pipe.send('PUT', kvPath(key), { params, body: value, label: `kv/${key}` })
      return answer('PUT', `kv/${key}`, res) === true
    },
    leader: async () => String(answer('GET', 'status/leader', await pipe.send('GET', '/v1/status/leader')) ?? ''),
    members: async () => {
      const raw = answer('GET', 'agent/members', await pipe.send('GET', '/v1/agent/members'))
      if (!Array.isArray(raw)) throw new ConsulError('CONSUL_BAD_BODY', `GET agent/members on ${opts.url}: expected a list`)
      return (raw as Array<{ Name: string; Addr: string; Status: number; Tags?: Record<string, string> }>).map((m) => ({ name: m.Name, addr: m.Addr, status: m.Status, role: m.Tags?.role === 'consul' ? 'server' : 'client' }))
    },
    txn: async (ops) => {
      const res = await pipe.send('PUT', '/v1/txn', { body: JSON.stringify(ops) })
      if (res.status === 409) {
        const body = json(res, 'PUT /v1/txn') as { Errors?: Array<{ OpIndex: number; What: string }> } | undefined
        return { ok: false, errors: body?.Errors ?? [] }
      }
      const body = answer('PUT', '/v1/txn', res) as { Results?: Array<{ KV?: { Key: string; ModifyIndex: number } }> } | undefined
      return { ok: true, results: body?.Results ?? [] }
    },
    request: async <T>(method: string, path: string, body?: unknown): Promise<T> => answer(method, path, await pipe.send(method, path, { body: body === undefined ? undefined : JSON.stringify(body) })) as T,
  }
  return client
}

async function blockingGet(pipe: Pipeline, path: string, params: Record<string, string>, o: GetOptions): Promise<RawRead> {
  const label = o.label ?? path
  const res = await pipe.send('GET', path, { params, index: o.index, waitSeconds: o.waitSeconds, signal: o.signal, label })
  const index = Number(header(res, 'x-consul-index') ?? NaN)
  const filtered = header(res, 'x-consul-results-filtered-by-acls') === 'true'
  if (res.status === 404) return { status: 404, body: res.body, index: Number.isFinite(index) ? index : 0, filtered }
  if (res.status < 200 || res.status > 299) throw pipe.httpError('GET', label, res)
  if (!Number.isFinite(index)) throw new ConsulError('CONSUL_BAD_BODY', `GET ${label} on ${pipe.url}: response has no X-Consul-Index`, res.status)
  return { status: res.status, body: res.body, index, filtered }
}
