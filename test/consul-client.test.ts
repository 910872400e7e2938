import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { createConsulClient } from '../src/consul/client.ts'
import { ConsulError } from '../src/errors.ts'

async function withServer(handler: (req: IncomingMessage, res: ServerResponse) => void, fn: (url: string, seen: IncomingMessage[]) => Promise<void>) {
  const seen: IncomingMessage[] = []
  const server = createServer((req, res) => {
    seen.push(req)
    handler(req, res)
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  try {
    await fn(`http://127.0.0.1:${(server.address() as AddressInfo).port}`, seen)
  } finally {
    server.closeAllConnections()
    await new Promise((r) => server.close(r))
  }
}

test('kvGet decodes the base64 value and sends the token', async () => {
  await withServer(
    (_req, res) => {
      res.setHeader('content-type', 'application/json')
      res.setHeader('x-consul-index', '42')
      res.end(JSON.stringify([{ Key: 'a/b', Value: Buffer.from('héllo').toString('base64'), ModifyIndex: 42, CreateIndex: 1, LockIndex: 0, Flags: 0 }]))
    },
    async (url, seen) => {
      const entry = await createConsulClient({ url, token: 's3cret' }).kvGet('a/b')
      assert.deepEqual(entry, { key: 'a/b', value: 'héllo', modifyIndex: 42 })
      assert.equal(seen[0]?.headers['x-consul-token'], 's3cret')
      assert.match(decodeURIComponent(seen[0]?.url ?? ''), /^\/v1\/kv\/a\/b/)
    },
  )
})

test('a missing key is undefined, not an error', async () => {
  await withServer(
    (_req, res) => {
      res.statusCode = 404
      res.end()
    },
    async (url) => {
      assert.equal(await createConsulClient({ url }).kvGet('nope'), undefined)
    },
  )
})

test('403 becomes ConsulError CONSUL_FORBIDDEN', async () => {
  await withServer(
    (_req, res) => {
      res.statusCode = 403
      res.end('Permission denied: anonymous token lacks permission')
    },
    async (url) => {
      await assert.rejects(createConsulClient({ url }).kvPut('x', 'y'), (err: unknown) => err instanceof ConsulError && err.code === 'CONSUL_FORBIDDEN' && err.status === 403)
      await assert.rejects(createConsulClient({ url }).request('PUT', '/v1/acl/policy', {}), (err: unknown) => err instanceof ConsulError && err.code === 'CONSUL_FORBIDDEN')
    },
  )
})

test('an unreachable agent is CONSUL_UNREACHABLE and names the address', async () => {
  let port = 0
  await withServer(
    () => {},
    async (url) => {
      port = Number(new URL(url).port)
    },
  )
  const url = `http://127.0.0.1:${port}`
  await assert.rejects(createConsulClient({ url, timeoutMs: 2000 }).leader(), (err: unknown) => err instanceof ConsulError && err.code === 'CONSUL_UNREACHABLE' && err.message.includes(url))
})

test("kvPut sends the raw value and the cas index, and returns Consul's verdict", async () => {
  const bodies: string[] = []
  await withServer(
    (req, res) => {
      let body = ''
      req.on('data', (c: Buffer) => (body += c.toString()))
      req.on('end', () => {
        bodies.push(body)
        res.end(new URL(req.url ?? '/', 'http://x').searchParams.get('cas') === '7' ? 'false' : 'true')
      })
    },
    async (url, seen) => {
      const client = createConsulClient({ url })
      assert.equal(await client.kvPut('a/b', 'plain text'), true)
      assert.equal(await client.kvPut('a/b', 'v2', { cas: 7 }), false)
      assert.deepEqual(bodies, ['plain text', 'v2'])
      assert.equal(seen[1]?.method, 'PUT')
      assert.match(seen[1]?.url ?? '', /^\/v1\/kv\/a\/b\?cas=7$/)
    },
  )
})

test('a rolled-back transaction (409) is an answer that names the failed op', async () => {
  await withServer(
    (_req, res) => {
      res.statusCode = 409
      res.end(JSON.stringify({ Results: null, Errors: [{ OpIndex: 1, What: 'failed index check' }] }))
    },
    async (url) => {
      const client = createConsulClient({ url })
      assert.deepEqual(await client.txn([{ KV: { Verb: 'set', Key: 'k', Value: 'dg==' } }]), { ok: false, errors: [{ OpIndex: 1, What: 'failed index check' }] })
      assert.equal(client.reach.ok, true)
    },
  )
})

test('a blocking GET sends index and wait, and returns the index and the ACL-filter header', async () => {
  await withServer(
    (_req, res) => {
      res.setHeader('x-consul-index', '42')
      res.setHeader('x-consul-results-filtered-by-acls', 'true')
      res.end(JSON.stringify(['p/a', 'p/b']))
    },
    async (url, seen) => {
      const client = createConsulClient({ url, token: 't' })
      const keys = await client.kvKeys('p/', { index: 40, waitSeconds: 30 })
      assert.deepEqual(keys, { keys: ['p/a', 'p/b'], index: 42, bytes: 13, filtered: true })
      const q = new URL(seen[0]?.url ?? '/', 'http://x').searchParams
      assert.deepEqual([q.get('keys'), q.get('index'), q.get('wait')], ['true', '40', '30s'])
      assert.equal(seen[0]?.headers['x-consul-token'], 't')
      // No index: a plain read.
      await client.kvKeys('p/')
      assert.equal(new URL(seen[1]?.url ?? '/', 'http://x').searchParams.has('index'), false)
    },
  )
})

test('kvGetOne keeps the raw bytes and both indexes; a 404 is an empty answer', async () => {
  await withServer(
    (req, res) => {
      res.setHeader('x-consul-index', '9')
      if (req.url?.startsWith('/v1/kv/missing')) {
        res.statusCode = 404
        return res.end()
      }
      res.end(JSON.stringify([{ Key: 'k', Value: Buffer.from([0, 255]).toString('base64'), CreateIndex: 3, ModifyIndex: 9, LockIndex: 0, Flags: 0 }]))
    },
    async (url) => {
      const client = createConsulClient({ url })
      const one = await client.kvGetOne('k')
      assert.deepEqual({ ...one.item, value: [...(one.item?.value ?? [])] }, { key: 'k', value: [0, 255], createIndex: 3, modifyIndex: 9 })
      assert.deepEqual(await client.kvGetOne('missing'), { item: undefined, index: 9, bytes: 0 })
      assert.equal(client.reach.ok, true, 'a 404 is an answer, not a failure')
    },
  )
})

test('reach follows the latest request: a 500 or 429 is a failure, the next answer a recovery', async () => {
  const statuses = [500, 429, 200, 403, 200]
  await withServer(
    (_req, res) => {
      res.statusCode = statuses.shift() ?? 200
      res.end(JSON.stringify('10.0.0.1:8300'))
    },
    async (url) => {
      const client = createConsulClient({ url })
      let recovered = 0
      const unsubscribe = client.reach.onRecovered(() => recovered++)
      assert.equal(client.reach.ok, undefined, 'nothing is known before the first request')
      await assert.rejects(client.leader(), (e: unknown) => e instanceof ConsulError && e.code === 'CONSUL_HTTP' && e.message.includes(url))
      await assert.rejects(client.leader())
      assert.deepEqual([client.reach.ok, client.reach.failures, client.reach.lastOkAt], [false, 2, undefined])
      assert.equal(await client.leader(), '10.0.0.1:8300')
      assert.deepEqual([client.reach.ok, client.reach.failures, recovered], [true, 0, 1])
      assert.ok(client.reach.lastOkAt instanceof Date)
      // A refusal is an answer from a working agent: Consul is reachable, the request still fails.
      await assert.rejects(client.leader(), (e: unknown) => e instanceof ConsulError && e.code === 'CONSUL_FORBIDDEN')
      assert.equal(client.reach.ok, true)
      unsubscribe()
    },
  )
})

test('an aborted blocking read ends at once and says nothing about Consul; a silent agent times out as unreachable', async () => {
  await withServer(
    () => {}, // never answers
    async (url) => {
      const client = createConsulClient({ url, timeoutMs: 200 })
      const controller = new AbortController()
      const read = client.kvList('p/', { index: 5, waitSeconds: 300, signal: controller.signal })
      controller.abort()
      await assert.rejects(read, (e: unknown) => e instanceof ConsulError && e.code === 'CONSUL_UNREACHABLE')
      assert.equal(client.reach.ok, undefined)
      await assert.rejects(client.kvGet('x'), (e: unknown) => e instanceof ConsulError && e.code === 'CONSUL_UNREACHABLE' && /no answer within 200 ms/.test(e.message))
      assert.equal(client.reach.ok, false)
    },
  )
})

test("members and leader are parsed from the agent's answers", async () => {
  await withServer(
    (req, res) => {
      if (req.url === '/v1/agent/members')
        return res.end(
          JSON.stringify([
            { Name: 's1', Addr: '10.0.0.1', Status: 1, Tags: { role: 'consul' } },
            { Name: 'c1', Addr: '10.0.0.2', Status: 4, Tags: { role: 'node' } },
          ]),
        )
      res.end('""')
    },
    async (url) => {
      const client = createConsulClient({ url })
      assert.deepEqual(await client.members(), [
        { name: 's1', addr: '10.0.0.1', status: 1, role: 'server' },
        { name: 'c1', addr: '10.0.0.2', status: 4, role: 'client' },
      ])
      assert.equal(await client.leader(), '', 'no leader')
    },
  )
})
