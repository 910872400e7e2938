import { test } from 'node:test'
import assert from 'node:assert/strict'
import { reconcile, type NodeEntry, type ReconcileInput, type ReconcileResult } from '../src/mesh/reconcile.ts'
import type { MeshView } from '../src/mesh/view.ts'
import { hostFileText } from '../src/tinc/render.ts'
import { LAYOUT, NETWORK, nodeEntry, nodeRecord, reconcileInput, rsaPublicPem } from './helpers-keys.ts'

// The reconciler's rules, one finding of issue 16 per group. Unless a comment says otherwise,
// each test fails against the old `buildView` (src/mesh/view.ts before the reconciler) fed the
// same input the way the old sync did (unread keys missing, `complete` as removalsConfirmed).

const PEM = { alpha: rsaPublicPem(), beta: rsaPublicPem(), gamma: rsaPublicPem(), self: rsaPublicPem() }
const alpha = nodeRecord('alpha', 2, PEM.alpha)
const beta = nodeRecord('beta', 3, PEM.beta)
const gamma = nodeRecord('gamma', 4, PEM.gamma)

/** A first complete read with alpha and beta accepted: the previous view of most tests. */
function established(): MeshView {
  const r = reconcile(
    undefined,
    reconcileInput([
      ['alpha', nodeEntry(alpha, 10)],
      ['beta', nodeEntry(beta, 11)],
    ]),
  )
  assert.deepEqual([...r.view.peers.keys()], ['alpha', 'beta'])
  return r.view
}

const names = (r: ReconcileResult) => [...r.view.peers.keys()].sort()
const refusal = (r: ReconcileResult, name: string) => r.refusals.find((x) => x.name === name)
const unreadable = (reason = 'HTTP 429'): NodeEntry => ({ state: 'unreadable', reason })

// Finding 1: one failed read deleted a good peer (buildView never saw the key, so the
// snapshot lacked beta and beta was removed once removals were "confirmed").
test('finding 1: an unreadable key keeps the copy accepted before, even in a complete listing', () => {
  const r = reconcile(
    established(),
    reconcileInput([
      ['alpha', nodeEntry(alpha, 10)],
      ['beta', unreadable()],
    ]),
  )
  assert.deepEqual(names(r), ['alpha', 'beta'])
  assert.deepEqual(r.removed, [])
  assert.deepEqual(r.pending, [])
  assert.equal(refusal(r, 'beta')?.kind, 'unreadable')
})

// The contract the daemon relies on (a filtered or empty listing is passed as complete: false);
// the old sync took any non-empty read as complete once the network record answered.
test('finding 1: a filtered or empty listing proves nothing, so nobody is removed', () => {
  const previous = established()
  const filtered = reconcile(previous, reconcileInput([['alpha', nodeEntry(alpha, 10)]], { complete: false }))
  assert.deepEqual(names(filtered), ['alpha', 'beta'])
  assert.deepEqual(filtered.removed, [])
  const empty = reconcile(previous, reconcileInput([], { complete: false }))
  assert.deepEqual(names(empty), ['alpha', 'beta'])
  assert.deepEqual(empty.removed, [])
  // Only a complete listing without the key is a removal.
  const gone = reconcile(previous, reconcileInput([['alpha', nodeEntry(alpha, 10)]]))
  assert.deepEqual(names(gone), ['alpha'])
  assert.deepEqual(gone.removed, ['beta'])
})

test('finding 1: at start-up an unreadable key with no copy is pending, neither accepted nor removed', () => {
  const r = reconcile(
    undefined,
    reconcileInput([
      ['alpha', nodeEntry(alpha, 10)],
      ['beta', unreadable('connection refused')],
    ]),
  )
  assert.deepEqual(names(r), ['alpha'])
  assert.deepEqual(r.pending, ['beta'])
  assert.deepEqual(r.removed, [], 'the file join wrote for beta must stay until beta can be read')
})

// Finding 2: a squatting record (another node's address) and a revoked key were judged record by
// record, with no ipam/ or revoked/, when init and join wrote host files; buildView kept a
// squatter's earlier copy.
test('finding 2: a record squatting on an allocated address is refused and its file goes', () => {
  const squatter = nodeRecord('squatter', 3, rsaPublicPem())
  const allocations = new Map([
    ['10.99.0.2', 'alpha'],
    ['10.99.0.3', 'beta'],
  ])
  const r = reconcile(
    undefined,
    reconcileInput(
      [
        ['alpha', nodeEntry(alpha, 10)],
        ['beta', nodeEntry(beta, 11)],
        ['squatter', nodeEntry(squatter, 5)],
      ],
      { allocations },
    ),
  )
  assert.deepEqual(names(r), ['alpha', 'beta'])
  assert.equal(refusal(r, 'squatter')?.kind, 'ownership')
  assert.match(refusal(r, 'squatter')?.reason ?? '', /allocated to beta/)
  assert.deepEqual(r.removed, ['squatter'], "a squatter's file left by an earlier join must be deleted")
})

