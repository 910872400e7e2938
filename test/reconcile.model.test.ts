import { after, test } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import { reconcile, type NodeEntry, type ReconcileInput, type ReconcileResult } from '../src/mesh/reconcile.ts'
import type { AcceptedPeer, NodeRecord } from '../src/mesh/record.ts'
import type { MeshView } from '../src/mesh/view.ts'
import { readManagedBlock } from '../src/tinc/conf-block.ts'
import { isTincName } from '../src/tinc/names.ts'
import { hostFileText, renderTinc, type RenderOptions } from '../src/tinc/render.ts'
import { LAYOUT, NETWORK, nodeRecord, rsaPublicPem, tincDirFixture } from './helpers-keys.ts'

/**
 * Model-based test of the sync core (issue 16): random sequences of KV events and read
 * faults drive the real reconciler and the real renderer over a temp directory, and after
 * every apply an oracle written from the model's own knowledge (which record is well formed,
 * who holds which address and key, what was revoked or pinned, what this read could see)
 * checks the view and every file in hosts/.
 *
 * MODEL_RUNS (default 10000) sets the number of sequences, MODEL_SEED (and MODEL_PATH, both
 * printed by fast-check on failure) replays one.
 */

const RUNS = Number(process.env.MODEL_RUNS ?? 10_000)
const SEED = process.env.MODEL_SEED === undefined ? undefined : Number(process.env.MODEL_SEED)
const PATH = process.env.MODEL_PATH

const SELF = 'me'
const KEEP = 'kept'
/** Names records are written under: a case twin (ANN), our own name (a clone), a name kept by hand. */
const NAMES = ['ann', 'bob', 'cy', 'ANN', SELF, KEEP] as const
const BAD_KEYS = ['ann', 'bob', 'ANN', 'x-up'] as const
/** Key 0 is ours. */
const PEMS = Array.from({ length: 5 }, () => rsaPublicPem())
const OCTETS = [1, 2, 3, 4, 5] as const
const vpn = (octet: number) => `10.99.0.${octet}`
const SELF_RECORD = nodeRecord(SELF, 1, PEMS[0])
const SELF_ID = { name: SELF, vpnAddress: SELF_RECORD.vpnAddress, fingerprint: SELF_RECORD.fingerprint }
const FP = PEMS.map((pem) => nodeRecord('x', 9, pem).fingerprint)

type Step = { event: Event; read: Read }
type Event =
  | { t: 'put'; name: string; key: number; octet: number; weight: number; allocate: boolean }
  | { t: 'bad'; name: string; variant: 'json' | 'schema' | 'mismatch' }
  | { t: 'del'; name: string }
  | { t: 'ipam'; octet: number; holder: string | null }
  | { t: 'revoke'; key: number }
  | { t: 'unpin'; name: string }
  | { t: 'restart'; cache: boolean; cacheKnowsRules: boolean }
  | { t: 'none' }
/** How this step's nodes/ read went; `mask` picks the keys a partial read loses. */
type Read = { mode: 'full' | 'unreadable' | 'filtered' | 'empty'; mask: number; trust: boolean }

