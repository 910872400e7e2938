import { updateTtlCheck } from '../consul/agent.ts'
import type { ConsulClient } from '../consul/client.ts'
import { ConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import type { DefinitionEntry } from './agent-sync.ts'
import { runLocalCheck } from './local-check.ts'
import { checkId, isLocalCheck } from './registration.ts'

export interface CheckLoopsOptions {
  client: ConsulClient
  /** The node's VPN address, where the checks connect. */
  address: string
  log: Logger
  /** The current definition from a file; undefined once it is deleted. */
  entry(file: string): DefinitionEntry | undefined
  stopped(): boolean
  /** The agent doesn't know a check: it restarted or lost its state, so register again. */
  lost(): void
}

export interface CheckLoops {
  /** Starts, keeps or ends the file's loop to match its current definition; `now` runs the check at once. */
  run(file: string, now?: boolean): void
  /** Ends the file's loop. */
  drop(file: string): void
  /** Ends every loop. */
  stopAll(): void
}

/**
 * One loop per file whose check the daemon runs, tied to the definition it started from:
 * a changed or deleted file ends its loop. `now` runs the check at once (a registration
 * just reset it to critical).
 */
export function checkLoops(opts: CheckLoopsOptions): CheckLoops {
  const { log } = opts
  const loops = new Map<string, { entry: DefinitionEntry; timer?: NodeJS.Timeout }>()
  const noteRefusal = scriptRefusals(log)
  const drop = (file: string) => {
    clearTimeout(loops.get(file)?.timer)
    loops.delete(file)
  }
  const run = (file: string, now = false) => {
    const entry = opts.entry(file)
    const current = loops.get(file)
    if (current && current.entry === entry) {
      if (!now) return
      clearTimeout(current.timer)
    } else if (current) drop(file)
    if (!entry || opts.stopped() || !isLocalCheck(entry.def)) return
    const loop = current?.entry === entry ? current : { entry }
    loops.set(file, loop)
    const { def, reg } = entry
    const tick = () => {
      if (loops.get(file) !== loop || opts.stopped()) return
      void runLocalCheck(def, opts.address)
        .then((r) => {
          noteRefusal(file, r.refused)
          return updateTtlCheck(opts.client, checkId(reg.ID), r.status, r.output)
        })
        .catch((err: unknown) => {
          // The agent doesn't know the check: it restarted or lost its state. Register again.
          if (err instanceof ConsulError && err.status !== undefined && err.status >= 400 && err.status < 500) opts.lost()
          else log.debug({ err, file }, 'could not report a check result')
        })
        .finally(() => {
          if (loops.get(file) === loop && !opts.stopped() && 'intervalMs' in def.check) loop.timer = setTimeout(tick, def.check.intervalMs)
        })
    }
    tick()
  }
  return {
    run,
    drop,
    stopAll() {
      for (const l of loops.values()) clearTimeout(l.timer)
      loops.clear()
    },
  }
}

/** A script check refused before a run (see strict-modes.ts) is logged when the reason changes, not every interval. */
function scriptRefusals(log: Logger) {
  const refusedRuns = new Map<string, string>()
  return (file: string, refused: string | undefined) => {
    if (refused === refusedRuns.get(file)) return
    if (refused) {
      log.error({ file }, refused)
      refusedRuns.set(file, refused)
    } else {
      log.info({ file }, 'script check trusted again')
      refusedRuns.delete(file)
    }
  }
}
