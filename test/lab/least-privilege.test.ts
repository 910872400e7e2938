import { describe, type TestContext } from 'node:test'
import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { createPipeline } from '../../src/consul/http.ts'
import { kvPath } from '../../src/consul/kv.ts'
import { waitFor } from '../../src/lab/daemon.ts'
import { LAB_NETNAME, type Lab } from '../../src/lab/lab.ts'
import { kvLayout } from '../../src/mesh/kv-layout.ts'
import { serviceNaming } from '../../src/services/naming.ts'
import { dig, labTest, sidecarStatus, useLab, withLogs } from './helpers.ts'

/**
 * The blast radius of one node's token (issue 17, "Proof"): with node1's own token, the one
 * its sidecar runs with, every write outside its own record and its own services is refused,
 * through its own agent and through a server's, and nothing changed afterwards. Positive
 * controls (its own record, `nodes/`, its own token) keep the refusals from passing vacuously.
 * The table of operations and statuses is printed with t.diagnostic for docs/security.md.
 */

const layout = kvLayout(LAB_NETNAME)
const P = layout.prefix
const A = 'node1'
const B = 'node2'
const NODES = [A, B]
// The join-server list (KvLayout.joinEndpoint, being added): written only with a join-server or operator token.
const joinEndpoint = (name: string) => `${P}join-endpoints/${name}`
const OTHER_APP = 'other-app/secret'
const INVITE_ID = 'a1'.repeat(16)
const REVOKED_FP = createHash('sha256').update('least-privilege: a key revoked long ago').digest('hex')

interface Reply {
  status: number
  text: string
}
type Send = (method: string, path: string, body?: unknown, params?: Record<string, string>) => Promise<Reply>

/** Raw requests with one token: every status comes back, nothing is thrown for a refusal. */
function sender(url: string, token: string | undefined): Send {
  const pipe = createPipeline({ url, token, timeoutMs: 10_000 })
  return async (method, path, body, params) => {
    const res = await pipe.send(method, path, { params, body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body) })
    return { status: res.status, text: res.body.toString('utf8') }
  }
}

const b64 = (s: string) => Buffer.from(s).toString('base64')
const json = (r: Reply): unknown => {
  try {
    return JSON.parse(r.text)
  } catch {
    return undefined
  }
}
const keysOf = (r: Reply): string[] => {
  const v = json(r)
  if (!Array.isArray(v)) return []
  return v.map((e: unknown) => (typeof e === 'string' ? e : String((e as { Key?: string }).Key)))
}

type Want = 'refused' | 'allowed' | 'hidden' | 'info'
interface Check {
  op: string
  want: Want
  run: (send: Send) => Promise<Reply>
  /** Whether the reply is what `want` asks; the default is 403 for refused, 2xx for allowed. */
  judge?: (r: Reply) => boolean
  /** What the table shows instead of the bare status. */
  show?: (r: Reply) => string
}

const defaultJudge = (want: Want, r: Reply) =>
  want === 'refused' ? r.status === 403 : want === 'allowed' ? r.status >= 200 && r.status < 300 : want === 'hidden' ? r.status === 403 || r.status === 404 : true

interface Row {
  op: string
  want: Want
  got: Record<string, string>
  bad: string[]
}

async function runChecks(checks: Check[], agents: Array<[string, Send]>): Promise<Row[]> {
  const rows: Row[] = []
  for (const c of checks) {
    const row: Row = { op: c.op, want: c.want, got: {}, bad: [] }
    for (const [at, send] of agents) {
      const r = await c.run(send)
      const ok = (c.judge ?? ((x: Reply) => defaultJudge(c.want, x)))(r)
      row.got[at] = `${c.show ? c.show(r) : String(r.status)}${ok ? '' : ' ✗'}`
      if (!ok) row.bad.push(`${at}: ${c.op} → ${r.status} ${r.text.trim().slice(0, 160)}`)
    }
    rows.push(row)
  }
  return rows
}

