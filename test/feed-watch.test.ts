import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { pino } from 'pino'
import { b64, createConsulClient, type ConsulClient, type TxnOp } from '../src/consul/client.ts'
import { REFUSED_BY_NAME, watchFeed, type FeedWatchOptions, type TreeSnapshot } from '../src/consul/feed-watch.ts'
import type { Watch } from '../src/consul/watch.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { changeLogSource, txnWithChangeLog, CHANGE_LOG_VERSION } from '../src/mesh/change-log.ts'
import { kvLayout, type KvLayout } from '../src/mesh/kv-layout.ts'
import { isTincName } from '../src/tinc/names.ts'
import { startFaultProxy, type FaultProxy } from './sync-fixture.ts'

const log = pino({ level: 'silent' })
/** The keys that read as a value, with their text. */
const text = (s: TreeSnapshot) => Object.fromEntries([...s.keys].flatMap(([k, r]) => (r.state === 'value' ? [[k, Buffer.from(r.item.value).toString()]] : [])))
/** Every key's state: its text, or `unreadable`. */
const states = (s: TreeSnapshot) => Object.fromEntries([...s.keys].map(([k, r]) => [k, r.state === 'value' ? Buffer.from(r.item.value).toString() : r.state]))
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

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
    /** The first snapshot from `from` on that matches. */
    async until(pred: (s: TreeSnapshot) => boolean, what: string, from = 0): Promise<TreeSnapshot> {
      const deadline = Date.now() + 20_000
      for (;;) {
        const hit = seen.slice(from).find(pred)
        if (hit) return hit
        if (Date.now() > deadline) throw new Error(`no snapshot where ${what}; last: ${JSON.stringify(seen.at(-1) && states(seen.at(-1) as TreeSnapshot))}`)
        await new Promise<void>((r) => {
          wake = r
          setTimeout(r, 200)
        })
      }
    },
  }
}

/** Polls until `check` holds (generous deadline; never a timed assertion). */
async function eventually(check: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 20_000
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`never true: ${what}`)
    await sleep(20)
  }
}

/** A request the proxy saw, parsed. */
const parse = (line: string) => {
  const [method = '', path = ''] = line.split(' ')
  return { method, url: new URL(path, 'http://proxy') }
}

