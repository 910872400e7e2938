import { describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { planGroups } from '../src/lab/demo-groups.ts'
import type { MatrixNode } from '../src/lab/reach-matrix.ts'
import { intToIp, ipToInt } from '../src/mesh/ipam.ts'

/**
 * planGroups() fits the demo's three groups (infra around the first node, eng and ops around runs
 * of the others) to the addresses the joins gave out. Pure: no lab. Whatever the layout, a plan
 * must hold: the ranges are canonical CIDRs inside the network, no two overlap, and each holds
 * exactly its planned members' addresses and no other node's.
 */

const nodesAt = (addresses: string[]): MatrixNode[] => addresses.map((address, i) => ({ name: `node${i + 1}`, address }))

/** "a.b.c.d/n" as its first address and size; fails unless the address is the block's first (canonical). */
function block(cidr: string): { base: number; size: number } {
  const m = /^(\d+\.\d+\.\d+\.\d+)\/(\d+)$/.exec(cidr) ?? assert.fail(`${cidr} is not a.b.c.d/n`)
  const bits = Number(m[2])
  assert.ok(bits >= 0 && bits <= 32, `${cidr}: prefix length`)
  const size = 2 ** (32 - bits)
  const base = ipToInt(m[1] ?? '')
  assert.equal(base % size, 0, `${cidr} is canonical (no host bits set): ${intToIp(Math.floor(base / size) * size)}/${bits}`)
  return { base, size }
}

const holds = (b: { base: number; size: number }, ip: string) => ipToInt(ip) >= b.base && ipToInt(ip) < b.base + b.size

/** Plans groups for `addresses` in `network` and checks every property a plan must have; returns the plan. */
function planAndCheck(addresses: string[], network: string): NonNullable<ReturnType<typeof planGroups>> {
  const nodes = nodesAt(addresses)
  const planned = planGroups(nodes, network) ?? assert.fail(`no plan for ${addresses.join(', ')} in ${network}`)
  assert.deepEqual(
    planned.map((g) => [g.name, g.infra]),
    [
      ['infra', true],
      ['eng', false],
      ['ops', false],
    ],
  )
  assert.deepEqual(planned[0]?.members, [nodes[0]], 'infra holds the first node alone')
  const net = block(network)
  const blocks = planned.map((g) => block(g.cidr))
  for (const [i, g] of planned.entries()) {
    const b = blocks[i] ?? assert.fail('a block per group')
    assert.ok(g.members.length > 0, `${g.name} has members`)
    assert.ok(b.base >= net.base && b.base + b.size <= net.base + net.size, `${g.name} ${g.cidr} is inside ${network}`)
    assert.deepEqual(
      nodes.filter((n) => holds(b, n.address)),
      g.members,
      `${g.name} ${g.cidr} holds exactly its planned members`,
    )
    for (const [j, o] of blocks.entries())
      if (j !== i) assert.ok(b.base + b.size <= o.base || o.base + o.size <= b.base, `${g.name} ${g.cidr} and ${planned[j]?.name} ${planned[j]?.cidr} don't overlap`)
  }
  return planned
}

const summary = (planned: NonNullable<ReturnType<typeof planGroups>>) => planned.map((g) => `${g.name} ${g.cidr} ${g.members.map((n) => n.name).join(',')}`)

describe('planGroups: the demo fits infra, eng and ops to the joined nodes', () => {
  test("the demo's usual layout (five nodes, addresses handed out in order): every node in a group, as evenly as CIDRs allow", () => {
    assert.deepEqual(summary(planAndCheck(['10.99.0.1', '10.99.0.2', '10.99.0.3', '10.99.0.4', '10.99.0.5'], '10.99.0.0/24')), [
      'infra 10.99.0.0/31 node1',
      'eng 10.99.0.2/31 node2,node3',
      'ops 10.99.0.4/30 node4,node5',
    ])
  })

  test('three nodes: one node per group', () => {
    assert.deepEqual(summary(planAndCheck(['10.99.0.1', '10.99.0.2', '10.99.0.3'], '10.99.0.0/24')), ['infra 10.99.0.0/31 node1', 'eng 10.99.0.2/32 node2', 'ops 10.99.0.3/32 node3'])
  })

  test('more nodes, in a network just big enough: the ranges stay inside it', () => {
    planAndCheck(['10.99.0.1', '10.99.0.2', '10.99.0.3', '10.99.0.4', '10.99.0.5', '10.99.0.6', '10.99.0.7'], '10.99.0.0/24')
    planAndCheck(['10.99.0.1', '10.99.0.2', '10.99.0.3', '10.99.0.4', '10.99.0.5', '10.99.0.6'], '10.99.0.0/29')
  })

  test('scattered addresses, out of order: groups hold what fits, the rest stays in no group', () => {
    const planned = planAndCheck(['10.99.0.9', '10.99.0.3', '10.99.0.200', '10.99.0.17', '10.99.0.4', '10.99.0.100'], '10.99.0.0/24')
    const grouped = planned.flatMap((g) => g.members.map((n) => n.name))
    assert.equal(new Set(grouped).size, grouped.length, 'no node is in two groups')
  })

  test('no plan: fewer than three nodes, an address outside the network, or not IPv4', () => {
    assert.equal(planGroups(nodesAt(['10.99.0.1', '10.99.0.2']), '10.99.0.0/24'), undefined)
    assert.equal(planGroups(nodesAt(['10.98.0.1', '10.99.0.2', '10.99.0.3']), '10.99.0.0/24'), undefined)
    assert.equal(planGroups(nodesAt(['10.99.0.1', 'fd00::2', '10.99.0.3']), '10.99.0.0/24'), undefined)
  })
})
