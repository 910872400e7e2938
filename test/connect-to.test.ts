import { test } from 'node:test'
import assert from 'node:assert/strict'
import { pino } from 'pino'
import { connectToKeeper } from '../src/mesh/daemon/connect-to-keeper.ts'
import { planConnectTo, rendezvousOrder, type CandidateState, type ConnectToInput, type ConnectToTimers } from '../src/mesh/connect-to.ts'

const publics = Array.from({ length: 20 }, (_, i) => `pub${i}`)
const nodes = Array.from({ length: 1000 }, (_, i) => `node${i}`)
const timers: ConnectToTimers = { graceMs: 60_000, benchMs: 120_000, benchMaxMs: 600_000 }

test('rendezvous order: stable, spread evenly, and a public node leaving moves only the nodes that had it', (t) => {
  const k = 3
  const load = new Map<string, number>()
  const before = new Map<string, string[]>()
  for (const n of nodes) {
    const first = rendezvousOrder(n, publics).slice(0, k)
    before.set(n, first)
    for (const p of first) load.set(p, (load.get(p) ?? 0) + 1)
  }
  assert.deepEqual(rendezvousOrder('node7', publics), rendezvousOrder('node7', [...publics].reverse()), 'the order does not depend on the input order')
  const mean = (nodes.length * k) / publics.length
  const counts = [...load.values()]
  assert.equal(counts.length, publics.length, 'every public node is chosen by someone')
  t.diagnostic(`${nodes.length} nodes, K = ${k}, ${publics.length} public nodes: ${Math.min(...counts)} to ${Math.max(...counts)} ConnectTo lines each (even share ${mean})`)
  assert.ok(Math.max(...counts) <= mean * 1.25 && Math.min(...counts) >= mean * 0.75, `load per public node within ±25% of ${mean}: ${counts.join(' ')}`)
  const gone = 'pub3'
  let moved = 0
  for (const n of nodes) {
    const after = rendezvousOrder(
      n,
      publics.filter((p) => p !== gone),
    ).slice(0, k)
    const had = before.get(n) ?? []
    if (had.includes(gone)) {
      moved++
      assert.deepEqual(
        after.filter((p) => had.includes(p)),
        had.filter((p) => p !== gone),
        `${n} keeps its other choices`,
      )
    } else assert.deepEqual(after, had, `${n} did not have ${gone} and keeps its choice`)
  }
  assert.equal(moved, load.get(gone))
  assert.deepEqual(rendezvousOrder('a', ['a', 'b', 'b']), ['b'], 'never itself, never twice')
})

test('an order is handed out as a copy and follows the list; a caller that keeps the order gets it used as given', () => {
  const pubs = Array.from({ length: 50 }, (_, i) => `pub${i}`)
  const first = rendezvousOrder('me', pubs)
  first.reverse()
  assert.notDeepEqual(first, rendezvousOrder('me', pubs), 'changing a returned order does not change the next one')
  assert.deepEqual(rendezvousOrder('me', pubs), rendezvousOrder('me', [...pubs]), 'the same list gives the same order')
  assert.deepEqual(rendezvousOrder('other', pubs).length, 50, 'another node has its own order')
  const fewer = pubs.filter((p) => p !== rendezvousOrder('me', pubs)[0])
  assert.deepEqual(rendezvousOrder('me', fewer), rendezvousOrder('me', pubs).slice(1), 'a node leaving the list is gone from the order')
  const kept = [...pubs].reverse()
  const plan = planConnectTo({ self: 'me', publics: pubs, k: 3, now: 0, order: kept }, new Map(), [])
  assert.deepEqual(plan.connectTo, kept.slice(0, 3).sort(), 'the order the keeper kept, not one hashed again')
})

/** Runs rounds of the planner as the daemon would, carrying its state. */
function driver(base: Omit<ConnectToInput, 'now' | 'connected'>) {
  let state = new Map<string, CandidateState>()
  let chosen: string[] = []
  return (now: number, connected: ReadonlySet<string> | undefined) => {
    const plan = planConnectTo({ ...base, now, connected, timers }, state, chosen)
    state = plan.state
    chosen = plan.connectTo
    return plan
  }
}

test('a chosen node without a meta connection for the grace period is replaced, and comes back after its bench', () => {
  const pubs = ['a', 'b', 'c', 'd', 'e']
  const order = rendezvousOrder('me', pubs)
  const [first, second, third] = order as [string, string, string]
  const round = driver({ self: 'me', publics: pubs, k: 2 })
  const all = new Set(pubs)
  const noFirst = new Set(pubs.filter((p) => p !== first))
  assert.deepEqual(round(0, all).connectTo, [first, second].sort())
  assert.deepEqual(round(10_000, noFirst).connectTo, [first, second].sort(), 'a short break changes nothing')
  assert.deepEqual(round(69_999, noFirst).connectTo, [first, second].sort(), 'still inside the grace period')
  const swapped = round(70_000, noFirst)
  assert.deepEqual(swapped.connectTo, [second, third].sort(), 'the next in order takes its place')
  assert.deepEqual(swapped.benched, [{ name: first, until: 70_000 + 120_000, strikes: 1 }])
  assert.deepEqual(round(189_999, noFirst).connectTo, [second, third].sort())
  assert.deepEqual(round(190_000, noFirst).connectTo, [first, second].sort(), 'tried again once its bench is over')
  // Still unreachable: a grace period after it was tried again, benched again, twice as long.
  assert.deepEqual(round(250_000, noFirst).benched, [])
  const again = round(250_001 + 60_000, noFirst)
  assert.deepEqual(again.benched, [{ name: first, until: 310_001 + 240_000, strikes: 2 }])
  // Back, and connected for a whole grace period: forgiven.
  assert.deepEqual(round(550_001, all).connectTo, [first, second].sort())
  round(610_001, all)
  const forgiven = round(611_000, noFirst)
  assert.deepEqual(forgiven.connectTo, [first, second].sort())
  assert.equal(forgiven.state.get(first)?.strikes, 0)
})