test('finding 2: a revoked key is refused for a node seen for the first time (down during the revocation, no cache)', () => {
  const r = reconcile(
    undefined,
    reconcileInput(
      [
        ['alpha', nodeEntry(alpha, 10)],
        ['beta', nodeEntry(beta, 11)],
      ],
      { revoked: new Set([beta.fingerprint]) },
    ),
  )
  assert.deepEqual(names(r), ['alpha'])
  assert.match(refusal(r, 'beta')?.reason ?? '', /revoked/)
  assert.deepEqual(r.removed, ['beta'])
})

// Finding 3: buildView skipped the address check while no allocations were read, and kept a copy
// accepted in that moment after the record was refused; two records could hold one address.
test('finding 3: a kept copy that now fails an ownership rule is dropped, not kept', () => {
  // alpha was accepted before ipam/ was known (a cached view); ipam/ now gives its address to beta.
  const fromCache = reconcile(undefined, reconcileInput([['alpha', { state: 'value', value: alpha, createIndex: 10 }]], { allocations: undefined, complete: false }))
  assert.deepEqual(names(fromCache), ['alpha'])
  const r = reconcile(fromCache.view, reconcileInput([['alpha', nodeEntry(alpha, 10)]], { allocations: new Map([['10.99.0.2', 'beta']]) }))
  assert.deepEqual(names(r), [])
  assert.equal(refusal(r, 'alpha')?.kind, 'ownership')
  assert.deepEqual(r.removed, ['alpha'])
})

// Behaviour buildView had and the reconciler keeps: a refused value doesn't undo a good copy.
test('finding 3: a bad write keeps the copy accepted before, a squatting rewrite does not replace it', () => {
  const previous = established()
  const allocations = new Map([
    ['10.99.0.2', 'alpha'],
    ['10.99.0.3', 'beta'],
  ])
  const garbage: NodeEntry = { state: 'value', value: Buffer.from('{"v":1,'), createIndex: 10 }
  const bad = reconcile(
    previous,
    reconcileInput(
      [
        ['alpha', garbage],
        ['beta', nodeEntry(beta, 11)],
      ],
      { allocations },
    ),
  )
  assert.equal(bad.view.peers.get('alpha'), previous.peers.get('alpha'))
  assert.equal(refusal(bad, 'alpha')?.kind, 'invalid')
  const squat = reconcile(
    previous,
    reconcileInput(
      [
        ['alpha', nodeEntry(nodeRecord('alpha', 3, PEM.alpha), 10)],
        ['beta', nodeEntry(beta, 11)],
      ],
      { allocations },
    ),
  )
  assert.equal(squat.view.peers.get('alpha'), previous.peers.get('alpha'))
  assert.deepEqual(squat.view.peers.get('beta'), previous.peers.get('beta'))
  // The same key revoked: the copy goes too.
  const revoked = reconcile(
    previous,
    reconcileInput(
      [
        ['alpha', garbage],
        ['beta', nodeEntry(beta, 11)],
      ],
      { allocations, revoked: new Set([alpha.fingerprint]) },
    ),
  )
  assert.deepEqual(names(revoked), ['beta'])
  assert.deepEqual(revoked.removed, ['alpha'])
})

test('finding 3: without ipam/, two records with one address: the earlier CreateIndex keeps it', () => {
  const late = nodeRecord('aardvark', 2, rsaPublicPem())
  const r = reconcile(
    undefined,
    reconcileInput([
      ['aardvark', nodeEntry(late, 20)],
      ['alpha', nodeEntry(alpha, 10)],
    ]),
  )
  assert.deepEqual(names(r), ['alpha'])
  assert.match(refusal(r, 'aardvark')?.reason ?? '', /already held by alpha/)
  // Also when the newcomer is the one in the previous view's place: seniority, not order, decides.
  const r2 = reconcile(
    undefined,
    reconcileInput([
      ['aardvark', nodeEntry(late, 9)],
      ['alpha', nodeEntry(alpha, 10)],
    ]),
  )
  assert.deepEqual(names(r2), ['aardvark'])
})

