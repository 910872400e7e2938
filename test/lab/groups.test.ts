import { describe, type TestContext } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { createPipeline } from '../../src/consul/http.ts'
import { MEMBER_ALIVE } from '../../src/consul/client.ts'
import { kvPath } from '../../src/consul/kv.ts'
import { waitFor, type Daemon } from '../../src/lab/daemon.ts'
import { LAB_NETNAME, type Lab } from '../../src/lab/lab.ts'
import { labConfigDir } from '../../src/lab/tinc-manual.ts'
import { groupOf, mayReach, OPEN_POLICY, type AccessPolicy, type Group } from '../../src/mesh/access-policy.ts'
import { kvLayout } from '../../src/mesh/kv-layout.ts'
import { CONNECT, groupLabel, LISTENER, listening, startListeners, takeMatrix, TCP_MATRIX, waitApplied, type MatrixNode } from '../../src/lab/reach-matrix.ts'
import { dig, labTest, useLab, withLogs } from './helpers.ts'

/**
 * Who may talk to whom (issue 20, "Proof"), on real tincd 1.0, real Consul with ACLs and real
 * nftables in the lab's namespaces. Six nodes, three groups made with the real CLI and an
 * operator token:
 *
 *   infra (--infra) 10.99.0.0/31  node1 (public; the lab's hub of ConnectTo lines)
 *   eng             10.99.0.2/31  node2, node3
 *   ops             10.99.0.4/31  node4, node5
 *   (no group)                    node6 (10.99.0.6, behind NAT)
 *
 * For every ordered pair of nodes, a TCP connection to a listener on the target's VPN address
 * and a ping over the VPN, compared with mayReach() (src/mesh/access-policy.ts): with no groups
 * (open), with the groups, after `group associate eng ops`, after `group dissociate eng ops`.
 * Between steps every node's /status must show the new policy applied before the matrix is taken.
 * The time from `dissociate` to the last node's path closing is measured and printed, never
 * asserted. Also: DNS hides the names a node may not reach; Consul's members stay alive; a node's
 * own token can't write groups or associations (403).
 *
 * Where Consul runs in the lab: every agent binds to its control address (198.19.0.x, bridge
 * "ctl" in src/lab/topology.ts), not to the tinc interface, so the access table (on tinc0) never
 * sees gossip here. "Consul stays healthy" is therefore checked as is, and the table's Consul
 * exception (TCP 8300/8301, UDP 8301 pass whatever the groups) is proved separately, with
 * listeners on those ports on a VPN address, reached from a node the groups keep out.
 */

const layout = kvLayout(LAB_NETNAME)
const NODES = ['node1', 'node2', 'node3', 'node4', 'node5', 'node6']
const vpn = (n: string): string => `10.99.0.${n.replace('node', '')}`
const PORT = 7000

const GROUPS: Group[] = [
  { name: 'eng', cidr: '10.99.0.2/31', infra: false },
  { name: 'infra', cidr: '10.99.0.0/31', infra: true },
  { name: 'ops', cidr: '10.99.0.4/31', infra: false },
]
const GROUPED: AccessPolicy = { groups: GROUPS, associations: [] }
const ASSOCIATED: AccessPolicy = { groups: GROUPS, associations: [['eng', 'ops']] }

const asOperator = (lab: Lab): string[] => [
  '--net',
  LAB_NETNAME,
  '--consul',
  'http://127.0.0.1:8500',
  '--token',
  lab.state.managementToken ?? '',
  '--config-dir',
  labConfigDir(lab.state.runDir, 'node1'),
]

/** A UDP echo on the node's VPN address (Consul's gossip port, for the exception). */
const UDP_ECHO = `
const [host, port] = process.argv.slice(1)
const s = require('node:dgram').createSocket('udp4')
s.on('message', (m, r) => s.send(m, r.port, r.address))
s.bind(Number(port), host, () => console.log('listening on udp ' + host + ':' + port))
`

/**
 * Watches one path close: waits for a connection to work ("ready <ms>"), then connects every
 * 50 ms until `fails` connections in a row fail, and prints when the first of them started
 * ("closed <ms>", this machine's clock). Gives up after `withinMs` ("still-open").
 */
