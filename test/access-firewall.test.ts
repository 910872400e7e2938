import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync } from 'node:fs'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, describe, test, type TestContext } from 'node:test'
import ipaddr from 'ipaddr.js'
import { pino } from 'pino'
import { compilePolicy, mayReach, OPEN_POLICY, type AccessPolicy } from '../src/mesh/access-policy.ts'
import { accessFirewall, accessPlan, accessScript, accessTable, CONSUL_PORTS, describeNftFailure, ownGroup, type AccessInput } from '../src/mesh/daemon/access-firewall.ts'
import { CommandError, TincConsulError } from '../src/errors.ts'
import { listNamespaces } from '../src/lab/netns.ts'
import { run } from '../src/util/exec.ts'
import { accessFollower } from '../src/mesh/daemon/access-follow.ts'
import type { PolicyRead } from '../src/mesh/groups.ts'
import type { AcceptedPeer } from '../src/mesh/record.ts'
import type { OwnIdentity } from '../src/mesh/reconcile.ts'
import type { MeshView } from '../src/mesh/view.ts'
import { NETWORK, nodeRecord, rsaPublicPem } from './helpers-keys.ts'
import { quiet, recordingNft } from './sync-fixture.ts'

// The access table (src/mesh/daemon/access-firewall.ts): the compiled script, the keeper around
// nft, the follower that feeds it and DNS (src/mesh/daemon/access-follow.ts), and the script
// loaded into a real kernel in a namespace of its own.

const POLICY: AccessPolicy = {
  groups: [
    { name: 'infra', cidr: '10.99.0.0/27', cidr6: 'fd42:7e57:1ab::/112', infra: true },
    { name: 'office', cidr: '10.99.0.32/27', cidr6: 'fd42:7e57:1ab::1:0/112', infra: false },
    { name: 'lab', cidr: '10.99.0.64/27', cidr6: 'fd42:7e57:1ab::2:0/112', infra: false },
    { name: 'guests', cidr: '10.99.0.96/27', infra: false },
  ],
  associations: [['lab', 'office']],
}
const OFFICE = '10.99.0.40'
const input = (over: Partial<AccessInput> = {}): AccessInput => ({ iface: 'tinc0', policy: POLICY, selfAddress: OFFICE, ...over })
const script = (over: Partial<AccessInput> = {}): string => accessScript({ net: 'home', ...input(over) })

/** The rules of one chain, as the script writes them. */
function chainLines(text: string, chain: 'input' | 'forward'): string[] {
  const body = new RegExp(`chain ${chain} \\{\\n([^}]*(?:\\{[^}]*\\}[^}]*)*)\\n  \\}`).exec(text)?.[1]
  assert.ok(body !== undefined, `no ${chain} chain in\n${text}`)
  return body
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('type '))
}

/** The source ranges a chain accepts, per family. */
function accepted(text: string, family: 'ip' | 'ip6', chain: 'input' | 'forward' = 'input'): string[] {
  const out: string[] = []
  for (const line of chainLines(text, chain)) {
    const m = new RegExp(`^iifname "[^"]+" ${family} saddr (?:\\{ ([^}]+) \\}|(\\S+)) accept$`).exec(line)
    if (m) out.push(...(m[1] ?? m[2] ?? '').split(', '))
  }
  return out.sort()
}

/** A host address inside a CIDR (its network address plus 5), to ask mayReach about the group it stands for. */
function hostIn(cidr: string): string {
  const bytes = ipaddr.parseCIDR(cidr)[0].toByteArray()
  bytes[bytes.length - 1] = (bytes.at(-1) ?? 0) + 5
  return ipaddr.fromByteArray(bytes).toString()
}

const removal = (net: string) => `table inet ${accessTable(net)} {}\ndelete table inet ${accessTable(net)}\n`