function printTable(t: TestContext, title: string, agents: string[], rows: Row[]): void {
  const head = ['operation', 'want', ...agents]
  const lines = rows.map((r) => [r.op, r.want, ...agents.map((a) => r.got[a] ?? '')])
  const width = head.map((h, i) => Math.max(h.length, ...lines.map((l) => (l[i] ?? '').length)))
  const fmt = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(width[i] ?? 0)).join(' | ')} |`
  t.diagnostic(title)
  t.diagnostic(fmt(head))
  t.diagnostic(fmt(width.map((w) => '-'.repeat(w))))
  for (const l of lines) t.diagnostic(fmt(l))
}

/** Everything a refused write could have touched, as the management token sees it: one sorted list of lines per kind. */
async function snapshot(admin: Send): Promise<Record<string, string[]>> {
  const list = async <T>(path: string, line: (x: T) => string, params?: Record<string, string>) => ((json(await admin('GET', path, undefined, params)) as T[] | undefined) ?? []).map(line).sort()
  const nodes = (json(await admin('GET', '/v1/catalog/nodes')) as Array<{ Node: string }>).map((n) => n.Node)
  const services: string[] = []
  const checks: string[] = []
  for (const n of nodes) {
    const s = json(await admin('GET', `/v1/catalog/node-services/${encodeURIComponent(n)}`)) as {
      Services?: Array<{ ID: string; Service: string; Address: string; Port: number; Meta?: unknown; ModifyIndex: number }>
    }
    for (const x of s.Services ?? []) services.push(`${n} ${x.ID} ${x.Service} ${x.Address}:${x.Port} ${JSON.stringify(x.Meta ?? {})} @${x.ModifyIndex}`)
    // Not the status: a real check may flap; an injected one shows as a new CheckID.
    checks.push(...(await list<{ CheckID: string; ServiceID: string; Name: string }>(`/v1/health/node/${encodeURIComponent(n)}`, (c) => `${n} ${c.CheckID} ${c.ServiceID} ${c.Name}`)))
  }
  return {
    kv: await list<{ Key: string; Value: string | null; ModifyIndex: number; Flags: number; Session?: string }>(
      '/v1/kv/',
      (e) => `${e.Key} @${e.ModifyIndex} flags=${e.Flags} ${e.Session ?? ''} ${e.Value ?? ''}`,
      { recurse: 'true' },
    ),
    policies: await list<{ ID: string; Name: string; ModifyIndex: number }>('/v1/acl/policies', (p) => `${p.ID} ${p.Name} @${p.ModifyIndex}`),
    tokens: await list<{ AccessorID: string; Policies?: unknown; Roles?: unknown; ModifyIndex: number }>(
      '/v1/acl/tokens',
      (x) => `${x.AccessorID} ${JSON.stringify(x.Policies ?? [])} ${JSON.stringify(x.Roles ?? [])} @${x.ModifyIndex}`,
    ),
    roles: await list<unknown>('/v1/acl/roles', (x) => JSON.stringify(x)),
    // Each agent fills in its own node's tagged addresses and consul-* meta by itself some time
    // after it starts (seen on a server during the test); those aren't the token's doing.
    nodes: await list<{ Node: string; Address: string; Meta?: Record<string, string> }>(
      '/v1/catalog/nodes',
      (n) => `${n.Node} ${n.Address} ${JSON.stringify(Object.entries(n.Meta ?? {}).filter(([k]) => !k.startsWith('consul-')))}`,
    ),
    services: services.sort(),
    checks: checks.sort(),
    sessions: await list<unknown>('/v1/session/list', (x) => JSON.stringify(x)),
    queries: await list<unknown>('/v1/query', (x) => JSON.stringify(x)),
    config: [...(await list<unknown>('/v1/config/service-defaults', (x) => JSON.stringify(x))), ...(await list<unknown>('/v1/config/proxy-defaults', (x) => JSON.stringify(x)))],
  }
}

/** What changed between two snapshots, line by line ("-" gone, "+" new). */
function changes(before: Record<string, string[]>, after: Record<string, string[]>): string[] {
  const out: string[] = []
  for (const kind of Object.keys(before)) {
    const a = new Set(before[kind])
    const b = new Set(after[kind])
    for (const l of a) if (!b.has(l)) out.push(`${kind} - ${l}`)
    for (const l of b) if (!a.has(l)) out.push(`${kind} + ${l}`)
  }
  return out
}

/** A node's sidecar status, from its own status server inside its namespace. */
/** The service-name prefix a node's policy lets it write (`service_prefix "…" write`), read from the policy itself. */
async function serviceScope(admin: Send, token: Send): Promise<string | undefined> {
  const self = json(await token('GET', '/v1/acl/token/self')) as { Policies: Array<{ ID: string }> }
  for (const p of self.Policies) {
    const rules = (json(await admin('GET', `/v1/acl/policy/${p.ID}`)) as { Rules?: string }).Rules ?? ''
    const m = /service_prefix\s+"([^"]*)"\s*\{\s*policy\s*=\s*"write"/.exec(rules)
    if (m) return m[1]
  }
  return undefined
}

describe("lab, ACLs on: one node's token can write nothing but its own record and its own services", () => {
  // Two public nodes with tinc and their sidecars, one Consul server (which is the second agent probed).
  const get = useLab({ nodes: 2, nat: 0, consulServers: 1, acl: true, tinc: true, hostFiles: 'all' })
  // Both nodes joined: their sidecars published their own records with their own tokens. Once per lab, for every test.
  let sidecars: Promise<void> | undefined
  const sidecarsUp = (lab: Lab) =>
    (sidecars ??= (async () => {
      const admin = sender(lab.consul('consul1').url, lab.state.managementToken)
      await lab.writeNetwork()
      for (const n of NODES) await lab.startSidecar(n)
      await withLogs(lab, NODES, () =>
        waitFor(
          'both sidecars to publish their records',
          async () => {
            const keys = keysOf(await admin('GET', kvPath(layout.nodesPrefix), undefined, { keys: 'true' }))
            return NODES.every((n) => keys.includes(layout.node(n))) ? true : undefined
          },
          { timeoutMs: 60_000, intervalMs: 200 },
        ),
      )
    })())
  const agentsOf = (lab: Lab, token: string | undefined): Array<[string, Send]> => [
    [`${A} agent`, sender(lab.consul(A).url, token)],
    ['consul1 server', sender(lab.consul('consul1').url, token)],
  ]

  labTest("with one node's token, every write outside its own record and its own services is refused (403)", async (t) => {
    const started = Date.now()
    const lab = get()
    const tokenA = lab.state.nodeTokens[A]
    const tokenB = lab.state.nodeTokens[B]
    assert.ok(tokenA && tokenB, 'the lab gave every node its own token')
    const admin = sender(lab.consul('consul1').url, lab.state.managementToken)

    await sidecarsUp(lab)
    // node2 has a service of its own, registered with its own token through its own agent, under a name its policy allows.
    const agentB = sender(lab.consul(B).url, tokenB)
    const webName = `${(await serviceScope(admin, agentB)) ?? ''}web`
    const webReg = await agentB('PUT', '/v1/agent/service/register', { ID: 'lp-web', Name: webName, Address: '10.99.0.2', Port: 8080, Meta: { 'mesh-net': LAB_NETNAME, 'mesh-node': B } })
    assert.equal(webReg.status, 200, `${B} registers ${webName}: ${webReg.text}`)
    type CatalogService = { ID: string; Service: string; Address: string; Port: number; Meta?: Record<string, string> }
    const webB = await waitFor(
      `${B}'s agent to sync ${webName} to the catalog`,
      async () => (json(await admin('GET', `/v1/catalog/node-services/${B}`)) as { Services?: CatalogService[] } | undefined)?.Services?.find((x) => x.ID === 'lp-web'),
      { timeoutMs: 30_000, intervalMs: 200 },
    )
    const addressB = (json(await admin('GET', `/v1/catalog/node/${B}`)) as { Node: { Address: string } }).Node.Address

    // What an operator (or a join server) wrote, which node1 must not be able to touch.
    const now = new Date().toISOString()
    const seed: Array<[string, string]> = [
      [layout.ipam('10.99.0.1'), JSON.stringify({ name: A, at: now })],
      [layout.ipam('10.99.0.2'), JSON.stringify({ name: B, at: now })],
      [layout.revoked(REVOKED_FP), JSON.stringify({ name: 'gone', revokedAt: now })],
      [layout.alias('www'), B],
      [layout.invite(INVITE_ID), JSON.stringify({ v: 1, name: 'node9', expiresAt: new Date(Date.now() + 3_600_000).toISOString() })],
      [joinEndpoint(B), JSON.stringify({ v: 1, endpoints: ['198.18.0.2:8655'], at: now })],
      [OTHER_APP, 's3cret'],
    ]
    for (const [k, v] of seed) assert.equal((await admin('PUT', kvPath(k), v)).text, 'true', `seed ${k}`)

    const self = async (token: string) => json(await sender(lab.consul('consul1').url, token)('GET', '/v1/acl/token/self')) as { AccessorID: string; Policies: Array<{ ID: string; Name: string }> }
    const selfA = await self(tokenA)
    const selfB = await self(tokenB)
    const recordB = json(await admin('GET', kvPath(layout.node(B)))) as Array<{ ModifyIndex: number }>
    const indexB = recordB[0]?.ModifyIndex ?? 0
    const ownRecord = async () => {
      const e = (json(await admin('GET', kvPath(layout.node(A)))) as Array<{ Value: string; ModifyIndex: number }>)[0]
      assert.ok(e, "node1's record")
      return { value: Buffer.from(e.Value, 'base64').toString('utf8'), index: e.ModifyIndex }
    }

    // Positive controls: node1's token does work for what it is for. Run first, so the snapshot below is after them.
    const positive: Check[] = [
      {
        op: 'GET kv nodes/?recurse',
        want: 'allowed',
        run: (s) => s('GET', kvPath(layout.nodesPrefix), undefined, { recurse: 'true' }),
        judge: (r) => r.status === 200 && NODES.every((n) => keysOf(r).includes(layout.node(n))),
      },
      { op: 'GET kv network', want: 'allowed', run: (s) => s('GET', kvPath(layout.network)) },
      {
        op: `PUT kv nodes/${A}?cas=<index> (same bytes)`,
        want: 'allowed',
        run: async (s) => {
          const own = await ownRecord()
          return s('PUT', kvPath(layout.node(A)), own.value, { cas: String(own.index) })
        },
        judge: (r) => r.status === 200 && r.text.trim() === 'true',
      },
      {
        op: `PUT txn [cas nodes/${A} (same bytes)]`,
        want: 'allowed',
        run: async (s) => {
          const own = await ownRecord()
          return s('PUT', '/v1/txn', [{ KV: { Verb: 'cas', Key: layout.node(A), Value: b64(own.value), Index: own.index } }])
        },
      },
      { op: 'GET acl/token/self', want: 'allowed', run: (s) => s('GET', '/v1/acl/token/self') },
    ]
    const agents = agentsOf(lab, tokenA)
    const rows = await runChecks(positive, agents)

    const before = await snapshot(admin)
    const own = await ownRecord()
    const put =
      (key: string, value = '{"hijacked":true}', params?: Record<string, string>): Check['run'] =>
      (s) =>
        s('PUT', kvPath(key), value, params)
    const del =
      (key: string, params?: Record<string, string>): Check['run'] =>
      (s) =>
        s('DELETE', kvPath(key), undefined, params)
    // A transaction is refused whole; Consul reports an op it may not do as 409 "Permission denied" for that op.
    const txnRefused = (forbiddenOp: number) => (r: Reply) => {
      if (r.status === 403) return true
      const errs = (json(r) as { Errors?: Array<{ OpIndex: number; What: string }> } | undefined)?.Errors ?? []
      return r.status === 409 && errs.some((e) => e.OpIndex === forbiddenOp && /permission denied/i.test(e.What))
    }
    const showTxn = (r: Reply) => {
      const errs = (json(r) as { Errors?: Array<{ OpIndex: number; What: string }> } | undefined)?.Errors ?? []
      return errs.length ? `${r.status} (${errs.map((e) => `op ${e.OpIndex} ${/permission denied/i.test(e.What) ? 'denied' : e.What.slice(0, 40)}`).join(', ')})` : String(r.status)
    }
    const ownCas = { KV: { Verb: 'cas', Key: layout.node(A), Value: b64(own.value), Index: own.index } }
    const kvWrites: Check[] = [
      { op: `PUT kv nodes/${B}`, want: 'refused', run: put(layout.node(B)) },
      { op: `PUT kv nodes/${B}?cas=<index>`, want: 'refused', run: put(layout.node(B), undefined, { cas: String(indexB) }) },
      { op: `DELETE kv nodes/${B}`, want: 'refused', run: del(layout.node(B)) },
      { op: `DELETE kv nodes/${B}?cas=<index>`, want: 'refused', run: del(layout.node(B), { cas: String(indexB) }) },
      { op: 'PUT kv nodes/newnode (a new record)', want: 'refused', run: put(layout.node('newnode')) },
      { op: `PUT kv nodes/${A}x (a name extending its own)`, want: 'refused', run: put(layout.node(`${A}x`)) },
      { op: `PUT kv nodes/${A}/sub (below its own key)`, want: 'refused', run: put(`${layout.node(A)}/sub`) },
      { op: `PUT kv nodes/${A.toUpperCase()} (its name in other case)`, want: 'refused', run: put(layout.node(A.toUpperCase())) },
      { op: 'DELETE kv nodes/?recurse', want: 'refused', run: del(layout.nodesPrefix, { recurse: 'true' }) },
      { op: 'PUT kv ipam/10.99.0.9 (claim a free address)', want: 'refused', run: put(layout.ipam('10.99.0.9')) },
      { op: `PUT kv ipam/10.99.0.2 (take ${B}'s)`, want: 'refused', run: put(layout.ipam('10.99.0.2'), JSON.stringify({ name: A, at: now })) },
      { op: `DELETE kv ipam/10.99.0.2 (${B}'s)`, want: 'refused', run: del(layout.ipam('10.99.0.2')) },
      { op: `DELETE kv ipam/10.99.0.1 (its own)`, want: 'refused', run: del(layout.ipam('10.99.0.1')) },
      { op: 'DELETE kv ipam/?recurse', want: 'refused', run: del(layout.ipamPrefix, { recurse: 'true' }) },
      { op: `PUT kv revoked/<${B}'s key>`, want: 'refused', run: put(layout.revoked('ab'.repeat(32)), JSON.stringify({ name: B, revokedAt: now })) },
      { op: 'DELETE kv revoked/<a revoked key>', want: 'refused', run: del(layout.revoked(REVOKED_FP)) },
      { op: 'PUT kv aliases/evil', want: 'refused', run: put(layout.alias('evil'), A) },
      { op: 'PUT kv aliases/www (repoint)', want: 'refused', run: put(layout.alias('www'), A) },
      { op: 'DELETE kv aliases/www', want: 'refused', run: del(layout.alias('www')) },
      { op: `PUT kv subnet-approvals/${A}/<a LAN> (approve its own)`, want: 'refused', run: put(layout.subnetApproval(A, '192.168.1.0/24'), JSON.stringify({ v: 1, at: now })) },
      { op: 'PUT kv subnet-approvals/ (its marker)', want: 'refused', run: put(layout.subnetApprovalsPrefix, '') },
      { op: 'PUT kv network', want: 'refused', run: put(layout.network, JSON.stringify({ v: 1, cidr: '10.0.0.0/8', domain: 'mesh', createdAt: now })) },
      { op: 'DELETE kv network', want: 'refused', run: del(layout.network) },
      { op: 'PUT kv invites/<new id>', want: 'refused', run: put(layout.invite('b2'.repeat(16))) },
      { op: 'DELETE kv invites/<open invite>', want: 'refused', run: del(layout.invite(INVITE_ID)) },
      { op: `PUT kv join-endpoints/${A} (list itself)`, want: 'refused', run: put(joinEndpoint(A), JSON.stringify({ v: 1, endpoints: ['198.18.0.1:8655'], at: now })) },
      { op: 'PUT kv join-endpoints/evil', want: 'refused', run: put(joinEndpoint('evil'), JSON.stringify({ v: 1, endpoints: ['203.0.113.66:8655'], at: now })) },
      { op: `DELETE kv join-endpoints/${B}`, want: 'refused', run: del(joinEndpoint(B)) },
      { op: 'PUT kv <prefix>x (a new key in the network)', want: 'refused', run: put(`${P}x`) },
      { op: 'DELETE kv <prefix>?recurse (the network)', want: 'refused', run: del(P, { recurse: 'true' }) },
      { op: `PUT kv /${OTHER_APP} (outside the network)`, want: 'refused', run: put(OTHER_APP) },
      { op: `DELETE kv /${OTHER_APP}`, want: 'refused', run: del(OTHER_APP) },
      {
        op: `PUT txn [cas nodes/${A} (allowed), set nodes/${B}]`,
        want: 'refused',
        run: (s) => s('PUT', '/v1/txn', [ownCas, { KV: { Verb: 'set', Key: layout.node(B), Value: b64('{"hijacked":true}') } }]),
        judge: txnRefused(1),
        show: showTxn,
      },
      {
        op: `PUT txn [cas nodes/${A} (allowed), set ipam/10.99.0.9]`,
        want: 'refused',
        run: (s) => s('PUT', '/v1/txn', [ownCas, { KV: { Verb: 'set', Key: layout.ipam('10.99.0.9'), Value: b64(JSON.stringify({ name: A, at: now })) } }]),
        judge: txnRefused(1),
        show: showTxn,
      },
      {
        op: `PUT txn [set revoked/<${B}'s key>, delete nodes/${B}] (a revoke)`,
        want: 'refused',
        run: (s) => s('PUT', '/v1/txn', [{ KV: { Verb: 'set', Key: layout.revoked('ab'.repeat(32)), Value: b64('{}') } }, { KV: { Verb: 'delete', Key: layout.node(B) } }]),
        judge: txnRefused(0),
        show: showTxn,
      },
      {
        op: `PUT txn [delete-tree nodes/]`,
        want: 'refused',
        run: (s) => s('PUT', '/v1/txn', [{ KV: { Verb: 'delete-tree', Key: layout.nodesPrefix } }]),
        judge: txnRefused(0),
        show: showTxn,
      },
    ]
    const hiddenKeys = (r: Reply) => keysOf(r).filter((k) => k.startsWith(layout.invitesPrefix) || k.startsWith('other-app/'))
    const showKeys = (r: Reply) => (r.status === 200 ? `200 (${keysOf(r).length} keys, ${hiddenKeys(r).length} hidden ones)` : String(r.status))
    const reads: Check[] = [
      { op: 'GET kv invites/<open invite>', want: 'refused', run: (s) => s('GET', kvPath(layout.invite(INVITE_ID))) },
      { op: 'GET kv invites/?recurse', want: 'hidden', run: (s) => s('GET', kvPath(layout.invitesPrefix), undefined, { recurse: 'true' }) },
      {
        op: 'GET kv invites/?keys',
        want: 'hidden',
        run: (s) => s('GET', kvPath(layout.invitesPrefix), undefined, { keys: 'true' }),
        judge: (r) => r.status === 403 || r.status === 404 || hiddenKeys(r).length === 0,
        show: showKeys,
      },
      {
        op: 'GET kv <prefix>?recurse (no invites/)',
        want: 'hidden',
        run: (s) => s('GET', kvPath(P), undefined, { recurse: 'true' }),
        judge: (r) => r.status === 403 || r.status === 404 || hiddenKeys(r).length === 0,
        show: showKeys,
      },
      {
        op: 'GET kv /?keys (whole store)',
        want: 'hidden',
        run: (s) => s('GET', '/v1/kv/', undefined, { keys: 'true' }),
        judge: (r) => r.status === 403 || r.status === 404 || hiddenKeys(r).length === 0,
        show: showKeys,
      },
      { op: `GET kv /${OTHER_APP}`, want: 'refused', run: (s) => s('GET', kvPath(OTHER_APP)) },
      { op: 'GET snapshot (every key and token)', want: 'refused', run: (s) => s('GET', '/v1/snapshot') },
    ]
    const acl: Check[] = [
      { op: 'PUT acl/policy (key_prefix "" write)', want: 'refused', run: (s) => s('PUT', '/v1/acl/policy', { Name: 'lp-evil', Rules: 'key_prefix "" { policy = "write" }\nacl = "write"' }) },
      { op: 'PUT acl/token (global-management)', want: 'refused', run: (s) => s('PUT', '/v1/acl/token', { Description: 'lp-evil', Policies: [{ Name: 'global-management' }] }) },
      { op: `PUT acl/token (${B}'s policy)`, want: 'refused', run: (s) => s('PUT', '/v1/acl/token', { Description: 'lp-evil', Policies: selfB.Policies.map((p) => ({ ID: p.ID })) }) },
      {
        op: 'PUT acl/token/<own> (add global-management)',
        want: 'refused',
        run: (s) => s('PUT', `/v1/acl/token/${selfA.AccessorID}`, { AccessorID: selfA.AccessorID, Policies: [...selfA.Policies.map((p) => ({ ID: p.ID })), { Name: 'global-management' }] }),
      },
      { op: 'PUT acl/token/<own>/clone', want: 'refused', run: (s) => s('PUT', `/v1/acl/token/${selfA.AccessorID}/clone`, { Description: 'lp-evil' }) },
      { op: `DELETE acl/token/<${B}'s>`, want: 'refused', run: (s) => s('DELETE', `/v1/acl/token/${selfB.AccessorID}`) },
      { op: 'PUT acl/role', want: 'refused', run: (s) => s('PUT', '/v1/acl/role', { Name: 'lp-evil', Policies: [{ Name: 'global-management' }] }) },
      { op: 'GET acl/tokens', want: 'refused', run: (s) => s('GET', '/v1/acl/tokens') },
      { op: `GET acl/token/<${B}'s>`, want: 'refused', run: (s) => s('GET', `/v1/acl/token/${selfB.AccessorID}`) },
      { op: 'GET acl/policies', want: 'refused', run: (s) => s('GET', '/v1/acl/policies') },
      { op: 'GET acl/policy/<its own>', want: 'refused', run: (s) => s('GET', `/v1/acl/policy/${selfA.Policies[0]?.ID ?? ''}`) },
      { op: 'PUT acl/bootstrap', want: 'refused', run: (s) => s('PUT', '/v1/acl/bootstrap') },
    ]
    // Re-posting node2's own address (SkipNodeUpdate) changes nothing about the node, so Consul asks only for
    // service write on the name, and a deregister by ServiceID needs no node right either: Consul lets any token
    // that may write a service name add, move, fail or remove its instances on any node. What keeps node1 off
    // node2's instances is that its token writes only its own names (tinc-<net>--node1--…), and these are node2's.
    // (node1 filing one of its own names under node2 is the next test's.)
    const onB = { Node: B, Address: addressB, SkipNodeUpdate: true }
    const catalog: Check[] = [
      { op: `PUT catalog/register Node=${B} (new address)`, want: 'refused', run: (s) => s('PUT', '/v1/catalog/register', { Node: B, Address: '198.19.0.66' }) },
      { op: 'PUT catalog/register Node=ghost (a new node)', want: 'refused', run: (s) => s('PUT', '/v1/catalog/register', { Node: 'ghost', Address: '198.19.0.66' }) },
      { op: 'PUT catalog/register Node=consul1', want: 'refused', run: (s) => s('PUT', '/v1/catalog/register', { Node: 'consul1', Address: '198.19.0.66' }) },
      {
        op: `PUT catalog/register Node=${B} + a node check (critical)`,
        want: 'refused',
        run: (s) => s('PUT', '/v1/catalog/register', { ...onB, Check: { CheckID: 'lp-evil-node', Name: 'lp', Status: 'critical' } }),
      },
      {
        op: `PUT catalog/register Node=${B} + a ${webB.Service} instance (injected)`,
        want: 'refused',
        run: (s) => s('PUT', '/v1/catalog/register', { ...onB, Service: { ...webB, ID: 'lp-evil', Port: 9999 } }),
      },
      {
        op: `PUT catalog/register Node=${B} + a critical check on its ${webB.Service}`,
        want: 'refused',
        run: (s) => s('PUT', '/v1/catalog/register', { ...onB, Check: { CheckID: 'lp-evil-check', Name: 'lp', Status: 'critical', ServiceID: webB.ID } }),
      },
      { op: `PUT catalog/register Node=${B} ${webB.Service} on port 9999 (moved)`, want: 'refused', run: (s) => s('PUT', '/v1/catalog/register', { ...onB, Service: { ...webB, Port: 9999 } }) },
      { op: `PUT catalog/deregister Node=${B} CheckID=serfHealth`, want: 'refused', run: (s) => s('PUT', '/v1/catalog/deregister', { Node: B, CheckID: 'serfHealth' }) },
      { op: `PUT catalog/deregister Node=${B} ServiceID=<its ${webB.Service}>`, want: 'refused', run: (s) => s('PUT', '/v1/catalog/deregister', { Node: B, ServiceID: webB.ID }) },
      {
        op: `PUT agent/service/register ${webB.Service} (${B}'s name)`,
        want: 'refused',
        run: (s) => s('PUT', '/v1/agent/service/register', { ID: 'lp-evil-name', Name: webB.Service, Address: '10.99.0.1', Port: 9999, Meta: { 'mesh-net': LAB_NETNAME, 'mesh-node': A } }),
      },
      { op: `PUT catalog/deregister Node=${B}`, want: 'refused', run: (s) => s('PUT', '/v1/catalog/deregister', { Node: B }) },
      { op: 'PUT session/create', want: 'refused', run: (s) => s('PUT', '/v1/session/create', { Node: A, Name: 'lp-evil' }) },
      { op: 'PUT event/fire/deploy', want: 'refused', run: (s) => s('PUT', '/v1/event/fire/deploy', 'x') },
      { op: 'POST query (prepared query)', want: 'refused', run: (s) => s('POST', '/v1/query', { Name: 'lp-evil', Service: { Service: 'web' } }) },
      { op: 'PUT config proxy-defaults', want: 'refused', run: (s) => s('PUT', '/v1/config', { Kind: 'proxy-defaults', Name: 'global', Config: { protocol: 'http' } }) },
      { op: 'PUT operator/autopilot/configuration', want: 'refused', run: (s) => s('PUT', '/v1/operator/autopilot/configuration', { CleanupDeadServers: false }) },
      { op: 'POST operator/keyring (install a gossip key)', want: 'refused', run: (s) => s('POST', '/v1/operator/keyring', { Key: Buffer.alloc(32, 7).toString('base64') }) },
      { op: 'PUT agent/token/default', want: 'refused', run: (s) => s('PUT', '/v1/agent/token/default', { Token: tokenA }) },
      { op: `PUT agent/force-leave/${B}`, want: 'refused', run: (s) => s('PUT', `/v1/agent/force-leave/${B}`) },
      { op: 'PUT agent/reload', want: 'refused', run: (s) => s('PUT', '/v1/agent/reload') },
      // Last: an agent that obeyed would be gone.
      { op: 'PUT agent/leave', want: 'refused', run: (s) => s('PUT', '/v1/agent/leave') },
    ]
    const sections: Array<[string, Check[]]> = [
      ['KV writes', kvWrites],
      ['reads', reads],
      ['ACL', acl],
      ['catalog, agent and the rest', catalog],
    ]
    for (const [, checks] of sections) rows.push(...(await runChecks(checks, agents)))

    const changed = changes(before, await snapshot(admin))
    printTable(
      t,
      `${A}'s token against its own agent and a server's (${Date.now() - started} ms from the sidecars' start)`,
      agents.map(([x]) => x),
      rows,
    )
    for (const c of changed) t.diagnostic(`changed: ${c}`)

    // Whatever got through is removed, and node2's own service with it.
    for (const id of ['lp-evil-node', 'lp-evil-check']) await admin('PUT', '/v1/catalog/deregister', { Node: B, CheckID: id })
    await admin('PUT', '/v1/catalog/deregister', { Node: B, ServiceID: 'lp-evil' })
    await agentB('PUT', '/v1/agent/service/deregister/lp-web')
    for (const [, send] of agentsOf(lab, lab.state.managementToken)) await send('PUT', '/v1/agent/service/deregister/lp-evil-name')

    assert.deepEqual(
      { unexpected: rows.flatMap((r) => r.bad), changed },
      { unexpected: [], changed: [] },
      'every operation answered as wanted, and nothing changed: KV (values and ModifyIndex, its own record included), ACL, catalog and health, sessions, queries, config',
    )
  })

  labTest('node1 files one of its own names under node2 through the catalog: Consul may take it, and no reader serves it', async (t) => {
    const lab = get()
    await sidecarsUp(lab)
    const [tokenA, tokenB] = [lab.state.nodeTokens[A], lab.state.nodeTokens[B]]
    assert.ok(tokenA && tokenB)
    const admin = sender(lab.consul('consul1').url, lab.state.managementToken)
    const agentA = sender(lab.consul(A).url, tokenA)
    const agentB = sender(lab.consul(B).url, tokenB)
    const naming = serviceNaming(LAB_NETNAME, 'scoped')
    // Each token writes its own node's names only (read from the policies themselves).
    assert.equal(await serviceScope(admin, agentA), naming.nodePrefix(A))
    assert.equal(await serviceScope(admin, agentB), naming.nodePrefix(B))
    const meta = { 'mesh-net': LAB_NETNAME, 'mesh-node': B }
    const name = 'lp-forged'
    // Positive control: node2's own instance of the same mesh name, through its own agent, which every reader serves.
    const own = await agentB('PUT', '/v1/agent/service/register', { ID: 'lp-own', Name: naming.toConsul(B, name), Address: '10.99.0.2', Port: 7001, Meta: meta })
    assert.equal(own.status, 200, own.text)
    // The forgery: node1's token, one of node1's own names, filed under node2 (its node entry re-posted unchanged),
    // at node2's VPN address and claiming node2 in its meta. Consul asks only for service write on the name.
    const addressB = (json(await admin('GET', `/v1/catalog/node/${B}`)) as { Node: { Address: string } }).Node.Address
    const forged = { ID: 'lp-forged', Service: naming.toConsul(A, name), Address: '10.99.0.2', Port: 7002, Meta: meta }
    const put = await agentA('PUT', '/v1/catalog/register', { Node: B, Address: addressB, SkipNodeUpdate: true, Service: forged })
    const rows: Row[] = [{ op: `PUT catalog/register Node=${B} + ${forged.Service} (its own name, filed under ${B})`, want: 'info', got: { result: String(put.status) }, bad: [] }]
    try {
      const inCatalog = async () =>
        ((json(await admin('GET', `/v1/catalog/service/${forged.Service}`)) as Array<{ Node: string; ServiceID: string }> | undefined) ?? []).some((e) => e.Node === B && e.ServiceID === forged.ID)
      if (put.status !== 200) {
        // Consul refusing it outright is as good: then there is nothing for the readers to refuse.
        assert.equal(put.status, 403, put.text)
        assert.equal(await inCatalog(), false)
        return
      }
      assert.equal(await inCatalog(), true, 'Consul filed it under node2')
      // node2's agent removes the forgery on its next anti-entropy sync, since its local state lacks it,
      // at times within a tenth of a second. A sidecar that never saw it can't refuse it, so while
      // waiting the forgery is filed again whenever it is gone.
      let refiled = 0
      const keepFiled = async () => {
        if (await inCatalog()) return
        const again = await agentA('PUT', '/v1/catalog/register', { Node: B, Address: addressB, SkipNodeUpdate: true, Service: forged })
        assert.equal(again.status, 200, again.text)
        refiled++
      }
      // Every sidecar serves node2's own instance and reports the forged one refused: proof that it read it.
      for (const node of NODES) {
        const seen = await withLogs(lab, NODES, () =>
          waitFor(
            `${node}'s sidecar to serve lp-own and refuse lp-forged`,
            async () => {
              await keepFiled()
              const st = await sidecarStatus(lab, node)
              const served = st.services.filter((x) => x.name === name).flatMap((x) => x.instances.map((i) => i.id))
              const refused = st.consul.servicesRefused.filter((r) => r.id === forged.ID)
              return served.includes('lp-own') && (refused.length > 0 || served.includes(forged.ID)) ? { served, refused } : undefined
            },
            { timeoutMs: 30_000, intervalMs: 250 },
          ),
        )
        rows.push({
          op: `${node}'s sidecar /status: instances of ${name}`,
          want: 'refused',
          got: { result: `serves ${seen.served.join(', ')}; refuses ${seen.refused.map((r) => r.id).join(', ')}` },
          bad: [],
        })
        for (const r of seen.refused) t.diagnostic(`${node} refuses ${r.id}: ${r.reason}`)
        assert.deepEqual(seen.served, ['lp-own'], `${node} serves only node2's own instance`)
        assert.deepEqual(
          seen.refused.map((r) => r.reason),
          [`"${forged.Service}" is not a name of node "${B}", which it is filed under (its names start with "${naming.nodePrefix(B)}")`],
        )
      }
      // And DNS, built from the same set: node2's own port, never the forged one.
      const srv = await waitFor(
        `${A}'s DNS to serve _${name}._tcp`,
        async () => {
          const out = await dig(lab, A, '@10.99.0.1', '+short', `_${name}._tcp.service.mesh`, 'SRV')
          return / 7001 /.test(out) ? out : undefined
        },
        { timeoutMs: 15_000, intervalMs: 250 },
      )
      rows.push({ op: `${A}'s DNS: _${name}._tcp.service.mesh SRV`, want: 'refused', got: { result: srv.trim().replace(/\n/g, ' / ') }, bad: [] })
      t.diagnostic(`the forgery was filed again ${refiled} times after node2's agent removed it`)
      printTable(t, `${A} files its own name under ${B}, through its own agent`, ['result'], rows)
      assert.equal(srv.trim(), `1 1 7001 ${B}.mesh.`)
    } finally {
      await admin('PUT', '/v1/catalog/deregister', { Node: B, ServiceID: forged.ID })
      await agentB('PUT', '/v1/agent/service/deregister/lp-own')
    }
  })

  labTest("the service-name scope: a node's token can't register a service outside its own prefix (consul, vault) (403)", async (t) => {
    const lab = get()
    const tokenA = lab.state.nodeTokens[A]
    assert.ok(tokenA)
    const admin = sender(lab.consul('consul1').url, lab.state.managementToken)
    const agents = agentsOf(lab, tokenA)
    const vpnA = '10.99.0.1'
    // The scope the node's policy grants.
    const scope = await serviceScope(admin, agents[0]![1])
    t.diagnostic(`service_prefix write in ${A}'s policy: ${scope === undefined ? 'none' : JSON.stringify(scope)}`)
    const probeName = `${scope ?? ''}lp-probe`
    const reg = (name: string) => (s: Send) => s('PUT', '/v1/agent/service/register', { ID: `lp-${name}`, Name: name, Address: vpnA, Port: 8200 })
    const checks: Check[] = [
      // These four answered 200 under the old `service_prefix "" write`.
      { op: 'PUT agent/service/register vault', want: 'refused', run: reg('vault') },
      { op: 'PUT agent/service/register consul', want: 'refused', run: reg('consul') },
      {
        op: `PUT catalog/register Node=${A} + service vault`,
        want: 'refused',
        run: (s) =>
          s('PUT', '/v1/catalog/register', {
            Node: A,
            Address: lab.state.plan.nodes[0]?.controlIp,
            SkipNodeUpdate: true,
            Service: { ID: 'lp-cat-vault', Service: 'vault', Address: vpnA, Port: 8200 },
          }),
      },
      { op: 'PUT config service-defaults vault', want: 'refused', run: (s) => s('PUT', '/v1/config', { Kind: 'service-defaults', Name: 'vault', Protocol: 'http' }) },
    ]
    const rows = await runChecks(checks, agents)
    // Its own services still register, through its own agent (positive control).
    rows.push(...(await runChecks([{ op: `PUT agent/service/register ${probeName} (in scope)`, want: 'allowed', run: reg(probeName) }], agents.slice(0, 1))))
    // Reported, not asserted: an in-scope name through another node's agent files it under that node; in production
    // the agent's HTTP API listens on 127.0.0.1 only, so this needs a shell on that machine.
    rows.push(...(await runChecks([{ op: `INFO PUT agent/service/register ${probeName} via consul1's agent`, want: 'info', run: reg(probeName) }], agents.slice(1))))
    printTable(
      t,
      "node1's token, service names",
      agents.map(([a]) => a),
      rows,
    )

    // Whatever got through is removed, so later tests see the lab as it was.
    for (const [, send] of agentsOf(lab, lab.state.managementToken)) for (const name of ['vault', 'consul', probeName]) await send('PUT', `/v1/agent/service/deregister/lp-${name}`)
    await admin('PUT', '/v1/catalog/deregister', { Node: A, ServiceID: 'lp-cat-vault' })
    await admin('DELETE', '/v1/config/service-defaults/vault')

    assert.deepEqual(
      rows.flatMap((r) => r.bad),
      [],
      'service names outside the scope are refused; the scoped one registers',
    )
  })
})
