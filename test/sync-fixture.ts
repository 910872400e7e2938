import { mkdir, mkdtemp, writeFile } from 'node:fs/promises'
import { createServer, request, type ServerResponse } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pino } from 'pino'
import { startSync, type AppliedEvent, type SyncDaemon } from '../src/mesh/sync.ts'
import { NETWORK, nodeRecord, rsaPublicPem } from './helpers-keys.ts'
import { randomUUID } from 'node:crypto'
import { createJoinServerToken } from '../src/consul/acl.ts'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { startSeparatedJoinServer, type SeparatedJoinServer } from '../src/mesh/join-server.ts'
import { kvLayout, type KvLayout } from '../src/mesh/kv-layout.ts'
import { createNetwork } from '../src/mesh/network.ts'

export const quiet = pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' })

export interface TestNode {
  name: string
  tincDir: string
  stateDir: string
  daemon: SyncDaemon
  events: AppliedEvent[]
  /** Resolves once an apply has happened after which `check` holds (checked at every apply, never on a timer). */
  until(check: () => boolean | Promise<boolean>, what: string): Promise<void>
}

/** A tinc directory as `tinc-consul init` would leave it: tinc.conf, our host file with a real key. */
export async function makeTincDir(root: string, name: string, octet: number, isPublic: boolean): Promise<string> {
  const dir = join(root, name, 'tinc')
  await mkdir(join(dir, 'hosts'), { recursive: true })
  await writeFile(join(dir, 'tinc.conf'), `Name = ${name}\nStrictSubnets = yes\n# a line the operator wrote\n`)
  const lines = [...(isPublic ? [`Address = 198.18.0.${octet}`] : []), 'Port = 655', `Subnet = 10.99.0.${octet}/32`, rsaPublicPem(), '']
  await writeFile(join(dir, 'hosts', name), lines.join('\n'))
  return dir
}

export async function startNode(opts: {
  root: string
  name: string
  octet: number
  isPublic: boolean
  consulUrl: string
  token?: string
  tincDir?: string
  keepFile?: string
  /** Receives the access table's nft scripts; by default they go nowhere, so no test touches the host's rules. */
  nft?: (script: string) => Promise<void>
  /** Receives `ip` commands (a `group move` renumbering the node); by default they go nowhere, like nft's. */
  ip?: (args: string[]) => Promise<void>
}): Promise<TestNode> {
  const tincDir = opts.tincDir ?? (await makeTincDir(opts.root, opts.name, opts.octet, opts.isPublic))
  const stateDir = join(opts.root, opts.name, 'state')
  const events: AppliedEvent[] = []
  const waiters = new Set<() => void>()
  const daemon = await startSync({
    net: 'test',
    tincDir,
    stateDir,
    pidFile: join(opts.root, opts.name, 'tinc.pid'),
    consulUrl: opts.consulUrl,
    token: opts.token,
    keepFile: opts.keepFile,
    accessNft: opts.nft ?? (async () => {}),
    ip: opts.ip ?? (async () => {}),
    waitSeconds: 30,
    log: quiet,
    onApplied: (e) => {
      events.push(e)
      for (const w of [...waiters]) w()
    },
    onIgnored: () => {
      for (const w of [...waiters]) w()
    },
  })
  // Checked after every apply, and every 100 ms besides: some states (Consul unreachable) change without an apply.
  const until = (check: () => boolean | Promise<boolean>, what: string) =>
    new Promise<void>((resolve, reject) => {
      const guard = setTimeout(() => {
        clearInterval(tick)
        waiters.delete(test)
        reject(new Error(`${opts.name}: nothing made this true: ${what}`))
      }, 20_000)
      const test = () => {
        void Promise.resolve(check()).then((ok) => {
          if (!ok || !waiters.has(test)) return
          clearTimeout(guard)
          clearInterval(tick)
          waiters.delete(test)
          resolve()
        })
      }
      const tick = setInterval(test, 100)
      waiters.add(test)
      test()
    })
  return { name: opts.name, tincDir, stateDir, daemon, events, until }
}

/** A stand-in for `nft -f -` (the access table's loader) that records every script, and then throws `fail` while it is set. */
export interface RecordingNft {
  /** Every script given, in order, failed ones included. */
  calls: string[]
  fail: Error | undefined
  nft: (script: string) => Promise<void>
}