// Finding 9: identity was not unique (a forged ipam/ entry let two nodes hold one address; one
// key under two names was accepted; NODE3 next to node3 broke node3's DNS name).
test('finding 9: one node per address even when ipam/ is forged to agree with the newcomer', () => {
  const previous = established()
  const forger = nodeRecord('forger', 3, rsaPublicPem())
  // ipam/10.99.0.3 rewritten to name the forger while beta still publishes that address.
  const allocations = new Map([
    ['10.99.0.2', 'alpha'],
    ['10.99.0.3', 'forger'],
  ])
  const r = reconcile(
    previous,
    reconcileInput(
      [
        ['alpha', nodeEntry(alpha, 10)],
        ['beta', nodeEntry(beta, 11)],
        ['forger', nodeEntry(forger, 30)],
      ],
      { allocations },
    ),
  )
  const holders = [...r.view.peers.values()].filter((p) => p.record.vpnAddress === '10.99.0.3')
  assert.ok(holders.length <= 1, `one holder for 10.99.0.3, got ${holders.map((p) => p.record.name).join(', ')}`)
})

test('finding 9: one key under two names: the earlier name keeps it', () => {
  const twin = nodeRecord('twin', 5, PEM.alpha)
  const r = reconcile(
    undefined,
    reconcileInput([
      ['alpha', nodeEntry(alpha, 10)],
      ['twin', nodeEntry(twin, 12)],
    ]),
  )
  assert.deepEqual(names(r), ['alpha'])
  assert.match(refusal(r, 'twin')?.reason ?? '', /already used by alpha/)
})

test('finding 9: NODE3 next to the established node3 is refused, and node3 keeps its name', () => {
  const node3 = nodeRecord('node3', 6, rsaPublicPem())
  const upper = nodeRecord('NODE3', 7, rsaPublicPem())
  // "NODE3" sorts before "node3": seniority must come from the CreateIndex, not from the name.
  const r = reconcile(
    undefined,
    reconcileInput([
      ['NODE3', nodeEntry(upper, 40)],
      ['node3', nodeEntry(node3, 12)],
    ]),
  )
  assert.deepEqual(names(r), ['node3'])
  assert.equal(refusal(r, 'NODE3')?.kind, 'ownership')
  assert.match(refusal(r, 'NODE3')?.reason ?? '', /differs only in case from node3/)
})

test('our own name, address and key are ours alone; our record is never in the view', () => {
  const self = { name: 'self', vpnAddress: '10.99.0.1', fingerprint: nodeRecord('self', 1, PEM.self).fingerprint }
  const nodes: Array<[string, NodeEntry]> = [
    ['self', nodeEntry(nodeRecord('self', 1, PEM.self), 1)],
    ['clone', nodeEntry(nodeRecord('clone', 8, PEM.self), 2)],
    ['thief', nodeEntry(nodeRecord('thief', 1, rsaPublicPem()), 3)],
    ['SELF', nodeEntry(nodeRecord('SELF', 9, rsaPublicPem()), 4)],
    ['alpha', nodeEntry(alpha, 10)],
  ]
  const r = reconcile(undefined, reconcileInput(nodes, { self }))
  assert.deepEqual(names(r), ['alpha'])
  assert.deepEqual(r.refusals.map((x) => x.name).sort(), ['SELF', 'clone', 'thief'])
  assert.ok(r.refusals.every((x) => x.kind === 'ownership'))
})

// Fails while nodeRecordSchema is .strict() (the record was refused as a whole).
test('forward compatibility: a record with a field this version does not know is accepted, and the field is never rendered', () => {
  const newer = { ...alpha, futureField: 'Proxy = exec /bin/sh' }
  const r = reconcile(undefined, reconcileInput([['alpha', nodeEntry(newer, 10)]]))
  const peer = r.view.peers.get('alpha')
  assert.ok(peer, JSON.stringify(r.refusals))
  assert.doesNotMatch(hostFileText(peer), /future|Proxy/)
})

test('keep-list names are not in the view, not refused and not removed', () => {
  const previous = established()
  const r = reconcile(
    previous,
    reconcileInput(
      [
        ['alpha', nodeEntry(alpha, 10)],
        ['beta', nodeEntry(beta, 11)],
      ],
      { keep: new Set(['beta']) },
    ),
  )
  assert.deepEqual(names(r), ['alpha'])
  assert.deepEqual(r.refusals, [])
  assert.deepEqual(r.pending, [])
})

