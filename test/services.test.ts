import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { chmodSync, mkdtempSync, readdirSync, rmSync, unlinkSync, writeFileSync } from 'node:fs'
import { createServer, type Server } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pino } from 'pino'
import { agentChecks, agentServices, deregisterService } from '../src/consul/agent.ts'
import { createConsulClient } from '../src/consul/client.ts'
import { watchHealth } from '../src/consul/health.ts'
import { buildZone } from '../src/dns/zone.ts'
import { zoneInputFrom } from '../src/dns/feed.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { meshServices, serviceFilters } from '../src/mesh/services.ts'
import type { MeshView } from '../src/mesh/view.ts'
import { DefinitionError, loadYamlParser, parseDefinitionText, readDefinition } from '../src/services/definition.ts'
import { checkId, registrationFor, serviceId } from '../src/services/registration.ts'
import { startServices, type ServicesRegistrar } from '../src/services/registrar.ts'
import { staleServices } from '../src/services/agent-sync.ts'
import type { AgentService } from '../src/consul/agent.ts'
import { serviceNaming } from '../src/services/naming.ts'
import { waitFor } from '../src/lab/daemon.ts'
import { TYPE } from '../src/dns/wire.ts'

const EXAMPLES = join(import.meta.dirname, '..', 'examples', 'services.d')
const quiet = pino({ level: 'silent' })
const opts = { allowScripts: false }
// The daemon imports the YAML parser with the first YAML file; parseDefinitionText needs it loaded.
before(loadYamlParser)

function errorOf(text: string, file: string, o = opts): string {
  try {
    parseDefinitionText(text, file, o)
  } catch (err) {
    assert.ok(err instanceof DefinitionError, `expected a DefinitionError, got ${String(err)}`)
    return err.message
  }
  assert.fail(`${file} was accepted:\n${text}`)
}