const CLOSE_WATCH = `${CONNECT}
const { host, port, ms, fails, withinMs } = JSON.parse(process.argv[1])
;(async () => {
  const readyBy = Date.now() + 60000
  while (!(await once(host, port, 1000))) {
    if (Date.now() > readyBy) { console.log('never-open'); process.exit(2) }
    await sleep(100)
  }
  console.log('ready ' + Date.now())
  const deadline = Date.now() + withinMs
  let failed = 0
  let first = 0
  for (;;) {
    const t = Date.now()
    if (await once(host, port, ms)) failed = 0
    else if (failed++ === 0) first = t
    if (failed >= fails) { console.log('closed ' + first); process.exit(0) }
    if (Date.now() > deadline) { console.log('still-open'); process.exit(3) }
    await sleep(50)
  }
})()
`

/** A UDP datagram to `host:port` that must come back, up to three tries of a second. */
const UDP_PROBE = `
const { host, port } = JSON.parse(process.argv[1])
const s = require('node:dgram').createSocket('udp4')
let tries = 0
const send = () => {
  if (tries++ === 3) { process.stdout.write('no-echo'); process.exit(0) }
  s.send('probe', port, host)
  setTimeout(send, 1000)
}
s.on('message', (m) => { if (String(m) === 'probe') { process.stdout.write('echo'); process.exit(0) } })
send()
`

/** A node as the matrix module (src/lab/reach-matrix.ts) takes it. */
const matrixNode = (name: string): MatrixNode => ({ name, address: vpn(name) })
const MATRIX_NODES: MatrixNode[] = NODES.map(matrixNode)

/** Takes the matrix, prints it, and asserts both protocols equal mayReach() for every ordered pair. */
async function checkMatrix(t: TestContext, lab: Lab, title: string, policy: AccessPolicy): Promise<void> {
  const { lines, diffs } = await takeMatrix(lab, MATRIX_NODES, policy, title, PORT)
  for (const line of lines) t.diagnostic(line)
  assert.deepEqual(diffs, [], `${title}: the matrix differs from mayReach()`)
}

async function groupLs(
  lab: Lab,
): Promise<{ groups: Array<{ name: string; cidr: string; infra: boolean; members: string[]; associations: string[] }>; associations: string[][]; ungrouped: string[]; refused: unknown[] }> {
  return JSON.parse((await lab.cli('node1', ['group', 'ls', '--json', ...asOperator(lab)])).stdout) as Awaited<ReturnType<typeof groupLs>>
}

const resolves = async (lab: Lab, at: string, name: string): Promise<boolean> => (await dig(lab, at, `@${vpn(at)}`, '+short', `${name}.mesh`)).trim() === vpn(name)
const nxdomain = async (lab: Lab, at: string, name: string): Promise<boolean> => /status: NXDOMAIN/.test(await dig(lab, at, `@${vpn(at)}`, `${name}.mesh`))

/** Waits until `at`'s DNS answers (or hides) each name as `policy` says. */
async function dnsFollows(lab: Lab, policy: AccessPolicy, at: string, names: string[]): Promise<string[]> {
  const lines: string[] = []
  for (const name of names) {
    const reach = mayReach(policy, vpn(at), vpn(name))
    await waitFor(
      `${at}'s DNS to ${reach ? `resolve ${name}.mesh to ${vpn(name)}` : `answer NXDOMAIN for ${name}.mesh`}`,
      async () => ((reach ? await resolves(lab, at, name) : await nxdomain(lab, at, name)) ? true : undefined),
      {
        timeoutMs: 30_000,
        intervalMs: 200,
      },
    )
    lines.push(`${at} (${groupLabel(policy, matrixNode(at))}) asks ${name}.mesh (${groupLabel(policy, matrixNode(name))}): ${reach ? vpn(name) : 'NXDOMAIN'}`)
  }
  return lines
}

