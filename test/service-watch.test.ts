import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { EventEmitter } from 'node:events'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { pino } from 'pino'
import { createConsulClient } from '../src/consul/client.ts'
import { checkChanges, DEFAULT_SERVICE_READS, watchHealth, type CheckState } from '../src/consul/health.ts'
import { waitFor } from '../src/lab/daemon.ts'
import { serviceFilters } from '../src/mesh/services.ts'

const quiet = pino({ level: 'silent' })
const NAMES = Array.from({ length: 200 }, (_, i) => `tinc-home--n1--svc${String(i).padStart(3, '0')}`)

/**
 * A stand-in for a Consul agent with 200 service names, one passing instance each. It answers
 * the catalog, the check list and each service's health, and holds a blocking query (one whose
 * `index` is the current one) until that answer changes, as Consul does. It counts the sockets
 * open at once: what the agent's per-client connection limit counts.
 */
class FakeConsul {
  server: Server
  open = 0
  peakOpen = 0
  catalogIndex = 10
  checksIndex = 10
  serviceIndex = new Map(NAMES.map((n) => [n, 10]))
  critical = new Set<string>()
  /** Reads of /v1/health/service/NAME, by name. */
  healthReads = new Map<string, number>()
  private changed = new EventEmitter()

  constructor() {
    this.changed.setMaxListeners(0)
    this.server = createServer((req, res) => void this.handle(req, res))
    this.server.on('connection', (socket) => {
      this.open++
      this.peakOpen = Math.max(this.peakOpen, this.open)
      socket.on('close', () => this.open--)
    })
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as { port: number }).port}`
  }

  fail(name: string): void {
    this.critical.add(name)
    this.checksIndex++
    this.serviceIndex.set(name, (this.serviceIndex.get(name) ?? 0) + 1)
    this.changed.emit('change')
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://x')
    const answer = this.answer(url.pathname)
    if (!answer) return void res.writeHead(404).end()
    const waitFor = Number(url.searchParams.get('index') ?? 0)
    // A blocking query on the current index waits for a change (or the client giving up).
    while (waitFor > 0 && answer().index <= waitFor && !req.socket.destroyed) await new Promise((r) => this.changed.once('change', r))
    if (url.pathname.startsWith('/v1/health/service/')) {
      const name = decodeURIComponent(url.pathname.slice('/v1/health/service/'.length))
      this.healthReads.set(name, (this.healthReads.get(name) ?? 0) + 1)
    }
    const { index, body } = answer()
    res.writeHead(200, { 'content-type': 'application/json', 'x-consul-index': String(index) }).end(JSON.stringify(body))
  }

  private answer(path: string): (() => { index: number; body: unknown }) | undefined {
    if (path === '/v1/catalog/services') return () => ({ index: this.catalogIndex, body: Object.fromEntries(NAMES.map((n) => [n, []])) })
    if (path === '/v1/health/state/any')
      return () => ({
        index: this.checksIndex,
        body: NAMES.map((n, i) => ({
          Node: 'n1',
          CheckID: `mesh-home-svc${i}:check`,
          ServiceID: `mesh-home-svc${i}`,
          ServiceName: n,
          Status: this.critical.has(n) ? 'critical' : 'passing',
          ModifyIndex: this.serviceIndex.get(n),
        })),
      })
    if (!path.startsWith('/v1/health/service/')) return undefined
    const name = decodeURIComponent(path.slice('/v1/health/service/'.length))
    const port = 1000 + NAMES.indexOf(name)
    const instance = { Node: { Node: 'n1' }, Service: { ID: `mesh-home-${name}`, Service: name, Address: '10.99.0.1', Port: port, Meta: { 'mesh-net': 'home', 'mesh-node': 'n1' } }, Checks: [] }
    return () => ({ index: this.serviceIndex.get(name) ?? 1, body: this.critical.has(name) ? [] : [instance] })
  }
}

let consul: FakeConsul
before(async () => {
  consul = new FakeConsul()
  await new Promise<void>((r) => consul.server.listen(0, '127.0.0.1', r))
})
after(async () => {
  consul.server.closeAllConnections()
  await new Promise((r) => consul.server.close(r))
})

test('200 service names are watched over a fixed number of connections, and a failed check is read again alone', async () => {
  let latest: ReadonlyMap<string, unknown[]> = new Map()
  const w = watchHealth({ client: createConsulClient({ url: consul.url }), filter: serviceFilters('home'), waitSeconds: 300, log: quiet, onChange: (m) => (latest = new Map(m)) })
  try {
    const passing = () => [...latest.values()].filter((e) => e.length === 1).length
    await waitFor('every name to be read', async () => (passing() === NAMES.length ? true : undefined), { timeoutMs: 20_000, intervalMs: 20 })
    // Two blocking queries (catalog, checks) and the reads in flight: not one per name.
    const fixed = 2 + DEFAULT_SERVICE_READS
    assert.ok(consul.peakOpen <= fixed, `at most ${fixed} connections to the agent at once, saw ${consul.peakOpen} for ${NAMES.length} names`)

    const before = new Map(consul.healthReads)
    const victim = NAMES[42] as string
    consul.fail(victim)
    await waitFor(`${victim} to leave`, async () => (latest.get(victim)?.length === 0 ? true : undefined), { timeoutMs: 20_000, intervalMs: 20 })
    const readAgain = NAMES.filter((n) => (consul.healthReads.get(n) ?? 0) !== (before.get(n) ?? 0))
    assert.deepEqual(readAgain, [victim], 'only the name whose check changed is read again')
    assert.equal(passing(), NAMES.length - 1)
    assert.ok(consul.peakOpen <= fixed, `still at most ${fixed} connections, saw ${consul.peakOpen}`)
  } finally {
    await w.stop()
  }
})

test('the check list names what changed: a service check by its state and index, a node check by every name on that node', () => {
  const check = (node: string, serviceName: string, status = 'passing', modifyIndex = 1): CheckState => ({ node, checkId: `${serviceName || 'serfHealth'}:${node}`, serviceName, status, modifyIndex })
  const changes = checkChanges()
  const base = [check('n1', 'web'), check('n1', 'db'), check('n2', 'web'), check('n2', 'mail')]
  assert.deepEqual([...changes.apply(base)].sort(), ['db', 'mail', 'web'], 'everything is new at first')
  assert.deepEqual([...changes.apply(base)], [], 'the same list again: nothing')
  assert.deepEqual([...changes.apply([check('n1', 'web'), check('n1', 'db', 'critical', 2), check('n2', 'web'), check('n2', 'mail')])], ['db'])
  // n2 goes critical: its node check shows up in the list (only failing node checks are asked for).
  const down = [check('n1', 'web'), check('n1', 'db', 'critical', 2), check('n2', 'web'), check('n2', 'mail'), check('n2', '', 'critical', 3)]
  assert.deepEqual([...changes.apply(down)].sort(), ['mail', 'web'])
  assert.deepEqual([...changes.apply(down.slice(0, 4))].sort(), ['mail', 'web'], 'and again when it comes back')
})