export function recordingNft(fail?: Error): RecordingNft {
  const r: RecordingNft = {
    calls: [],
    fail,
    nft: async (script) => {
      r.calls.push(script)
      if (r.fail) throw r.fail
    },
  }
  return r
}

export async function tempRoot(): Promise<string> {
  return mkdtemp(join(tmpdir(), 'tc-sync-'))
}

/** What a fault proxy does with one request: pass it on, answer it with an error, or hang it. */
export type Fault = 'pass' | { status: number; body?: string } | 'hang'

/** An upstream answer, which a proxy's rewrite may change before it goes back. */
export interface Answer {
  status: number
  headers: Record<string, string | string[] | undefined>
  body: Buffer
}

export interface FaultProxy {
  url: string
  /** Every request seen, in order (method and path with query). */
  seen: string[]
  /** Decides each request; the default passes everything. */
  rule: (method: string, url: URL) => Fault
  /** Changes an upstream answer (an ACL filter, a blank read); the default passes it as it is. */
  rewrite: (url: URL, answer: Answer) => Answer
  stop(): Promise<void>
}

/**
 * An HTTP proxy in front of a real Consul agent that can fail, hold or alter single requests:
 * the faults a leader change, an agent's per-client connection limit or an ACL filter cause,
 * one read at a time, which a real agent won't do on demand.
 */
export async function startFaultProxy(target: string): Promise<FaultProxy> {
  const upstream = new URL(target)
  const held = new Set<ServerResponse>()
  const proxy: FaultProxy = {
    url: '',
    seen: [],
    rule: () => 'pass',
    rewrite: (_url, answer) => answer,
    stop: async () => {
      for (const res of held) res.destroy()
      server.closeAllConnections()
      await new Promise((r) => server.close(r))
    },
  }
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://proxy')
    proxy.seen.push(`${req.method ?? 'GET'} ${url.pathname}${url.search}`)
    const fault = proxy.rule(req.method ?? 'GET', url)
    if (fault === 'hang') {
      held.add(res)
      res.on('close', () => held.delete(res))
      return
    }
    if (fault !== 'pass') {
      res.statusCode = fault.status
      return res.end(fault.body ?? 'injected fault')
    }
    const headers = { ...req.headers, 'accept-encoding': 'identity' }
    const out = request({ host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers }, (up) => {
      const chunks: Buffer[] = []
      up.on('data', (c: Buffer) => chunks.push(c))
      up.on('end', () => {
        const answer = proxy.rewrite(url, { status: up.statusCode ?? 502, headers: { ...up.headers }, body: Buffer.concat(chunks) })
        delete answer.headers['content-length']
        delete answer.headers['transfer-encoding']
        res.writeHead(answer.status, { ...answer.headers, 'content-length': String(answer.body.length) })
        res.end(answer.body)
      })
      up.on('error', () => res.destroy())
    })
    out.on('error', () => res.destroy())
    req.pipe(out)
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  const address = server.address()
  proxy.url = `http://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`
  return proxy
}

/**
 * A network with ACLs on and one public node, "hub", whose join endpoint runs as `run`
 * serves it (a front as nobody, a broker with a real join-server token). Needs root.
 */
export async function separatedJoinFixture(opts: { burst: number }): Promise<{
  consul: DevConsul
  admin: ConsulClient
  layout: KvLayout
  management: string
  joinToken: string
  server: SeparatedJoinServer
  stop(): Promise<void>
}> {
  const management = randomUUID()
  const consul = await startDevConsul({ managementToken: management })
  const admin = createConsulClient({ url: consul.url, token: management })
  const layout = kvLayout('test')
  await createNetwork(admin, layout, NETWORK)
  await admin.kvPut(layout.node('hub'), JSON.stringify(nodeRecord('hub', 1)))
  await admin.kvPut(layout.ipam('10.99.0.1'), JSON.stringify({ name: 'hub', at: '2026-11-21T00:00:00.000Z' }))
  const joinToken = (await createJoinServerToken(admin, layout, 'hub')).secretId
  const server = await startSeparatedJoinServer(
    { net: 'test', prefix: layout.prefix, consulUrl: consul.url, self: 'hub', host: '127.0.0.1', port: 0, endpoints: ['127.0.0.1:0'], user: 'nobody', burst: opts.burst },
    joinToken,
    quiet,
  )
  return {
    consul,
    admin,
    layout,
    management,
    joinToken,
    server,
    stop: async () => {
      await server.close()
      await consul.stop()
    },
  }
}