const stepArb: fc.Arbitrary<Step> = fc.record({
  event: fc.oneof(
    {
      weight: 6,
      arbitrary: fc.record({
        t: fc.constant('put' as const),
        name: fc.constantFrom(...NAMES),
        key: fc.integer({ min: 0, max: 4 }),
        octet: fc.constantFrom(...OCTETS),
        weight: fc.integer({ min: 0, max: 2 }),
        allocate: fc.boolean(),
      }),
    },
    { weight: 1, arbitrary: fc.record({ t: fc.constant('bad' as const), name: fc.constantFrom(...BAD_KEYS), variant: fc.constantFrom('json' as const, 'schema' as const, 'mismatch' as const) }) },
    { weight: 2, arbitrary: fc.record({ t: fc.constant('del' as const), name: fc.constantFrom(...NAMES) }) },
    { weight: 1, arbitrary: fc.record({ t: fc.constant('ipam' as const), octet: fc.constantFrom(...OCTETS), holder: fc.option(fc.constantFrom(...NAMES), { nil: null }) }) },
    { weight: 1, arbitrary: fc.record({ t: fc.constant('revoke' as const), key: fc.integer({ min: 0, max: 4 }) }) },
    { weight: 1, arbitrary: fc.record({ t: fc.constant('unpin' as const), name: fc.constantFrom(...NAMES) }) },
    { weight: 1, arbitrary: fc.record({ t: fc.constant('restart' as const), cache: fc.boolean(), cacheKnowsRules: fc.boolean() }) },
    { weight: 1, arbitrary: fc.constant({ t: 'none' as const }) },
  ),
  read: fc.record({
    mode: fc.constantFrom('full' as const, 'full' as const, 'unreadable' as const, 'filtered' as const, 'empty' as const),
    mask: fc.integer({ min: 0, max: 63 }),
    // Mostly true: false when revoked/ could not be re-read before trusting a new key.
    trust: fc.oneof({ weight: 4, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
  }),
})

// ---------------------------------------------------------------- the world: Consul and the local files

/** What the model knows about a stored value: a well-formed record (and whose), or garbage. */
type Stored = { bytes: Buffer; createIndex: number; record: NodeRecord | undefined }

interface World {
  ipamMode: boolean
  kv: Map<string, Stored>
  nextIndex: number
  ipam: Map<string, string>
  revoked: Set<string>
  pins: Map<string, string>
}

const recordCache = new Map<string, { record: NodeRecord; bytes: Buffer }>()
function goodRecord(name: string, key: number, octet: number, weight: number): { record: NodeRecord; bytes: Buffer } {
  const id = `${name}|${key}|${octet}|${weight}`
  let hit = recordCache.get(id)
  if (!hit) {
    const record = nodeRecord(name, octet, PEMS[key], weight ? [`Weight = ${weight}`] : [])
    hit = { record, bytes: Buffer.from(JSON.stringify(record)) }
    recordCache.set(id, hit)
  }
  return hit
}

function put(world: World, name: string, bytes: Buffer, record: NodeRecord | undefined): void {
  const createIndex = world.kv.get(name)?.createIndex ?? world.nextIndex++
  world.kv.set(name, { bytes, createIndex, record })
}

function initialWorld(ipamMode: boolean): World {
  const world: World = { ipamMode, kv: new Map(), nextIndex: 1, ipam: new Map(), revoked: new Set(), pins: new Map() }
  for (const [name, key, octet] of [
    [SELF, 0, 1],
    ['ann', 1, 2],
    ['bob', 2, 3],
  ] as const) {
    const g = goodRecord(name, key, octet, 0)
    put(world, name, g.bytes, g.record)
    if (ipamMode) world.ipam.set(vpn(octet), name)
  }
  return world
}

function mutate(world: World, e: Event): void {
  if (e.t === 'put') {
    const g = goodRecord(e.name, e.key, e.octet, e.weight)
    put(world, e.name, g.bytes, g.record)
    // A join writes the record and takes a free address in one transaction; a hostile write doesn't.
    if (world.ipamMode && e.allocate && !world.ipam.has(vpn(e.octet))) world.ipam.set(vpn(e.octet), e.name)
  } else if (e.t === 'bad') {
    const bytes = e.variant === 'json' ? Buffer.from('{"v":1,') : e.variant === 'schema' ? Buffer.from(JSON.stringify({ v: 1, name: e.name })) : goodRecord('cy', 3, 4, 0).bytes
    put(world, e.name, bytes, undefined)
  } else if (e.t === 'del') world.kv.delete(e.name)
  else if (e.t === 'ipam') {
    if (e.holder === null) world.ipam.delete(vpn(e.octet))
    else world.ipam.set(vpn(e.octet), e.holder)
  } else if (e.t === 'revoke') world.revoked.add(FP[e.key] ?? '')
  else if (e.t === 'unpin') world.pins.delete(e.name)
}

// ---------------------------------------------------------------- the daemon, as sync drives it

interface Daemon {
  view: MeshView | undefined
  written: RenderOptions['written']
  memo: NonNullable<ReconcileInput['memo']>
  /** A complete read was applied since start: the renderer owns hosts/. */
  owned: boolean
  /** What the cache file holds: the last view from Consul, with the rules it was judged by. */
  cache: { view: MeshView; allocations: ReadonlyMap<string, string>; revoked: ReadonlySet<string> } | undefined
}

/** What one apply could see of each name: the oracle's view of the input. */
type Seen = { kind: 'unreadable' } | { kind: 'bad' } | { kind: 'good'; record: NodeRecord; createIndex: number }

interface Apply {
  input: ReconcileInput
  seen: Map<string, Seen>
  source: 'cache' | 'consul'
}

function consulApply(world: World, read: Read): Apply {
  const nodes = new Map<string, NodeEntry>()
  const seen = new Map<string, Seen>()
  const names = [...world.kv.keys()].sort()
  names.forEach((name, i) => {
    const stored = world.kv.get(name)
    if (!stored || read.mode === 'empty') return
    const lost = ((read.mask >> (i % 6)) & 1) === 1
    if (lost && read.mode === 'filtered') return
    if (lost && read.mode === 'unreadable') {
      nodes.set(LAYOUT.nodesPrefix + name, { state: 'unreadable', reason: 'HTTP 429' })
      seen.set(name, { kind: 'unreadable' })
      return
    }
    nodes.set(LAYOUT.nodesPrefix + name, { state: 'value', value: stored.bytes, createIndex: stored.createIndex })
    seen.set(name, stored.record ? { kind: 'good', record: stored.record, createIndex: stored.createIndex } : { kind: 'bad' })
  })
  const complete = (read.mode === 'full' || read.mode === 'unreadable') && nodes.size > 0
  const input: ReconcileInput = {
    layout: LAYOUT,
    network: NETWORK,
    self: SELF_ID,
    nodes,
    complete,
    allocations: world.ipamMode ? new Map(world.ipam) : new Map(),
    revoked: new Set(world.revoked),
    pins: new Map(world.pins),
    keep: new Set([KEEP]),
    trustNewKeys: read.trust,
  }
  return { input, seen, source: 'consul' }
}

function cacheApply(world: World, cache: NonNullable<Daemon['cache']>, knowsRules: boolean): Apply {
  const nodes = new Map<string, NodeEntry>()
  const seen = new Map<string, Seen>()
  for (const peer of cache.view.peers.values()) {
    nodes.set(LAYOUT.nodesPrefix + peer.record.name, { state: 'value', value: peer.record, createIndex: peer.createIndex })
    seen.set(peer.record.name, { kind: 'good', record: peer.record, createIndex: peer.createIndex })
  }
  const input: ReconcileInput = {
    layout: LAYOUT,
    network: NETWORK,
    self: SELF_ID,
    nodes,
    complete: false,
    allocations: knowsRules ? cache.allocations : undefined,
    revoked: knowsRules ? cache.revoked : undefined,
    pins: new Map(world.pins),
    keep: new Set([KEEP]),
    trustNewKeys: true,
  }
  return { input, seen, source: 'cache' }
}

// ---------------------------------------------------------------- the oracle

/** Everything in hosts/: file bytes, or 'dir'. */
type Disk = Map<string, string>

/**
 * Everything in hosts/: file bytes, or 'dir'. The files the renderer may not touch are read
 * only with `all` (at the end of a run): a write to one of them can't be undone by the
 * renderer, so it is still there to see, and reading them after every apply costs a third
 * of the run.
 */
function readDisk(hosts: string, all = false): Disk {
  const disk: Disk = new Map()
  for (const e of readdirSync(hosts, { withFileTypes: true })) {
    if (e.isDirectory()) disk.set(e.name, 'dir')
    else disk.set(e.name, !all && FOREIGN.has(e.name) ? (FOREIGN.get(e.name) ?? '') : readFileSync(join(hosts, e.name), 'utf8'))
  }
  return disk
}

/** Files that are not the renderer's to touch, with the bytes they start with. */
const FOREIGN = new Map([
  [SELF, '# our own host file\nSubnet = 10.99.0.1/32\n'],
  [KEEP, '# kept by hand\nAddress = 192.0.2.9\n'],
  ['x-up', '#!/bin/sh\n'],
  ['.junk', 'dot file'],
])

interface Judge {
  apply: Apply
  previous: MeshView | undefined
  result: ReconcileResult
  trustNew: boolean
}

type Identity = { name: string; record: NodeRecord; createIndex: number }

const sameValue = (a: Identity | undefined, b: Identity | undefined) => a !== undefined && b !== undefined && a.createIndex === b.createIndex && JSON.stringify(a.record) === JSON.stringify(b.record)
const asIdentity = (p: AcceptedPeer | undefined): Identity | undefined => (p ? { name: p.record.name, record: p.record, createIndex: p.createIndex } : undefined)

/** Whether a record may stand on its own under the rules of this apply (the model's reading of the design). */
function acceptable(j: Judge, r: NodeRecord): boolean {
  const { input } = j.apply
  if (r.vpnAddress === SELF_ID.vpnAddress || r.fingerprint === SELF_ID.fingerprint || r.name.toLowerCase() === SELF) return false
  if (input.revoked?.has(r.fingerprint)) return false
  const pin = input.pins.get(r.name)
  if (pin !== undefined && !input.revoked?.has(pin) && pin !== r.fingerprint) return false
  if (input.allocations && input.allocations.size > 0 && input.allocations.get(r.vpnAddress) !== r.name) return false
  return true
}

function trusted(j: Judge, r: NodeRecord): boolean {
  const pin = j.apply.input.pins.get(r.name)
  const pinned = pin !== undefined && !j.apply.input.revoked?.has(pin)
  return pinned || j.trustNew || j.previous?.peers.get(r.name)?.record.fingerprint === r.fingerprint
}

const currentOf = (j: Judge, name: string): Identity | undefined => {
  const s = j.apply.seen.get(name)
  return s?.kind === 'good' ? { name, record: s.record, createIndex: s.createIndex } : undefined
}

/** Seniority of a name: the CreateIndex of its first usable candidate (current value, then the kept copy), then the name. */
function rank(j: Judge, name: string): [number, string] {
  const cur = currentOf(j, name)
  if (cur && acceptable(j, cur.record) && trusted(j, cur.record)) return [cur.createIndex, name]
  const kept = j.previous?.peers.get(name)
  if (kept && acceptable(j, kept.record)) return [kept.createIndex, name]
  return [Number.POSITIVE_INFINITY, name]
}

const before = (a: [number, string], b: [number, string]) => a[0] < b[0] || (a[0] === b[0] && a[1] < b[1])
const conflicts = (a: Identity, b: Identity) =>
  a.name !== b.name && (a.record.vpnAddress === b.record.vpnAddress || a.record.fingerprint === b.record.fingerprint || a.name.toLowerCase() === b.name.toLowerCase())

/** A peer in the view that takes something `x` (under `name`) claims and is senior to `name`. */
function seniorRival(j: Judge, name: string, x: Identity): string | undefined {
  for (const p of j.result.view.peers.values()) {
    const q = asIdentity(p)
    if (q && conflicts(q, x) && before(rank(j, q.name), rank(j, name))) return q.name
  }
  return undefined
}

function checkView(j: Judge): void {
  const { view } = j.result
  const { input } = j.apply
  const taken = new Map<string, string>([
    [`a${SELF_ID.vpnAddress}`, SELF],
    [`k${SELF_ID.fingerprint}`, SELF],
    [`n${SELF}`, SELF],
  ])
  for (const [name, peer] of view.peers) {
    assert.ok(isTincName(name) && name !== SELF && name !== KEEP, `${name} must never be in the view`)
    assert.equal(peer.record.name, name)
    for (const claim of [`a${peer.record.vpnAddress}`, `k${peer.record.fingerprint}`, `n${name.toLowerCase()}`]) {
      assert.equal(taken.get(claim), undefined, `${name} and ${taken.get(claim)} both hold ${claim.slice(1)}`)
      taken.set(claim, name)
    }
    const mine = asIdentity(peer)
    const cur = currentOf(j, name)
    const kept = asIdentity(j.previous?.peers.get(name))
    assert.ok(sameValue(mine, cur) || sameValue(mine, kept), `${name}: a value this read did not show and the previous view did not hold`)
    assert.ok(acceptable(j, peer.record), `${name}: a record that is refused (revoked, pinned to another key, squatting, or ours) is in the view`)
    assert.ok(trusted(j, peer.record), `${name}: a new key was trusted while new keys wait`)
    if (!sameValue(mine, cur) && j.apply.seen.get(name) === undefined) assert.ok(!input.complete, `${name}: confirmed gone but kept`)
  }
}

function checkLivenessAndLoss(j: Judge): void {
  const { view } = j.result
  // An acceptable current value is in the view unless a senior peer holds its address, key or name.
  for (const [name] of j.apply.seen) {
    const cur = currentOf(j, name)
    if (!cur || name === KEEP || !isTincName(name) || !acceptable(j, cur.record) || !trusted(j, cur.record)) continue
    if (sameValue(asIdentity(view.peers.get(name)), cur)) continue
    assert.ok(seniorRival(j, name, cur), `${name}: an acceptable record was refused with no senior rival`)
  }
  // A peer of the previous view leaves it only when its key is confirmed gone, its copy is refused
  // now, or a senior peer took what it holds: never because a read failed, was filtered or was empty.
  for (const [name, peer] of j.previous?.peers ?? []) {
    if (view.peers.has(name)) continue
    const seen = j.apply.seen.get(name)
    if (seen === undefined && j.apply.input.complete) continue
    const kept = asIdentity(peer)
    if (kept && !acceptable(j, peer.record)) continue
    assert.ok(kept && seniorRival(j, name, kept), `${name} was lost (its key was ${seen?.kind ?? 'not listed'}, listing ${j.apply.input.complete ? 'complete' : 'incomplete'})`)
  }
}

/** Names that can't be judged now: unreadable without a usable copy, or an acceptable new key while new keys wait. */
function expectedPending(j: Judge): string[] {
  const out: string[] = []
  for (const [name, seen] of j.apply.seen) {
    if (name === SELF || name === KEEP || !isTincName(name)) continue
    if (seen.kind === 'unreadable' && !j.result.view.peers.has(name)) out.push(name)
    if (seen.kind === 'good' && acceptable(j, seen.record) && !trusted(j, seen.record)) out.push(name)
  }
  return out.sort()
}

function checkOutputs(j: Judge, again: boolean): void {
  const { result } = j
  const pending = expectedPending(j)
  assert.deepEqual(result.pending, pending, 'pending')
  const refusedOutright = [...j.apply.seen.keys()].filter((n) => n !== SELF && n !== KEEP && isTincName(n) && !result.view.peers.has(n) && !pending.includes(n))
  const gone = [...(j.previous?.peers.keys() ?? [])].filter((n) => !result.view.peers.has(n))
  assert.deepEqual(result.removed, [...new Set([...gone, ...refusedOutright])].sort(), 'removed')
  const newPins = [...result.view.peers]
    .filter(([name, p]) => sameValue(asIdentity(p), currentOf(j, name)) && j.trustNew && (j.apply.input.pins.get(name) === undefined || j.apply.input.revoked?.has(j.apply.input.pins.get(name) ?? '')))
    .map(([name, p]): [string, string] => [name, p.record.fingerprint])
  assert.deepEqual(result.newPins, newPins, 'newPins')
  const refused = new Set(result.refusals.map((r) => r.key.slice(LAYOUT.nodesPrefix.length)))
  for (const [name, seen] of j.apply.seen) {
    if (name === SELF || name === KEEP) continue
    const accepted = sameValue(asIdentity(result.view.peers.get(name)), currentOf(j, name))
    const waits = seen.kind === 'good' && pending.includes(name)
    assert.equal(refused.has(name), accepted ? false : waits ? refused.has(name) : true, `${name}: refusal reported`)
  }
  // Same input, same output; the memo changes nothing but the cost. (On a quarter of the applies: it costs a full decode.)
  if (again) assert.equal(summary(reconcile(j.previous, { ...j.apply.input, memo: undefined })), summary(result), 'deterministic, memo or not')
}

const summary = (r: ReconcileResult) =>
  JSON.stringify([[...r.view.peers].map(([n, p]) => [n, p.createIndex, p.record, p.options, p.publicKey, p.dropped]), r.refusals, r.newPins, r.removed, r.pending])

/** Every file in hosts/ is ours to have written from the view, a file we may not touch, or one left while its name waits. */
function checkDisk(j: Judge, was: Disk, now: Disk, owned: boolean): void {
  const { view, pending, removed } = j.result
  for (const [name, text] of FOREIGN) assert.equal(now.get(name), text, `${name} must never be touched`)
  assert.equal(now.get('dir'), 'dir')
  for (const [name, peer] of view.peers) assert.equal(now.get(name), hostFileText(peer), `hosts/${name} is not the render of its view peer`)
  for (const name of new Set([...was.keys(), ...now.keys()])) {
    if (FOREIGN.has(name) || name === 'dir' || view.peers.has(name)) continue
    const text = now.get(name)
    if (text !== undefined) assert.equal(text, was.get(name), `hosts/${name} was written but is not in the view`)
    // A file outside the view stays while its name waits to be judged, and, until a complete
    // read has shown the whole mesh, while nothing has been said against it.
    const waits = pending.includes(name)
    const untouchedYet = !owned && j.apply.seen.get(name) === undefined && !j.previous?.peers.has(name)
    if (text !== undefined) assert.ok(waits || untouchedYet, `hosts/${name} outlived its record (refused, revoked, squatting or gone)`)
    const stays = was.has(name) && (waits || (!owned && !removed.includes(name)))
    assert.equal(text !== undefined, stays, `hosts/${name} ${stays ? 'was deleted while its name waits to be judged' : 'should be gone'}`)
  }
}

function checkConf(view: MeshView, conf: string): void {
  assert.deepEqual(
    readManagedBlock(conf),
    [...view.peers.keys()].sort().map((n) => `ConnectTo = ${n}`),
  )
}

// ---------------------------------------------------------------- the run

let root = ''
const shm = '/dev/shm'
after(() => (root ? rm(root, { recursive: true, force: true }) : undefined))

/** hosts/ as every run starts: files we may not touch, a directory, and files left by an earlier join or run. */
const INITIAL: Disk = new Map([
  ...FOREIGN,
  ['dir', 'dir'],
  // bob's current record, and a node that left while we were away.
  ['bob', hostFileText({ record: goodRecord('bob', 2, 3, 0).record, publicKey: PEMS[2] ?? '', options: [] })],
  ['cy', '# a node that left while we were away\nSubnet = 10.99.0.4/32\n'],
])

/** Puts hosts/ back as INITIAL, touching only what the last run changed (`last`: hosts/ as it left it). */
function resetDisk(dir: string, last: Disk | undefined): Disk {
  const hosts = join(dir, 'hosts')
  if (!last) {
    rmSync(hosts, { recursive: true, force: true })
    mkdirSync(hosts)
  }
  for (const name of last?.keys() ?? []) if (!INITIAL.has(name)) rmSync(join(hosts, name), { recursive: true })
  for (const [name, text] of INITIAL) {
    if (last?.get(name) === text) continue
    if (text === 'dir') mkdirSync(join(hosts, name), { recursive: true })
    else writeFileSync(join(hosts, name), text)
  }
  writeFileSync(join(dir, 'tinc.conf'), `Name = ${SELF}\nStrictSubnets = yes\n`)
  return INITIAL
}

/** One apply as the daemon runs it, checked before and after the render; returns hosts/ as it is now. */
async function step(world: World, daemon: Daemon, dir: string, apply: Apply, was: Disk, again: boolean): Promise<Disk> {
  const hosts = join(dir, 'hosts')
  const previous = daemon.view
  const result = reconcile(previous, { ...apply.input, memo: daemon.memo })
  const j: Judge = { apply, previous, result, trustNew: apply.input.trustNewKeys && apply.input.revoked !== undefined }
  checkView(j)
  checkLivenessAndLoss(j)
  checkOutputs(j, again)
  for (const [name, fp] of result.newPins) world.pins.set(name, fp)
  if (apply.source === 'consul' && apply.input.complete) daemon.owned = true
  await renderTinc(result.view, { tincDir: dir, self: SELF, keep: new Set([KEEP]), removed: result.removed, prune: daemon.owned, pending: result.pending, written: daemon.written })
  const now = readDisk(hosts)
  checkDisk(j, was, now, daemon.owned)
  checkConf(result.view, readFileSync(join(dir, 'tinc.conf'), 'utf8'))
  daemon.view = result.view
  if (apply.source === 'consul') daemon.cache = { view: result.view, allocations: apply.input.allocations ?? new Map(), revoked: apply.input.revoked ?? new Set() }
  return now
}

interface Lane {
  dir: string
  /**
   * The reconciler's memo, shared by the lane's runs: it is a pure cache (the determinism check
   * compares against runs without it), and sharing it saves most of the decoding.
   */
  memo: NonNullable<ReconcileInput['memo']>
  /** hosts/ as the lane's last run left it. */
  disk: Disk | undefined
}

async function run(lane: Lane, ipamMode: boolean, steps: Step[]): Promise<void> {
  let disk = resetDisk(lane.dir, lane.disk)
  lane.disk = undefined // a run that throws leaves hosts/ unknown: the next one starts from scratch
  const world = initialWorld(ipamMode)
  let daemon: Daemon = { view: undefined, written: new Map(), memo: lane.memo, owned: false, cache: undefined }
  for (const { event, read } of steps) {
    mutate(world, event)
    const again = read.mask % 4 === 0
    if (event.t === 'restart') {
      // A new process: nothing in memory; the cache (if kept) is rendered before Consul answers.
      const cache = event.cache ? daemon.cache : undefined
      daemon = { view: undefined, written: new Map(), memo: lane.memo, owned: false, cache }
      if (cache) disk = await step(world, daemon, lane.dir, cacheApply(world, cache, event.cacheKnowsRules), disk, again)
    }
    disk = await step(world, daemon, lane.dir, consulApply(world, read), disk, again)
  }
  const end = readDisk(join(lane.dir, 'hosts'), true)
  for (const [name, text] of FOREIGN) assert.equal(end.get(name), text, `${name} must never be touched`)
  lane.disk = end
}

/**
 * Four lanes (MODEL_LANES), each with its own directory and seed, run side by side so one
 * lane's CPU work fills the others' waits on the file system. A replay (MODEL_SEED, and
 * MODEL_PATH for the shrunk case) runs the one lane it names.
 */
test(`model: ${RUNS} random sequences of KV events and read faults keep hosts/ right after every step`, { timeout: 600_000 }, async () => {
  root = await mkdtemp(join(existsSync(shm) ? shm : tmpdir(), 'tinc-consul-model-'))
  const base = SEED ?? Math.floor(Math.random() * 2 ** 31)
  const lanes = SEED === undefined ? Number(process.env.MODEL_LANES ?? 4) : 1
  const started = Date.now()
  let failed = false
  const outcomes = await Promise.allSettled(
    Array.from({ length: lanes }, async (_, i) => {
      const lane: Lane = { dir: await tincDirFixture(SELF, join(root, `lane${i}`)), memo: new Map(), disk: undefined }
      // Once a lane fails, the others stop doing work so its report comes out at once.
      const property = fc.asyncProperty(fc.boolean(), fc.array(stepArb, { minLength: 1, maxLength: 8 }), (ipamMode, steps) => (failed ? Promise.resolve() : run(lane, ipamMode, steps)))
      try {
        await fc.assert(property, { numRuns: Math.ceil(RUNS / lanes), seed: base + i, ...(PATH === undefined ? {} : { path: PATH }), verbose: 1 })
      } catch (err) {
        failed = true
        const cause = (err as Error).cause
        throw new Error(
          `${(err as Error).message}\nGot error: ${cause instanceof Error ? (cause.stack ?? cause.message) : String(cause)}\nReplay: MODEL_SEED=${base + i} MODEL_PATH=<path above> node --import tsx --test test/reconcile.model.test.ts`,
          { cause: err },
        )
      }
    }),
  )
  for (const o of outcomes) if (o.status === 'rejected') throw o.reason
  process.stderr.write(`# model: ${RUNS} sequences (seeds ${base}${lanes > 1 ? `..${base + lanes - 1}` : ''}) in ${((Date.now() - started) / 1000).toFixed(1)} s\n`)
})
