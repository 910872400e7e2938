import type { Logger } from '../../log.ts'
import type { DumpResult } from '../../tinc/dump.ts'
import { planConnectTo, rendezvousOrder, type CandidateState, type ConnectToPlan, type ConnectToTimers } from '../connect-to.ts'

/** tinc 1.0's connection_status_t: bit 1 is `active`, set once the meta connection is authenticated. */
const ACTIVE = 0x2

/** The peers tincd holds an authenticated meta connection to, or undefined when its dump failed. */
export function activeConnections(r: DumpResult): Set<string> | undefined {
  if (r.state !== 'up' || !r.dump.connections) return undefined
  return new Set(r.dump.connections.filter((c) => (c.status & ACTIVE) !== 0).map((c) => c.name))
}

export interface ConnectToKeeperOptions {
  self: string
  k: number
  pinned?: readonly string[]
  /** The node that admitted this one, and until when it stays in the list. */
  sponsor?: { name: string; until: number }
  /** tincd's state; the status collector's reader, so both share one dump a second at most. */
  readState(): Promise<DumpResult>
  /** How often tincd's connections are looked at. */
  intervalMs: number
  timers?: ConnectToTimers
  /** The chosen list changed: render again. */
  onChange(): void
  log: Logger
  now?: () => number
}

export interface ConnectToKeeper {
  /** The list to render for these public peers, from what was last observed. */
  choose(publics: readonly string[]): string[]
  /** The latest plan, for status: benched candidates and unknown pins. */
  plan(): ConnectToPlan | undefined
  /** Looks at tincd's connections once (the timer's step; tests call it directly). */
  tick(): Promise<void>
  stop(): void
}

/**
 * Keeps the ConnectTo list at K public peers (src/mesh/connect-to.ts), observing tincd's meta
 * connections every `intervalMs`. Choosing for a new set of public peers observes nothing, so a
 * render never benches anyone; only the timer's observations do.
 */
export function connectToKeeper(o: ConnectToKeeperOptions): ConnectToKeeper {
  const log = o.log.child({ component: 'connect-to' })
  const now = o.now ?? Date.now
  let state = new Map<string, CandidateState>()
  let chosen: string[] = []
  let publics: readonly string[] = []
  let last: ConnectToPlan | undefined
  let stopped = false
  // The rendezvous order for the public peers last seen: a render asks at every apply, the list rarely changes.
  let ordered = { publics: '', order: [] as readonly string[] }
  const round = (connected: ReadonlySet<string> | undefined): ConnectToPlan => {
    const sponsor = o.sponsor && o.sponsor.until > now() ? o.sponsor.name : undefined
    const key = publics.join('\n')
    if (ordered.publics !== key) ordered = { publics: key, order: rendezvousOrder(o.self, publics) }
    const plan = planConnectTo({ self: o.self, publics, k: o.k, pinned: o.pinned, sponsor, connected, now: now(), timers: o.timers, order: ordered.order }, state, chosen)
    state = plan.state
    last = plan
    return plan
  }
  const tick = async () => {
    // With K or fewer public peers every one is chosen, and a pinned list never changes: nothing to
    // look at, so tincd isn't asked for a dump (each wakes both processes).
    if (stopped || publics.length <= o.k || o.pinned) return
    const connected = activeConnections(await o.readState())
    const plan = round(connected)
    if (plan.connectTo.join() === chosen.join()) return
    log.info({ from: chosen, to: plan.connectTo, benched: plan.benched.map((b) => b.name) }, 'ConnectTo choice changed')
    chosen = plan.connectTo
    o.onChange()
  }
  const timer = setInterval(() => void tick().catch((err: unknown) => log.warn({ err }, 'could not look at tincd connections')), o.intervalMs)
  timer.unref()
  return {
    choose(p) {
      publics = [...p]
      chosen = round(undefined).connectTo
      return chosen
    },
    plan: () => last,
    tick,
    stop() {
      stopped = true
      clearInterval(timer)
    },
  }
}