test('new keys wait while revoked/ cannot be re-read; known ones stay', () => {
  const previous = established()
  const input = reconcileInput(
    [
      ['alpha', nodeEntry(alpha, 10)],
      ['beta', nodeEntry(beta, 11)],
      ['gamma', nodeEntry(gamma, 12)],
    ],
    { trustNewKeys: false },
  )
  const r = reconcile(previous, input)
  assert.deepEqual(names(r), ['alpha', 'beta'])
  assert.deepEqual(r.pending, ['gamma'])
  assert.deepEqual(r.newPins, [])
  assert.deepEqual(r.removed, [])
  // With revoked/ read, gamma is accepted and pinned (alpha and beta were never pinned here).
  const trusted = reconcile(previous, { ...input, trustNewKeys: true })
  assert.deepEqual(names(trusted), ['alpha', 'beta', 'gamma'])
  assert.deepEqual(
    trusted.newPins.map(([n]) => n),
    ['alpha', 'beta', 'gamma'],
  )
})

test('a pinned name keeps its key; a pin on a revoked key is spent', () => {
  const previous = established()
  const rekeyed = nodeRecord('alpha', 2, rsaPublicPem())
  const pins = new Map([['alpha', alpha.fingerprint]])
  const r = reconcile(
    previous,
    reconcileInput(
      [
        ['alpha', nodeEntry(rekeyed, 10)],
        ['beta', nodeEntry(beta, 11)],
      ],
      { pins },
    ),
  )
  assert.equal(r.view.peers.get('alpha')?.record.fingerprint, alpha.fingerprint)
  assert.match(refusal(r, 'alpha')?.reason ?? '', /pinned/)
  const spent = reconcile(
    previous,
    reconcileInput(
      [
        ['alpha', nodeEntry(rekeyed, 10)],
        ['beta', nodeEntry(beta, 11)],
      ],
      { pins, revoked: new Set([alpha.fingerprint]) },
    ),
  )
  assert.equal(spent.view.peers.get('alpha')?.record.fingerprint, rekeyed.fingerprint)
  assert.deepEqual(spent.newPins, [
    ['alpha', rekeyed.fingerprint],
    ['beta', beta.fingerprint],
  ])
})

test('keys outside nodes/<valid tinc name> are refused as invalid', () => {
  const input = reconcileInput([['alpha', nodeEntry(alpha, 10)]])
  const nodes = new Map(input.nodes)
  nodes.set(`${LAYOUT.nodesPrefix}x-up`, nodeEntry(alpha, 3))
  nodes.set(`${LAYOUT.nodesPrefix}a/b`, nodeEntry(alpha, 4))
  nodes.set(LAYOUT.nodesPrefix, { state: 'value', value: new Uint8Array(), createIndex: 1 })
  const r = reconcile(undefined, { ...input, nodes })
  assert.deepEqual(names(r), ['alpha'])
  assert.deepEqual(
    r.refusals.map((x) => [x.key.slice(LAYOUT.nodesPrefix.length), x.kind]),
    [
      ['a/b', 'invalid'],
      ['x-up', 'invalid'],
    ],
  )
})

test('the memo reuses the decoded peer for the same bytes, so unchanged peers keep their object', () => {
  const memo: NonNullable<ReconcileInput['memo']> = new Map()
  const input = reconcileInput(
    [
      ['alpha', nodeEntry(alpha, 10)],
      ['beta', nodeEntry(beta, 11)],
    ],
    { memo },
  )
  const first = reconcile(undefined, input)
  const second = reconcile(
    first.view,
    reconcileInput(
      [
        ['alpha', nodeEntry(alpha, 10)],
        ['beta', nodeEntry({ ...beta, port: 656 }, 11)],
      ],
      { memo },
    ),
  )
  assert.equal(second.view.peers.get('alpha'), first.view.peers.get('alpha'))
  assert.notEqual(second.view.peers.get('beta'), first.view.peers.get('beta'))
  // Same input, same output, with or without the memo.
  assert.deepEqual(reconcile(undefined, input), reconcile(undefined, { ...input, memo: undefined }))
  // The same bytes under a new CreateIndex (deleted and written again) are a newer record: seniority follows.
  const recreated = reconcile(
    second.view,
    reconcileInput(
      [
        ['alpha', nodeEntry(alpha, 50)],
        ['beta', nodeEntry({ ...beta, port: 656 }, 11)],
      ],
      { memo },
    ),
  )
  assert.equal(recreated.view.peers.get('alpha')?.createIndex, 50)
})

test('a changed network re-checks the copies kept from the previous view', () => {
  const previous = established()
  const moved = { ...NETWORK, cidr: '10.98.0.0/24' }
  const r = reconcile(previous, reconcileInput([['alpha', unreadable()]], { network: moved, complete: false }))
  assert.deepEqual(names(r), [])
  assert.deepEqual(r.removed, ['alpha', 'beta'])
})
