import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdir, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { createConsulClient } from '../src/consul/client.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { freePort, startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { prettyLine } from '../src/log.ts'
import { cachePath } from '../src/mesh/cache.ts'
import { createNetwork } from '../src/mesh/network.ts'
import { NETWORK, nodeRecord } from './helpers-keys.ts'
import { makeTincDir, tempRoot } from './sync-fixture.ts'

// makeTincDir puts the node in <root>/alpha/tinc: the network is called "tinc" and --dir is <root>/alpha.
const NET = 'tinc'
const MAIN = join(import.meta.dirname, '..', 'src', 'cli', 'main.ts')

interface Running {
  child: ChildProcess
  lines: Array<Record<string, unknown>>
  /** Lines on stdout that weren't JSON: journald would store them as they are. */
  stray: string[]
  exit: Promise<number | null>
  /** Resolves with the first log line (present or future) for which `match` holds. */
  line(match: (l: Record<string, unknown>) => boolean, what: string): Promise<Record<string, unknown>>
}

function spawnDaemon(argv: string[]): Running {
  const child = spawn(process.execPath, ['--import', 'tsx', MAIN, 'run', ...argv], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, TINC_CONSUL_LOG_LEVEL: 'info', TINC_CONSUL_LOG_FORMAT: '' },
  })
  const lines: Array<Record<string, unknown>> = []
  const stray: string[] = []
  const waiters = new Set<() => void>()
  let buf = ''
  child.stdout?.setEncoding('utf8').on('data', (d: string) => {
    buf += d
    let nl
    while ((nl = buf.indexOf('\n')) >= 0) {
      const text = buf.slice(0, nl)
      buf = buf.slice(nl + 1)
      try {
        lines.push(JSON.parse(text) as Record<string, unknown>)
      } catch {
        stray.push(text)
      }
      for (const w of [...waiters]) w()
    }
  })
  let stderr = ''
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const exit = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
  const line = (match: (l: Record<string, unknown>) => boolean, what: string) =>
    new Promise<Record<string, unknown>>((resolve, reject) => {
      const guard = setTimeout(() => {
        waiters.delete(check)
        reject(new Error(`the daemon never logged ${what}; stdout:\n${lines.map((l) => JSON.stringify(l)).join('\n')}\nstderr:\n${stderr}`))
      }, 30_000)
      const check = () => {
        const hit = lines.find(match)
        if (!hit) return
        clearTimeout(guard)
        waiters.delete(check)
        resolve(hit)
      }
      waiters.add(check)
      check()
    })
  return { child, lines, stray, exit, line }
}

const msg = (text: string) => (l: Record<string, unknown>) => typeof l.msg === 'string' && l.msg.startsWith(text)

/** The answer section of a dig query, as [name, ttl, type, data] rows. */
function dig(port: number, name: string): string[][] {
  const r = spawnSync('dig', ['@127.0.0.1', '-p', String(port), name, 'A', '+noall', '+answer', '+tries=1', '+time=2'], { encoding: 'utf8' })
  return r.stdout
    .split('\n')
    .filter((l) => l && !l.startsWith(';'))
    .map((l) => l.split(/\s+/))
    .map((f) => [f[0] ?? '', f[1] ?? '', f[3] ?? '', f[4] ?? ''])
}

