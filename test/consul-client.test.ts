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
  await withServer(() => {}, async (url) => {
    port = Number(new URL(url).port)
  })
  const url = `http://127.0.0.1:${port}`
  await assert.rejects(createConsulClient({ url, timeoutMs: 2000 }).leader(), (err: unknown) => err instanceof ConsulError && err.code === 'CONSUL_UNREACHABLE' && err.message.includes(url))
})
