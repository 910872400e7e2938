import { mkdir, mkdtemp, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pino } from 'pino'
import { startSync, type AppliedEvent, type SyncDaemon } from '../src/mesh/sync.ts'
import { rsaPublicPem } from './helpers-keys.ts'

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

export async function startNode(opts: { root: string; name: string; octet: number; isPublic: boolean; consulUrl: string; token?: string; tincDir?: string }): Promise<TestNode> {
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
  const until = (check: () => boolean | Promise<boolean>, what: string) =>
    new Promise<void>((resolve, reject) => {
      const guard = setTimeout(() => {
        waiters.delete(test)
        reject(new Error(`${opts.name}: no apply made this true: ${what}`))
      }, 20_000)
      const test = () => {
        void Promise.resolve(check()).then((ok) => {
          if (!ok) return
          clearTimeout(guard)
          waiters.delete(test)
          resolve()
        })
      }
      waiters.add(test)
      test()
    })
  return { name: opts.name, tincDir, stateDir, daemon, events, until }
}

export async function tempRoot(): Promise<string> {
  return mkdtemp(join(tmpdir(), 'tc-sync-'))
}