async function until<T>(what: string, fn: () => T | undefined | Promise<T | undefined>, ms = 20_000): Promise<T> {
  const end = Date.now() + ms
  for (;;) {
    const v = await fn()
    if (v !== undefined) return v
    if (Date.now() > end) throw new Error(`gave up waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 100))
  }
}

describe('the daemon as a process: logs, SIGHUP, SIGTERM, a restart without Consul', () => {
  let consul: DevConsul
  let root: string
  let argv: string[]
  let envFile: string
  let stateDir: string
  let dnsPort: number
  let statusPort: number
  let daemon: Running | undefined

  before(async () => {
    consul = await startDevConsul()
    root = await tempRoot()
    const admin = createConsulClient({ url: consul.url })
    const layout = kvLayout(NET)
    await createNetwork(admin, layout, NETWORK)
    await admin.kvPut(layout.node('beta'), JSON.stringify(nodeRecord('beta', 2)))
    await makeTincDir(root, 'alpha', 1, true)
    const configDir = join(root, 'etc-tinc-consul')
    await mkdir(configDir, { recursive: true })
    envFile = join(configDir, `${NET}.env`)
    await writeFile(envFile, 'TINC_CONSUL_DNS_NODE_TTL=30\n')
    stateDir = join(root, 'state')
    dnsPort = await freePort()
    statusPort = await freePort()
    argv = [
      '--net',
      NET,
      '--dir',
      join(root, 'alpha'),
      '--config-dir',
      configDir,
      '--state-dir',
      stateDir,
      '--pidfile',
      join(root, 'tinc.pid'),
      '--run-dir',
      join(root, 'run'),
      '--tinc-log',
      join(root, 'tinc.log'),
      '--services-dir',
      join(root, 'services'),
      '--consul',
      consul.url,
      '--join-port',
      '0',
      '--dns-port',
      String(dnsPort),
      '--dns-workers',
      '1',
      '--status-port',
      String(statusPort),
    ]
  })
  after(async () => {
    daemon?.child.kill('SIGKILL')
    await consul?.stop()
    if (root) await rm(root, { recursive: true, force: true })
  })

  test('logs JSON lines on stdout (for journald) and serves the mesh over DNS', async () => {
    daemon = spawnDaemon(argv)
    await daemon.line(msg('tinc-consul running'), '"tinc-consul running"')
    const beta = await until('beta.mesh in DNS', () => dig(dnsPort, 'beta.mesh').find((r) => r[3] === '10.99.0.2'))
    assert.equal(beta[1], '30', 'the node TTL comes from the config file')
    assert.deepEqual(daemon.stray, [], 'every stdout line is JSON')
    assert.ok(
      daemon.lines.every((l) => typeof l.level === 'number' && typeof l.time === 'number'),
      'pino lines',
    )
  })

  test('SIGHUP reads the config file again; a broken file is refused and the daemon keeps its settings', async () => {
    const d = daemon
    assert.ok(d, 'the daemon runs')
    await writeFile(envFile, 'TINC_CONSUL_DNS_NODE_TTL=77\n')
    d.child.kill('SIGHUP')
    await d.line((l) => msg('SIGHUP: restarting')(l) && JSON.stringify(l.changed).includes('dns'), 'a restart for the DNS change')
    await until('the new TTL', () => (dig(dnsPort, 'beta.mesh')[0]?.[1] === '77' ? true : undefined))

    await writeFile(envFile, 'this is not a config line\n')
    d.child.kill('SIGHUP')
    const refused = await d.line(msg('SIGHUP: the new settings are refused'), 'the refusal')
    assert.match(JSON.stringify(refused.err), /expected TINC_CONSUL_NAME=value/)
    assert.equal(dig(dnsPort, 'beta.mesh')[0]?.[1], '77', 'still serving with the settings it had')
    assert.equal(d.child.exitCode, null, 'still running')

    await writeFile(envFile, 'TINC_CONSUL_DNS_NODE_TTL=77\n')
    d.child.kill('SIGHUP')
    await d.line(msg('SIGHUP: nothing changed'), 'that nothing changed')
  })

  test('SIGTERM stops every part, writes the view cache and exits 0', async (t) => {
    const d = daemon
    assert.ok(d, 'the daemon runs')
    await rm(cachePath(stateDir), { force: true })
    d.child.kill('SIGTERM')
    assert.equal(await d.exit, 0)
    const stopped = d.lines.find(msg('stopped'))
    assert.ok(stopped, 'it logged that it stopped')
    t.diagnostic(`stopped in ${String(stopped.ms)} ms after SIGTERM (budget 2000 ms)`)
    assert.ok(existsSync(cachePath(stateDir)), 'the view cache was flushed on the way out')
    daemon = undefined
  })

  test('restarted while Consul is down, it serves DNS and status from the cached view', async () => {
    await consul.stop()
    const d = spawnDaemon(argv)
    daemon = d
    await d.line(msg('tinc-consul running'), '"tinc-consul running"')
    const beta = await until('beta.mesh from the cache', () => dig(dnsPort, 'beta.mesh').find((r) => r[3] === '10.99.0.2'))
    assert.equal(beta[1], '77')
    const res = await fetch(`http://127.0.0.1:${statusPort}/status`)
    const status = (await res.json()) as { self: { name: string }; consul: { reachable: boolean }; nodes: Array<{ name: string }> }
    assert.equal(status.consul.reachable, false)
    assert.deepEqual(status.nodes.map((n) => n.name).sort(), ['alpha', 'beta'])
    d.child.kill('SIGTERM')
    assert.equal(await d.exit, 0, 'it stops cleanly with Consul unreachable too')
    daemon = undefined
  })
})

describe('log format', () => {
  test('pretty lines for people: time, level, component, message, fields and the error', () => {
    const line = JSON.stringify({
      level: 50,
      time: Date.UTC(2026, 10, 22, 3, 4, 5, 6),
      msg: 'could not write',
      component: 'dns',
      file: '/etc/hosts',
      err: { message: 'EACCES', code: 'E_IO', stack: 'Error: EACCES\n    at x' },
    })
    assert.equal(prettyLine(line), '03:04:05.006 ERROR [dns] could not write file=/etc/hosts err="E_IO: EACCES"\n')
    assert.equal(prettyLine('not json'), 'not json')
  })

  test('a daemon on a terminal logs pretty lines; piped, JSON', { skip: spawnSync('script', ['--version']).status !== 0 ? 'util-linux script is missing' : false }, () => {
    const code = `import('${join(import.meta.dirname, '..', 'src', 'log.ts')}').then((m) => m.createLogger({ fd: 1 }).child({ component: 'x' }).info({ peer: 'beta' }, 'hello'))`
    const tty = spawnSync('script', ['-qec', `${process.execPath} --import tsx -e "${code}"`, '/dev/null'], { encoding: 'utf8', env: { ...process.env, TINC_CONSUL_LOG_FORMAT: '' } })
    const ESC = String.fromCharCode(27)
    assert.match(tty.stdout, new RegExp(`^\\d\\d:\\d\\d:\\d\\d\\.\\d{3} ${ESC}\\[32mINFO ${ESC}\\[0m \\[x\\] hello peer=beta\\r?$`, 'm'))
    const piped = spawnSync(process.execPath, ['--import', 'tsx', '-e', code], { encoding: 'utf8', env: { ...process.env, TINC_CONSUL_LOG_FORMAT: '' } })
    assert.deepEqual(Object.keys(JSON.parse(piped.stdout) as object), ['level', 'time', 'component', 'peer', 'msg'])
  })
})
