import assert from 'node:assert/strict'
import { test } from 'node:test'
import { approvalKeySuffix, type Approval } from '../src/mesh/routes.ts'
import { takesTrustAway } from '../src/mesh/daemon/core.ts'

// Which judgements reach the cache soon (src/mesh/daemon/core.ts): those that take trust away,
// so a restart from the cache never trusts what Consul no longer does.

const approval = (node: string, cidr: string): Approval => ({ node, cidr, at: '2026-12-01T00:00:00.000Z', createIndex: 1 })
const keys = (...a: Approval[]) => new Set(a.map((x) => approvalKeySuffix(x.node, x.cidr)))
const same = { removed: [], revoked: new Set<string>(['fp1']) }

test('an approval withdrawn takes trust away even when another is given at once (the count stays)', () => {
  const [a, b] = [approval('alpha', '192.168.1.0/24'), approval('beta', '192.168.2.0/24')]
  assert.equal(takesTrustAway(same, same, keys(a), [b]), true)
  assert.equal(takesTrustAway(same, same, keys(a), [a, b]), false, 'a new approval adds trust')
  assert.equal(takesTrustAway(same, same, keys(a, b), [b]), true)
  assert.equal(takesTrustAway(same, same, undefined, [a]), false)
})

test('a peer removed, or a key revoked instead of another, takes trust away', () => {
  assert.equal(takesTrustAway(same, { removed: ['gone'], revoked: same.revoked }, undefined, undefined), true)
  assert.equal(takesTrustAway(same, { removed: [], revoked: new Set(['fp2']) }, undefined, undefined), true, 'same count, another key')
  assert.equal(takesTrustAway(same, { removed: [], revoked: new Set() }, undefined, undefined), false, 'a revocation withdrawn gives trust')
  assert.equal(takesTrustAway(undefined, same, undefined, undefined), true)
})