describe('service definition files', () => {
  test('the same service in TOML, YAML and JSON reads the same, with the defaults filled in', () => {
    const toml = parseDefinitionText('name = "nfs"\nport = 2049\ntags = ["Home"]\n[check]\ntype = "tcp"\n', 'nfs.toml', opts)
    const yaml = parseDefinitionText('name: nfs\nport: 2049\ntags: [Home]\ncheck:\n  type: tcp\n', 'nfs.yaml', opts)
    const json = parseDefinitionText('{"name":"nfs","port":2049,"tags":["Home"],"check":{"type":"tcp"}}', 'nfs.json', opts)
    for (const d of [yaml, json]) assert.deepEqual({ ...d, file: '' }, { ...toml, file: '' })
    assert.deepEqual(toml.check, { type: 'tcp', intervalMs: 10_000, timeoutMs: 2_000, deregisterAfterMs: 600_000 })
    assert.deepEqual(toml.tags, ['home'])
    assert.equal(toml.protocol, 'tcp')
    // The name defaults to the file's; a UDP service gets a UDP check.
    const game = parseDefinitionText('port = 6112\nprotocol = "udp"\n', 'broodwar.toml', opts)
    assert.equal(game.name, 'broodwar')
    assert.equal(game.check.type, 'udp')
  })

  test('every problem names the file and the field', () => {
    assert.match(errorOf('name = "nfs"\nport = 2049\nintervall = "5s"\n', 'nfs.toml'), /^nfs\.toml: intervall: unknown field$/)
    assert.match(errorOf('name = "nfs"\n', 'nfs.toml'), /^nfs\.toml: port: required/)
    assert.match(errorOf('port = 70000\n', 'nfs.toml'), /^nfs\.toml: port: .*65535/)
    assert.match(errorOf('port = 1\n[check]\ninterval = "10"\n', 'a.toml'), /^a\.toml: check\.interval: expected a duration like "10s"/)
    assert.match(errorOf('port = 1\n[check]\nderegister_critical_after = "30s"\n', 'a.toml'), /check\.deregister_critical_after: must be at least 1m, Consul's minimum \(got "30s"\)/)
    assert.match(errorOf('port = 1\n[check]\ntype = "tcp"\npath = "/x"\n', 'a.toml'), /check\.path: not used by a tcp check/)
    assert.match(errorOf('port = 1\n[check]\ntype = "udp"\n', 'a.toml'), /a udp check needs protocol = "udp"/)
    assert.match(errorOf('port = 1\n[check]\ntype = "http"\ntimeout = "20s"\n', 'a.toml'), /check\.timeout: longer than the interval/)
    assert.match(errorOf('port = 1\ntags = ["not a label"]\n', 'a.toml'), /tags\.0: a tag must be a DNS label/)
    assert.match(errorOf('port = 1\n[meta]\nmesh-node = "evil"\n', 'a.toml'), /meta\.mesh-node: "mesh-" and "consul-" keys are reserved/)
    assert.match(errorOf('name = "Not_A_Label"\nport = 1\n', 'a.toml'), /name: name must be a DNS label/)
    assert.match(errorOf('port = \n', 'a.toml'), /^a\.toml: not valid TOML: .* at line 1, column \d+$/)
    assert.match(errorOf('port: [1\n', 'a.yaml'), /^a\.yaml: not valid YAML: /)
    assert.match(errorOf('port: 1\nport: 2\n', 'a.yml'), /not valid YAML: Map keys must be unique/)
    assert.match(errorOf('{"port": 1,}', 'a.json'), /^a\.json: not valid JSON: /)
    assert.match(errorOf('[1, 2]', 'a.json'), /^a\.json: \(top level\): /)
  })

  test('script checks are refused unless the operator turned them on, and need an absolute program', () => {
    const text = 'port = 1\n[check]\ntype = "script"\ncommand = ["/usr/bin/true"]\n'
    assert.match(errorOf(text, 's.toml'), /script checks run commands on this node and are off; start the daemon with --script-checks/)
    assert.equal(parseDefinitionText(text, 's.toml', { allowScripts: true }).check.type, 'script')
    assert.match(errorOf('port = 1\n[check]\ntype = "script"\ncommand = ["true"]\n', 's.toml', { allowScripts: true }), /absolute path/)
  })

  test('the shipped examples are valid: NFS, X11, a BroodWar host, a web app with an HTTP check, a cron-fed TTL check', async () => {
    const files = readdirSync(EXAMPLES).sort()
    assert.deepEqual(files, ['backup.toml', 'broodwar.json', 'nfs.toml', 'wiki.toml', 'x11.yaml'])
    const defs = await Promise.all(files.map((f) => readDefinition(join(EXAMPLES, f), opts)))
    assert.deepEqual(
      defs.map((d) => [d.name, d.protocol, d.port, d.check.type]),
      [
        ['backup', 'tcp', 873, 'ttl'],
        ['broodwar', 'udp', 6112, 'udp'],
        ['nfs', 'tcp', 2049, 'tcp'],
        ['wiki', 'tcp', 8080, 'http'],
        ['x11', 'tcp', 6000, 'tcp'],
      ],
    )
  })
})

const fakeView = (peers: Record<string, string>): MeshView =>
  ({
    network: { v: 1, cidr: '10.99.0.0/24', domain: 'mesh', createdAt: '2026-01-01T00:00:00Z' },
    peers: new Map(Object.entries(peers).map(([name, vpnAddress]) => [name, { record: { name, vpnAddress, addresses: [], fingerprint: `sha256:${'0'.repeat(64)}` } }])),
  }) as unknown as MeshView

const entry = (service: string, node: string, address: string, port: number, extra: Record<string, string> = {}) => ({
  Node: { Node: node },
  Service: { ID: `mesh-home-${service}-${node}`, Service: service, Address: address, Port: port, Tags: ['a'], Meta: { 'mesh-net': 'home', 'mesh-node': node, ...extra } },
})

describe('healthy instances from Consul are judged against the mesh view', () => {
  test("an instance must sit on a mesh node, at that node's VPN address; malformed entries are refused, not fatal", () => {
    const view = fakeView({ n1: '10.99.0.1', n2: '10.99.0.2' })
    const raw = new Map<string, unknown[]>([
      ['web', [entry('web', 'n1', '10.99.0.1', 80), entry('web', 'n2', '10.99.0.1', 80), entry('web', 'ghost', '10.99.0.9', 80), { Service: { ID: 'x', Port: 'eighty' } }, null]],
      ['game', [entry('game', 'n2', '10.99.0.2', 6112, { 'mesh-proto': 'udp' }), entry('game', 'n1', '10.99.0.1', 6113)]],
      ['other-net', [{ Service: { ...entry('other-net', 'n1', '10.99.0.1', 1).Service, Meta: { 'mesh-net': 'work', 'mesh-node': 'n1' } } }]],
    ])
    const { services, refused } = meshServices(raw, view, 'home')
    assert.deepEqual(
      services.map((s) => [s.name, s.protocol, s.instances.map((i) => `${i.node}:${i.port}`)]),
      [
        ['game', 'tcp', ['n1:6113']],
        ['game', 'udp', ['n2:6112']],
        ['web', 'tcp', ['n1:80']],
      ],
    )
    assert.deepEqual(
      refused.map((r) => r.reason),
      [
        'malformed entry: Service.Service Invalid input: expected string, received undefined',
        'malformed entry: Invalid input: expected object, received null',
        "address 10.99.0.1 is not n2's VPN address 10.99.0.2",
        'node "ghost" is not in the mesh',
      ],
    )
    // The zone serves one A per address even when a name has both a tcp and a udp service.
    const zone = buildZone(zoneInputFrom({ view, aliases: [], services }, { self: 'n1', ttl: { node: 30, service: 5, negative: 5 } }, 1))
    assert.equal(zone.lookup('game.service.mesh', TYPE.A)?.an, 2)
    assert.equal(zone.lookup('_game._udp.service.mesh', TYPE.SRV)?.an, 1)
  })
})

describe('the registrar keeps a real Consul agent equal to the services directory', () => {
  let consul: DevConsul
  let dir: string
  let reg: ServicesRegistrar | undefined
  let web: Server
  let webStatus = 200
  let webPort = 0
  const who = { net: 'home', node: 'n1', address: '127.0.0.1' }
  const client = () => createConsulClient({ url: consul.url })
  const mine = async () => agentServices(client(), 'Meta["mesh-net"] == "home"')
  const checkStatus = async (stem: string) => (await agentChecks(client()))[checkId(serviceId('home', stem))]?.Status

  before(async () => {
    consul = await startDevConsul()
    dir = mkdtempSync(join(tmpdir(), 'tinc-consul-services-'))
    web = createServer((_req, res) => {
      res.statusCode = webStatus
      res.end('ok')
    })
    await new Promise<void>((r) => web.listen(0, '127.0.0.1', r))
    webPort = (web.address() as { port: number }).port
  })
  after(async () => {
    await reg?.stop()
    web.close()
    await consul.stop()
    rmSync(dir, { recursive: true, force: true })
  })

  test('add, change, break, fix and delete files; a service lost by the agent comes back', async () => {
    writeFileSync(join(dir, 'web.toml'), `port = ${webPort}\ntags = ["ui"]\n[check]\ntype = "http"\npath = "/health"\ninterval = "1s"\n`)
    writeFileSync(join(dir, 'README'), 'not a service file\n')
    writeFileSync(join(dir, 'broken.yaml'), 'port: [\n')
    reg = await startServices({ dir, who, consulUrl: consul.url, allowScripts: false, deregisterOnExit: true, resyncMs: 200, log: quiet })
    let svc = (await mine())[serviceId('home', 'web')]
    assert.ok(svc, 'web is registered')
    assert.equal(svc.Address, '127.0.0.1')
    assert.equal(svc.Port, webPort)
    assert.deepEqual(svc.Tags, ['ui'])
    assert.equal(svc.Meta?.['mesh-node'], 'n1')
    assert.equal(svc.Meta?.['mesh-proto'], 'tcp')
    assert.deepEqual(Object.keys(await mine()), [serviceId('home', 'web')])
    assert.match(
      reg
        .problems()
        .map((p) => p.message)
        .join('\n'),
      /^broken\.yaml: not valid YAML/,
    )
    await waitFor('the http check to pass', async () => ((await checkStatus('web')) === 'passing' ? true : undefined), { timeoutMs: 15_000, intervalMs: 100 })

    // A changed port is re-registered.
    writeFileSync(join(dir, 'web.toml'), `port = ${webPort + 1}\n[check]\ntype = "tcp"\ninterval = "1s"\n`)
    await waitFor('the new port', async () => ((await mine())[serviceId('home', 'web')]?.Port === webPort + 1 ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })

    // A broken edit keeps the last good registration; fixing the broken file registers it.
    writeFileSync(join(dir, 'web.toml'), 'port = "x"\n')
    await waitFor('the problem to be reported', async () => (reg?.problems().some((p) => p.file === 'web.toml') ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })
    await reg.sync()
    assert.equal((await mine())[serviceId('home', 'web')]?.Port, webPort + 1, 'the last good registration stays')
    writeFileSync(join(dir, 'broken.yaml'), 'port: 7000\nprotocol: udp\n')
    await waitFor('broken.yaml to be registered', async () => ((await mine())[serviceId('home', 'broken')]?.Meta?.['mesh-proto'] === 'udp' ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })

    // The agent loses a service (restart with a wiped data dir): the next resync puts it back.
    await deregisterService(client(), serviceId('home', 'broken'))
    await waitFor('broken to be registered again', async () => ((await mine())[serviceId('home', 'broken')] ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })

    // A deleted file is deregistered; other nodes' services are never touched.
    await client().request('PUT', '/v1/agent/service/register', { ID: 'mesh-home-theirs', Name: 'theirs', Port: 1, Meta: { 'mesh-net': 'home', 'mesh-node': 'n2' } })
    unlinkSync(join(dir, 'broken.yaml'))
    await waitFor('broken to be deregistered', async () => (!(await mine())[serviceId('home', 'broken')] ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })
    svc = (await mine())['mesh-home-theirs']
    assert.ok(svc, 'a service that is not ours stays')
    await deregisterService(client(), 'mesh-home-theirs')
  })

  test('an HTTP check with an exact status is run by the daemon; a script check runs only when allowed', async () => {
    await reg?.stop()
    const script = join(dir, 'check.sh')
    writeFileSync(script, '#!/bin/sh\necho "all good"\nexit 1\n')
    chmodSync(script, 0o755)
    for (const f of readdirSync(dir)) if (f.endsWith('.toml')) unlinkSync(join(dir, f))
    writeFileSync(join(dir, 'login.toml'), `port = ${webPort}\n[check]\ntype = "http"\nstatus = 401\ninterval = "1s"\n`)
    writeFileSync(join(dir, 'job.toml'), `port = 9\n[check]\ntype = "script"\ncommand = ["${script}"]\ninterval = "1s"\n`)
    reg = await startServices({ dir, who, consulUrl: consul.url, allowScripts: false, deregisterOnExit: true, resyncMs: 200, log: quiet })
    assert.match(
      reg
        .problems()
        .map((p) => p.message)
        .join('\n'),
      /job\.toml: check\.type: script checks run commands on this node and are off/,
    )
    webStatus = 200
    const login = async () => (await agentChecks(client()))[checkId(serviceId('home', 'login'))]
    await waitFor('login to have run', async () => ((await login())?.Output ? true : undefined), { timeoutMs: 10_000, intervalMs: 100 })
    assert.equal((await login())?.Status, 'critical')
    assert.match((await login())?.Output ?? '', /got 200, expected 401/)
    webStatus = 401
    await waitFor('login to pass', async () => ((await checkStatus('login')) === 'passing' ? true : undefined), { timeoutMs: 10_000, intervalMs: 100 })
    await reg.stop()
    assert.equal((await mine())[serviceId('home', 'login')], undefined, 'deregistered on exit when asked to')

    reg = await startServices({ dir, who, consulUrl: consul.url, allowScripts: true, deregisterOnExit: false, resyncMs: 200, log: quiet })
    await waitFor('the script (exit 1) to warn', async () => ((await checkStatus('job')) === 'warning' ? true : undefined), { timeoutMs: 10_000, intervalMs: 100 })
    assert.match((await agentChecks(client()))[checkId(serviceId('home', 'job'))]?.Output ?? '', /all good/)
    await reg.stop()
    reg = undefined
    assert.ok((await mine())[serviceId('home', 'job')], 'left registered on exit by default')

    // A daemon restarted over a registration it made before still runs the check (nothing to register).
    writeFileSync(script, '#!/bin/sh\necho "fixed"\nexit 0\n')
    reg = await startServices({ dir, who, consulUrl: consul.url, allowScripts: true, deregisterOnExit: false, resyncMs: 200, log: quiet })
    await waitFor('the restarted daemon to report the script passing', async () => ((await checkStatus('job')) === 'passing' ? true : undefined), { timeoutMs: 10_000, intervalMs: 100 })
    await reg.stop()
    reg = undefined
  })

  test('the health watch sees only passing instances of this network, and follows the catalog', async () => {
    const c = client()
    const ttDef = { stem: 'tt', file: 'tt.toml', name: 'tt', port: 5, protocol: 'tcp' as const, tags: [], meta: {}, check: { type: 'ttl' as const, ttlMs: 60_000, deregisterAfterMs: 600_000 } }
    await c.request('PUT', '/v1/agent/service/register', registrationFor(ttDef, who))
    await c.request('PUT', '/v1/agent/service/register', { ID: 'elsewhere', Name: 'tt', Port: 6, Meta: { 'mesh-net': 'work', 'mesh-node': 'n1' } })
    let latest: ReadonlyMap<string, unknown[]> = new Map()
    const w = watchHealth({ client: client(), filter: serviceFilters('home'), waitSeconds: 5, log: quiet, onChange: (m) => (latest = new Map(m)) })
    try {
      const ids = () => (latest.get('tt') ?? []).map((e) => (e as { Service: { ID: string } }).Service.ID)
      await waitFor('tt to be watched', async () => (latest.has('tt') ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })
      assert.deepEqual(ids(), [], 'a TTL check starts critical')
      await c.request('PUT', `/v1/agent/check/pass/${encodeURIComponent(checkId(serviceId('home', 'tt')))}`)
      await waitFor('tt to pass', async () => (ids().length === 1 ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })
      assert.deepEqual(ids(), [serviceId('home', 'tt')], "the other network's instance is filtered out")
      // A new port with the same TTL check: only the check's notes (the registration hash) change,
      // and that is what wakes the one query on every check (the next full re-read is minutes away).
      const port = () => (latest.get('tt') ?? []).map((e) => (e as { Service: { Port: number } }).Service.Port)
      await c.request('PUT', '/v1/agent/service/register', registrationFor({ ...ttDef, port: 7 }, who))
      await waitFor('the new port', async () => (port()[0] === 7 ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })
      await c.request('PUT', `/v1/agent/check/fail/${encodeURIComponent(checkId(serviceId('home', 'tt')))}`)
      await waitFor('tt to fail', async () => (ids().length === 0 ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })
      await deregisterService(c, serviceId('home', 'tt'))
      await waitFor('tt to leave the catalog', async () => (!latest.has('tt') ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })
    } finally {
      await w.stop()
      await deregisterService(c, 'elsewhere')
    }
  })

  test('the service command: add writes a file the daemon accepts, ls shows health, ttl reports, rm deletes', async () => {
    const cdir = mkdtempSync(join(tmpdir(), 'tinc-consul-svc-cli-'))
    const cli = (...args: string[]) =>
      spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'service', ...args, '--net', 'home', '--services-dir', cdir, '--consul', consul.url], {
        encoding: 'utf8',
        env: { ...process.env, TINC_CONSUL_CONFIG_DIR: cdir },
      })
    try {
      let r = cli('add', 'cron-job', '--port', '873', '--check', 'ttl', '--ttl', '2m', '--tag', 'a', '--tag', 'b,c', '--meta', 'owner=alice')
      assert.equal(r.status, 0, r.stderr)
      assert.match(r.stdout, /wrote .*cron-job\.toml: cron-job on tcp 873, ttl check/)
      const def = await readDefinition(join(cdir, 'cron-job.toml'), opts)
      assert.deepEqual([def.tags, def.meta, def.check], [['a', 'b', 'c'], { owner: 'alice' }, { type: 'ttl', ttlMs: 120_000, deregisterAfterMs: 600_000 }])
      r = cli('add', 'cron-job', '--port', '1')
      assert.equal(r.status, 2)
      assert.match(r.stderr, /already defines cron-job; edit it, or pass --force/)
      r = cli('add', 'bad', '--port', '1', '--check', 'http:/x', '--interval', '0s')
      assert.equal(r.status, 2)
      assert.match(r.stderr, /check\.interval: must be at least 1s/)
      assert.equal(readdirSync(cdir).includes('bad.toml'), false, 'nothing written for a bad definition')

      reg = await startServices({ dir: cdir, who, consulUrl: consul.url, allowScripts: false, deregisterOnExit: true, resyncMs: 200, log: quiet })
      r = cli('ls', '--json')
      assert.equal(r.status, 0, r.stderr)
      assert.deepEqual(
        JSON.parse(r.stdout).services.map((s: { name: string; health: string }) => [s.name, s.health]),
        [['cron-job', 'critical']],
      )
      r = cli('ttl', 'cron-job', 'pass', '--note', 'backup done')
      assert.equal(r.status, 0, r.stderr)
      r = cli('ls')
      assert.match(r.stdout, /^SERVICE\s+PORT\s+PROTO\s+CHECK\s+HEALTH\s+FILE\ncron-job\s+873\s+tcp\s+ttl\s+passing\s+cron-job\.toml$/m)
      r = cli('ls', '--all', '--json')
      assert.deepEqual(
        JSON.parse(r.stdout).map((e: { name: string; node: string; port: number }) => [e.name, e.node, e.port]),
        [['cron-job', 'n1', 873]],
      )
      r = cli('rm', 'cron-job')
      assert.equal(r.status, 0, r.stderr)
      await waitFor('cron-job to be deregistered', async () => (!(await mine())[serviceId('home', 'cron-job')] ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })
      r = cli('rm', 'cron-job')
      assert.match(r.stderr, /no definition for "cron-job"/)
    } finally {
      await reg?.stop()
      reg = undefined
      rmSync(cdir, { recursive: true, force: true })
    }
  })

  test("the node's own scoped names on the agent; a node over its cap has the excess refused and reported, and registered again when under it", async () => {
    const sdir = mkdtempSync(join(tmpdir(), 'tinc-consul-svc-cap-'))
    for (const n of ['a', 'b', 'c']) writeFileSync(join(sdir, `${n}.toml`), 'port = 9\n[check]\ntype = "ttl"\n')
    const scoped = serviceNaming('home', 'scoped')
    const opts = { dir: sdir, who, consulUrl: consul.url, allowScripts: false, deregisterOnExit: true, resyncMs: 200, naming: () => scoped, log: quiet }
    let capped = await startServices({ ...opts, maxServices: 2 })
    try {
      const names = async () => Object.values(await mine()).map((s) => `${s.ID} ${s.Service}`)
      assert.deepEqual((await names()).sort(), [`${serviceId('home', 'a')} tinc-home--n1--a`, `${serviceId('home', 'b')} tinc-home--n1--b`])
      assert.deepEqual(capped.limits(), { max: 2, registered: 2, refused: [{ file: 'c.toml', service: 'c', reason: "over this node's cap of 2 services (--max-services)" }] })
      await capped.stop()
      capped = await startServices({ ...opts, maxServices: 3 })
      assert.deepEqual(
        (await names()).sort(),
        ['a', 'b', 'c'].map((n) => `${serviceId('home', n)} tinc-home--n1--${n}`),
      )
      assert.deepEqual(capped.limits().refused, [])
    } finally {
      await capped.stop()
      rmSync(sdir, { recursive: true, force: true })
    }
  })
})

test('the registrar removes only registrations it made from a file, not a service registered on the agent by hand with our meta', () => {
  const svc = (meta: Record<string, string>) => ({ ID: 'x', Service: 'tinc-home--n1--x', Port: 1, Address: '10.99.0.1', Tags: [], Meta: meta }) as unknown as AgentService
  const onAgent = {
    mine: svc({ 'mesh-net': 'home', 'mesh-node': 'n1', 'mesh-file': 'gone.toml' }),
    byHand: svc({ 'mesh-net': 'home', 'mesh-node': 'n1' }),
    other: svc({ 'mesh-net': 'home', 'mesh-node': 'n2', 'mesh-file': 'x.toml' }),
    broken: svc({ 'mesh-net': 'home', 'mesh-node': 'n1', 'mesh-file': 'broken.toml' }),
  }
  assert.deepEqual(
    staleServices(new Map(), onAgent, 'n1', new Set(['broken.toml'])).map((s) => s.id),
    ['mine'],
  )
})
