import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { pino } from 'pino'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { REFUSED_BY_NAME, watchTree, type TreeSnapshot, type TreeWatchOptions } from '../src/consul/tree-watch.ts'
import type { Watch } from '../src/consul/watch.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'

const log = pino({ level: 'silent' })
/** The keys that read as a value, with their text. */
const text = (s: TreeSnapshot) => Object.fromEntries([...s.keys].flatMap(([k, r]) => (r.state === 'value' ? [[k, Buffer.from(r.item.value).toString()]] : [])))
/** Every key's state: its text, or `unreadable`. */
const states = (s: TreeSnapshot) => Object.fromEntries([...s.keys].map(([k, r]) => [k, r.state === 'value' ? Buffer.from(r.item.value).toString() : r.state]))

/** Collects snapshots and lets a test wait for one that matches. */
function recorder() {
  const seen: TreeSnapshot[] = []
  let wake: (() => void) | undefined
  return {
    seen,
    onChange: (s: TreeSnapshot) => {
      seen.push(s)
      wake?.()
    },
    async until(pred: (s: TreeSnapshot) => boolean, what: string): Promise<TreeSnapshot> {
      const deadline = Date.now() + 20_000
      for (;;) {
        const hit = seen.find(pred)
        if (hit) return hit
        if (Date.now() > deadline) throw new Error(`no snapshot where ${what}; last: ${JSON.stringify(seen.at(-1) && text(seen.at(-1) as TreeSnapshot))}`)
        await new Promise<void>((r) => {
          wake = r
          setTimeout(r, 200)
        })
      }
    },
  }
}

describe('tree watch against a real Consul agent', () => {
  let consul: DevConsul
  let admin: ConsulClient
  const watches: Watch[] = []
  const start = (prefix: string, extra: Partial<TreeWatchOptions> = {}) => {
    const r = recorder()
    watches.push(watchTree({ client: createConsulClient({ url: consul.url }), prefix, perKeyLimit: 50, waitSeconds: 30, log, onChange: r.onChange, ...extra }))
    return r
  }
  // Values about the size of a node record, so the byte counts mean something.
  const value = (name: string, v: number) => JSON.stringify({ name, v, pad: 'k'.repeat(800) })

  before(async () => {
    consul = await startDevConsul()
    admin = createConsulClient({ url: consul.url })
  })
  after(async () => {
    await Promise.all(watches.map((w) => w.stop()))
    await consul?.stop()
  })

  test('start-up hands over every key at once, then each change reads one value instead of all of them', async () => {
    for (let i = 0; i < 20; i++) await admin.kvPut(`a/k${i}`, value(`k${i}`, 0))
    const r = start('a/')
    const first = await r.until((s) => s.keys.size > 0, 'anything arrived')
    assert.equal(Object.keys(text(first)).length, 20, 'the first snapshot was partial: it would look like nodes leaving')
    assert.equal(r.seen.length, 1)

    await admin.kvPut('a/k7', value('k7', 1))
    const changed = await r.until((s) => text(s)['a/k7'] === value('k7', 1), 'k7 changed')
    assert.equal(Object.keys(text(changed)).length, 20)
    assert.equal(text(changed)['a/k3'], value('k3', 0))
    // What a ?recurse watch would have read for the same change.
    const full = await admin.kvList('a/')
    assert.ok(changed.bytes < full.bytes / 5, `read ${changed.bytes} bytes for one change; a full read is ${full.bytes}`)
  })

  test('added and deleted keys show up; a junk key is listed by name only, unread, and never stops the rest', async () => {
    await admin.kvPut('b/one', 'first')
    const r = start('b/', { nameOnly: (k) => k.includes('..') })
    await r.until((s) => text(s)['b/one'] === 'first', 'one is there')
    await admin.kvPut('b/two', 'second')
    await r.until((s) => text(s)['b/two'] === 'second', 'two appeared')
    // Keys with dot segments can't be read through a URL path; only a transaction writes them.
    await admin.request('PUT', '/v1/txn', [{ KV: { Verb: 'set', Key: 'b/../evil', Value: Buffer.from('x').toString('base64') } }])
    const junk = await r.until((s) => s.keys.has('b/../evil'), 'the junk key is listed')
    assert.deepEqual(junk.keys.get('b/../evil'), { state: 'unreadable', reason: REFUSED_BY_NAME }, 'a name-only key must not carry a value')
    await admin.request('DELETE', '/v1/kv/b/one')
    const gone = await r.until((s) => !s.keys.has('b/one'), 'one is gone')
    assert.deepEqual(states(gone), { 'b/../evil': 'unreadable', 'b/two': 'second' })
    assert.equal(gone.filtered, false)
  })

  test('above the per-key limit it falls back to whole-prefix reads and stays correct', async () => {
    for (let i = 0; i < 6; i++) await admin.kvPut(`c/k${i}`, `v${i}`)
    const r = start('c/', { perKeyLimit: 4 })
    await r.until((s) => Object.keys(text(s)).length === 6, 'six keys')
    await admin.kvPut('c/k2', 'changed')
    await r.until((s) => text(s)['c/k2'] === 'changed', 'k2 changed')
    await admin.request('DELETE', '/v1/kv/c/k5')
    await admin.request('DELETE', '/v1/kv/c/k4')
    await admin.request('DELETE', '/v1/kv/c/k3')
    // Back under the limit: per-key watches take over and still see changes.
    await r.until((s) => s.keys.size === 3, 'three keys left')
    await admin.kvPut('c/k0', 'again')
    const last = await r.until((s) => text(s)['c/k0'] === 'again', 'k0 changed after the switch')
    assert.deepEqual(text(last), { 'c/k0': 'again', 'c/k1': 'v1', 'c/k2': 'changed' })
  })
})

