import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { execFile, spawnSync } from 'node:child_process'
import { promisify } from 'node:util'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pino } from 'pino'
import { renderStatus } from '../src/cli/status.ts'
import type { MeshView } from '../src/mesh/view.ts'
import { createSvgCache, renderDot, renderSvg, type SvgResult } from '../src/status/graph.ts'
import { createMetrics } from '../src/status/metrics.ts'
import { buildStatus, tincstat, type Status, type StatusInputs } from '../src/status/model.ts'
import { startStatusServer, type StatusServer } from '../src/status/server.ts'
import type { TincDump } from '../src/tinc/dump.ts'

const quiet = pino({ level: 'silent' })

const view = (peers: Record<string, { address: string; public: boolean }>): MeshView =>
  ({
    network: { v: 1, cidr: '10.99.0.0/24', domain: 'mesh', createdAt: '2026-01-01T00:00:00Z' },
    peers: new Map(Object.entries(peers).map(([name, p]) => [name, { record: { name, vpnAddress: p.address, addresses: p.public ? ['198.18.0.1'] : [], fingerprint: `sha256:${'0'.repeat(64)}` } }])),
  }) as unknown as MeshView

const node = (name: string, o: Partial<NonNullable<TincDump['nodes']>[number]> = {}) => ({
  name,
  address: '198.18.0.9',
  port: 655,
  status: 0x1a,
  reachable: true,
  nexthop: name,
  via: name,
  pmtu: 1451,
  minPmtu: 1451,
  options: 12,
  ...o,
})

const DUMP: TincDump = {
  bytesIn: 12345,
  bytesOut: 67890,
  nodes: [
    node('alpha', { address: '198.18.0.1' }),
    node('beta', { address: '198.18.0.2' }),
    node('laptop', { nexthop: 'alpha', via: 'alpha' }),
    node('phone', { reachable: false, status: 0, address: undefined, port: undefined }),
    node('home'),
  ],
  edges: [
    { from: 'home', to: 'alpha', address: '198.18.0.1', port: 655, weight: 3 },
    { from: 'alpha', to: 'home', address: '198.18.0.5', port: 655, weight: 3 },
    { from: 'alpha', to: 'laptop', address: '198.18.0.7', port: 655, weight: 5 },
    { from: 'home', to: 'beta', address: '198.18.0.2', port: 655, weight: 4 },
  ],
  subnets: [{ subnet: '10.99.0.1/32', weight: 10, owner: 'alpha' }],
  connections: [
    { name: 'alpha', address: '198.18.0.1', port: 655, status: 0x1c2 },
    { name: 'beta', address: '198.18.0.2', port: 655, status: 0xc2 },
  ],
  skipped: 2,
}

function inputs(o: Partial<StatusInputs> = {}): StatusInputs {
  return {
    net: 'home',
    self: 'home',
    iface: 'tinc-home',
    view: view({
      home: { address: '10.99.0.5', public: false },
      alpha: { address: '10.99.0.1', public: true },
      beta: { address: '10.99.0.2', public: true },
      laptop: { address: '10.99.0.7', public: false },
      phone: { address: '10.99.0.8', public: false },
    }),
    links: new Map([
      ['alpha', { up: true, since: new Date('2026-11-22T01:00:00Z'), remote: '198.18.0.1' }],
      ['phone', { up: false, since: new Date('2026-11-22T01:30:00Z') }],
    ]),
    tinc: { state: 'up', dump: DUMP, pid: 42 },
    counters: { rxBytes: 1, txBytes: 2, rxPackets: 3, txPackets: 4 },
    consul: { reachable: true, lastReadAt: new Date('2026-11-22T01:59:58Z'), index: 77, failures: 0 },
    refusals: new Map([['tinc-consul/home/nodes/evil', 'key is not the pinned one']]),
    sync: { refusedTotal: 3, servicesRefusedTotal: 1, emptyReadsIgnored: 0, bytesRead: 0, fullReads: 0, applies: 5, hups: 1 },
    dns: { queries: 10, formerr: 1, refused: 2, truncated: 0, byHelpers: 4, tcpOpen: 3, tcpRefused: 5 },
    services: [{ name: 'nfs', protocol: 'tcp', instances: [{ id: 'mesh-home-nfs', node: 'alpha', address: '10.99.0.1', port: 2049, tags: [] }] }],
    allocations: new Map([['10.99.0.1', 'alpha']]),
    now: new Date('2026-11-22T02:00:00Z'),
    ...o,
  }
}

