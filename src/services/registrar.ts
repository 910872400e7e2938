import { mkdir } from 'node:fs/promises'
import { basename } from 'node:path'
import { watch as chokidarWatch } from 'chokidar'
import { agentServices, deregisterService, metaFilter, registerService, updateTtlCheck } from '../consul/agent.ts'
import { createConsulClient } from '../consul/client.ts'
import { ConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import { DefinitionError, isServiceFile, readDefinition, type ServiceDefinition } from './definition.ts'
import { runLocalCheck } from './local-check.ts'
import { checkId, isLocalCheck, META, registrationFor, type NodeIdentity, type Registration } from './registration.ts'

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
  log: Logger
}

export interface ServiceProblem {
  file: string
  message: string
}

export interface ServicesRegistrar {
  definitions(): ServiceDefinition[]
  problems(): ServiceProblem[]
  /** Reconciles with the agent now; resolves when done (tests and `service` commands use it). */
  sync(): Promise<void>
  stop(): Promise<void>
}

export async function startServices(opts: ServicesOptions): Promise<ServicesRegistrar> {
  const log = opts.log.child({ component: 'services' })
  const client = createConsulClient({ url: opts.consulUrl, token: opts.token })
  await mkdir(opts.dir, { recursive: true, mode: 0o755 })
  type Entry = { def: ServiceDefinition; reg: Registration }
  const desired = new Map<string, Entry>()
  const problems = new Map<string, string>()
  let stopped = false
  let ready = false
  let agentDown = false
  /** IDs we have seen on the agent: one missing later means the agent lost it (restart, wiped data). */
  const seenOnAgent = new Set<string>()

  /**
   * One loop per file whose check the daemon runs, tied to the definition it started from:
   * a changed or deleted file ends its loop. `now` runs the check at once (a registration
   * just reset it to critical).
   */
  const loops = new Map<string, { entry: Entry; timer?: NodeJS.Timeout }>()
  const runLocal = (file: string, now = false) => {
    const entry = desired.get(file)
    const current = loops.get(file)
    if (current && current.entry === entry) {
      if (!now) return
      clearTimeout(current.timer)
    } else if (current) {
      clearTimeout(current.timer)
      loops.delete(file)
    }
    if (!entry || stopped || !isLocalCheck(entry.def)) return
    const loop = current?.entry === entry ? current : { entry }
    loops.set(file, loop)
    const { def, reg } = entry
    const tick = () => {
      if (loops.get(file) !== loop || stopped) return
      void runLocalCheck(def, opts.who.address)
        .then((r) => updateTtlCheck(client, checkId(reg.ID), r.status, r.output))
        .catch((err: unknown) => {
          // The agent doesn't know the check: it restarted or lost its state. Register again.
          if (err instanceof ConsulError && err.status !== undefined && err.status >= 400 && err.status < 500) void sync()
          else log.debug({ err, file }, 'could not report a check result')
        })
        .finally(() => {
          if (loops.get(file) === loop && !stopped && 'intervalMs' in def.check) loop.timer = setTimeout(tick, def.check.intervalMs)
        })
    }
    tick()
  }

  // One reconcile at a time; a request during one runs once more afterwards.
  let running: Promise<void> | undefined
  let again = false
  const sync = (): Promise<void> => {
    if (!ready || stopped) return Promise.resolve()
    if (running) {
      again = true
      return running
    }
    running = reconcile()
      .catch((err: unknown) => {
        if (!agentDown) log.warn({ err }, 'cannot reach the consul agent; services are registered when it is back')
        agentDown = true
      })
      .finally(() => {
        running = undefined
        if (again) {
          again = false
          void sync()
        }
      })
    return running
  }

  /** The agent refused one service (ACLs, a check it won't take): logged once per reason, the others go on. */
  const refusedByAgent = new Map<string, string>()
  const refused = (id: string, err: unknown, what: string) => {
    if (!(err instanceof ConsulError) || err.status === undefined) throw err
    if (refusedByAgent.get(id) !== err.message) log.error({ id, err: { message: err.message, code: err.code } }, what)
    refusedByAgent.set(id, err.message)
  }

  const reconcile = async () => {
    const onAgent = await agentServices(client, metaFilter('Meta', META.net, opts.who.net))
    if (agentDown) log.info('consul agent reachable again')
    agentDown = false
    const wanted = new Map([...desired.values()].map((e) => [e.reg.ID, e]))
    for (const [id, { def, reg }] of wanted) {
      const current = onAgent[id]
      if (current && current.Meta?.[META.hash] === reg.Meta[META.hash]) {
        seenOnAgent.add(id)
        // Registered by an earlier run of the daemon: its TTL check still needs feeding.
        runLocal(def.file)
        continue
      }
      try {
        await registerService(client, reg)
      } catch (err) {
        refused(id, err, 'the consul agent refused to register a service')
        continue
      }
      refusedByAgent.delete(id)
      const why = current ? 'changed' : seenOnAgent.has(id) ? 'missing from the agent (restarted?)' : 'new'
      seenOnAgent.add(id)
      log.info({ service: def.name, id, port: def.port, protocol: def.protocol, check: def.check.type, file: def.file, why }, 'service registered')
      runLocal(def.file, true)
    }
    const invalidFiles = new Set(problems.keys())
    for (const [id, svc] of Object.entries(onAgent)) {
      if (wanted.has(id) || svc.Meta?.[META.node] !== opts.who.node) continue
      // Its file is there but broken right now: keep the last good registration.
      if (invalidFiles.has(svc.Meta[META.file] ?? '')) continue
      try {
        await deregisterService(client, id)
      } catch (err) {
        refused(id, err, 'the consul agent refused to deregister a service')
        continue
      }
      seenOnAgent.delete(id)
      log.info({ service: svc.Service, id }, 'service deregistered')
    }
  }

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
      if (previous?.reg.Meta[META.hash] !== reg.Meta[META.hash]) void sync()
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
  const watcher = chokidarWatch(opts.dir, { depth: 0, ignoreInitial: false })
  watcher.on('all', (event, path) => {
    if (!isServiceFile(path)) return
    queue = queue.then(async () => {
      if (event === 'add' || event === 'change') await load(path)
      else if (event === 'unlink') {
        const file = basename(path)
        problems.delete(file)
        const had = desired.delete(file)
        runLocal(file)
        if (had) void sync()
      }
    })
  })
  watcher.on('error', (err) => log.error({ err, dir: opts.dir }, 'watching the services directory failed'))
  await new Promise<void>((resolve) => watcher.once('ready', () => resolve()))
  await queue
  ready = true
  log.info({ dir: opts.dir, services: desired.size, invalid: problems.size }, 'services directory loaded')
  await sync()
  const resync = setInterval(() => void sync(), opts.resyncMs)
  resync.unref()

  return {
    definitions: () => [...desired.values()].map((e) => e.def),
    problems: () => [...problems].map(([file, message]) => ({ file, message })),
    sync: async () => {
      await queue
      await sync()
      if (running) await running
    },
    async stop() {
      stopped = true
      clearInterval(resync)
      for (const l of loops.values()) clearTimeout(l.timer)
      loops.clear()
      await watcher.close()
      await queue
      await running
      if (!opts.deregisterOnExit) return
      for (const { reg } of desired.values()) {
        await deregisterService(client, reg.ID).then(
          () => log.info({ id: reg.ID }, 'service deregistered on exit'),
          (err: unknown) => log.warn({ err, id: reg.ID }, 'could not deregister on exit'),
        )
      }
    },
  }
}
