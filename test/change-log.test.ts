import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { b64, createConsulClient, type ConsulClient, type TxnOp } from '../src/consul/client.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { appendChanges, changeLogSchema, changeLogSeq, CHANGE_LOG_ENTRIES, CHANGE_LOG_VERSION, explainChanges, txnWithChangeLog, type ChangeLog } from '../src/mesh/change-log.ts'
import { kvLayout, type KvLayout } from '../src/mesh/kv-layout.ts'

const enc = (v: unknown) => new TextEncoder().encode(typeof v === 'string' ? v : JSON.stringify(v))
/** A log as Consul would hand it over, written at `modifyIndex`. */
const read = (log: unknown, modifyIndex: number) => ({ value: enc(log), modifyIndex })
/** A log whose entries run from `from` to `seq`, naming `name(s)`. */
const logOf = (from: number, seq: number, name: (s: number) => string = (s) => `n${s}`): ChangeLog => ({
  v: CHANGE_LOG_VERSION,
  seq,
  // Writers that saw nodes/ no further than the previous logged write: nothing slipped in between.
  entries: Array.from({ length: seq - from + 1 }, (_, i) => ({ s: from + i, n: name(from + i), p: 0, w: 0 })),
})

describe('appendChanges', () => {
  test('starts a log at 1 and numbers entries consecutively', () => {
    const log = appendChanges(undefined, ['a', 'b'])
    assert.deepEqual(log, {
      v: CHANGE_LOG_VERSION,
      seq: 2,
      entries: [
        { s: 1, n: 'a' },
        { s: 2, n: 'b' },
      ],
    })
    const next = appendChanges(log, ['c'])
    assert.equal(next.seq, 3)
    assert.deepEqual(next.entries.at(-1), { s: 3, n: 'c' })
    assert.equal(next.entries.length, 3)
    // The input log is not changed.
    assert.equal(log.entries.length, 2)
  })

  test(`keeps only the last ${CHANGE_LOG_ENTRIES} entries, and seq keeps counting`, () => {
    let log = appendChanges(undefined, [])
    assert.deepEqual(log, { v: CHANGE_LOG_VERSION, seq: 0, entries: [] })
    for (let i = 0; i < 3; i++)
      log = appendChanges(
        log,
        Array.from({ length: 50 }, (_, j) => `n${i * 50 + j}`),
      )
    assert.equal(log.seq, 150)
    assert.equal(log.entries.length, CHANGE_LOG_ENTRIES)
    assert.deepEqual(log.entries[0], { s: 150 - CHANGE_LOG_ENTRIES + 1, n: `n${150 - CHANGE_LOG_ENTRIES}` })
    assert.deepEqual(log.entries.at(-1), { s: 150, n: 'n149' })
    assert.ok(changeLogSchema.safeParse(log).success, 'a capped log must still pass the schema readers use')
  })
})