describe('accessScript', () => {
  test('a network without groups, and an infrastructure node, get the table removed', () => {
    assert.equal(accessTable('home'), 'tinc-consul-home-access')
    assert.equal(accessScript({ net: 'home', ...input({ policy: OPEN_POLICY }) }), removal('home'))
    assert.equal(script({ selfAddress: '10.99.0.3' }), removal('home'), 'an infra node is reached by every node, grouped or not')
    assert.ok(mayReach(POLICY, '10.99.0.3', '10.99.1.77'), 'the rule this follows')
  })

  test('a node accepts exactly the groups mayReach allows, in both chains, on the tinc interface only', () => {
    const text = script()
    assert.match(text, /^table inet tinc-consul-home-access \{\}\ndelete table inet tinc-consul-home-access\ntable inet tinc-consul-home-access \{\n {2}comment "managed by tinc-consul/)
    const want = POLICY.groups.filter((g) => mayReach(POLICY, OFFICE, hostIn(g.cidr))).map((g) => g.cidr)
    assert.ok(want.length > 0 && want.length < POLICY.groups.length, 'the example must both allow and refuse')
    assert.deepEqual(accepted(text, 'ip'), want.sort())
    assert.ok(!text.includes('10.99.0.96/27'), 'guests are not associated with office')
    assert.deepEqual(chainLines(text, 'forward'), chainLines(text, 'input'))
    const lines = chainLines(text, 'input')
    for (const l of lines) assert.match(l, /^iifname "tinc0" /)
    assert.match(lines[0] ?? '', /ct state established,related accept$/)
    assert.equal(lines.at(-1), 'iifname "tinc0" counter drop')
    const invalid = lines.findIndex((l) => l.endsWith('ct state invalid drop'))
    const nd = lines.findIndex((l) => l.includes('nd-neighbor-solicit'))
    assert.ok(nd >= 0 && invalid > nd, 'neighbour discovery is accepted before invalid packets are dropped')
    assert.ok(lines.includes(`iifname "tinc0" tcp dport { ${CONSUL_PORTS.tcp.join(', ')} } accept`))
    assert.ok(lines.includes(`iifname "tinc0" udp dport ${CONSUL_PORTS.udp.join(', ')} accept`))
    assert.deepEqual(accessPlan(POLICY, OFFICE), {
      open: false,
      group: 'office',
      groups: ['infra', 'lab', 'office'],
      cidrs4: want,
      cidrs6: ['fd42:7e57:1ab::/112', 'fd42:7e57:1ab::1:0/112', 'fd42:7e57:1ab::2:0/112'],
    })
  })

  test('IPv6: the groups with a cidr6 are accepted; the IPv4 address alone places the node', () => {
    const text = script({ selfAddress: '10.99.0.70' })
    const want6 = POLICY.groups.filter((g) => g.cidr6 !== undefined && mayReach(POLICY, '10.99.0.70', hostIn(g.cidr6))).map((g) => g.cidr6 ?? '')
    assert.deepEqual(accepted(text, 'ip6'), want6.sort())
    assert.deepEqual(accepted(text, 'ip'), ['10.99.0.0/27', '10.99.0.32/27', '10.99.0.64/27'])
    // Membership is the IPv4 address (docs/groups.md): the table, DNS and status all ask ownGroup.
    const c = compilePolicy(POLICY)
    assert.equal(ownGroup(c, '10.99.0.70')?.name, 'lab')
    assert.equal(ownGroup(c, 'fd42:7e57:1ab::2:9'), undefined, 'an IPv6 address places a node in no group')
    assert.equal(ownGroup(c, '10.99.1.9'), undefined)
    assert.deepEqual(accessPlan(POLICY, '10.99.1.9'), { open: false, group: undefined, groups: ['infra'], cidrs4: ['10.99.0.0/27'], cidrs6: ['fd42:7e57:1ab::/112'] })
    const onlyV4 = script({ policy: { ...POLICY, groups: POLICY.groups.map(({ cidr6: _, ...g }) => g) } })
    assert.ok(!onlyV4.includes('ip6 saddr'), 'no IPv6 ranges, no IPv6 rule')
  })

  test('a node that may be reached by no group keeps established traffic and Consul, and drops the rest', () => {
    const policy: AccessPolicy = { groups: POLICY.groups.filter((g) => !g.infra), associations: [] }
    const lines = chainLines(accessScript({ net: 'home', ...input({ policy, selfAddress: '10.99.0.200' }) }), 'input')
    assert.ok(!lines.some((l) => / saddr /.test(l)), lines.join('\n'))
    assert.ok(lines.some((l) => l.includes('ct state established,related accept')))
    assert.ok(lines.some((l) => l.includes('tcp dport')) && lines.some((l) => l.includes('udp dport')))
    assert.equal(lines.at(-1), 'iifname "tinc0" counter drop')
    const none = chainLines(script({ consulPorts: { tcp: [], udp: [8301] } }), 'input')
    assert.ok(!none.some((l) => l.includes('tcp dport')) && none.includes('iifname "tinc0" udp dport 8301 accept'))
  })

  test('an interface name, range, port or network name that is not safe for nft is refused', () => {
    const refused = (over: Partial<AccessInput>, net = 'home') =>
      assert.throws(
        () => accessScript({ net, ...input(over) }),
        (e: unknown) => e instanceof TincConsulError && e.code === 'ACCESS_FIREWALL_INPUT',
        JSON.stringify(over),
      )
    for (const iface of ['', 'a'.repeat(16), '..', 'tinc 0', 'tinc0" accept; flush ruleset #', 'eth0/1']) refused({ iface })
    assert.doesNotThrow(() => script({ iface: 'a'.repeat(15) }))
    assert.doesNotThrow(() => script({ iface: 'tinc-home.2' }))
    const withGroup = (cidr: string, cidr6?: string): Partial<AccessInput> => ({
      policy: { ...POLICY, groups: [...POLICY.groups.filter((g) => g.name !== 'office'), { name: 'office', cidr, ...(cidr6 ? { cidr6 } : {}), infra: false }] },
    })
    for (const cidr of ['10.99.0.33/27', '10.99.0.32/27 } accept; flush ruleset #', '10.99.0.32', 'fd42::/64']) refused(withGroup(cidr))
    for (const cidr6 of ['10.99.0.32/27', 'FD42:7E57:1AB::1:0/112', 'fd42::1:0/112 } accept']) refused(withGroup('10.99.0.32/27', cidr6))
    refused({ consulPorts: { tcp: [0], udp: [] } })
    refused({ consulPorts: { tcp: [8300], udp: [70000] } })
    refused({}, 'home; flush ruleset')
  })
})

/** A logger whose lines the test reads. */
function recordingLog() {
  const lines: Array<{ level: number; msg: string; reason?: string }> = []
  const log = pino({ level: 'info', base: undefined }, { write: (s: string) => void lines.push(JSON.parse(s)) })
  return { log, lines, errors: () => lines.filter((l) => l.level >= 50) }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

/** Moves the mocked interval timers on (setTimeout stays real), then lets the attempts they started finish. */
async function tick(t: TestContext, ms: number): Promise<void> {
  t.mock.timers.tick(ms)
  await sleep(5)
}

const EPERM = () => new CommandError('nft -f - failed (exit 1): Error: Could not process rule: Operation not permitted', 1, 'Operation not permitted')
const ENOENT = () => new CommandError('cannot run nft: spawn nft ENOENT', null, '')

describe('the access firewall keeper', () => {
  test('nft runs at the first apply (an earlier run may have left a table) and then only on a change', async () => {
    const { calls, nft } = recordingNft()
    const { log } = recordingLog()
    const fw = accessFirewall({ net: 'home', log, enforce: true, nft })
    await fw.apply(input({ policy: OPEN_POLICY }))
    assert.deepEqual(calls, [removal('home')])
    assert.equal(fw.state().mode, 'open')
    await fw.apply(input({ policy: OPEN_POLICY }))
    assert.equal(calls.length, 1)
    await fw.apply(input())
    await fw.apply(input())
    assert.equal(calls.length, 2)
    assert.equal(calls[1], script())
    const s = fw.state()
    assert.equal(s.mode, 'enforced')
    assert.equal(s.table, 'tinc-consul-home-access')
    assert.deepEqual(s.allowedGroups, ['infra', 'lab', 'office'])
    await fw.apply(input({ selfAddress: '10.99.0.100' }))
    assert.equal(calls.length, 3)
    assert.deepEqual(fw.state().allowedGroups, ['guests', 'infra'])
    fw.stop()
    await fw.apply(input({ policy: OPEN_POLICY }))
    assert.equal(calls.length, 3, 'stopped: the table stays as it is')
  })

  test('a failed load says so loudly, is retried by the 30 s timer (an apply of the same script does not run nft), and recovers', async (t) => {
    t.mock.timers.enable({ apis: ['setInterval'] })
    const rec = recordingNft(EPERM())
    const calls = rec.calls
    const { log, errors, lines } = recordingLog()
    const fw = accessFirewall({ net: 'home', log, enforce: true, nft: rec.nft })
    await fw.apply(input())
    const failed = fw.state()
    assert.equal(failed.mode, 'failed')
    assert.match(failed.reason ?? '', /root/)
    assert.equal(errors().length, 1)
    assert.match(errors()[0]?.msg ?? '', /NOT ENFORCED/)
    for (let i = 0; i < 3; i++) await fw.apply(input())
    assert.equal(calls.length, 1, 'the daemon applies at every change of the view: the same failed script waits for the timer')
    assert.equal(errors().length, 1, 'the same reason is not logged again at once')
    await tick(t, 29_999)
    assert.equal(calls.length, 1)
    rec.fail = ENOENT()
    await tick(t, 1)
    assert.equal(calls.length, 2, 'the timer retried')
    assert.match(fw.state().reason ?? '', /not installed/)
    assert.equal(errors().length, 2, 'a new reason is logged')
    await fw.apply(input({ selfAddress: '10.99.0.100' }))
    assert.equal(calls.length, 3, 'a changed script runs at once')
    await fw.apply(input())
    assert.equal(calls.length, 4, 'and so does the earlier one, once another has failed since')
    rec.fail = undefined
    const before = calls.length
    await tick(t, 30_000)
    assert.ok(calls.length > before, 'the timer retried')
    assert.equal(fw.state().mode, 'enforced')
    assert.ok(lines.some((l) => /loaded again/.test(l.msg)))
    const settled = calls.length
    await tick(t, 90_000)
    assert.equal(calls.length, settled, 'the timer stops once loaded')
    fw.stop()
  })

  test('a removal that fails while our table is there is a failure: not recorded as done, retried by the timer, never "open"', async (t) => {
    t.mock.timers.enable({ apis: ['setInterval'] })
    const rec = recordingNft()
    const { log, errors } = recordingLog()
    const fw = accessFirewall({ net: 'home', log, enforce: true, nft: rec.nft })
    await fw.apply(input())
    assert.equal(fw.loaded(), true)
    rec.fail = EPERM()
    await fw.apply(input({ policy: OPEN_POLICY }))
    assert.deepEqual(rec.calls.slice(1), [removal('home')])
    assert.equal(fw.state().mode, 'failed')
    assert.match(fw.state().reason ?? '', /earlier policy.*root/)
    assert.equal(fw.loaded(), true, 'the table is still there')
    assert.match(errors()[0]?.msg ?? '', /NOT REMOVED/)
    await fw.apply(input({ policy: OPEN_POLICY }))
    assert.equal(rec.calls.length, 2, 'not run again by an apply')
    await tick(t, 30_000)
    assert.equal(rec.calls.length, 3, 'the timer retries the removal')
    assert.equal(fw.state().mode, 'failed', 'still failed, not open')
    rec.fail = undefined
    await tick(t, 30_000)
    assert.equal(rec.calls.length, 4)
    assert.equal(fw.state().mode, 'open')
    assert.equal(fw.loaded(), false)
    await tick(t, 90_000)
    assert.equal(rec.calls.length, 4, 'the timer stops once the table is gone')
    fw.stop()

    // A table an earlier run left (the follower's marker) counts the same.
    const left = recordingNft(ENOENT())
    const restarted = accessFirewall({ net: 'home', log, enforce: true, nft: left.nft })
    await restarted.apply(input({ policy: OPEN_POLICY, tableLeft: true }))
    assert.equal(restarted.state().mode, 'failed')
    assert.equal(restarted.loaded(), undefined)
    restarted.stop()
  })

  test('a policy that is not safe to load is not loaded: the previous table stays and the state says failed', async () => {
    const { calls, nft } = recordingNft()
    const { log, errors } = recordingLog()
    const fw = accessFirewall({ net: 'home', log, enforce: true, retryMs: 60_000, nft })
    await fw.apply(input())
    await fw.apply(input({ iface: 'tinc0"; flush ruleset' }))
    assert.equal(calls.length, 1)
    assert.equal(fw.state().mode, 'failed')
    assert.match(fw.state().reason ?? '', /refused the policy/)
    assert.equal(errors().length, 1)
    await fw.apply(input())
    assert.equal(calls.length, 1, 'the loaded table already matches')
    assert.equal(fw.state().mode, 'enforced')
    fw.stop()
    assert.throws(() => accessFirewall({ net: 'a b', log, enforce: true }), TincConsulError, 'a network name is checked at once')
  })

  test('an open network where nft cannot run warns once and stays open: nothing needs filtering', async () => {
    const { calls, nft } = recordingNft(new CommandError('cannot run nft: spawn nft ENOENT', null, ''))
    const { log, errors, lines } = recordingLog()
    const fw = accessFirewall({ net: 'home', log, enforce: true, retryMs: 10, nft })
    await fw.apply(input({ policy: OPEN_POLICY }))
    await fw.apply(input({ policy: OPEN_POLICY }))
    await sleep(50)
    assert.equal(calls.length, 1, 'no retries for an open network')
    assert.equal(fw.state().mode, 'open')
    assert.match(fw.state().reason ?? '', /stale table failed: nft is not installed/)
    assert.equal(errors().length, 0)
    assert.equal(lines.filter((l) => l.level === 40).length, 1)
    await fw.apply(input())
    assert.equal(fw.state().mode, 'failed', 'once there are groups to enforce, the same failure is loud')
    assert.equal(errors().length, 1)
    fw.stop()
  })

  test('enforcement off: the table is removed once, the state says off, and nothing is loaded', async () => {
    const { calls, nft } = recordingNft()
    const { log, lines } = recordingLog()
    const fw = accessFirewall({ net: 'home', log, enforce: false, nft })
    assert.equal(fw.state().mode, 'off')
    await fw.apply(input())
    await fw.apply(input({ selfAddress: '10.99.0.100' }))
    assert.deepEqual(calls, [removal('home')])
    assert.equal(fw.state().mode, 'off')
    assert.ok(lines.some((l) => l.level === 40 && /enforcement is off/.test(l.msg)))
  })

  test('failure reasons in plain words', () => {
    assert.match(describeNftFailure(new CommandError('cannot run nft: spawn nft ENOENT', null, '')), /not installed/)
    assert.match(describeNftFailure(new CommandError('nft -f - failed (exit 1): netlink: Error: cache initialization failed: Operation not permitted', 1, '')), /root/)
    assert.match(describeNftFailure(new CommandError('nft -f - failed (exit 1): Error: syntax error, unexpected }', 1, 'Error: syntax error')), /nft refused the rules: .*syntax error/)
  })
})

describe('the access follower', () => {
  const pem = rsaPublicPem()
  const peer = (name: string, octet: number): AcceptedPeer => ({ record: nodeRecord(name, octet, pem), publicKey: pem, options: [], dropped: [], createIndex: 1 })
  // NETWORK is 10.99.0.0/24: office2 (.41) in office, lab1 (.70) in lab, guest (.100) in guests, pub (.3) in infra, stray (.200) in none.
  const VIEW: MeshView = { network: NETWORK, peers: new Map([peer('office2', 41), peer('lab1', 70), peer('guest', 100), peer('pub', 3), peer('stray', 200)].map((p) => [p.record.name, p])) }
  const dirs: string[] = []
  after(async () => {
    for (const d of dirs) await rm(d, { recursive: true, force: true })
  })

  async function follower(o: { read: () => PolicyRead | undefined; self?: () => OwnIdentity; iface?: () => Promise<string>; fail?: Error; markerLeft?: boolean }) {
    const stateDir = await mkdtemp(join(tmpdir(), 'tc-access-follow-'))
    dirs.push(stateDir)
    const marker = join(stateDir, 'access-table')
    if (o.markerLeft) await writeFile(marker, 'left by an earlier run\n')
    const rec = recordingNft(o.fail)
    const firewall = accessFirewall({ net: 'home', log: quiet, enforce: true, nft: rec.nft })
    const f = accessFollower({ stateDir, firewall, iface: o.iface ?? (async () => 'tinc0'), policy: o.read, self: o.self ?? (() => ({ name: 'me', vpnAddress: OFFICE })), log: quiet })
    return { f, firewall, calls: rec.calls, rec, marker }
  }

  test('hides exactly the peers mayReach refuses, and judges a view once per view, policy and address', async () => {
    let read: PolicyRead = { policy: POLICY, refused: [] }
    let self: OwnIdentity = { name: 'me', vpnAddress: OFFICE }
    const { f } = await follower({ read: () => read, self: () => self })
    const want = (address: string) => [...VIEW.peers.values()].filter((p) => !mayReach(read.policy, address, p.record.vpnAddress)).map((p) => p.record.name)
    assert.deepEqual(want(OFFICE).sort(), ['guest', 'stray'], 'the example both shows and hides')
    const visible = f.visible(VIEW)
    assert.deepEqual([...visible.peers.keys()].sort(), ['lab1', 'office2', 'pub'])
    assert.equal(visible.network, VIEW.network)
    assert.equal(f.visible(VIEW), visible, 'the same view, policy and address: the same answer, not worked out again')
    const status = f.status(VIEW)
    assert.deepEqual(status.hidden, want(OFFICE).sort())
    assert.equal(status.group, 'office')
    status.hidden.push('changed by a caller')
    assert.deepEqual(f.status(VIEW).hidden, ['guest', 'stray'], "status hands out a copy, not the follower's own list")
    assert.equal(f.visible(VIEW), visible)

    read = { policy: { ...POLICY, associations: [...POLICY.associations, ['guests', 'office']] }, refused: [] }
    assert.deepEqual(f.status(VIEW).hidden, ['stray'], 'a new policy is judged again')
    self = { name: 'me', vpnAddress: '10.99.0.100' }
    assert.deepEqual(f.status(VIEW).hidden, want('10.99.0.100').sort(), 'so is a new address of ours')
    const copy: MeshView = { network: VIEW.network, peers: new Map(VIEW.peers) }
    assert.notEqual(f.visible(copy), f.visible(VIEW), 'and another view')
    assert.deepEqual([...f.visible(copy).peers.keys()], [...f.visible(VIEW).peers.keys()])
  })

  test('an open network: the view passes as it is, and neither the interface nor nft is asked for', async () => {
    let asked = 0
    const { f, calls } = await follower({ read: () => ({ policy: OPEN_POLICY, refused: [] }), iface: async () => `tinc${asked++}` })
    assert.equal(f.visible(VIEW), VIEW)
    assert.deepEqual(f.status(VIEW).hidden, [])
    await f.apply()
    await f.apply()
    assert.equal(asked, 0)
    assert.deepEqual(calls, [])
  })

  test('the interface is resolved once, not at every apply; a failure is logged and asked again at the next one', async () => {
    let asked = 0
    let broken = true
    let read: PolicyRead = { policy: POLICY, refused: [] }
    const { f, firewall, calls } = await follower({
      read: () => read,
      iface: async () => {
        asked++
        if (broken) throw new Error('tinc.conf unreadable')
        return 'tinc0'
      },
    })
    await f.apply()
    assert.equal(asked, 1)
    assert.equal(calls.length, 0, 'no interface, nothing loaded')
    broken = false
    await f.apply()
    assert.equal(asked, 2, 'a failure is not kept')
    assert.equal(firewall.state().mode, 'enforced')
    read = { policy: { ...POLICY, associations: [] }, refused: [] }
    for (let i = 0; i < 5; i++) await f.apply()
    assert.equal(asked, 2, 'resolved once for every later apply')
    assert.equal(calls.length, 2, 'the changed policy was loaded')
    assert.ok(calls.every((c) => c.includes('iifname "tinc0"')))
    firewall.stop()
  })

  test('the marker goes only after a removal that worked: a failed one keeps it (and the table), says failed and is retried', async (t) => {
    t.mock.timers.enable({ apis: ['setInterval'] })
    let read: PolicyRead = { policy: POLICY, refused: [] }
    const { f, firewall, rec, marker } = await follower({ read: () => read })
    await f.apply()
    assert.equal(firewall.state().mode, 'enforced')
    assert.ok(existsSync(marker), 'a table was loaded: the marker says so')
    rec.fail = ENOENT()
    read = { policy: OPEN_POLICY, refused: [] }
    await f.apply()
    assert.equal(rec.calls.at(-1), removal('home'))
    assert.equal(f.status(VIEW).firewall?.mode, 'failed')
    assert.ok(existsSync(marker), 'the table is still there, and so is the marker')
    for (let i = 0; i < 3; i++) await f.apply()
    assert.equal(rec.calls.length, 2, 'the applies do not run the failed removal again')
    rec.fail = undefined
    await tick(t, 30_000)
    assert.equal(rec.calls.length, 3, 'the 30 s timer does')
    assert.equal(firewall.state().mode, 'open')
    await f.apply()
    assert.ok(!existsSync(marker), 'gone with the table')
    assert.equal(rec.calls.length, 3)
    firewall.stop()
  })

  test('a marker an earlier run left: an open network removes the table, and a removal that fails is a failure that keeps the marker', async () => {
    const { f, firewall, calls, marker } = await follower({ read: () => ({ policy: OPEN_POLICY, refused: [] }), fail: ENOENT(), markerLeft: true })
    await f.apply()
    assert.deepEqual(calls, [removal('home')])
    assert.equal(firewall.state().mode, 'failed')
    assert.match(firewall.state().reason ?? '', /earlier policy.*not installed/)
    assert.ok(existsSync(marker))
    firewall.stop()
  })
})

// The real kernel: the compiled script in a namespace of our own, with a veth pair standing for the
// tinc interface so packets from an allowed and a refused group really arrive on it.

function kernelUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'not running as root'
  if (spawnSync('nft', ['--version']).status !== 0) return 'nft is not installed'
  if (spawnSync('ip', ['netns', 'list']).status !== 0) return '`ip netns` does not work here'
  return undefined
}

const why = kernelUnavailable()
const id = `tc-nft-${randomBytes(4).toString('hex')}`
const [NODE, PEER] = [`${id}-a`, `${id}-b`]
after(() => {
  for (const ns of [NODE, PEER]) if (listNamespaces().includes(ns)) spawnSync('ip', ['netns', 'del', ns])
})

/** Like test/lab/helpers.ts: skips loudly where it can't run, fails instead with REQUIRE_NETNS=1. */
function kernelTest(name: string, fn: () => Promise<void>): void {
  if (!why) return void test(name, { timeout: 60_000 }, fn)
  if (process.env.REQUIRE_NETNS === '1')
    return void test(name, () => {
      throw new Error(`REQUIRE_NETNS=1 but the nftables test cannot run: ${why}`)
    })
  process.stderr.write(`\n!! SKIPPING the real-kernel nftables test: ${why}. Run as root with nft installed; REQUIRE_NETNS=1 makes this a failure.\n\n`)
  test(name, { skip: `real-kernel nftables test unavailable: ${why}` }, () => {})
}

interface NftJson {
  nftables: Array<{ table?: { name: string }; chain?: { name: string; hook?: string }; rule?: { chain: string; expr: unknown[] } }>
}

/** An address as a number, to compare ranges of either family. */
const num = (addr: string): bigint =>
  ipaddr
    .parse(addr)
    .toByteArray()
    .reduce((n, b) => (n << 8n) | BigInt(b), 0n)

/** A CIDR as the first and last address it holds. */
function cidrRange(cidr: string): [bigint, bigint] {
  const [addr, bits] = ipaddr.parseCIDR(cidr)
  const size = addr.kind() === 'ipv4' ? 32 : 128
  const first = num(addr.toString())
  return [first, first + (1n << BigInt(size - bits)) - 1n]
}

/** Ranges joined where they touch or overlap, as nft prints an anonymous interval set ("10.99.0.0-10.99.0.95"). */
function merged(ranges: Array<[bigint, bigint]>): string[] {
  const out: Array<[bigint, bigint]> = []
  for (const [a, b] of [...ranges].sort((x, y) => (x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : 0))) {
    const last = out.at(-1)
    if (last && a <= last[1] + 1n) last[1] = b > last[1] ? b : last[1]
    else out.push([a, b])
  }
  return out.map(([a, b]) => `${a}-${b}`)
}

/** The addresses a chain's rules match `<family> saddr` against, as merged ranges. */
function saddrRanges(exprs: unknown[][], family: 'ip' | 'ip6'): string[] {
  const ranges: Array<[bigint, bigint]> = []
  const add = (v: unknown): void => {
    if (typeof v === 'string') ranges.push([num(v), num(v)])
    else if (v && typeof v === 'object' && 'prefix' in v) {
      const p = (v as { prefix: { addr: string; len: number } }).prefix
      ranges.push(cidrRange(`${p.addr}/${p.len}`))
    } else if (v && typeof v === 'object' && 'range' in v) {
      const [a, b] = (v as { range: [string, string] }).range
      ranges.push([num(a), num(b)])
    } else if (v && typeof v === 'object' && 'set' in v) for (const e of (v as { set: unknown[] }).set) add(e)
  }
  for (const expr of exprs)
    for (const e of expr as Array<{ match?: { left?: { payload?: { protocol: string; field: string } }; right?: unknown } }>) {
      const p = e.match?.left?.payload
      if (p?.protocol === family && p.field === 'saddr') add(e.match?.right)
    }
  return merged(ranges)
}

describe('in a real kernel', () => {
  kernelTest('the script loads, filters by source group, loads again unchanged, and the open script removes it', async () => {
    const sh = (ns: string | undefined, argv: string[], allowFailure = false) => run(argv, { ...(ns ? { netns: ns } : {}), allowFailure, timeoutMs: 15_000 })
    for (const ns of [NODE, PEER]) {
      await sh(undefined, ['ip', 'netns', 'add', ns])
      await sh(ns, ['ip', 'link', 'set', 'lo', 'up'])
    }
    await sh(NODE, ['ip', 'link', 'add', 'tinc0', 'type', 'veth', 'peer', 'name', 'peer0', 'netns', PEER])
    await sh(NODE, ['ip', 'addr', 'add', `${OFFICE}/24`, 'dev', 'tinc0'])
    await sh(NODE, ['ip', 'link', 'set', 'tinc0', 'up'])
    // One peer address in an associated group (lab), one in a group office doesn't reach (guests).
    for (const a of ['10.99.0.70/24', '10.99.0.100/24']) await sh(PEER, ['ip', 'addr', 'add', a, 'dev', 'peer0'])
    await sh(PEER, ['ip', 'link', 'set', 'peer0', 'up'])
    const ping = async (from: string) => (await sh(PEER, ['ping', '-c', '1', '-W', '1', '-I', from, OFFICE], true)).code === 0
    assert.ok((await ping('10.99.0.70')) && (await ping('10.99.0.100')), 'without the table both peers get through')

    const table = accessTable('home')
    const text = script()
    await run(['nft', '-f', '-'], { netns: NODE, input: text })
    const listed = async (): Promise<NftJson> => JSON.parse((await sh(NODE, ['nft', '-j', 'list', 'table', 'inet', table])).stdout) as NftJson
    const first = await listed()
    const items = first.nftables
    // nft 1.0.6 leaves a table's comment out of its JSON; the text listing has it.
    assert.match((await sh(NODE, ['nft', 'list', 'table', 'inet', table])).stdout, /comment "managed by tinc-consul/)
    assert.deepEqual(items.flatMap((i) => (i.chain ? [`${i.chain.name}:${i.chain.hook}`] : [])).sort(), ['forward:forward', 'input:input'])
    const plan = accessPlan(POLICY, OFFICE)
    assert.ok(!plan.open)
    for (const chain of ['input', 'forward']) {
      const rules = items.flatMap((i) => (i.rule?.chain === chain ? [i.rule] : []))
      // nft joins adjacent prefixes into ranges, so compare the addresses covered, not the text.
      assert.deepEqual(
        saddrRanges(
          rules.map((r) => r.expr),
          'ip',
        ),
        merged(plan.cidrs4.map(cidrRange)),
      )
      assert.deepEqual(
        saddrRanges(
          rules.map((r) => r.expr),
          'ip6',
        ),
        merged(plan.cidrs6.map(cidrRange)),
      )
      assert.ok(JSON.stringify(rules.at(-1)?.expr).includes('"drop"'), `${chain} ends in a drop`)
    }
    assert.ok(await ping('10.99.0.70'), 'an associated group gets through')
    assert.ok(!(await ping('10.99.0.100')), 'a group office does not reach is dropped')
    assert.match((await sh(NODE, ['nft', 'list', 'chain', 'inet', table, 'input'])).stdout, /counter packets [1-9]\d* bytes \d+ drop/)

    await run(['nft', '-f', '-'], { netns: NODE, input: text })
    const again = (await listed()).nftables.filter((i) => i.rule).map((i) => JSON.stringify({ ...i.rule, handle: undefined }))
    assert.deepEqual(
      again,
      first.nftables.filter((i) => i.rule).map((i) => JSON.stringify({ ...i.rule, handle: undefined })),
      'loading twice leaves one copy',
    )

    await run(['nft', '-f', '-'], { netns: NODE, input: accessScript({ net: 'home', ...input({ policy: OPEN_POLICY }) }) })
    assert.ok(!(await sh(NODE, ['nft', 'list', 'tables'])).stdout.includes(table), 'the open policy removes the table')
    assert.ok(await ping('10.99.0.100'), 'and every peer gets through again')
    await run(['nft', '-f', '-'], { netns: NODE, input: removal('home') })
  })
})
