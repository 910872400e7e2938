import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createNodeToken } from '../src/consul/acl.ts'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import type { KvItem } from '../src/consul/kv.ts'
import { ConsulError } from '../src/errors.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import ipaddr from 'ipaddr.js'
import { compilePolicy, groupOf, mayReach, OPEN_POLICY, reachableGroups, type AccessPolicy, type Group } from '../src/mesh/access-policy.ts'
import { associatedWith, associationKeysNaming, groupMembers, MAX_POLICY_VALUE_BYTES, newGroupValue, parseAccessPolicy, refusalOfNew, type PolicyRead } from '../src/mesh/groups.ts'
import { isGroupName, kvLayout } from '../src/mesh/kv-layout.ts'
import { createNetwork } from '../src/mesh/network.ts'
import type { NetworkRecord } from '../src/mesh/record.ts'
import { policyScopeFor } from '../src/services/naming.ts'
import { NETWORK, nodeRecord } from './helpers-keys.ts'

const L = kvLayout('t')
const AT = '2026-11-21T00:00:00.000Z'
const NET: NetworkRecord = { v: 1, cidr: '10.20.0.0/16', cidr6: 'fd12:3456:789a:1::/64', domain: 'mesh', createdAt: AT }
const NET4: NetworkRecord = { v: 1, cidr: '10.20.0.0/16', domain: 'mesh', createdAt: AT }

let nextIndex = 100
const item = (key: string, value: unknown, createIndex = nextIndex++): KvItem => ({
  key,
  value: value instanceof Uint8Array ? value : Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)),
  modifyIndex: createIndex,
  createIndex,
})
/** A group item under a raw name (so hostile names can be written too). */
const grp = (name: string, fields: Record<string, unknown>, createIndex?: number) => item(`${L.groupsPrefix}${name}`, { v: 1, createdAt: AT, ...fields }, createIndex)
const assoc = (rest: string, value: unknown = { v: 1, at: AT }) => item(`${L.associationsPrefix}${rest}`, value)

/** The innernet-like example of docs/groups.md. */
const base = (): KvItem[] => [
  item(L.network, { ...NET }, 1),
  grp('infra', { cidr: '10.20.0.0/22', infra: true }, 10),
  grp('humans', { cidr: '10.20.16.0/20' }, 11),
  grp('engineering', { cidr: '10.20.64.0/20', cidr6: 'fd12:3456:789a:1:4000::/66' }, 12),
  grp('installations', { cidr: '10.20.128.0/20' }, 13),
  assoc('engineering+installations'),
]

const names = (r: PolicyRead) => r.policy.groups.map((g) => g.name)
const reasonOf = (r: PolicyRead, key: string) => r.refused.find((x) => x.key === key)?.reason

/** Parses base() plus `extra` and checks that `extra`'s key alone is refused, with a reason matching `why`. */
function refuses(extra: KvItem, why: RegExp): PolicyRead {
  const r = parseAccessPolicy([...base(), extra], L, NET)
  assert.deepEqual(
    r.refused.map((x) => x.key),
    [extra.key],
    `only ${extra.key} is refused`,
  )
  assert.match(reasonOf(r, extra.key) ?? '', why)
  assert.deepEqual(names(r), ['engineering', 'humans', 'infra', 'installations'], 'the good groups stay')
  return r
}

describe('kv layout', () => {
  test('group keys live under network/, names are one lower-case DNS label of at most 32 characters', () => {
    assert.equal(L.groupsPrefix, 'tinc-consul/t/network/groups/')
    assert.equal(L.group('eng-1'), 'tinc-consul/t/network/groups/eng-1')
    assert.ok(L.group('a'.repeat(32)).endsWith('a'.repeat(32)))
    for (const bad of ['', 'Eng', 'a'.repeat(33), '-a', 'a-', 'a/b', 'a+b', 'a.b', 'a_b', '../x']) {
      assert.equal(isGroupName(bad), false, bad)
      assert.throws(() => L.group(bad), { name: 'UsageError', code: 'BAD_GROUP' }, bad)
    }
  })

  test('an association has one key per pair, sorted, and never joins a group to itself', () => {
    assert.equal(L.associationsPrefix, 'tinc-consul/t/network/associations/')
    assert.equal(L.association('installations', 'engineering'), 'tinc-consul/t/network/associations/engineering+installations')
    assert.equal(L.association('engineering', 'installations'), L.association('installations', 'engineering'))
    assert.equal(L.association('b', 'a1'), `${L.associationsPrefix}a1+b`)
    assert.throws(() => L.association('eng', 'eng'), { code: 'SAME_GROUP' })
    assert.throws(() => L.association('eng', 'Inst'), { code: 'BAD_GROUP' })
    assert.throws(() => L.association('a+b', 'c'), { code: 'BAD_GROUP' })
  })
})

