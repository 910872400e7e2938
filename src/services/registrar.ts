import { mkdir } from 'node:fs/promises'
import { basename } from 'node:path'
import { watch as chokidarWatch } from 'chokidar'
import { createConsulClient } from '../consul/client.ts'
import type { Logger } from '../log.ts'
import { agentSync, deregisterAll, type DefinitionEntry } from './agent-sync.ts'
import { checkLoops } from './check-loops.ts'
import { DefinitionError, isServiceFile, readDefinition, type ServiceDefinition } from './definition.ts'
import { serviceNaming, type ServiceNaming } from './naming.ts'
import { DEFAULT_MAX_SERVICES, META, registrationFor, type LocalRefusal, type NodeIdentity } from './registration.ts'

/**
 * Keeps the local Consul agent's services equal to the files in the services
 * directory: a file added or changed is (re-)registered, a file deleted is
 * deregistered, and every `resyncMs` the agent's list is compared with ours, so
 * a restarted agent that lost them gets them back. A file that stops parsing
 * keeps its last good registration (and is reported), never taking the others
 * down with it.
 */
export interface ServicesOptions {
  dir: string
  who: NodeIdentity
  consulUrl: string
  token?: string
  allowScripts: boolean
  /** Deregister on stop. Off by default: checks and deregister_critical_after handle a dead node. */
  deregisterOnExit: boolean
  resyncMs: number
  /**
   * How names look in Consul, from the network record (src/services/naming.ts). Undefined while
   * the record is unknown: nothing is registered or deregistered until every node agrees.
   * Default: bare names, what a network record without the field means.
   */
  naming?(): ServiceNaming | undefined
  /** Most services registered (default DEFAULT_MAX_SERVICES); the files past it, in file-name order, are refused (see planRegistrations). */
  maxServices?: number
  log: Logger
}

export interface ServiceProblem {
  file: string
  message: string
}

export interface ServicesRegistrar {
  definitions(): ServiceDefinition[]
  problems(): ServiceProblem[]
  /** The cap, how many definitions are registered under it, and the valid ones that are not (over the cap, a name too long in Consul). */
  limits(): LocalLimits
  /** Reconciles with the agent now; resolves when done (tests and `service` commands use it). */
  sync(): Promise<void>
  stop(): Promise<void>
}

export async function startServices(opts: ServicesOptions): Promise<ServicesRegistrar> {
  const log = opts.log.child({ component: 'services' })
  const client = createConsulClient({ url: opts.consulUrl, token: opts.token })
  await mkdir(opts.dir, { recursive: true, mode: 0o755 })
  let stopped = false
  let ready = false
  const max = opts.maxServices ?? DEFAULT_MAX_SERVICES
  const capped = localLimits(log, max)
  const checks = checkLoops({ client, address: opts.who.address, log, entry: (file) => dir.desired.get(file), stopped: () => stopped, lost: () => void agent.sync() })
  const agent = agentSync({
    client,
    who: opts.who,
    log,
    max,
    naming: () => (opts.naming ? opts.naming() : serviceNaming(opts.who.net, 'bare')),
    desired: () => dir.desired.values(),
    invalidFiles: () => new Set(dir.problems.keys()),
    active: () => ready && !stopped,
    limits: capped,
    checks,
  })
  const dir = watchServiceDir(opts, log, {
    changed: () => void agent.sync(),
    removed(file, had) {
      checks.run(file)
      if (had) void agent.sync()
    },
  })
  await dir.loaded
  ready = true
  log.info({ dir: opts.dir, services: dir.desired.size, invalid: dir.problems.size }, 'services directory loaded')
  await agent.sync()
  const resync = setInterval(() => void agent.sync(), opts.resyncMs)
  resync.unref()

  return {
    definitions: () => [...dir.desired.values()].map((e) => e.def),
    problems: () => [...dir.problems].map(([file, message]) => ({ file, message })),
    limits: capped.limits,
    sync: async () => {
      await dir.settled()
      await agent.sync()
      const running = agent.running()
      if (running) await running
    },
    async stop() {
      stopped = true
      clearInterval(resync)
      checks.stopAll()
      await dir.close()
      await agent.running()
      if (opts.deregisterOnExit) await deregisterAll(client, log, dir.desired.values())
    },
  }
}

