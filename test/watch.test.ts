import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { pino } from 'pino'
import { createConsulClient } from '../src/consul/client.ts'
import { backoffMs, nextIndex, watchPrefix } from '../src/consul/watch.ts'
import type { KvListResult } from '../src/consul/kv.ts'
import { blockingTimeoutMs } from '../src/consul/kv.ts'

const log = pino({ level: 'silent' })

test('index rules: backwards resets to 0, 0 is never blocked on', () => {
  assert.equal(nextIndex(0, 10), 10)
  assert.equal(nextIndex(10, 10), 10)
  assert.equal(nextIndex(10, 12), 12)
  assert.equal(nextIndex(10, 9), 0)
  assert.equal(nextIndex(0, 0), 1)
  assert.equal(nextIndex(5, Number.NaN), 0)
})

test("the HTTP timeout outlasts wait plus Consul's wait/16 jitter", () => {
  assert.ok(blockingTimeoutMs(300) > 300_000 + 300_000 / 16)
  assert.ok(blockingTimeoutMs(1) > 1000 + 1000 / 16)
})

test('backoff grows, is capped, and never drops below half its base', () => {
  assert.equal(
    backoffMs(1, 250, 30_000, () => 0),
    125,
  )
  assert.equal(
    backoffMs(3, 250, 30_000, () => 1),
    1000,
  )
  assert.equal(
    backoffMs(30, 250, 30_000, () => 1),
    30_000,
  )
})

/** A scripted stand-in for the KV endpoint: each request gets the next reply. */
type Reply = { status: number; index?: number; body?: unknown }

async function scripted(replies: Reply[], fn: (url: string, requests: URL[], done: Promise<void>) => Promise<void>) {
  const requests: URL[] = []
  let finish!: () => void
  const done = new Promise<void>((r) => (finish = r))
  const server = createServer((req, res) => {
    requests.push(new URL(req.url ?? '/', 'http://x'))
    const reply = replies.shift()
    if (!reply) {
      finish()
      return // hold the request open like a blocking query with nothing new
    }
    if (reply.index !== undefined) res.setHeader('x-consul-index', String(reply.index))
    res.statusCode = reply.status
    res.end(reply.body === undefined ? '' : JSON.stringify(reply.body))
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  try {
    await fn(`http://127.0.0.1:${(server.address() as AddressInfo).port}`, requests, done)
  } finally {
    server.closeAllConnections()
    await new Promise((r) => server.close(r))
  }
}

const item = (key: string, value: string, idx: number) => ({ Key: key, Value: Buffer.from(value).toString('base64'), ModifyIndex: idx, CreateIndex: idx, Flags: 0, LockIndex: 0 })

test('a watch delivers changes only when the index moves, and follows the index rules on the wire', async () => {
  await scripted(
    [
      { status: 404, index: 0 }, // a brand-new store: empty prefix, index 0
      { status: 200, index: 10, body: [item('p/nodes/a', 'A1', 10)] },
      { status: 200, index: 10, body: [item('p/nodes/a', 'A1', 10)] }, // wait timed out: no change
      { status: 200, index: 12, body: [item('p/nodes/a', 'A2', 12)] },
      { status: 200, index: 7, body: [item('p/nodes/a', 'A2', 7)] }, // went backwards (snapshot restore)
      { status: 200, index: 7, body: [item('p/nodes/a', 'A3', 7)] }, // full re-read after the reset
      { status: 500, body: 'leader election' },
    ],
    async (url, requests, done) => {
      const seen: KvListResult[] = []
      const errors: number[] = []
      const w = watchPrefix({
        client: createConsulClient({ url }),
        prefix: 'p/nodes/',
        waitSeconds: 30,
        ratePerSecond: 1000,
        burst: 100,
        backoffMinMs: 1,
        backoffMaxMs: 5,
        log,
        onChange: (r) => void seen.push(r),
        onError: (_e, n) => void errors.push(n),
      })
      await done
      await w.stop()
      assert.deepEqual(
        seen.map((r) => [r.index, r.items.map((i) => Buffer.from(i.value).toString())]),
        [
          [0, []],
          [10, ['A1']],
          [12, ['A2']],
          [7, ['A3']],
        ],
      )
      assert.deepEqual(errors, [1])
      const q = requests.map((u) => [u.searchParams.get('index'), u.searchParams.get('wait')])
      assert.deepEqual(q, [
        [null, null], // the first read never blocks
        ['1', '30s'], // index 0 is treated as 1
        ['10', '30s'],
        ['10', '30s'],
        ['12', '30s'],
        [null, null], // after the index went backwards: a fresh, non-blocking read
        ['7', '30s'], // this one fails with the 500
        [null, null], // after a failure: a read that doesn't block, to learn at once what changed meanwhile
      ])
      assert.ok(requests.every((u) => u.searchParams.get('recurse') === 'true'))
    },
  )
})

test('a storm of changes is rate-limited, while the first few go straight through', async () => {
  const replies: Reply[] = Array.from({ length: 12 }, (_, i) => ({ status: 200, index: i + 1, body: [] }))
  await scripted(replies, async (url, requests, done) => {
    const times: number[] = []
    const w = watchPrefix({ client: createConsulClient({ url }), prefix: 'p/', ratePerSecond: 10, burst: 3, log, onChange: () => void times.push(Date.now()) })
    await done
    await w.stop()
    assert.equal(times.length, 12)
    // 3 immediate requests, then 10 per second: the 12th change can't arrive before ~0.8 s after the 3rd.
    assert.ok((times[11] ?? 0) - (times[2] ?? 0) >= 800, `12 changes in ${(times[11] ?? 0) - (times[0] ?? 0)} ms`)
    assert.equal(requests.length, 13)
  })
})

test('a watch that failed re-reads without blocking as soon as any request through its client succeeds', { timeout: 10_000 }, async () => {
  await scripted(
    [
      { status: 200, index: 10, body: [item('p/a', 'A1', 10)] },
      { status: 500, body: 'No cluster leader' },
      { status: 200, index: 3, body: [item('other', 'x', 3)] }, // the unrelated kvGet below
      { status: 200, index: 10, body: [item('p/a', 'A1', 10)] },
    ],
    async (url, requests, done) => {
      const client = createConsulClient({ url })
      let failed!: () => void
      const failure = new Promise<void>((r) => (failed = r))
      let recoveries = 0
      client.reach.onRecovered(() => recoveries++)
      // A backoff of at least 30 s: only the recovery can end it within the test's timeout.
      const w = watchPrefix({ client, prefix: 'p/', waitSeconds: 30, backoffMinMs: 60_000, backoffMaxMs: 60_000, log, onChange: () => {}, onError: () => failed() })
      await failure
      assert.equal(client.reach.ok, false)
      assert.equal(client.reach.failures, 1)
      assert.equal(w.failures, 1)
      assert.equal((await client.kvGet('other'))?.value, 'x')
      assert.equal(client.reach.ok, true, 'reach flips back to ok on the first answered request')
      assert.equal(client.reach.failures, 0)
      assert.equal(recoveries, 1)
      await done
      assert.equal(w.failures, 0)
      await w.stop()
      const q = requests.filter((u) => u.pathname.startsWith('/v1/kv/p/')).map((u) => u.searchParams.get('index'))
      assert.deepEqual(q, [null, '10', null, '10'])
    },
  )
})