describe('explainChanges (the reader rule)', () => {
  test('names what changed after seen, once each, when the log was written with the change', () => {
    const log = logOf(1, 5, (s) => ['a', 'b', 'a', 'c', 'b'][s - 1] ?? 'x')
    assert.deepEqual(explainChanges(read(log, 40), 40, 2), { names: ['a', 'c', 'b'], seq: 5 })
    assert.deepEqual(explainChanges(read(log, 40), 40, 4), { names: ['b'], seq: 5 })
    assert.deepEqual(explainChanges(read(log, 40), 40, 0), { names: ['a', 'b', 'c'], seq: 5 })
  })

  test('a writer that saw nodes/ move past the previous logged write means a write without an entry: a full read', () => {
    const log = (w: number, p: number) => ({
      v: CHANGE_LOG_VERSION,
      seq: 3,
      entries: [
        { s: 2, n: 'a', p: 10, w: 10 },
        { s: 3, n: 'b', p, w },
      ],
    })
    assert.deepEqual(explainChanges(read(log(30, 30), 40), 40, 1, 10), { names: ['a', 'b'], seq: 3 })
    // b's writer saw nodes/ at 35 while the log was last written at 30: something else wrote at 31..35.
    assert.deepEqual(explainChanges(read(log(35, 30), 40), 40, 1, 10), { full: 'a record changed without a change-log entry' })
    // The first new entry may point past the log into what this reader has read already.
    const first = { v: CHANGE_LOG_VERSION, seq: 2, entries: [{ s: 2, n: 'a', p: 10, w: 20 }] }
    assert.deepEqual(explainChanges(read(first, 40), 40, 1, 20), { names: ['a'], seq: 2 })
    assert.deepEqual(explainChanges(read(first, 40), 40, 1, 15), { full: 'a record changed without a change-log entry' })
    // An entry without what its writer saw can't vouch for anything.
    const bare = { v: CHANGE_LOG_VERSION, seq: 2, entries: [{ s: 2, n: 'a' }] }
    assert.deepEqual(explainChanges(read(bare, 40), 40, 1, 40), { full: 'a record changed without a change-log entry' })
  })

  test('no log, or an unreadable one, means a full read', () => {
    assert.deepEqual(explainChanges(undefined, 10, 3), { full: 'no change log' })
    for (const garbage of [
      'not json {',
      '',
      'null',
      { v: 1, seq: 'x', entries: [] },
      { v: 0, seq: 1, entries: [] },
      { v: 1, seq: 2, entries: [{ s: 2, n: 'a'.repeat(65) }] },
      logOf(1, 4 * CHANGE_LOG_ENTRIES + 1),
    ]) {
      const e = explainChanges(read(garbage, 10), 10, 0)
      assert.ok('full' in e && /unreadable/.test(e.full), `${JSON.stringify(garbage).slice(0, 60)}: ${JSON.stringify(e)}`)
    }
  })

  test('a log written after the index is ahead; one written before it does not explain it', () => {
    assert.deepEqual(explainChanges(read(logOf(1, 3), 12), 10, 2), { ahead: 12 })
    // Ahead is decided before anything else: the newer log may explain the newer index.
    assert.deepEqual(explainChanges(read(logOf(1, 3), 12), 10, undefined), { ahead: 12 })
    const behind = explainChanges(read(logOf(1, 3), 9), 10, 2)
    assert.ok('full' in behind && /without a change-log entry/.test(behind.full))
  })

  test('no baseline, a log going backwards or standing still, and gaps mean a full read', () => {
    const log = logOf(5, 8)
    const full = (seen: number | undefined, l: unknown = log) => {
      const e = explainChanges(read(l, 20), 20, seen)
      assert.ok('full' in e, `seen ${seen}: ${JSON.stringify(e)}`)
      return e.full
    }
    assert.match(full(undefined), /no baseline/)
    assert.match(full(8), /backwards/)
    assert.match(full(12), /backwards/)
    // seen 2: entries 3 and 4 are gone (capped away, or never written).
    assert.match(full(2), /missing/)
    // A hole inside the entries, and a seq past the last entry.
    const holed: ChangeLog = { v: 1, seq: 8, entries: log.entries.filter((e) => e.s !== 7) }
    assert.match(full(5, holed), /missing/)
    assert.match(full(5, { ...log, seq: 9 }), /missing/)
    // Out of order.
    assert.match(full(4, { ...log, entries: [...log.entries].reverse() }), /missing/)
    // Exactly caught up from the oldest entry is fine.
    assert.deepEqual(explainChanges(read(log, 20), 20, 4), { names: ['n5', 'n6', 'n7', 'n8'], seq: 8 })
  })

  test('names that could not be a record are dropped; too many to read one by one is a full read', () => {
    const names = ['a', '../network', 'x/y', '', 'with-dash', 'b', 'a']
    const log = logOf(1, names.length, (s) => names[s - 1] ?? '')
    assert.deepEqual(explainChanges(read(log, 7), 7, 0), { names: ['a', 'b'], seq: names.length })
    // Only junk: nothing to read, but the log is followed (seq moves on).
    assert.deepEqual(
      explainChanges(
        read(
          logOf(1, 2, () => '../x'),
          7,
        ),
        7,
        0,
      ),
      { names: [], seq: 2 },
    )
    // Up to the cap, one by one; above it, everything at once.
    assert.equal((explainChanges(read(logOf(1, CHANGE_LOG_ENTRIES), 7), 7, 0) as { names: string[] }).names.length, CHANGE_LOG_ENTRIES)
    const many = explainChanges(read(logOf(1, CHANGE_LOG_ENTRIES + 1), 7), 7, 0)
    assert.ok('full' in many && /too many/.test(many.full), JSON.stringify(many))
    // The same name many times is one read.
    assert.deepEqual(
      explainChanges(
        read(
          logOf(1, 200, () => 'same'),
          7,
        ),
        7,
        0,
      ),
      { names: ['same'], seq: 200 },
    )
  })

  test('changeLogSeq: no log is 0, a readable one its seq, garbage none', () => {
    assert.equal(changeLogSeq(undefined), 0)
    assert.equal(changeLogSeq({ value: enc(logOf(3, 9)) }), 9)
    assert.equal(changeLogSeq({ value: enc('garbage') }), undefined)
  })
})