/** A stand-in agent for what Consul itself won't do on demand: fail one key while serving the next. */
async function fakeAgent(handler: (u: URL, res: ServerResponse, req: IncomingMessage) => void, fn: (client: ConsulClient) => Promise<void>) {
  const server = createServer((req, res) => {
    const u = new URL(req.url ?? '/', 'http://x')
    if (u.searchParams.has('index')) return // a blocking read with nothing new: hold it open
    res.setHeader('x-consul-index', '5')
    handler(u, res, req)
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  try {
    await fn(createConsulClient({ url: `http://127.0.0.1:${(server.address() as AddressInfo).port}` }))
  } finally {
    server.closeAllConnections()
    await new Promise((res) => server.close(res))
  }
}

const kvReply = (res: ServerResponse, key: string, value: string) => res.end(JSON.stringify([{ Key: key, Value: Buffer.from(value).toString('base64'), CreateIndex: 2, ModifyIndex: 5 }]))

test('a key whose first read fails is unreadable, never missing, and becomes a value when it reads', async () => {
  // p/a answers 500 (a leader election), p/b 429 (over the agent's connection limit), twice each, then their values.
  const failuresLeft = new Map([
    ['/v1/kv/p/a', [500, 500]],
    ['/v1/kv/p/b', [429, 429]],
  ])
  await fakeAgent(
    (u, res) => {
      if (u.searchParams.has('keys')) return res.end(JSON.stringify(['p/a', 'p/b', 'p/good']))
      const status = failuresLeft.get(u.pathname)?.shift()
      if (status) {
        res.statusCode = status
        return res.end(status === 429 ? 'Your IP is issuing too many concurrent connections' : 'No cluster leader')
      }
      kvReply(res, u.pathname.slice('/v1/kv/'.length), u.pathname.slice('/v1/kv/p/'.length))
    },
    async (client) => {
      const r = recorder()
      const errors: unknown[] = []
      const w = watchTree({ client, prefix: 'p/', perKeyLimit: 10, backoffMinMs: 20, backoffMaxMs: 40, log, onChange: r.onChange, onError: (e) => void errors.push(e) })
      try {
        const first = await r.until(() => true, 'a first snapshot')
        assert.deepEqual(states(first), { 'p/a': 'unreadable', 'p/b': 'unreadable', 'p/good': 'good' })
        const a = first.keys.get('p/a')
        const b = first.keys.get('p/b')
        assert.match(a?.state === 'unreadable' ? a.reason : '', /HTTP 500/)
        assert.match(b?.state === 'unreadable' ? b.reason : '', /HTTP 429/)
        await r.until((s) => states(s)['p/a'] === 'a' && states(s)['p/b'] === 'b', 'both keys read at last')
        for (const s of r.seen) assert.deepEqual([...s.keys.keys()], ['p/a', 'p/b', 'p/good'], 'no snapshot may leave a listed key out')
        assert.ok(errors.length >= 4)
      } finally {
        await w.stop()
      }
    },
  )
})

test('a listed key that 404s is unreadable; a filtered listing says so', async () => {
  await fakeAgent(
    (u, res) => {
      if (u.searchParams.has('keys')) {
        res.setHeader('x-consul-results-filtered-by-acls', 'true')
        return res.end(JSON.stringify(['p/gone', 'p/here']))
      }
      if (u.pathname === '/v1/kv/p/gone') {
        res.statusCode = 404
        return res.end()
      }
      kvReply(res, 'p/here', 'ok')
    },
    async (client) => {
      const r = recorder()
      const w = watchTree({ client, prefix: 'p/', perKeyLimit: 10, log, onChange: r.onChange })
      try {
        const s = await r.until(() => true, 'a snapshot')
        assert.deepEqual(states(s), { 'p/gone': 'unreadable', 'p/here': 'ok' })
        assert.equal(s.filtered, true)
        const here = s.keys.get('p/here')
        assert.equal(here?.state === 'value' ? here.item.createIndex : undefined, 2)
      } finally {
        await w.stop()
      }
    },
  )
})