describe('feed watch with the change log, against a real Consul agent', () => {
  let consul: DevConsul
  let admin: ConsulClient
  let proxy: FaultProxy
  const watches: Watch[] = []
  /** Every value each key was ever given: a snapshot may be behind, never make one up. */
  const history = new Map<string, Set<string>>()
  const remember = (key: string, value: string) => {
    const h = history.get(key) ?? new Set<string>()
    h.add(value)
    history.set(key, h)
  }
  const assertNothingMadeUp = (seen: TreeSnapshot[], l: KvLayout) => {
    for (const s of seen) {
      for (const [key, read] of s.keys) {
        assert.ok(key.startsWith(l.nodesPrefix), `a key outside the prefix was delivered: ${key}`)
        if (read.state === 'value')
          assert.ok(history.get(key)?.has(Buffer.from(read.item.value).toString()), `${key} was delivered with a value it never had: ${Buffer.from(read.item.value).toString()}`)
      }
    }
  }

  const start = (l: KvLayout, extra: Partial<FeedWatchOptions> = {}) => {
    const r = recorder()
    const client = createConsulClient({ url: proxy.url })
    watches.push(
      watchFeed({ client, prefix: l.nodesPrefix, changes: changeLogSource(client, l), fullReadMinMs: 50, waitSeconds: 30, backoffMinMs: 20, backoffMaxMs: 100, log, onChange: r.onChange, ...extra }),
    )
    return r
  }
  const set = (key: string, value: string): TxnOp => {
    remember(key, value)
    return { KV: { Verb: 'set', Key: key, Value: b64(value) } }
  }
  /** A record written the way publish/join/adopt do: with the change log, in one transaction. */
  const logged = async (l: KvLayout, name: string, value: string) => {
    const r = await txnWithChangeLog(admin, l, [set(l.node(name), value)], [name])
    assert.ok(r.result.ok && r.logged, `a logged write of ${name} failed: ${JSON.stringify(r)}`)
  }
  const loggedDelete = async (l: KvLayout, name: string) => {
    const r = await txnWithChangeLog(admin, l, [{ KV: { Verb: 'delete', Key: l.node(name) } }], [name])
    assert.ok(r.result.ok && r.logged)
  }
  /** A record written by something that doesn't know the log (an older version, an operator). */
  const plain = async (l: KvLayout, name: string, value: string) => {
    remember(l.node(name), value)
    await admin.kvPut(l.node(name), value)
  }
  const plainDelete = (l: KvLayout, name: string) => admin.request('DELETE', `/v1/kv/${l.node(name)}`)
  /** The log's seq as it is in Consul now. */
  const logSeq = async (l: KvLayout): Promise<number> => {
    try {
      const seq = (JSON.parse((await admin.kvGet(l.changes))?.value ?? '{}') as { seq?: unknown }).seq
      return typeof seq === 'number' ? seq : 0
    } catch {
      return 0
    }
  }
  /** Requests the proxy saw since `mark` on this layout's records. */
  const recordReads = (l: KvLayout, mark: number) =>
    proxy.seen
      .slice(mark)
      .map(parse)
      .filter((r) => r.method === 'GET' && r.url.pathname.startsWith(`/v1/kv/${l.nodesPrefix}`))
  const fullReads = (l: KvLayout, mark: number) => recordReads(l, mark).filter((r) => r.url.searchParams.has('recurse'))

  before(async () => {
    consul = await startDevConsul()
    admin = createConsulClient({ url: consul.url })
    proxy = await startFaultProxy(consul.url)
  })
  after(async () => {
    await Promise.all(watches.map((w) => w.stop()))
    await proxy?.stop()
    await consul?.stop()
  })

  test('start-up delivers every key at once; a logged change reads that one record, not the prefix', async () => {
    const l = kvLayout('one')
    // Values about the size of a node record, so the byte counts mean something.
    const value = (name: string, v: number) => JSON.stringify({ name, v, pad: 'k'.repeat(800) })
    const names = Array.from({ length: 200 }, (_, i) => `n${i}`)
    for (let i = 0; i < names.length; i += 50) await admin.txn(names.slice(i, i + 50).map((n) => set(l.node(n), value(n, 0))))
    await logged(l, 'n0', value('n0', 0))
    const r = start(l)
    const first = await r.until((s) => s.keys.size > 0, 'anything arrived')
    assert.equal(Object.keys(text(first)).length, 200, 'the first snapshot was partial: it would look like nodes leaving')
    assert.equal(r.seen.length, 1)

    const mark = proxy.seen.length
    await logged(l, 'n7', value('n7', 1))
    const changed = await r.until((s) => text(s)[l.node('n7')] === value('n7', 1), 'n7 changed')
    assert.equal(Object.keys(text(changed)).length, 200)
    assert.equal(text(changed)[l.node('n3')], value('n3', 0))
    // What a ?recurse watch would have read for the same change, measured now.
    const full = await admin.kvList(l.nodesPrefix)
    assert.ok(changed.bytes * 20 < full.bytes, `read ${changed.bytes} bytes for one change; a full read is ${full.bytes}`)
    assert.deepEqual(fullReads(l, mark), [], 'a logged change was read by reading every record')
    const single = recordReads(l, mark).filter((q) => !q.url.searchParams.has('keys'))
    assert.deepEqual(
      single.map((q) => q.url.pathname),
      [`/v1/kv/${l.node('n7')}`],
    )

    // A new record, then two changes back to back: each read alone, none by a full read.
    const mark2 = proxy.seen.length
    await logged(l, 'n200', value('n200', 0))
    await r.until((s) => s.keys.size === 201, 'n200 added')
    await logged(l, 'n1', value('n1', 1))
    await logged(l, 'n2', value('n2', 1))
    const last = await r.until((s) => text(s)[l.node('n1')] === value('n1', 1) && text(s)[l.node('n2')] === value('n2', 1), 'n1 and n2 changed')
    assert.equal(last.keys.size, 201)
    assert.deepEqual(fullReads(l, mark2), [], 'logged changes fell back to a full read')
    assertNothingMadeUp(r.seen, l)
  })

  test('writes without the log, and deletes either way, arrive through a full read', async () => {
    const l = kvLayout('two')
    await logged(l, 'a', 'a0')
    await logged(l, 'b', 'b0')
    await logged(l, 'c', 'c0')
    const r = start(l)
    await r.until((s) => s.keys.size === 3, 'three keys')

    let mark = proxy.seen.length
    await plain(l, 'a', 'a1')
    let s = await r.until((x) => text(x)[l.node('a')] === 'a1', 'a plain write arrived')
    assert.deepEqual(states(s), { [l.node('a')]: 'a1', [l.node('b')]: 'b0', [l.node('c')]: 'c0' })
    assert.ok(fullReads(l, mark).length >= 1, 'a write the log does not explain must be read in full')

    // A logged delete names the record; reading it finds it gone, and only a full read removes it.
    mark = proxy.seen.length
    await loggedDelete(l, 'b')
    s = await r.until((x) => !x.keys.has(l.node('b')), 'b deleted through the log')
    assert.deepEqual(states(s), { [l.node('a')]: 'a1', [l.node('c')]: 'c0' })
    assert.ok(fullReads(l, mark).length >= 1)

    await plainDelete(l, 'c')
    s = await r.until((x) => !x.keys.has(l.node('c')), 'c deleted without the log')
    assert.deepEqual(states(s), { [l.node('a')]: 'a1' })

    // After all that the log is followed again: the next logged change is read alone.
    await logged(l, 'd', 'd0')
    await r.until((x) => text(x)[l.node('d')] === 'd0', 'd arrived')
    mark = proxy.seen.length
    await logged(l, 'a', 'a2')
    s = await r.until((x) => text(x)[l.node('a')] === 'a2', 'a changed through the log')
    assert.deepEqual(states(s), { [l.node('a')]: 'a2', [l.node('d')]: 'd0' })
    assert.deepEqual(fullReads(l, mark), [])
    for (const x of r.seen) assert.equal(x.filtered, false)
    assertNothingMadeUp(r.seen, l)
  })

  test('a forged log never makes a wrong value appear, and the true state arrives', async () => {
    const l = kvLayout('three')
    for (const n of ['a', 'b', 'c']) await logged(l, n, `${n}0`)
    const r = start(l)
    await r.until((s) => s.keys.size === 3, 'three keys')
    const only = (a: string) => ({ [l.node('a')]: a, [l.node('b')]: 'b0', [l.node('c')]: 'c0' })
    /** Writes `a` and, in the same transaction, a log that is not what txnWithChangeLog would write. */
    const forge = async (a: string, logText: (seq: number) => string) => {
      const seq = await logSeq(l)
      const mark = r.seen.length
      const res = await admin.txn([set(l.node('a'), a), { KV: { Verb: 'set', Key: l.changes, Value: b64(logText(seq)) } }])
      assert.ok(res.ok)
      const s = await r.until((x) => text(x)[l.node('a')] === a, `a became ${a}`, mark)
      assert.deepEqual(states(s), only(a))
      // An honest write after each lie, so the next one starts from a log the watch follows.
      const honest = await txnWithChangeLog(admin, l, [set(l.node('b'), 'b0')], ['b'])
      const at = honest.result.ok ? honest.result.results[0]?.KV?.ModifyIndex : undefined
      assert.ok(honest.logged && at !== undefined)
      await r.until((x) => {
        const b = x.keys.get(l.node('b'))
        return b?.state === 'value' && b.item.modifyIndex === at
      }, 'the honest write was read')
    }
    const logOf = (seq: number, entries: Array<{ s: number; n: string }>) => JSON.stringify({ v: CHANGE_LOG_VERSION, seq, entries })
    const mark = proxy.seen.length
    // Names a record that doesn't exist: its read finds nothing, so everything is read.
    await forge('a1', (seq) => logOf(seq + 1, [{ s: seq + 1, n: 'ghost' }]))
    // Goes backwards.
    await forge('a2', () => logOf(1, [{ s: 1, n: 'b' }]))
    // Garbage, and a log of another shape.
    await forge('a3', () => 'not json {')
    await forge('a4', () => JSON.stringify({ v: 1, seq: 'many', entries: 'all' }))
    // Too long for the schema, then too many distinct names to read one by one.
    await forge('a5', (seq) =>
      logOf(
        seq + 300,
        Array.from({ length: 300 }, (_, i) => ({ s: seq + 1 + i, n: `x${i}` })),
      ),
    )
    await forge('a6', (seq) =>
      logOf(
        seq + 100,
        Array.from({ length: 100 }, (_, i) => ({ s: seq + 1 + i, n: `x${i}` })),
      ),
    )
    // Entries missing (a gap after what the reader has seen).
    await forge('a7', (seq) => logOf(seq + 3, [{ s: seq + 3, n: 'a' }]))
    // Names that could not be a record's key are dropped; the real one is read.
    await forge('a8', (seq) =>
      logOf(seq + 4, [
        { s: seq + 1, n: '../network' },
        { s: seq + 2, n: 'x/y' },
        { s: seq + 3, n: '..' },
        { s: seq + 4, n: 'a' },
      ]),
    )
    // A log written alone after a plain write (an `ahead` log that explains nothing).
    const before = r.seen.length
    await plain(l, 'b', 'b1')
    await admin.kvPut(l.changes, logOf((await logSeq(l)) + 1, [{ s: (await logSeq(l)) + 1, n: 'c' }]))
    const s = await r.until((x) => text(x)[l.node('b')] === 'b1', 'b1 arrived', before)
    assert.deepEqual(states(s), { [l.node('a')]: 'a8', [l.node('b')]: 'b1', [l.node('c')]: 'c0' })
    // The watch only ever read records under nodes/, the log, and nothing a name in it could point to.
    const outside = proxy.seen
      .slice(mark)
      .map(parse)
      .filter((q) => q.url.pathname.startsWith(`/v1/kv/${l.prefix}`) && !q.url.pathname.startsWith(`/v1/kv/${l.nodesPrefix.slice(0, -1)}`) && q.url.pathname !== `/v1/kv/${l.changes}`)
    assert.deepEqual(outside, [])
    for (const x of r.seen) assert.equal(x.keys.size, 3, `a forged log changed the set of keys: ${JSON.stringify(states(x))}`)
    assertNothingMadeUp(r.seen, l)
  })

  test('a forged log naming another record: the sweep delivers the true state', async () => {
    const l = kvLayout('four')
    for (const n of ['a', 'b']) await logged(l, n, `${n}0`)
    // The sweep bounds what a lying log can hide; short here so the test doesn't wait an hour.
    const r = start(l, { sweepMs: 500, waitSeconds: 1 })
    await r.until((s) => s.keys.size === 2, 'two keys')
    const seq = await logSeq(l)
    const mark = r.seen.length
    const lie = JSON.stringify({ v: CHANGE_LOG_VERSION, seq: seq + 1, entries: [{ s: seq + 1, n: 'b' }] })
    assert.ok((await admin.txn([set(l.node('a'), 'a1'), { KV: { Verb: 'set', Key: l.changes, Value: b64(lie) } }])).ok)
    const s = await r.until((x) => text(x)[l.node('a')] === 'a1', 'a1 arrived', mark)
    assert.deepEqual(states(s), { [l.node('a')]: 'a1', [l.node('b')]: 'b0' })
    // Honest writers carry on from the forged seq; the log is followed again.
    await logged(l, 'b', 'b1')
    await r.until((x) => text(x)[l.node('b')] === 'b1', 'b1 arrived')
    for (const x of r.seen) assert.equal(x.keys.size, 2)
    assertNothingMadeUp(r.seen, l)
  })

  test('a probe, log, record or full read failing once never removes or blanks a key, and the change arrives', async (t) => {
    const l = kvLayout('five')
    for (const n of ['a', 'b', 'c']) await logged(l, n, `${n}0`)
    const r = start(l)
    await r.until((s) => s.keys.size === 3, 'three keys')
    const nodes = `/v1/kv/${l.nodesPrefix}`
    // Each fault hits the reads of change 1 (the probe: the read after it, while change 2 is written).
    const targets: Array<{ what: string; status: number; match: (u: URL) => boolean; write: typeof logged }> = [
      { what: 'the probe', status: 500, match: (u) => u.pathname === nodes.slice(0, -1) && u.searchParams.has('keys'), write: logged },
      { what: 'the log', status: 429, match: (u) => u.pathname === `/v1/kv/${l.changes}`, write: logged },
      { what: "the record's read", status: 500, match: (u) => u.pathname === `/v1/kv/${l.node('a')}`, write: logged },
      { what: 'the full read', status: 500, match: (u) => u.pathname === nodes && u.searchParams.has('recurse'), write: plain },
    ]
    let round = 0
    for (const target of targets) {
      round++
      let fired = 0
      let during: Promise<void> | undefined
      proxy.rule = (method, u) => {
        if (method !== 'GET' || fired > 0 || !target.match(u)) return 'pass'
        fired++
        // A probe fails after change 1 was read: change 2 lands while the watch is failing.
        if (target.what === 'the probe') during = target.write(l, 'a', `a${round}-2`)
        return { status: target.status, body: target.status === 429 ? 'Your IP is issuing too many concurrent connections' : 'rpc error: No cluster leader' }
      }
      try {
        const mark = r.seen.length
        await target.write(l, 'a', `a${round}-1`)
        await eventually(() => fired > 0, `${target.what} was failed once`)
        // The change whose read failed arrives itself, not just the next one. (A failed probe may
        // come before change 1 is read, and change 2 then supersedes it.)
        if (target.what !== 'the probe') await r.until((x) => text(x)[l.node('a')] === `a${round}-1`, `change 1 arrived though ${target.what} failed`, mark)
        await (during ?? target.write(l, 'a', `a${round}-2`))
        const s = await r.until((x) => text(x)[l.node('a')] === `a${round}-2`, `change 2 arrived after ${target.what} failed`, mark)
        assert.deepEqual(states(s), { [l.node('a')]: `a${round}-2`, [l.node('b')]: 'b0', [l.node('c')]: 'c0' })
        t.diagnostic(`${target.what} answered ${target.status} once: ${r.seen.length - mark} snapshots, none lacking a key`)
      } finally {
        proxy.rule = () => 'pass'
      }
    }
    for (const x of r.seen) assert.deepEqual(Object.keys(text(x)), [l.node('a'), l.node('b'), l.node('c')], `a failed read removed or blanked a key: ${JSON.stringify(states(x))}`)
    assertNothingMadeUp(r.seen, l)
  })

  test('a blank or 404 full read never removes keys; the next change is read in full', async () => {
    const l = kvLayout('six')
    for (const n of ['a', 'b']) await logged(l, n, `${n}0`)
    const r = start(l)
    await r.until((s) => s.keys.size === 2, 'two keys')
    const nodes = `/v1/kv/${l.nodesPrefix}`
    const isFull = (u: URL) => u.pathname === nodes && u.searchParams.has('recurse')
    const faults = [
      { what: 'a blank body', arm: () => (proxy.rewrite = (u, a) => (isFull(u) ? { ...a, body: Buffer.from('[]') } : a)) },
      { what: 'a 404', arm: () => (proxy.rule = (_m, u) => (isFull(u) ? { status: 404, body: '' } : 'pass')) },
    ]
    let round = 0
    for (const fault of faults) {
      round++
      fault.arm()
      const mark = r.seen.length
      try {
        // A write the log doesn't explain: the watch reads everything, and gets nothing.
        await plain(l, 'c', `c${round}`)
        const empty = await r.until((x) => x.keys.size === 0, `${fault.what} delivered as an empty snapshot`, mark)
        assert.equal(empty.filtered, false)
      } finally {
        proxy.rewrite = (_u, a) => a
        proxy.rule = () => 'pass'
      }
      // The watch kept its state: a logged change is read in full and hands over every key.
      const after = r.seen.length
      const markReads = proxy.seen.length
      await logged(l, 'b', `b${round}`)
      const s = await r.until((x) => text(x)[l.node('b')] === `b${round}`, `b${round} arrived after ${fault.what}`, after)
      assert.deepEqual(states(s), { [l.node('a')]: 'a0', [l.node('b')]: `b${round}`, [l.node('c')]: `c${round}` })
      assert.ok(fullReads(l, markReads).length >= 1, `the change after ${fault.what} was not read in full`)
    }
    // Every snapshot but the empty ones holds every key.
    for (const x of r.seen) if (x.keys.size > 0) assert.ok(x.keys.has(l.node('a')) && x.keys.has(l.node('b')), `a key went missing: ${JSON.stringify(states(x))}`)
    assert.equal(r.seen.filter((x) => x.keys.size === 0).length, 2)
    assertNothingMadeUp(r.seen, l)
  })

  test('keys refused by name are listed unreadable, never read, and never stop the rest', async () => {
    const l = kvLayout('seven')
    await logged(l, 'a', 'a0')
    const r = start(l, { nameOnly: (k) => !isTincName(k.slice(l.nodesPrefix.length)) })
    await r.until((s) => text(s)[l.node('a')] === 'a0', 'a is there')
    // Keys with dot segments can't be read through a URL path; only a transaction writes them.
    const evil = `${l.nodesPrefix}../evil`
    const dashed = `${l.nodesPrefix}bad-name`
    const mark = proxy.seen.length
    assert.ok((await admin.txn([set(evil, 'x'), set(dashed, 'y')])).ok)
    const junk = await r.until((s) => s.keys.has(evil) && s.keys.has(dashed), 'the junk keys are listed')
    assert.deepEqual(junk.keys.get(evil), { state: 'unreadable', reason: REFUSED_BY_NAME }, 'a name-only key must not carry a value')
    assert.deepEqual(junk.keys.get(dashed), { state: 'unreadable', reason: REFUSED_BY_NAME })
    assert.equal(text(junk)[l.node('a')], 'a0')
    // A logged change after them is read alone, and the refused keys stay listed as they were.
    await logged(l, 'a', 'a1')
    const s = await r.until((x) => text(x)[l.node('a')] === 'a1', 'a changed')
    assert.deepEqual(states(s), { [evil]: 'unreadable', [l.node('a')]: 'a1', [dashed]: 'unreadable' })
    const direct = recordReads(l, mark).filter((q) => !q.url.searchParams.has('recurse') && !q.url.searchParams.has('keys'))
    assert.ok(
      direct.every((q) => q.url.pathname === `/v1/kv/${l.node('a')}`),
      `a refused key was read: ${JSON.stringify(direct.map((q) => q.url.pathname))}`,
    )
  })
})