describe('txnWithChangeLog against a real Consul agent', () => {
  let consul: DevConsul
  let admin: ConsulClient
  const management = randomUUID()
  const set = (key: string, value: string): TxnOp => ({ KV: { Verb: 'set', Key: key, Value: b64(value) } })
  const readLog = async (l: KvLayout) => {
    const raw = await admin.kvGet(l.changes)
    return raw && { log: changeLogSchema.parse(JSON.parse(raw.value)), modifyIndex: raw.modifyIndex }
  }

  before(async () => {
    consul = await startDevConsul({ managementToken: management })
    admin = createConsulClient({ url: consul.url, token: management })
  })
  after(async () => {
    await consul?.stop()
  })

  test('the log is written with the ops, at the same index', async () => {
    const l = kvLayout('one')
    const r = await txnWithChangeLog(admin, l, [set(l.node('a'), 'a0')], ['a'])
    assert.ok(r.result.ok)
    assert.deepEqual({ logged: r.logged, attempts: r.attempts, logRetries: r.logRetries }, { logged: true, attempts: 1, logRetries: 0 })
    const log = await readLog(l)
    // No log before this write (p 0), and nodes/ was empty, at most at the store's first index.
    const first = log?.log.entries[0]
    assert.deepEqual({ ...log?.log, entries: [] }, { v: CHANGE_LOG_VERSION, seq: 1, entries: [] })
    assert.deepEqual({ s: first?.s, n: first?.n, p: first?.p }, { s: 1, n: 'a', p: 0 })
    assert.ok(first?.w !== undefined && first.w < (log?.modifyIndex ?? 0), 'the writer saw nodes/ before its own write')
    assert.equal(log?.modifyIndex, (await admin.kvGet(l.node('a')))?.modifyIndex, 'the log and the record must share the index readers compare')
    // A log someone blanked or broke is started again rather than blocking writers.
    await admin.kvPut(l.changes, 'garbage')
    const again = await txnWithChangeLog(admin, l, [set(l.node('b'), 'b0')], ['b'])
    assert.ok(again.result.ok && again.logged)
    const restarted = (await readLog(l))?.log
    assert.deepEqual({ seq: restarted?.seq, names: restarted?.entries.map((e) => `${e.s}:${e.n}`) }, { seq: 1, names: ['1:b'] })
    // The writer saw a (its own earlier write) as the latest change, logged at the garbage's index.
    assert.ok((restarted?.entries[0]?.w ?? Infinity) <= (restarted?.entries[0]?.p ?? -1), 'w must not pass p when nothing was written without the log')
  })

  test('20 concurrent writers all succeed, and the log names exactly those it says it logged', async (t) => {
    const l = kvLayout('two')
    const names = Array.from({ length: 20 }, (_, i) => `w${i}`)
    const results = await Promise.all(names.map((n) => txnWithChangeLog(admin, l, [set(l.node(n), `${n}-value`)], [n])))
    for (const [i, r] of results.entries()) {
      assert.ok(r.result.ok, `${names[i]}: ${JSON.stringify(r.result)}`)
      assert.equal((await admin.kvGet(l.node(names[i] ?? '')))?.value, `${names[i]}-value`)
      // Only the log's check-and-set is ever retried: one attempt more than log retries, or the fallback's.
      if (r.logged) assert.equal(r.attempts, r.logRetries + 1, JSON.stringify(r))
      else assert.deepEqual({ attempts: r.attempts, logRetries: r.logRetries }, { attempts: 9, logRetries: 8 })
    }
    const log = (await readLog(l))?.log
    assert.ok(log)
    const logged = names.filter((_, i) => results[i]?.logged)
    assert.deepEqual([...log.entries.map((e) => e.n)].sort(), [...logged].sort(), 'the log must name each logged writer once, and no one else')
    assert.equal(log.seq, logged.length)
    assert.deepEqual(
      log.entries.map((e) => e.s),
      Array.from({ length: logged.length }, (_, i) => i + 1),
    )
    const retries = results.reduce((sum, r) => sum + r.logRetries, 0)
    t.diagnostic(`${logged.length}/20 logged, ${retries} log retries in all, at most ${Math.max(...results.map((r) => r.attempts))} attempts`)
  })

  test("a failure on the caller's ops is returned with only the caller's errors, and the log is untouched", async () => {
    const l = kvLayout('three')
    await txnWithChangeLog(admin, l, [set(l.node('a'), 'a0')], ['a'])
    const before = await readLog(l)
    const index = (await admin.kvGet(l.node('a')))?.modifyIndex ?? 0
    // A stale check-and-set on the record, as publish does when someone else wrote it.
    const r = await txnWithChangeLog(admin, l, [set(l.node('b'), 'b0'), { KV: { Verb: 'cas', Key: l.node('a'), Value: b64('a1'), Index: index + 1000 } }], ['b', 'a'])
    assert.equal(r.result.ok, false)
    assert.equal(r.logged, false)
    assert.equal(r.attempts, 1)
    const errors = r.result.ok ? [] : r.result.errors
    assert.ok(errors.length > 0)
    assert.ok(
      errors.every((e) => e.OpIndex < 2),
      JSON.stringify(errors),
    )
    assert.ok(errors.some((e) => e.OpIndex === 1))
    assert.equal((await admin.kvGet(l.node('a')))?.value, 'a0')
    assert.equal(await admin.kvGet(l.node('b')), undefined, 'the transaction must have rolled back')
    assert.deepEqual(await readLog(l), before)
  })

  test('a token that may not write the log writes the ops alone, unlogged', async () => {
    const l = kvLayout('four')
    await txnWithChangeLog(admin, l, [set(l.node('a'), 'a0')], ['a'])
    const before = await readLog(l)
    // An older node policy: its records, but read only on the log.
    const rules = `key_prefix "${l.nodesPrefix}" { policy = "write" }\nkey "${l.changes}" { policy = "read" }\n`
    await admin.request('PUT', '/v1/acl/policy', { Name: 'no-log-write', Rules: rules })
    const token = await admin.request<{ SecretID: string }>('PUT', '/v1/acl/token', { Policies: [{ Name: 'no-log-write' }] })
    const limited = createConsulClient({ url: consul.url, token: token.SecretID })
    const r = await txnWithChangeLog(limited, l, [set(l.node('old'), 'o0')], ['old'])
    assert.ok(r.result.ok, JSON.stringify(r.result))
    assert.equal(r.logged, false)
    assert.equal((await admin.kvGet(l.node('old')))?.value, 'o0')
    assert.deepEqual(await readLog(l), before)
  })
})