async function consulHealthy(t: TestContext, lab: Lab, when: string): Promise<void> {
  const members = await lab.consul('consul1').members()
  const notAlive = members.filter((m) => m.status !== MEMBER_ALIVE).map((m) => `${m.name} (status ${m.status})`)
  t.diagnostic(`Consul members ${when}: ${members.map((m) => `${m.name}@${m.addr}`).join(' ')}; not alive: ${notAlive.length ? notAlive.join(', ') : 'none'}`)
  assert.deepEqual(notAlive, [], `Consul members not alive ${when}`)
  assert.equal(members.length, lab.state.plan.servers.length + NODES.length, `every agent is a member ${when}`)
}

describe('lab, ACLs on: groups and associations decide who reaches whom, enforced by every node', () => {
  // node1..node5 public, node6 behind NAT; every node has every host file.
  const get = useLab({ nodes: 6, nat: 1, consulServers: 1, acl: true, tinc: true, hostFiles: 'all' })

  labTest(
    'open network: everyone reaches everyone; with groups: the matrix is mayReach(), DNS hides the rest, Consul stays up, node tokens cannot write the policy',
    async (t) => {
      const lab = get()
      await lab.writeNetwork()
      for (const n of NODES) await lab.startSidecar(n)
      await withLogs(lab, NODES, () => lab.waitForMesh())
      await startListeners(lab, MATRIX_NODES, PORT)

      await withLogs(lab, NODES, async () => {
        await waitApplied(lab, MATRIX_NODES, OPEN_POLICY, 'the open network')
        // Every sidecar has published its record: node1 resolves every name.
        await dnsFollows(lab, OPEN_POLICY, 'node1', NODES.slice(1))
        // The mesh again, now that every record is out: a sidecar's first sync drops the host files
        // of peers it has no record for yet, and tinc can take ten seconds or more to take back
        // the node that started last (node6), which the first wait may have passed before.
        await lab.waitForMesh()
        await checkMatrix(t, lab, 'no groups (open network)', OPEN_POLICY)

        // The real CLI, with the operator token, on node1's agent.
        const add = async (name: string, cidr: string, infra: boolean) => (await lab.cli('node1', ['group', 'add', name, '--cidr', cidr, ...(infra ? ['--infra'] : []), ...asOperator(lab)])).stdout
        assert.match(await add('infra', '10.99.0.0/31', true), /created group infra \(10\.99\.0\.0\/31, infrastructure\) with 1 member\(s\): node1/)
        assert.match(await add('eng', '10.99.0.2/31', false), /created group eng \(10\.99\.0\.2\/31\) with 2 member\(s\): node2, node3/)
        assert.match(await add('ops', '10.99.0.4/31', false), /created group ops \(10\.99\.0\.4\/31\) with 2 member\(s\): node4, node5/)
        const ls = await groupLs(lab)
        assert.deepEqual(
          ls.groups.map((g) => [g.name, g.cidr, g.infra, g.members]),
          GROUPS.map((g) => [g.name, g.cidr, g.infra, NODES.filter((n) => groupOf(GROUPED, vpn(n))?.name === g.name)]),
        )
        assert.deepEqual(ls.ungrouped, ['node6'])
        assert.deepEqual(ls.refused, [])

        await waitApplied(lab, MATRIX_NODES, GROUPED, 'three groups, no association')
        await checkMatrix(t, lab, 'groups infra/eng/ops, no association', GROUPED)
        // The tables as the kernel holds them, for the record: node2's (eng) and node6's (no group).
        for (const n of ['node2', 'node6'])
          t.diagnostic(`${n}: ${(await lab.exec(n, ['nft', 'list', 'chain', 'inet', `tinc-consul-${LAB_NETNAME}-access`, 'input'])).stdout.replace(/\s+/g, ' ').trim()}`)
        assert.equal((await lab.exec('node1', ['nft', 'list', 'table', 'inet', `tinc-consul-${LAB_NETNAME}-access`], { allowFailure: true })).code === 0, false, 'node1 (infra) has no access table')

        // DNS follows the matrix, from a member of eng, from the node in no group and from infra.
        const dns = [
          ...(await dnsFollows(lab, GROUPED, 'node2', ['node1', 'node3', 'node4', 'node5', 'node6'])),
          ...(await dnsFollows(lab, GROUPED, 'node6', ['node1', 'node2', 'node4'])),
          ...(await dnsFollows(lab, GROUPED, 'node1', ['node2', 'node4', 'node6'])),
        ]
        for (const l of dns) t.diagnostic(`DNS: ${l}`)

        await consulHealthy(t, lab, 'with the groups enforced')

        // The table's Consul exception: node2 (eng) is kept from node4 (ops) on every other port, yet
        // reaches TCP 8300/8301 and UDP 8301 on node4's VPN address, as Consul's agents must.
        for (const port of [8300, 8301]) await listening(await lab.spawn('node4', `listener-${port}`, [process.execPath, '-e', LISTENER, vpn('node4'), String(port)]), `node4's TCP ${port}`)
        await listening(await lab.spawn('node4', 'udp-8301', [process.execPath, '-e', UDP_ECHO, vpn('node4'), '8301']), "node4's UDP 8301")
        for (const port of [8300, 8301]) {
          const r = await lab.exec('node2', [process.execPath, '-e', TCP_MATRIX, JSON.stringify({ targets: [vpn('node4')], port, tries: 3, ms: 1000 })])
          assert.deepEqual(JSON.parse(r.stdout), { [vpn('node4')]: true }, `node2 (eng) reaches node4 (ops) on TCP ${port}, Consul's port`)
        }
        const udp = await lab.exec('node2', [process.execPath, '-e', UDP_PROBE, JSON.stringify({ host: vpn('node4'), port: 8301 })], { timeoutMs: 15_000 })
        assert.equal(udp.stdout, 'echo', 'node2 (eng) gets UDP 8301 through to node4 (ops) and back')
        t.diagnostic("Consul's ports pass the table: node2 (eng) reaches node4 (ops) on TCP 8300, TCP 8301 and UDP 8301, and nothing else of node4")

        // A node's own token reads the policy but can't write it, through its own agent: 403.
        const tokenOf = lab.state.nodeTokens.node2
        assert.ok(tokenOf, 'the lab made node2 a token')
        const asNode = createPipeline({ url: lab.consul('node2').url, token: tokenOf })
        const admin = createPipeline({ url: lab.consul('consul1').url, token: lab.state.managementToken })
        const writes: Array<[string, unknown]> = [
          [`${layout.groupsPrefix}x`, { v: 1, cidr: '10.99.0.128/25', infra: true, createdAt: new Date().toISOString() }],
          [layout.association('eng', 'ops'), { v: 1, at: new Date().toISOString() }],
        ]
        for (const [key, value] of writes) {
          const r = await asNode.send('PUT', kvPath(key), { body: JSON.stringify(value) })
          t.diagnostic(`PUT ${key} with node2's token: ${r.status}`)
          assert.equal(r.status, 403, `node2's token must not write ${key}: got ${r.status} ${r.body.toString('utf8')}`)
          assert.equal((await admin.send('GET', kvPath(key))).status, 404, `${key} was not written`)
        }
        assert.equal((await asNode.send('GET', kvPath(layout.group('eng')))).status, 200, "node2's token reads the policy (a positive control)")
        const cli = await lab.cli(
          'node2',
          ['group', 'associate', 'eng', 'ops', '--net', LAB_NETNAME, '--consul', 'http://127.0.0.1:8500', '--token', tokenOf, '--config-dir', labConfigDir(lab.state.runDir, 'node2')],
          {
            allowFailure: true,
          },
        )
        assert.notEqual(cli.code, 0, '`group associate` with a node token fails')
        t.diagnostic(`\`group associate eng ops\` with node2's token: exit ${cli.code}: ${`${cli.stdout}${cli.stderr}`.trim().split('\n').slice(-2).join(' ')}`)
        assert.match(`${cli.stdout}${cli.stderr}`, /operator \(management\) token|permission denied/i)
        assert.deepEqual((await groupLs(lab)).associations, [], 'no association came of it')
      })
    },
    600_000,
  )

  labTest(
    '`group associate eng ops`: eng and ops reach each other, everything else stays as it was',
    async (t) => {
      const lab = get()
      await withLogs(lab, NODES, async () => {
        t.diagnostic((await lab.cli('node1', ['group', 'associate', 'eng', 'ops', ...asOperator(lab)])).stdout.trim())
        assert.deepEqual((await groupLs(lab)).associations, [['eng', 'ops']])
        await waitApplied(lab, MATRIX_NODES, ASSOCIATED, 'the association eng+ops')
        await checkMatrix(t, lab, 'after `group associate eng ops`', ASSOCIATED)
        for (const l of await dnsFollows(lab, ASSOCIATED, 'node2', ['node4', 'node5', 'node6'])) t.diagnostic(`DNS: ${l}`)
        await consulHealthy(t, lab, 'with eng and ops associated')
      })
    },
    300_000,
  )

  labTest(
    '`group dissociate eng ops`: the paths close again on every node (time measured), the matrix is as before',
    async (t) => {
      const lab = get()
      await withLogs(lab, NODES, async () => {
        // One watcher per member of eng and ops, in a node of the other group: the path into the
        // watched node closes when that node's own table drops the other group (the watcher's
        // table lets the answers in as established, whichever table changes first).
        const watched: Array<[string, string]> = [
          ['node2', 'node4'],
          ['node3', 'node5'],
          ['node4', 'node2'],
          ['node5', 'node3'],
        ]
        const watchers = await Promise.all(
          watched.map(([target, from]) =>
            lab.spawn(from, `close-watch-${target}`, [process.execPath, '-e', CLOSE_WATCH, JSON.stringify({ host: vpn(target), port: PORT, ms: 400, fails: 3, withinMs: 120_000 })]),
          ),
        )
        const lines = (d: Daemon) => readFileSync(d.logFile, 'utf8')
        await Promise.all(
          watchers.map((d, i) =>
            waitFor(`the watcher of ${watched[i]?.[0]} (in ${watched[i]?.[1]}) to connect once while eng and ops are associated`, async () => (/^ready \d+$/m.test(lines(d)) ? true : undefined), {
              timeoutMs: 70_000,
              intervalMs: 100,
              daemons: [d],
            }),
          ),
        )

        const t0 = Date.now()
        t.diagnostic((await lab.cli('node1', ['group', 'dissociate', 'eng', 'ops', ...asOperator(lab)])).stdout.trim())
        const cliDone = Date.now()
        const closed = await Promise.all(
          watchers.map((d, i) =>
            waitFor(
              `the path from ${watched[i]?.[1]} into ${watched[i]?.[0]} to close after the dissociation (watcher log ${d.logFile})`,
              async () => {
                const m = /^closed (\d+)$/m.exec(lines(d))
                if (m) return Number(m[1])
                // Gave up: NaN ends the wait, and the check below names the node.
                return /^still-open$/m.test(lines(d)) ? Number.NaN : undefined
              },
              { timeoutMs: 130_000, intervalMs: 100 },
            ),
          ),
        )
        assert.deepEqual(
          watched.filter((_, i) => !Number.isFinite(closed[i])).map(([target, from]) => `${from} → ${target}`),
          [],
          'paths still open 120 s after `group dissociate`',
        )
        const took = closed.map((at, i) => `${watched[i]?.[0]} ${at - t0} ms`)
        t.diagnostic(
          `dissociate → closed: ${Math.max(...closed) - t0} ms from the start of \`group dissociate\` to the last node's path closing (${Math.max(...closed) - cliDone} ms after the command returned; the command took ${cliDone - t0} ms); per node: ${took.join(', ')} (TCP every 50 ms, 400 ms timeout, closed = first of 3 failures in a row)`,
        )

        await waitApplied(lab, MATRIX_NODES, GROUPED, 'the dissociation')
        await checkMatrix(t, lab, 'after `group dissociate eng ops`', GROUPED)
        for (const l of await dnsFollows(lab, GROUPED, 'node2', ['node4', 'node5', 'node1'])) t.diagnostic(`DNS: ${l}`)
        await consulHealthy(t, lab, 'after the dissociation')
      })
    },
    400_000,
  )
})
