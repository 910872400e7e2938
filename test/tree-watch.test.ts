import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { pino } from 'pino'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { kvList } from '../src/consul/kv.ts'
import { watchTree, type TreeSnapshot, type TreeWatchOptions } from '../src/consul/tree-watch.ts'
import type { Watch } from '../src/consul/watch.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'

const log = pino({ level: 'silent' })
const text = (s: TreeSnapshot) => Object.fromEntries(s.items.map((i) => [i.key, Buffer.from(i.value).toString()]))

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
    watches.push(watchTree({ url: consul.url, prefix, perKeyLimit: 50, waitSeconds: 30, log, onChange: r.onChange, ...extra }))
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
    const first = await r.until((s) => s.items.length > 0, 'anything arrived')
    assert.equal(first.items.length, 20, 'the first snapshot was partial: it would look like nodes leaving')
    assert.equal(r.seen.length, 1)

    await admin.kvPut('a/k7', value('k7', 1))
    const changed = await r.until((s) => text(s)['a/k7'] === value('k7', 1), 'k7 changed')
    assert.equal(changed.items.length, 20)
    assert.equal(text(changed)['a/k3'], value('k3', 0))
    // What a ?recurse watch would have read for the same change.
    const full = await kvList({ url: consul.url, prefix: 'a/' })
    assert.ok(changed.bytes < full.bytes / 5, `read ${changed.bytes} bytes for one change; a full read is ${full.bytes}`)
  })

  test('added and deleted keys show up; a junk key is listed by name only and never stops the rest', async () => {
    await admin.kvPut('b/one', 'first')
    const r = start('b/', { nameOnly: (k) => k.includes('..') })
    await r.until((s) => text(s)['b/one'] === 'first', 'one is there')
    await admin.kvPut('b/two', 'second')
    await r.until((s) => text(s)['b/two'] === 'second', 'two appeared')
    // Keys with dot segments can't be read through a URL path; only a transaction writes them.
    await admin.request('PUT', '/v1/txn', [{ KV: { Verb: 'set', Key: 'b/../evil', Value: Buffer.from('x').toString('base64') } }])
    const junk = await r.until((s) => 'b/../evil' in text(s), 'the junk key is listed')
    assert.equal(text(junk)['b/../evil'], '', 'a name-only key must not carry a value')
    await admin.request('DELETE', '/v1/kv/b/one')
    const gone = await r.until((s) => !('b/one' in text(s)), 'one is gone')
    assert.deepEqual(Object.keys(text(gone)).sort(), ['b/../evil', 'b/two'])
  })

  test('above the per-key limit it falls back to whole-prefix reads and stays correct', async () => {
    for (let i = 0; i < 6; i++) await admin.kvPut(`c/k${i}`, `v${i}`)
    const r = start('c/', { perKeyLimit: 4 })
    await r.until((s) => s.items.length === 6, 'six keys')
    await admin.kvPut('c/k2', 'changed')
    await r.until((s) => text(s)['c/k2'] === 'changed', 'k2 changed')
    await admin.request('DELETE', '/v1/kv/c/k5')
    await admin.request('DELETE', '/v1/kv/c/k4')
    await admin.request('DELETE', '/v1/kv/c/k3')
    // Back under the limit: per-key watches take over and still see changes.
    await r.until((s) => s.items.length === 3, 'three keys left')
    await admin.kvPut('c/k0', 'again')
    const last = await r.until((s) => text(s)['c/k0'] === 'again', 'k0 changed after the switch')
    assert.deepEqual(text(last), { 'c/k0': 'again', 'c/k1': 'v1', 'c/k2': 'changed' })
  })
})

test('a key that fails to read does not hold back the others', async () => {
  // Consul itself won't fail one key while serving the next, so a local server plays the agent here.
  const server = createServer((req, res) => {
    const u = new URL(req.url ?? '/', 'http://x')
    if (u.searchParams.has('index')) return // a blocking read with nothing new: hold it open
    res.setHeader('x-consul-index', '5')
    if (u.searchParams.has('keys')) return res.end(JSON.stringify(['p/bad', 'p/good']))
    if (u.pathname === '/v1/kv/p/bad') {
      res.statusCode = 500
      return res.end('rpc error')
    }
    res.end(JSON.stringify([{ Key: 'p/good', Value: Buffer.from('ok').toString('base64'), ModifyIndex: 5 }]))
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  const r = recorder()
  const errors: unknown[] = []
  const w = watchTree({ url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, prefix: 'p/', perKeyLimit: 10, backoffMinMs: 50, backoffMaxMs: 100, log, onChange: r.onChange, onError: (e) => void errors.push(e) })
  try {
    const s = await r.until((x) => x.items.length > 0, 'the readable key arrived')
    assert.deepEqual(text(s), { 'p/good': 'ok' })
    assert.ok(errors.length > 0)
  } finally {
    await w.stop()
    server.closeAllConnections()
    await new Promise((res) => server.close(res))
  }
})