/**
 * The services directory, read and watched: the valid definitions by file, and the files that
 * don't parse (a file that stops parsing keeps its last good definition here).
 */
function watchServiceDir(opts: Pick<ServicesOptions, 'dir' | 'allowScripts' | 'who'>, log: Logger, on: { changed(): void; removed(file: string, had: boolean): void }) {
  const desired = new Map<string, DefinitionEntry>()
  const problems = new Map<string, string>()
  // File events are handled one at a time, in order: a quick add-then-change must not race.
  let queue = Promise.resolve()
  const load = async (path: string) => {
    const file = basename(path)
    try {
      const def = await readDefinition(path, { allowScripts: opts.allowScripts })
      const clash = [...desired.values()].find((e) => e.def.stem === def.stem && e.def.file !== file)
      if (clash) throw new DefinitionError(file, `same service ID as ${clash.def.file}; rename one of them`)
      const reg = registrationFor(def, opts.who)
      const previous = desired.get(file)
      desired.set(file, { def, reg })
      if (problems.delete(file)) log.info({ file }, 'service file is valid again')
      if (previous?.reg.Meta[META.hash] !== reg.Meta[META.hash]) on.changed()
    } catch (err) {
      const message = (err as Error).message
      if (problems.get(file) !== message)
        log.error(
          { file, err: { message, code: (err as { code?: string }).code } },
          desired.has(file) ? 'invalid service file; keeping its last good registration' : 'invalid service file; not registered',
        )
      problems.set(file, message)
    }
  }
  // A file is read once its size has held still for 200 ms: an editor or `echo >` that writes
  // in steps would otherwise be read half-written, refused, and (its later events coalesced)
  // never read again.
  const watcher = chokidarWatch(opts.dir, { depth: 0, ignoreInitial: false, awaitWriteFinish: { stabilityThreshold: 200, pollInterval: 50 } })
  watcher.on('all', (event, path) => {
    if (!isServiceFile(path)) return
    queue = queue.then(async () => {
      if (event === 'add' || event === 'change') await load(path)
      else if (event === 'unlink') {
        const file = basename(path)
        problems.delete(file)
        const had = desired.delete(file)
        on.removed(file, had)
      }
    })
  })
  watcher.on('error', (err) => log.error({ err, dir: opts.dir }, 'watching the services directory failed'))
  return {
    desired,
    problems,
    /** Every file read once. */
    loaded: new Promise<void>((resolve) => watcher.once('ready', () => resolve())).then(() => queue),
    /** The file events so far handled. */
    settled: () => queue,
    async close() {
      await watcher.close()
      await queue
    },
  }
}

export interface LocalLimits {
  max: number
  registered: number
  refused: LocalRefusal[]
}

/** The cap's bookkeeping: refused definitions kept for status and logged when one first appears, and the wait for the network record. */
function localLimits(log: Logger, max: number) {
  let current: LocalRefusal[] = []
  let registered = 0
  let waited = false
  let again: NodeJS.Timeout | undefined
  return {
    limits: (): LocalLimits => ({ max, registered, refused: current }),
    note(wanted: number, next: LocalRefusal[]) {
      registered = wanted
      for (const r of next) if (!current.some((c) => c.file === r.file && c.reason === r.reason)) log.error({ file: r.file, service: r.service, max }, `service not registered: ${r.reason}`)
      current = next
    },
    /** No network record yet: said once, and tried again in a second (the daemon reads it right after start), not at the next resync. */
    waiting(retry: () => void) {
      if (!waited) log.info('waiting for the network record (how service names look in consul) before registering services')
      waited = true
      again ??= setTimeout(() => {
        again = undefined
        retry()
      }, 1000).unref()
    },
  }
}