describe('parseAccessPolicy', () => {
  test('reads groups and associations, sorted, and the rule follows them', () => {
    const r = parseAccessPolicy(base(), L, NET)
    assert.deepEqual(r.refused, [])
    assert.deepEqual(r.policy.groups, [
      { name: 'engineering', cidr: '10.20.64.0/20', cidr6: 'fd12:3456:789a:1:4000::/66', infra: false },
      { name: 'humans', cidr: '10.20.16.0/20', infra: false },
      { name: 'infra', cidr: '10.20.0.0/22', infra: true },
      { name: 'installations', cidr: '10.20.128.0/20', infra: false },
    ])
    assert.deepEqual(r.policy.associations, [['engineering', 'installations']])
    assert.equal(mayReach(r.policy, '10.20.64.5', '10.20.128.9'), true, 'associated')
    assert.equal(mayReach(r.policy, '10.20.16.5', '10.20.64.5'), false, 'humans and engineering are not')
    assert.equal(mayReach(r.policy, '10.20.16.5', '10.20.0.1'), true, 'everyone reaches infra')
  })

  test('the same items in any order give the same policy', () => {
    const items = [...base(), grp('bad', { cidr: '10.99.0.0/24' }), assoc('zz+aa')]
    const first = parseAccessPolicy(items, L, NET)
    for (let i = 0; i < 5; i++) {
      const shuffled = [...items].sort(() => Math.random() - 0.5)
      assert.deepEqual(parseAccessPolicy(shuffled, L, NET), first)
    }
    assert.deepEqual(
      first.refused.map((x) => x.key),
      [...first.refused.map((x) => x.key)].sort(),
    )
  })

  test('no groups is the open policy; other keys under network/ are left alone, neither used nor refused', () => {
    const r = parseAccessPolicy(
      [item(L.network, NET), item(`${L.prefix}network/future/thing`, 'whatever'), item(L.groupsPrefix, ''), item(L.associationsPrefix, ''), item(`${L.prefix}networkx`, 'x')],
      L,
      NET,
    )
    assert.deepEqual(r, { policy: { groups: [], associations: [] }, refused: [] })
  })

  test('unknown fields are dropped, an unknown version refused', () => {
    const r = parseAccessPolicy([...base(), grp('newer', { cidr: '10.20.32.0/20', colour: 'blue', infra: false })], L, NET)
    assert.deepEqual(
      r.policy.groups.find((g) => g.name === 'newer'),
      { name: 'newer', cidr: '10.20.32.0/20', infra: false },
    )
    refuses(grp('newer', { v: 2, cidr: '10.20.32.0/20' }), /unknown version 2/)
    refuses(item(`${L.groupsPrefix}newer`, { cidr: '10.20.32.0/20', createdAt: AT }), /no version/)
    refuses(assoc('humans+infra', { v: 2, at: AT }), /unknown version 2/)
  })

  test('refuses bad keys', () => {
    refuses(grp('Eng', { cidr: '10.20.32.0/20' }), /not network\/groups\/<name>/)
    refuses(grp('a'.repeat(33), { cidr: '10.20.32.0/20' }), /not network\/groups\/<name>/)
    refuses(grp('x/y', { cidr: '10.20.32.0/20' }), /not network\/groups\/<name>/)
  })

  test('refuses values that are not JSON, not UTF-8, too big or off the schema', () => {
    refuses(item(`${L.groupsPrefix}x`, '{"v":1,'), /not JSON/)
    refuses(item(`${L.groupsPrefix}x`, new Uint8Array([0x7b, 0xff, 0x7d])), /not UTF-8/)
    refuses(grp('x', { cidr: '10.20.32.0/20', pad: 'p'.repeat(MAX_POLICY_VALUE_BYTES) }), /over the 1024-byte limit/)
    refuses(grp('x', {}), /cidr/)
    refuses(grp('x', { cidr: '10.20.32.0/20', infra: 'yes' }), /infra/)
    refuses(grp('x', { cidr: '10.20.32.0/20', createdAt: 'yesterday' }), /createdAt/)
    refuses(assoc('humans+infra', 'null'), /invalid record/)
  })

  test('refuses ranges that are not canonical CIDRs of the right family', () => {
    refuses(grp('x', { cidr: '10.20.32.1/20' }), /host bits/)
    refuses(grp('x', { cidr: '10.20.32.0' }), /not a CIDR/)
    refuses(grp('x', { cidr: 'fd12:3456:789a:1:8000::/66' }), /not an IPv4 range/)
    refuses(grp('x', { cidr: '10.20.32.0/20', cidr6: '10.20.48.0/20' }), /cidr6 .* not an IPv6 range/)
    refuses(grp('x', { cidr: '10.20.32.0/20', cidr6: 'FD12:3456:789A:1:8000::/66' }), /not written canonically \(fd12:3456:789a:1:8000::\/66\)/)
  })

  test('refuses ranges outside the network, and cidr6 on a network without IPv6', () => {
    refuses(grp('x', { cidr: '10.21.0.0/20' }), /not inside the network's 10\.20\.0\.0\/16/)
    refuses(grp('x', { cidr: '10.0.0.0/8' }), /not inside/)
    refuses(grp('x', { cidr: '10.20.32.0/20', cidr6: 'fd12:3456:789a:2::/66' }), /cidr6 .* not inside the network's fd12:3456:789a:1::\/64/)
    const v4only = parseAccessPolicy([grp('a', { cidr: '10.20.0.0/24' }), grp('x', { cidr: '10.20.32.0/20', cidr6: 'fd12:3456:789a:1:8000::/66' })], L, NET4)
    assert.deepEqual(names(v4only), ['a'])
    assert.match(reasonOf(v4only, `${L.groupsPrefix}x`) ?? '', /cidr6 fd12:3456:789a:1:8000::\/66 in a network without an IPv6 range/)
    // The whole network is a range like any other, when nothing else holds part of it.
    assert.deepEqual(parseAccessPolicy([grp('all', { cidr: '10.20.0.0/16' })], L, NET).refused, [])
  })

  test('overlapping groups: the older key keeps its range, then the name decides', () => {
    refuses(grp('aaa', { cidr: '10.20.64.0/24' }, 50), /cidr 10\.20\.64\.0\/24 overlaps group engineering's 10\.20\.64\.0\/20, created earlier/)
    refuses(grp('zzz', { cidr: '10.20.0.0/18' }, 50), /overlaps group infra's/)
    refuses(grp('six', { cidr: '10.20.32.0/20', cidr6: 'fd12:3456:789a:1:4000::/80' }, 50), /cidr6 .* overlaps group engineering's fd12:3456:789a:1:4000::\/66/)
    // Older wins even with the later name: the newcomer that came first in the alphabet loses.
    const older = parseAccessPolicy([grp('b', { cidr: '10.20.0.0/24' }, 1), grp('a', { cidr: '10.20.0.0/25' }, 2)], L, NET)
    assert.deepEqual(names(older), ['b'])
    assert.match(reasonOf(older, `${L.groupsPrefix}a`) ?? '', /overlaps group b's/)
    const tie = parseAccessPolicy([grp('b', { cidr: '10.20.0.0/24' }, 7), grp('a', { cidr: '10.20.0.0/25' }, 7)], L, NET)
    assert.deepEqual(names(tie), ['a'], 'same CreateIndex: the lower name')
    // A refused group holds no range: the next one may take it.
    const chain = parseAccessPolicy([grp('a', { cidr: '10.20.0.0/24' }, 1), grp('b', { cidr: '10.20.0.0/23' }, 2), grp('c', { cidr: '10.20.1.0/24' }, 3)], L, NET)
    assert.deepEqual(names(chain), ['a', 'c'])
  })

  test('refuses associations with a bad, unsorted or self-naming key, or naming a group that is missing or refused', () => {
    refuses(assoc('installations+engineering'), /not in order: .* engineering\+installations/)
    refuses(assoc('humans+humans'), /with itself/)
    refuses(assoc('humans'), /not network\/associations\/<group>\+<group>/)
    refuses(assoc('a+b+c'), /not network\/associations/)
    refuses(assoc('Humans+infra'), /not network\/associations/)
    refuses(assoc('ghost+humans'), /group ghost does not exist/)
    const r = parseAccessPolicy([...base(), grp('late', { cidr: '10.20.64.0/24' }, 99), assoc('humans+late')], L, NET)
    assert.match(reasonOf(r, `${L.associationsPrefix}humans+late`) ?? '', /group late was refused/)
    assert.deepEqual(r.policy.associations, [['engineering', 'installations']])
  })

  test('refusalOfNew judges a key to be written as the newest, by the same rules', () => {
    const items = base()
    assert.equal(refusalOfNew(items, L, NET, L.group('ops'), newGroupValue({ cidr: '10.20.32.0/20' })), undefined)
    assert.match(refusalOfNew(items, L, NET, L.group('aaa'), newGroupValue({ cidr: '10.20.64.0/24' })) ?? '', /overlaps group engineering/)
    assert.match(refusalOfNew(items, L, NET4, L.group('ops'), newGroupValue({ cidr: '10.20.32.0/20', cidr6: 'fd12:3456:789a:1:8000::/66' })) ?? '', /without an IPv6 range/)
    assert.equal(refusalOfNew(items, L, NET, L.association('humans', 'infra'), { v: 1, at: AT }), undefined)
    assert.match(refusalOfNew(items, L, NET, L.association('humans', 'ghost'), { v: 1, at: AT }) ?? '', /ghost does not exist/)
    assert.deepEqual(newGroupValue({ cidr: '10.20.32.0/20', infra: false }, new Date(AT)), { v: 1, cidr: '10.20.32.0/20', createdAt: AT })
    assert.deepEqual(newGroupValue({ cidr: '10.20.32.0/20', cidr6: 'fd12::/66', infra: true }, new Date(AT)), { v: 1, cidr: '10.20.32.0/20', cidr6: 'fd12::/66', infra: true, createdAt: AT })
  })

  test('members by VPN address; nodes in no group; IPv6 addresses in another group', () => {
    const { policy } = parseAccessPolicy(base(), L, NET)
    const m = groupMembers(policy, [
      { name: 'pub1', vpnAddress: '10.20.0.1' },
      { name: 'zed', vpnAddress: '10.20.64.9', vpnAddress6: 'fd12:3456:789a:1:4000::9' },
      { name: 'ann', vpnAddress: '10.20.64.7', vpnAddress6: 'fd12:3456:789a:1:8000::7' },
      { name: 'box', vpnAddress: '10.20.130.1' },
      { name: 'stray', vpnAddress: '10.20.200.1' },
    ])
    assert.deepEqual(Object.fromEntries(m.members), { engineering: ['ann', 'zed'], humans: [], infra: ['pub1'], installations: ['box'] })
    assert.deepEqual(m.ungrouped, ['stray'])
    assert.deepEqual(m.split, [{ node: 'ann', group: 'engineering', group6: undefined }])
    assert.deepEqual(associatedWith(policy, 'installations'), ['engineering'])
    assert.deepEqual(associatedWith(policy, 'humans'), [])
    const keys = associationKeysNaming([...base(), assoc('humans+installations'), assoc('installations+zz')], L, 'installations')
    assert.deepEqual(
      keys.map((k) => k.slice(L.associationsPrefix.length)),
      ['engineering+installations', 'humans+installations', 'installations+zz'],
    )
  })
})

const toNum = (a: ipaddr.IPv4 | ipaddr.IPv6): bigint => a.toByteArray().reduce((n, b) => (n << 8n) | BigInt(b), 0n)

/**
 * The rule of docs/groups.md written out plainly, every range parsed and every set built at each
 * question, with the range arithmetic done by hand: what the compiled form must agree with.
 */
const reference = {
  inRange(address: ipaddr.IPv4 | ipaddr.IPv6, cidr: string): boolean {
    const [net, bits] = ipaddr.parseCIDR(cidr)
    if (net.kind() !== address.kind()) return false
    const shift = BigInt((address.kind() === 'ipv4' ? 32 : 128) - bits)
    return toNum(address) >> shift === toNum(net) >> shift
  },
  groupOf(policy: AccessPolicy, address: string | undefined): Group | undefined {
    if (address === undefined || !ipaddr.isValid(address)) return undefined
    const a = ipaddr.parse(address)
    return policy.groups.find((g) => {
      const cidr = a.kind() === 'ipv6' ? g.cidr6 : g.cidr
      return cidr !== undefined && reference.inRange(a, cidr)
    })
  },
  reachable(policy: AccessPolicy, group: string | undefined): string[] {
    const infra = policy.groups.filter((g) => g.infra).map((g) => g.name)
    if (group !== undefined && infra.includes(group)) return [...new Set(policy.groups.map((g) => g.name))].sort()
    const out = new Set(infra)
    if (group !== undefined) out.add(group)
    for (const [a, b] of policy.associations) if (group !== undefined && (a === group || b === group)) out.add(a === group ? b : a)
    return [...out].sort()
  },
  mayReach(policy: AccessPolicy, a: string | undefined, b: string | undefined): boolean {
    if (policy.groups.length === 0) return true
    const [ga, gb] = [reference.groupOf(policy, a), reference.groupOf(policy, b)]
    if (ga?.infra || gb?.infra) return true
    return ga !== undefined && gb !== undefined && reference.reachable(policy, ga.name).includes(gb.name)
  },
}

/** A small seeded generator, so a failing case can be run again. */
function prng(seed: number): (n: number) => number {
  let t = seed >>> 0
  return (n) => {
    t = (t + 0x6d2b79f5) >>> 0
    let r = Math.imul(t ^ (t >>> 15), 1 | t)
    r ^= r + Math.imul(r ^ (r >>> 7), 61 | r)
    return ((r ^ (r >>> 14)) >>> 0) % n
  }
}

/** The address `offset` places into `cidr` (modulo its size: -1n is its last address). */
function addressIn(cidr: string, offset: bigint): string {
  const [net, bits] = ipaddr.parseCIDR(cidr)
  const bytes = net.toByteArray()
  const size = 1n << BigInt(bytes.length * 8 - bits)
  let n = toNum(net) + (((offset % size) + size) % size)
  for (let i = bytes.length - 1; i >= 0; i--, n >>= 8n) bytes[i] = Number(n & 255n)
  return ipaddr.fromByteArray(bytes).toString()
}

/** Random policies as a hand-made one might be: ranges that may overlap, associations naming groups that don't exist, the odd duplicate name. */
function randomPolicy(rand: (n: number) => number): { policy: AccessPolicy; addresses: Array<string | undefined> } {
  const randomBits = (n: number): bigint => {
    let x = 0n
    for (let i = 0; i < n; i++) x = (x << 1n) | BigInt(rand(2))
    return x
  }
  // A prefix of `from` to `to` bits inside `base`, at a random place in it.
  const randomRange = (base: string, from: number, to: number): string => {
    const [net, baseBits] = ipaddr.parseCIDR(base)
    const bits = from + rand(to - from + 1)
    const width = net.kind() === 'ipv4' ? 32 : 128
    return `${addressIn(base, randomBits(bits - baseBits) << BigInt(width - bits))}/${bits}`
  }
  const pool = ['infra', 'eng', 'ops', 'lab', 'guests', 'humans']
  const groups: Group[] = []
  for (let i = rand(6); i > 0; i--) {
    const g: Group = { name: pool[rand(pool.length)] ?? 'eng', cidr: randomRange('10.20.0.0/16', 16, 30), infra: rand(4) === 0 }
    if (rand(2) === 0) g.cidr6 = randomRange('fd12:3456:789a:1::/64', 64, 124)
    groups.push(g)
  }
  const names = [...pool, 'ghost']
  const associations: Array<readonly [string, string]> = []
  for (let i = rand(5); i > 0; i--) {
    const [a, b] = [names[rand(names.length)] ?? 'eng', names[rand(names.length)] ?? 'ops']
    if (a !== b) associations.push(a < b ? [a, b] : [b, a])
  }
  const addresses: Array<string | undefined> = [undefined, 'not an address', '10.20.1', '::ffff:10.20.0.1', '10.21.0.1', 'fd12:3456:789b::1']
  for (const cidr of groups.flatMap((g) => [g.cidr, ...(g.cidr6 ? [g.cidr6] : [])])) addresses.push(addressIn(cidr, 0n), addressIn(cidr, -1n), addressIn(cidr, randomBits(24)))
  for (let i = 0; i < 6; i++) addresses.push(`10.20.${rand(256)}.${rand(256)}`, `fd12:3456:789a:1::${rand(0x10000).toString(16)}`)
  return { policy: { groups, associations }, addresses }
}

describe('the compiled policy', () => {
  test('agrees with the plain rule on random policies and addresses', () => {
    for (let seed = 1; seed <= 150; seed++) {
      const rand = prng(seed)
      const { policy, addresses } = randomPolicy(rand)
      const c = compilePolicy(policy)
      const at = `seed ${seed}: ${JSON.stringify(policy)}`
      for (const a of addresses) {
        assert.equal(c.groupOf(a), reference.groupOf(policy, a), `${at}: groupOf(${a})`)
        assert.equal(groupOf(policy, a), reference.groupOf(policy, a), `${at}: groupOf(${a})`)
      }
      for (const name of [undefined, 'ghost', ...policy.groups.map((g) => g.name)]) {
        assert.deepEqual([...c.reachableGroups(name)].sort(), reference.reachable(policy, name), `${at}: reachableGroups(${name})`)
        assert.deepEqual([...reachableGroups(policy, name)].sort(), reference.reachable(policy, name), `${at}: reachableGroups(${name})`)
      }
      // Each address against a few others, both ways round: every pair of every policy would take seconds.
      for (const a of addresses)
        for (let i = 0; i < 4; i++) {
          const b = addresses[rand(addresses.length)]
          for (const [x, y] of [
            [a, b],
            [b, a],
          ]) {
            const want = reference.mayReach(policy, x, y)
            if (mayReach(policy, x, y) !== want || c.groupsMayReach(c.groupOf(x), c.groupOf(y)) !== want) assert.fail(`${at}: mayReach(${x}, ${y}) should be ${want}`)
          }
        }
    }
  })

  test('is made once per policy object; an open policy parses nothing; the public sets are copies', () => {
    const { policy } = parseAccessPolicy(base(), L, NET)
    assert.equal(compilePolicy(policy), compilePolicy(policy))
    assert.notEqual(compilePolicy({ ...policy }), compilePolicy(policy), 'another object is compiled on its own')
    const open = compilePolicy(OPEN_POLICY)
    assert.equal(open.open, true)
    assert.equal(open.groupOf('10.20.0.1'), undefined)
    assert.equal(open.mayReach('10.20.0.1', 'nonsense'), true)
    assert.deepEqual([...reachableGroups(OPEN_POLICY, 'x')], ['x'], 'as the plain rule answers')
    const mine = reachableGroups(policy, 'humans')
    mine.add('engineering')
    assert.equal(reachableGroups(policy, 'humans').has('engineering'), false)
    assert.equal(mayReach(policy, '10.20.16.5', '10.20.64.5'), false)
  })

  test('a malformed range throws where the plain rule would parse it, and only there', () => {
    const policy: AccessPolicy = {
      groups: [
        { name: 'a', cidr: '10.20.0.0/24', infra: false },
        { name: 'b', cidr: 'nonsense', cidr6: 'fd12:3456:789a:1::/80', infra: false },
      ],
      associations: [],
    }
    assert.equal(groupOf(policy, '10.20.0.5')?.name, 'a', 'found before the malformed range is reached')
    assert.throws(() => groupOf(policy, '10.20.9.9'))
    assert.equal(groupOf(policy, 'fd12:3456:789a:1::5')?.name, 'b', 'IPv6 never looks at the malformed IPv4 range')
  })
})

/** Without inherited TINC_CONSUL_* or CONSUL_HTTP_* settings, so only the test's own reach the command. */
function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const kept = Object.entries(process.env).filter(([k]) => !k.startsWith('TINC_CONSUL_') && !k.startsWith('CONSUL_HTTP_'))
  return { ...Object.fromEntries(kept), NO_COLOR: '1', ...extra }
}

test('a bad group name on the command line is a usage error before Consul is asked anything', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tinc-consul-bad-group-'))
  try {
    // Nothing listens on port 9: a command that got as far as Consul would fail otherwise.
    const env = cleanEnv({ TINC_CONSUL_CONFIG_DIR: dir, TINC_CONSUL_CONSUL: 'http://127.0.0.1:9', TINC_CONSUL_NET: 'bad' })
    const run = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { encoding: 'utf8', env })
    for (const r of [
      run('invite', '--group', 'Bad'),
      run('init', '--name', 'pub1', '--cidr', '10.98.0.0/24', '--address', '198.18.0.1', '--dir', dir, '--infra-group', 'Bad', '--infra-cidr', '10.98.0.0/28'),
    ]) {
      assert.equal(r.status, 2, r.stderr)
      assert.match(r.stderr, /a group name must be one lower-case DNS label .*got "Bad"/)
    }
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})

describe('against a dev Consul with ACLs', () => {
  const net = 'groups'
  const layout = kvLayout(net)
  const management = randomUUID()
  let consul: DevConsul
  let admin: ConsulClient
  let configDir: string

  const cli = (token: string, ...args: string[]) => {
    const env = cleanEnv({ TINC_CONSUL_CONFIG_DIR: configDir, TINC_CONSUL_CONSUL: consul.url, TINC_CONSUL_TOKEN: token, TINC_CONSUL_NET: net })
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'group', ...args], { encoding: 'utf8', env })
    return { code: r.status, out: r.stdout, err: r.stderr }
  }
  const op = (...args: string[]) => cli(management, ...args)
  const exists = async (key: string) => (await admin.kvGetOne(key)).item !== undefined

  before(async () => {
    consul = await startDevConsul({ managementToken: management })
    admin = createConsulClient({ url: consul.url, token: management })
    configDir = await mkdtemp(join(tmpdir(), 'tinc-consul-groups-'))
    await createNetwork(admin, layout, NETWORK)
    // pub1 in infra, alice in eng, bob in inst, carol in none (NETWORK is 10.99.0.0/24).
    for (const [name, octet] of [
      ['pub1', 1],
      ['alice', 70],
      ['bob', 130],
      ['carol', 200],
    ] as const)
      await admin.kvPut(layout.node(name), JSON.stringify(nodeRecord(name, octet)))
  })
  after(async () => {
    await consul?.stop()
    if (configDir) await rm(configDir, { recursive: true, force: true })
  })

  test("a node's token reads the access policy and can't write it", async () => {
    await admin.kvPut(layout.group('probe'), JSON.stringify(newGroupValue({ cidr: '10.99.0.240/28' })))
    try {
      const node = createConsulClient({ url: consul.url, token: (await createNodeToken(admin, policyScopeFor(layout, net, NETWORK), 'alice')).secretId })
      assert.ok((await node.kvGetOne(layout.group('probe'))).item, 'reads network/groups/probe')
      const listed = await node.kvList(layout.network)
      assert.equal(listed.filtered, false, "the daemon's recurse read of network sees everything")
      assert.ok(listed.items.some((i) => i.key === layout.group('probe')))
      await assert.rejects(node.kvPut(layout.group('probe'), '{}'), (err: unknown) => err instanceof ConsulError && err.status === 403)
      await assert.rejects(node.kvPut(layout.association('eng', 'probe'), '{}'), (err: unknown) => err instanceof ConsulError && err.status === 403)
      const res = await node.txn([{ KV: { Verb: 'delete', Key: layout.group('probe') } }])
      assert.equal(res.ok, false)
      // The command says why, and writes nothing.
      const r = cli((await createNodeToken(admin, policyScopeFor(layout, net, NETWORK), 'bob')).secretId, 'add', 'sneaky', '--cidr', '10.99.0.224/28')
      assert.equal(r.code, 1, r.err)
      assert.match(r.err, /only an operator \(management\) token may write/)
      assert.equal(await exists(layout.group('sneaky')), false)
    } finally {
      await admin.request('DELETE', `/v1/kv/${layout.group('probe')}`)
    }
  })

  test('group add, ls, associate, dissociate and rm, end to end', async () => {
    const open = op('ls')
    assert.equal(open.code, 0, open.err)
    assert.match(open.out, /no groups: the network is open/)

    const infra = op('add', 'infra', '--cidr', '10.99.0.0/28', '--infra')
    assert.equal(infra.code, 0, infra.err)
    assert.match(infra.out, /created group infra \(10\.99\.0\.0\/28, infrastructure\) with 1 member\(s\): pub1/)
    assert.match(infra.out, /first group/)
    for (const [name, cidr] of [
      ['eng', '10.99.0.64/26'],
      ['inst', '10.99.0.128/26'],
    ] as const) {
      const r = op('add', name, '--cidr', cidr)
      assert.equal(r.code, 0, r.err)
    }
    const stored = JSON.parse((await admin.kvGet(layout.group('eng')))?.value ?? '{}') as Record<string, unknown>
    assert.deepEqual(Object.keys(stored).sort(), ['cidr', 'createdAt', 'v'])

    // Refused before anything is written, with the reason.
    const refusals: Array<[string[], RegExp]> = [
      [['add', 'wide', '--cidr', '10.99.0.0/25'], /group wide can't be created: cidr 10\.99\.0\.0\/25 overlaps group (eng|infra)'s/],
      [['add', 'out', '--cidr', '10.98.0.0/24'], /not inside the network's 10\.99\.0\.0\/24/],
      [['add', 'eng', '--cidr', '10.99.0.192/26'], /group eng exists already/],
      [['add', 'Bad', '--cidr', '10.99.0.192/26'], /one lower-case DNS label/],
      [['add', 'hosty', '--cidr', '10.99.0.193/26'], /host bits/],
      [['add', 'six', '--cidr', '10.99.0.192/26', '--cidr6', 'fd12:3456:789a:1::/64'], /without an IPv6 range/],
      [['add', 'nocidr'], /--cidr is required/],
      [['associate', 'eng', 'ghost'], /group ghost does not exist/],
      [['associate', 'eng', 'eng'], /reaches itself/],
    ]
    for (const [args, why] of refusals) {
      const r = op(...args)
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.err}`)
      assert.match(r.err, why)
    }
    for (const name of ['wide', 'out', 'hosty', 'six']) assert.equal(await exists(layout.group(name)), false, name)

    const a = op('associate', 'inst', 'eng')
    assert.equal(a.code, 0, a.err)
    assert.equal(await exists(`${layout.associationsPrefix}eng+inst`), true)
    assert.match(op('associate', 'eng', 'inst').out, /associated already/)

    // A hostile key shows up with its reason and changes nothing else.
    await admin.kvPut(`${layout.groupsPrefix}evil`, '{"v":1,')
    const ls = op('ls', '--json')
    assert.equal(ls.code, 0, ls.err)
    const l = JSON.parse(ls.out) as {
      open: boolean
      groups: Array<{ name: string; members: string[]; associations: string[]; infra: boolean }>
      ungrouped: string[]
      refused: Array<{ key: string; reason: string }>
    }
    assert.equal(l.open, false)
    assert.deepEqual(
      l.groups.map((g) => [g.name, g.infra, g.members, g.associations]),
      [
        ['eng', false, ['alice'], ['inst']],
        ['infra', true, ['pub1'], []],
        ['inst', false, ['bob'], ['eng']],
      ],
    )
    assert.deepEqual(l.ungrouped, ['carol'])
    assert.deepEqual(l.refused, [{ key: `${layout.groupsPrefix}evil`, reason: 'value is not JSON' }])
    const table = op('ls')
    assert.match(table.out, /^eng\s+10\.99\.0\.64\/26\s+-\s+no\s+1 \(alice\)\s+inst$/m)
    assert.match(table.out, /in no group \(reach only infrastructure groups\): carol/)
    assert.match(table.out, /refused: .*evil: value is not JSON/)

    // rm refuses a group in use, unless forced; forced, it takes the associations along.
    const inUse = op('rm', 'eng')
    assert.equal(inUse.code, 2, inUse.err)
    assert.match(inUse.err, /members \(alice\).*associations \(eng\+inst\).*--force/)
    assert.equal(await exists(layout.group('eng')), true)

    assert.equal(op('dissociate', 'eng', 'inst').code, 0)
    assert.equal(await exists(`${layout.associationsPrefix}eng+inst`), false)
    const again = op('dissociate', 'inst', 'eng')
    assert.equal(again.code, 2)
    assert.match(again.err, /not associated/)

    assert.equal(op('associate', 'eng', 'inst').code, 0)
    const forced = op('rm', 'inst', '--force')
    assert.equal(forced.code, 0, forced.err)
    assert.match(forced.out, /removed group inst and 1 association\(s\); bob now in no group/)
    assert.equal(await exists(layout.group('inst')), false)
    assert.equal(await exists(`${layout.associationsPrefix}eng+inst`), false)
    assert.equal(op('rm', 'inst').code, 2, 'gone already')

    // The last group's removal opens the network again.
    await admin.request('DELETE', `/v1/kv/${layout.groupsPrefix}evil`)
    assert.equal(op('rm', 'eng', '--force').code, 0)
    const last = op('rm', 'infra', '--force')
    assert.equal(last.code, 0, last.err)
    assert.match(last.out, /the network is open again/)
  })

  test('--help names every flag and its variable', () => {
    const r = op('add', '--help')
    assert.equal(r.code, 0, r.err)
    for (const s of ['--cidr', '--cidr6', '--infra', 'TINC_CONSUL_GROUP_CIDR', 'TINC_CONSUL_GROUP_INFRA', 'TINC_CONSUL_NET']) assert.match(r.out, new RegExp(s))
    assert.doesNotMatch(op('rm', '--help').out, /TINC_CONSUL_GROUP_FORCE/, 'a destructive switch has no environment variable')
  })
})