describe('the status picture', () => {
  test("every node: direct, relayed and via whom, unreachable; tincd's dump wins over the hooks", () => {
    const s = buildStatus(inputs())
    assert.deepEqual(
      s.nodes.map((n) => [n.name, n.address, n.reachable, n.path, n.via]),
      [
        ['alpha', '10.99.0.1', true, 'direct', undefined],
        ['beta', '10.99.0.2', true, 'direct', undefined],
        ['home', '10.99.0.5', true, 'self', undefined],
        ['laptop', '10.99.0.7', true, 'relayed', 'alpha'],
        ['phone', '10.99.0.8', false, 'unreachable', undefined],
      ],
    )
    assert.equal(s.nodes.find((n) => n.name === 'alpha')?.lastChange, '2026-11-22T01:00:00.000Z')
    assert.deepEqual(s.bytes, { in: 12345, out: 67890, source: 'tincd' })
    assert.deepEqual(s.tincd, { state: 'up', pid: 42, skippedLines: 2 })
    assert.deepEqual(s.consul.refused, [{ key: 'tinc-consul/home/nodes/evil', reason: 'key is not the pinned one' }])
    assert.equal(s.consul.lastSyncAt, '2026-11-22T01:59:58.000Z')
  })

  test('UDP that never answered means tinc sends through the meta connection: relayed via the next hop', () => {
    const s = buildStatus(inputs({ tinc: { state: 'up', pid: 42, dump: { ...DUMP, nodes: [node('beta', { minPmtu: 0, nexthop: 'alpha' }), node('alpha', { minPmtu: 0 })] } } }))
    assert.deepEqual(
      s.nodes.filter((n) => n.name === 'alpha' || n.name === 'beta').map((n) => [n.name, n.path, n.via]),
      [
        ['alpha', 'direct', undefined],
        ['beta', 'relayed', 'alpha'],
      ],
    )
  })

  test('a stopped tincd is a state: the hooks still tell who was reachable, bytes come from the interface', () => {
    const s = buildStatus(inputs({ tinc: { state: 'down', reason: 'no tincd at pid 42' } }))
    assert.deepEqual(s.tincd, { state: 'down', reason: 'no tincd at pid 42', skippedLines: 0 })
    assert.deepEqual(s.bytes, { in: 1, out: 2, source: 'interface' })
    assert.deepEqual(s.edges, [])
    assert.deepEqual(
      s.nodes.map((n) => [n.name, n.path]),
      [
        ['alpha', 'direct'],
        ['beta', 'unknown'],
        ['home', 'self'],
        ['laptop', 'unknown'],
        ['phone', 'unreachable'],
      ],
    )
  })

  test("/tincstat has exactly tincstat's field names and types", () => {
    const t = tincstat(buildStatus(inputs()))
    assert.deepEqual(Object.keys(t), ['total_bytes_in', 'total_bytes_out', 'connections'])
    assert.ok(Number.isInteger(t.total_bytes_in) && Number.isInteger(t.total_bytes_out))
    assert.deepEqual(t.connections, [
      { name: 'alpha', ip: '198.18.0.1', port: 655 },
      { name: 'beta', ip: '198.18.0.2', port: 655 },
    ])
    for (const c of t.connections) assert.deepEqual(Object.keys(c), ['name', 'ip', 'port'])
  })

  test('the table reads well: plain when piped, coloured on a terminal', () => {
    const s = buildStatus(inputs())
    const plain = renderStatus(s, { colour: false })
    assert.equal(plain.includes('\x1b['), false, 'no escape codes when piped')
    assert.match(plain, /^home 10\.99\.0\.5 on home \(tinc-home, router mode\) {2}tincd up \(pid 42\) {2}consul ok \(index 77\)$/m)
    assert.match(plain, /^traffic: in 12\.1 KiB, out 66\.3 KiB {3}dns: 10 queries {3}1 record\(s\) refused$/m)
    assert.match(plain, /^NAME\s+ADDRESS\s+REACHABLE\s+PATH\s+REMOTE\s+CHANGED$/m)
    assert.match(plain, /^laptop\s+10\.99\.0\.7\s+yes\s+relay via alpha\s+198\.18\.0\.9:655\s+-$/m)
    assert.match(plain, /^phone\s+10\.99\.0\.8\s+no\s+unreachable\s+-\s+30m ago$/m)
    assert.ok(renderStatus(s, { colour: true }).includes('\x1b[33mlaptop'), 'relayed rows are yellow on a terminal')
  })

  test("the network's mode is in /status, the table's first line and the info metric; a tinc.conf that disagrees is shown", async () => {
    const router = buildStatus(inputs({ tincConfMode: 'router' }))
    assert.equal(router.node.mode, 'router', 'a record without mode is a router network')
    assert.equal(router.node.tincConfMode, undefined)
    const switchView = { ...view({ home: { address: '10.99.0.5', public: false } }) }
    switchView.network = { ...switchView.network, mode: 'switch' }
    const agree = buildStatus(inputs({ view: switchView, tincConfMode: 'switch' }))
    assert.equal(agree.node.mode, 'switch')
    assert.equal(agree.node.tincConfMode, undefined)
    assert.match(renderStatus(agree, { colour: false }).split('\n')[0] ?? '', /^home 10\.99\.0\.5 on home \(tinc-home, switch mode\) /)
    assert.match(await createMetrics().render(agree), /^tinc_consul_info\{node="home",net="home",mode="switch"\} 1$/m)
    const stale = buildStatus(inputs({ view: switchView, tincConfMode: 'router' }))
    assert.equal(stale.node.tincConfMode, 'router')
    assert.match(renderStatus(stale, { colour: false }), /tinc\.conf sets Mode = router, but the network is in switch mode: set Mode = switch and DeviceType = tap in tinc\.conf and restart tincd/)
    assert.equal(buildStatus(inputs({ view: undefined })).node.mode, undefined, 'no view, no mode')
  })

  test('a cloned node and unreadable records are shown, not hidden', () => {
    const conflict = { ours: `sha256:${'a'.repeat(64)}`, theirs: `sha256:${'b'.repeat(64)}`, attempts: 3, gaveUp: true, since: '2026-01-01T00:00:00.000Z' }
    const s = buildStatus(inputs({ conflict, pending: ['beta'] }))
    assert.deepEqual(s.node.nameConflict, conflict)
    assert.deepEqual(s.consul.pending, ['beta'])
    const plain = renderStatus(s, { colour: false })
    assert.match(plain, /1 record\(s\) unreadable/)
    assert.match(plain, /another daemon writes a different record under this node's name \(ours sha256:aaaaaaaaaaaa…, theirs sha256:bbbbbbbbbbbb…\); gave up rewriting it after 3 tries/)
    assert.equal(buildStatus(inputs()).node.nameConflict, undefined)
  })

  test('the access policy shows in /status, the table, the graph and the metrics: hidden nodes, a table that failed, refused keys', async () => {
    const access = {
      groups: 2,
      associations: 0,
      group: 'left',
      hidden: ['laptop'],
      refused: [{ key: 'tinc-consul/home/network/groups/bad', reason: 'overlaps left' }],
      firewall: { mode: 'failed' as const, table: 'tinc-consul-home-access', reason: 'nft is not installed', since: '2026-11-22T01:00:00.000Z' },
    }
    const s = buildStatus(inputs({ access }))
    assert.equal(s.nodes.find((n) => n.name === 'laptop')?.hidden, true)
    assert.equal(s.nodes.find((n) => n.name === 'alpha')?.hidden, undefined)
    const plain = renderStatus(s, { colour: false })
    assert.match(plain, /^access: group left of 2, 0 association\(s\), 1 node\(s\) hidden$/m)
    assert.match(plain, /^access table NOT loaded \(nft is not installed\): the groups are not enforced on this node$/m)
    const stale = renderStatus(
      buildStatus(inputs({ access: { ...access, firewall: { ...access.firewall, stale: true as const, reason: 'could not remove the access table of an earlier policy' } } })),
      { colour: false },
    )
    assert.match(stale, /^access table of an earlier policy NOT removed \(could not remove the access table of an earlier policy\): retried every 30 s$/m)
    assert.match(plain, /^1 access policy key\(s\) refused: tinc-consul\/home\/network\/groups\/bad: overlaps left$/m)
    assert.match(plain, /^laptop \(hidden\) /m)
    assert.match(renderDot(s), /"laptop" \[label="laptop\\n10\.99\.0\.7.*hidden by groups"/)
    const text = await createMetrics().render(s)
    assert.match(text, /^tinc_consul_access_table\{mode="failed"\} 1$/m)
    assert.match(text, /^tinc_consul_access_table\{mode="enforced"\} 0$/m)
    assert.match(text, /^tinc_consul_access_hidden_nodes 1$/m)
    assert.match(text, /^tinc_consul_access_policy_refused 1$/m)
    assert.doesNotMatch(renderStatus(buildStatus(inputs()), { colour: false }), /^access/m, 'an open mesh says nothing about access')
  })

  test('a `group move` this node could not follow is shown in red, in an open mesh too; one it made, plainly', () => {
    const open = { groups: 0, associations: 0, hidden: [], refused: [] }
    const failed = { from: '10.99.0.2', to: '10.99.0.65', state: 'failed' as const, reason: 'hosts/alpha has no "Subnet = 10.99.0.2" line', at: '2026-12-02T07:00:00.000Z' }
    const red = renderStatus(buildStatus(inputs({ access: { ...open, renumber: failed } })), { colour: true })
    assert.ok(red.includes('\x1b[31mgroup move to 10.99.0.65 NOT done (hosts/alpha has no "Subnet = 10.99.0.2" line); retried on the next ipam/ change'), red)
    const done = renderStatus(buildStatus(inputs({ access: { ...open, renumber: { ...failed, state: 'done' as const, reason: undefined } } })), { colour: false })
    assert.match(done, /^renumbered from 10\.99\.0\.2 to 10\.99\.0\.65 at 2026-12-02T07:00:00\.000Z \(group move\)$/m)
  })

  test("refused services show in /status, the table and the metrics: other nodes' instances, and this node's files over its cap", async () => {
    const over = { file: 'z.toml', service: 'z', reason: "over this node's cap of 2 services (--max-services)" }
    const s = buildStatus(
      inputs({
        servicesRefused: [{ service: 'web', id: 'mesh-home-web', reason: 'node "alpha" has more than 2 services (--max-services)' }],
        localServices: { max: 2, registered: 2, refused: [over] },
      }),
    )
    assert.deepEqual(s.consul.servicesRefused, [{ service: 'web', id: 'mesh-home-web', reason: 'node "alpha" has more than 2 services (--max-services)' }])
    assert.deepEqual(s.localServices, { max: 2, registered: 2, refused: [over] })
    const plain = renderStatus(s, { colour: false })
    assert.match(plain, /^traffic: .* {3}1 service instance\(s\) refused$/m)
    assert.match(plain, /^1 of this node's services not registered \(2 registered, cap 2\): z\.toml: over this node's cap of 2 services \(--max-services\)$/m)
    const text = await createMetrics().render(s)
    assert.match(text, /^tinc_consul_service_instances_refused 1$/m)
    assert.match(text, /^tinc_consul_local_services\{state="refused"\} 1$/m)
    assert.match(text, /^tinc_consul_local_services\{state="registered"\} 2$/m)
    assert.match(text, /^tinc_consul_local_services_max 2$/m)
    assert.doesNotMatch(renderStatus(buildStatus(inputs()), { colour: false }), /service instance|not registered/, 'nothing said when nothing is refused')
  })

  test('the DOT graph parses with Graphviz; relayed peers get a dashed line to their relay', () => {
    const dot = renderDot(buildStatus(inputs()))
    assert.match(dot, /"home" -- "laptop" \[style=dashed, color="#ef6c00", fontcolor="#ef6c00", label="via alpha"/)
    assert.match(dot, /"alpha" -- "home" \[color="#2e7d32", penwidth=2\];/)
    assert.equal((dot.match(/"alpha" -- "home"/g) ?? []).length, 1, 'both directions of an edge are one line')
    const r = spawnSync('dot', ['-Tsvg'], { input: dot, encoding: 'utf8' })
    assert.equal(r.status, 0, r.stderr)
    assert.match(r.stdout, /<svg[\s\S]*laptop[\s\S]*<\/svg>/)
  })

  test('the DOT depends on the topology only: not on the time, the byte counters, or the order of the dump', () => {
    const dot = renderDot(buildStatus(inputs()))
    const later = buildStatus(
      inputs({
        now: new Date('2026-11-22T03:17:42Z'),
        counters: { rxBytes: 9e9, txBytes: 9e9, rxPackets: 9e6, txPackets: 9e6 },
        tinc: { state: 'up', pid: 42, dump: { ...DUMP, bytesIn: 1, bytesOut: 2, edges: [...(DUMP.edges ?? [])].reverse() } },
      }),
    )
    assert.equal(renderDot(later), dot)
    assert.match(dot, /label="home as seen from home";/)
    const moved = buildStatus(inputs({ tinc: { state: 'up', pid: 42, dump: { ...DUMP, nodes: (DUMP.nodes ?? []).map((n) => (n.name === 'phone' ? node('phone') : n)) } } }))
    assert.notEqual(renderDot(moved), dot, 'a peer coming up is a new picture')
  })
})

/** A stand-in for Graphviz that counts its runs and how many overlap, and takes `ms` for each. */
function countingRenderer(ms: number, result?: (dot: string) => SvgResult) {
  const c = { runs: [] as string[], active: 0, maxActive: 0 }
  const render = async (dot: string): Promise<SvgResult> => {
    c.runs.push(dot)
    c.maxActive = Math.max(c.maxActive, ++c.active)
    try {
      await new Promise((r) => setTimeout(r, ms))
      return result ? result(dot) : await renderSvg(dot)
    } finally {
      c.active--
    }
  }
  return Object.assign(c, { render })
}

describe('the SVG cache', () => {
  test('a failed render is answered from the cache until the DOT changes or the retry time passes', async () => {
    let fail = true
    let t = 0
    const r = countingRenderer(1, () => (fail ? { ok: false, missing: false, error: 'boom' } : { ok: true, svg: '<svg/>' }))
    const cache = createSvgCache({ render: r.render, retryFailedAfterMs: 30_000, now: () => t })
    assert.deepEqual(await cache.svg('graph a {}'), { ok: false, missing: false, error: 'boom' })
    t = 29_999
    assert.equal((await cache.svg('graph a {}')).ok, false)
    assert.equal(r.runs.length, 1, 'the same failing DOT is not rendered again at once')
    fail = false
    assert.equal((await cache.svg('graph b {}')).ok, true, 'a new DOT is rendered')
    assert.equal((await cache.svg('graph a {}')).ok, true, 'and so is the old one again')
    assert.equal(r.runs.length, 3)
    const cache2 = createSvgCache({ render: r.render, retryFailedAfterMs: 30_000, now: () => t })
    fail = true
    await cache2.svg('graph c {}')
    fail = false
    t += 30_000
    assert.deepEqual(await cache2.svg('graph c {}'), { ok: true, svg: '<svg/>' }, 'the same DOT is retried once the retry time has passed')
  })

  test('renders run one at a time; a render superseded before its turn is skipped and its requests get the newer picture', async () => {
    const r = countingRenderer(30, (dot) => ({ ok: true, svg: `<svg>${dot}</svg>` }))
    const cache = createSvgCache({ render: r.render })
    const a = [cache.svg('A'), cache.svg('A')]
    await new Promise((res) => setTimeout(res, 5))
    assert.equal(r.active, 1, 'A is being rendered')
    const later = ['B', 'C', 'D'].flatMap((d) => [cache.svg(d), cache.svg(d)])
    const results = await Promise.all([...a, ...later])
    assert.equal(r.maxActive, 1)
    // B and C were replaced by a newer DOT before A finished; D runs after A.
    assert.deepEqual(r.runs, ['A', 'D'])
    assert.deepEqual(
      results.map((x) => (x.ok ? x.svg : x.error)),
      ['A', 'A', 'D', 'D', 'D', 'D', 'D', 'D'].map((d) => `<svg>${d}</svg>`),
    )
  })
})

/** A strict reading of the Prometheus text format: every line is a comment, blank, or NAME{LABELS} VALUE. */
function checkExposition(text: string): Map<string, number> {
  const samples = new Map<string, number>()
  const typed = new Set<string>()
  for (const line of text.split('\n')) {
    if (line === '') continue
    const meta = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)$/.exec(line)
    if (meta) {
      if (meta[1] === 'TYPE') {
        assert.match(meta[3] ?? '', /^(counter|gauge|histogram|summary|untyped)$/, line)
        typed.add(meta[2] ?? '')
      }
      continue
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (-?[0-9.e+-]+|NaN|[+-]Inf)$/.exec(line)
    assert.ok(m, `not Prometheus text: ${JSON.stringify(line)}`)
    const base = (m[1] ?? '').replace(/_(bucket|sum|count)$/, '')
    assert.ok(typed.has(m[1] ?? '') || typed.has(base), `no TYPE for ${m[1]}`)
    samples.set(`${m[1]}${m[2] ?? ''}`, Number(m[3]))
  }
  return samples
}

describe('the status server', () => {
  let server: StatusServer
  let current: Status
  const url = (path: string) => `http://127.0.0.1:${server.port}${path}`
  before(async () => {
    current = buildStatus(inputs())
    server = await startStatusServer({ hosts: ['127.0.0.1'], port: 0, snapshot: () => Promise.resolve(current), log: quiet })
  })
  after(() => server.close())

  test('GET /tincstat, /status and /metrics; /metrics parses as Prometheus text', async () => {
    assert.deepEqual(await (await fetch(url('/tincstat'))).json(), tincstat(current))
    assert.deepEqual(await (await fetch(url('/status'))).json(), JSON.parse(JSON.stringify(current)))
    const res = await fetch(url('/metrics'))
    assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/)
    const samples = checkExposition(await res.text())
    assert.equal(samples.get('tinc_consul_tincd_up'), 1)
    assert.equal(samples.get('tinc_consul_tinc_bytes_total{direction="in"}'), 12345)
    assert.equal(samples.get('tinc_consul_nodes{path="relayed"}'), 1)
    assert.equal(samples.get('tinc_consul_node_reachable{node="phone"}'), 0)
    assert.equal(samples.get('tinc_consul_records_refused_total'), 3)
    assert.equal(samples.get('tinc_consul_service_healthy_instances{service="nfs",protocol="tcp"}'), 1)
    assert.equal(samples.get('tinc_consul_dns_queries_total{outcome="answered"}'), 7)
    assert.equal(samples.get('tinc_consul_dns_tcp_connections'), 3)
    assert.equal(samples.get('tinc_consul_dns_tcp_refused_total'), 5)
    // The process figures are read at scrape time; nothing samples the event loop between scrapes.
    assert.ok((samples.get('tinc_consul_process_resident_memory_bytes') ?? 0) > 1e6)
    assert.ok((samples.get('tinc_consul_process_cpu_seconds_total') ?? 0) > 0)
    assert.ok((samples.get('tinc_consul_process_open_fds') ?? 0) > 0)
    assert.deepEqual(
      [...samples.keys()].filter((k) => /eventloop|event_loop/.test(k)),
      [],
    )
  })

  test('/graph.dot and /graph.svg; without Graphviz a 501 that says what to do', async () => {
    const dot = await fetch(url('/graph.dot'))
    assert.equal(dot.headers.get('content-type'), 'text/vnd.graphviz; charset=utf-8')
    assert.match(await dot.text(), /^graph "tinc-consul home" \{/)
    const svg = await fetch(url('/graph.svg'))
    assert.equal(svg.status, 200)
    assert.match(await svg.text(), /<svg/)
    const noDot = await startStatusServer({ hosts: ['127.0.0.1'], port: 0, snapshot: () => Promise.resolve(current), log: quiet, dotBin: '/nonexistent/dot' })
    try {
      const r = await fetch(`http://127.0.0.1:${noDot.port}/graph.svg`)
      assert.equal(r.status, 501)
      assert.match(((await r.json()) as { hint: string }).hint, /apt install graphviz/)
    } finally {
      await noDot.close()
    }
  })

  test('/graph.svg runs Graphviz once per view, however many requests come, and one at a time', async () => {
    const r = countingRenderer(50)
    let view = buildStatus(inputs())
    const counted = await startStatusServer({ hosts: ['127.0.0.1'], port: 0, snapshot: () => Promise.resolve(view), log: quiet, renderSvg: r.render })
    const svg = async () => {
      const res = await fetch(`http://127.0.0.1:${counted.port}/graph.svg`)
      assert.equal(res.status, 200)
      assert.equal(res.headers.get('content-type'), 'image/svg+xml')
      return res.text()
    }
    try {
      const first = await Promise.all(Array.from({ length: 20 }, svg))
      for (let i = 0; i < 20; i++) {
        // New snapshots with the same topology: a later time and other byte counters.
        view = buildStatus(inputs({ now: new Date(Date.parse('2026-11-22T02:00:00Z') + i * 1000), counters: { rxBytes: i, txBytes: i, rxPackets: i, txPackets: i } }))
        assert.equal(await svg(), first[0])
      }
      assert.equal(new Set(first).size, 1)
      assert.match(first[0] ?? '', /<svg[\s\S]*laptop/)
      assert.equal(r.runs.length, 1, 'one render for 40 requests of one view')

      view = buildStatus(inputs({ tinc: { state: 'up', pid: 42, dump: { ...DUMP, nodes: (DUMP.nodes ?? []).map((n) => (n.name === 'phone' ? node('phone') : n)) } } }))
      const second = await Promise.all(Array.from({ length: 20 }, svg))
      for (let i = 0; i < 20; i++) assert.equal(await svg(), second[0])
      assert.notEqual(second[0], first[0])
      assert.equal(r.runs.length, 2, 'one more render after the view changed')

      // Views changing under concurrent requests: still never two Graphviz processes at once.
      let n = 0
      const views = [inputs(), inputs({ tinc: { state: 'down', reason: 'stopped' } })].map((i) => buildStatus(i))
      await Promise.all(
        Array.from({ length: 20 }, async () => {
          view = views[n++ % 2] as Status
          return svg()
        }),
      )
      assert.equal(r.maxActive, 1)
    } finally {
      await counted.close()
    }
  })

  test('unknown paths are 404, anything but GET is 405, and nothing changes', async () => {
    assert.equal((await fetch(url('/nope'))).status, 404)
    const post = await fetch(url('/status'), { method: 'POST', body: '{}' })
    assert.equal(post.status, 405)
    assert.equal(post.headers.get('allow'), 'GET, HEAD')
    assert.equal((await fetch(url('/status'), { method: 'DELETE' })).status, 405)
  })

  test('the status and graph commands read from the daemon', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tinc-consul-status-'))
    try {
      // Not spawnSync: the server answering lives in this very process.
      const cli = async (...args: string[]) =>
        promisify(execFile)(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { encoding: 'utf8', env: { ...process.env, NO_COLOR: '1' } }).then(
          (r) => ({ status: 0, stdout: r.stdout, stderr: r.stderr }),
          (e: { code?: number; stdout?: string; stderr?: string }) => ({ status: e.code ?? -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' }),
        )
      const port = ['--status-port', String(server.port)]
      let r = await cli('status', ...port)
      assert.equal(r.status, 0, r.stderr)
      assert.match(r.stdout, /^laptop\s+10\.99\.0\.7\s+yes\s+relay via alpha/m)
      r = await cli('status', '--json', ...port)
      assert.equal((JSON.parse(r.stdout) as Status).node.name, 'home')
      r = await cli('graph', '--svg', join(dir, 'mesh.svg'), ...port)
      assert.equal(r.status, 0, r.stderr)
      assert.match(readFileSync(join(dir, 'mesh.svg'), 'utf8'), /<svg/)
      r = await cli('status', '--status-port', '1')
      assert.equal(r.status, 1)
      assert.match(r.stderr, /cannot reach the daemon's status server at http:\/\/127\.0\.0\.1:1\/status/)
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  })
})
