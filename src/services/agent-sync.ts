import { agentServices, deregisterService, metaFilter, registerService, type AgentService } from '../consul/agent.ts'
import type { ConsulClient } from '../consul/client.ts'
import { ConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import type { ServiceDefinition } from './definition.ts'
import type { ServiceNaming } from './naming.ts'
import { META, planRegistrations, type LocalRefusal, type NodeIdentity, type Registration } from './registration.ts'

/** A valid definition read from the services directory, and what it becomes on the agent. */
export interface DefinitionEntry {
  def: ServiceDefinition
  reg: Registration
}

export interface AgentSyncOptions {
  client: ConsulClient
  who: NodeIdentity
  log: Logger
  max: number
  /** How names look in Consul; undefined while the network record is unknown. */
  naming(): ServiceNaming | undefined
  /** The valid definitions, by file. */
  desired(): Iterable<DefinitionEntry>
  /** Files there but not parsing right now. */
  invalidFiles(): Set<string>
  /** Whether a reconcile may run: the directory is loaded and the registrar not stopped. */
  active(): boolean
  /** The cap's bookkeeping (localLimits in registrar.ts). */
  limits: { note(registered: number, refused: LocalRefusal[]): void; waiting(retry: () => void): void }
  /** The locally run checks (check-loops.ts). */
  checks: { run(file: string, now?: boolean): void; drop(file: string): void }
}

export interface AgentSync {
  /** Reconciles with the agent; resolves when this reconcile (or the one running) is done. */
  sync(): Promise<void>
  /** The reconcile running now, if any. */
  running(): Promise<void> | undefined
}

/**
 * Keeps the agent's services equal to the wanted ones. One reconcile at a time; a request
 * during one runs once more afterwards.
 */
export function agentSync(opts: AgentSyncOptions): AgentSync {
  const { log } = opts
  let running: Promise<void> | undefined
  let again = false
  let agentDown = false
  const reconcile = reconciler(opts, {
    retry: () => void sync(),
    reachable() {
      if (agentDown) log.info('consul agent reachable again')
      agentDown = false
    },
  })
  const sync = (): Promise<void> => {
    if (!opts.active()) return Promise.resolve()
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
  return { sync, running: () => running }
}

/** One reconcile: plan the wanted registrations, then register what the agent lacks and deregister what it has left over. */
function reconciler(opts: AgentSyncOptions, hooks: { retry(): void; reachable(): void }) {
  const { client, log, who, checks } = opts
  /** IDs we have seen on the agent: one missing later means the agent lost it (restart, wiped data). */
  const seenOnAgent = new Set<string>()
  const refused = agentRefusals(log)
  return async () => {
    const naming = opts.naming()
    if (!naming) return opts.limits.waiting(hooks.retry)
    const { wanted, refused: over } = planRegistrations(opts.desired(), who, naming, opts.max)
    opts.limits.note(wanted.size, over)
    // A file no longer registered (over the cap now) stops feeding a check the agent won't have.
    for (const r of over) checks.drop(r.file)
    const onAgent = await agentServices(client, metaFilter('Meta', META.net, who.net))
    hooks.reachable()
    for (const step of registrationSteps(wanted, onAgent, seenOnAgent)) {
      const { id, def, reg } = step
      if (step.why === undefined) {
        seenOnAgent.add(id)
        // Registered by an earlier run of the daemon: its TTL check still needs feeding.
        checks.run(def.file)
        continue
      }
      try {
        await registerService(client, reg)
      } catch (err) {
        refused.note(id, err, 'the consul agent refused to register a service')
        continue
      }
      refused.clear(id)
      seenOnAgent.add(id)
      log.info({ service: def.name, id, port: def.port, protocol: def.protocol, check: def.check.type, file: def.file, why: step.why }, 'service registered')
      checks.run(def.file, true)
    }
    for (const { id, service } of staleServices(wanted, onAgent, who.node, opts.invalidFiles())) {
      try {
        await deregisterService(client, id)
      } catch (err) {
        refused.note(id, err, 'the consul agent refused to deregister a service')
        continue
      }
      seenOnAgent.delete(id)
      log.info({ service, id }, 'service deregistered')
    }
  }
}

/**
 * Each wanted registration in order, with why it must be (re-)registered, or no `why` when the
 * agent's copy is current.
 */
export function registrationSteps<E extends DefinitionEntry>(wanted: Map<string, E>, onAgent: Record<string, AgentService>, seenOnAgent: ReadonlySet<string>): Array<E & { id: string; why?: string }> {
  return [...wanted].map(([id, e]) => {
    const current = onAgent[id]
    if (current && current.Meta?.[META.hash] === e.reg.Meta[META.hash]) return { ...e, id }
    const why = current ? 'changed' : seenOnAgent.has(id) ? 'missing from the agent (restarted?)' : 'new'
    return { ...e, id, why }
  })
}

/** This node's services on the agent that are no longer wanted. */
export function staleServices(wanted: Map<string, unknown>, onAgent: Record<string, AgentService>, node: string, invalidFiles: Set<string>): Array<{ id: string; service: string }> {
  const stale: Array<{ id: string; service: string }> = []
  for (const [id, svc] of Object.entries(onAgent)) {
    // Ours are the ones this node's registrar made from a file: a service someone registered on
    // the agent by hand, even with our meta, is theirs to remove.
    if (wanted.has(id) || svc.Meta?.[META.node] !== node || !svc.Meta[META.file]) continue
    // Its file is there but broken right now: keep the last good registration.
    if (invalidFiles.has(svc.Meta[META.file] ?? '')) continue
    stale.push({ id, service: svc.Service })
  }
  return stale
}

/** The agent refused one service (ACLs, a check it won't take): logged once per reason, the others go on. */
function agentRefusals(log: Logger) {
  const refusedByAgent = new Map<string, string>()
  return {
    note(id: string, err: unknown, what: string) {
      if (!(err instanceof ConsulError) || err.status === undefined) throw err
      if (refusedByAgent.get(id) !== err.message) log.error({ id, err: { message: err.message, code: err.code } }, what)
      refusedByAgent.set(id, err.message)
    },
    clear: (id: string) => void refusedByAgent.delete(id),
  }
}

/** `--deregister-on-exit`: each registration removed, a failure logged and the rest still tried. */
export async function deregisterAll(client: ConsulClient, log: Logger, entries: Iterable<DefinitionEntry>): Promise<void> {
  for (const { reg } of entries) {
    await deregisterService(client, reg.ID).then(
      () => log.info({ id: reg.ID }, 'service deregistered on exit'),
      (err: unknown) => log.warn({ err, id: reg.ID }, 'could not deregister on exit'),
    )
  }
}