test('a flapping link that reconnects within the grace period never churns the list', () => {
  const pubs = ['a', 'b', 'c', 'd']
  const round = driver({ self: 'me', publics: pubs, k: 2 })
  const first = rendezvousOrder('me', pubs)[0] ?? assert.fail()
  const lists = new Set<string>()
  for (let t = 0; t < 3_600_000; t += 10_000) {
    const up = Math.floor(t / 30_000) % 2 === 0
    lists.add(round(t, new Set(up ? pubs : pubs.filter((p) => p !== first))).connectTo.join(','))
  }
  assert.equal(lists.size, 1, `one list in an hour of flapping: ${[...lists].join(' | ')}`)
})

test("without tincd's connection list nothing is benched; with too few left, benched ones fill in", () => {
  const pubs = ['a', 'b', 'c']
  const round = driver({ self: 'me', publics: pubs, k: 2 })
  const start = round(0, undefined).connectTo
  for (let t = 0; t < 600_000; t += 30_000) assert.deepEqual(round(t, undefined).connectTo, start, 'an unknown state is not a failure')
  // Nothing connects at all: everyone ends up benched, and the list still has K names.
  let last = start
  for (let t = 600_000; t < 2_000_000; t += 10_000) last = round(t, new Set()).connectTo
  assert.equal(last.length, 2)
})

test("an operator's pinned list is used as given and never changed; unknown pins are reported", () => {
  const round = driver({ self: 'me', publics: ['a', 'b', 'c', 'd'], k: 2, pinned: ['c', 'zz', 'me'] })
  for (let t = 0; t < 1_000_000; t += 50_000) {
    const plan = round(t, new Set())
    assert.deepEqual(plan.connectTo, ['c'])
    assert.deepEqual(plan.unknownPins, ['zz'], 'itself is no pin to report')
    assert.deepEqual(plan.benched, [])
  }
})

test('the node that admitted a new one stays in its list beside the K', () => {
  const pubs = ['a', 'b', 'c', 'd', 'e']
  const order = rendezvousOrder('me', pubs)
  const last = order.at(-1) ?? assert.fail()
  const plan = planConnectTo({ self: 'me', publics: pubs, k: 2, sponsor: last, now: 0, connected: new Set(pubs) }, new Map(), [])
  assert.deepEqual(plan.connectTo, [order[0], order[1], last].sort())
  assert.deepEqual(planConnectTo({ self: 'me', publics: pubs, k: 0, now: 0, connected: new Set(pubs) }, new Map(), []).connectTo, [])
})

test("the keeper benches a choice only from tincd's dump: active connections count, connecting ones don't", async () => {
  const pubs = ['a', 'b', 'c', 'd']
  const [first, second, third] = rendezvousOrder('me', pubs) as [string, string, string]
  let clock = 0
  let changes = 0
  // status 0x0002 is tinc 1.0's `active`; 0x0004 is `connecting` (a ConnectTo still trying).
  let conns = pubs.map((name) => ({ name, status: name === first ? 0x0004 : 0x0002 }))
  let up = true
  const keeper = connectToKeeper({
    self: 'me',
    k: 2,
    intervalMs: 3_600_000,
    timers,
    now: () => clock,
    readState: () => Promise.resolve(up ? { state: 'up', pid: 1, dump: { skipped: 0, connections: conns } } : { state: 'down', reason: 'not running' }),
    onChange: () => void changes++,
    log: pino({ level: 'silent' }),
  })
  try {
    assert.deepEqual(keeper.choose(pubs), [first, second].sort())
    await keeper.tick()
    clock = 59_999
    await keeper.tick()
    assert.equal(changes, 0)
    // tincd down: no observation, so the grace period passing proves nothing.
    up = false
    clock = 200_000
    await keeper.tick()
    assert.equal(changes, 0)
    up = true
    clock = 300_000
    await keeper.tick()
    assert.equal(changes, 1, 'the silent choice is replaced after a grace period of observations')
    assert.deepEqual(keeper.choose(pubs), [second, third].sort())
    assert.deepEqual(
      keeper.plan()?.benched.map((b) => b.name),
      [first],
    )
    conns = pubs.map((name) => ({ name, status: 0x0002 }))
    clock = 300_000 + timers.benchMs
    await keeper.tick()
    assert.equal(changes, 2, 'the original comes back after its bench')
    assert.deepEqual(keeper.choose(pubs), [first, second].sort())
  } finally {
    keeper.stop()
  }
})
