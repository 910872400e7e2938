import { createHash } from 'node:crypto'

/**
 * Which public nodes a node keeps a ConnectTo to. Every ConnectTo is a meta connection over
 * which tinc 1.0 floods every edge change, so a ConnectTo to every public node costs N × P
 * connections and storms when many nodes restart together. A node keeps K instead:
 *
 * - Rendezvous hashing on (node, public node) orders the candidates. The order is stable (a
 *   public node joining or leaving moves only the nodes that had it among their first K) and
 *   spreads nodes evenly over the public ones.
 * - A chosen one with no meta connection for `graceMs` is benched and the next in order takes
 *   its place. The bench lasts `benchMs`, doubling with each failure in a row up to
 *   `benchMaxMs`, then the original is tried again: the choice comes back once the original is
 *   reachable, and a link that keeps failing is retried ever more rarely, so tinc.conf doesn't
 *   churn.
 * - An operator's pinned list is used as it is and never changed.
 *
 * This is the pure core; the daemon feeds it tincd's connection list and renders its answer.
 */
export const DEFAULT_CONNECT_TO_K = 3

export interface ConnectToTimers {
  /** How long a chosen node may have no meta connection before the next one replaces it. */
  graceMs: number
  /** How long a replaced node sits out the first time; doubled on each failure in a row. */
  benchMs: number
  benchMaxMs: number
}

export const DEFAULT_CONNECT_TO_TIMERS: ConnectToTimers = { graceMs: 60_000, benchMs: 120_000, benchMaxMs: 3_600_000 }

/** What the core remembers about one candidate between rounds. */
export interface CandidateState {
  /** When a chosen candidate was first seen without a meta connection; cleared once connected. */
  failingSince?: number
  /** Until when it sits out after failing. */
  benchedUntil?: number
  /** Failures in a row; reset after a full grace period connected. */
  strikes: number
  /** Since when it has been connected without a break. */
  connectedSince?: number
}

export interface ConnectToInput {
  self: string
  /** Public peers (those with an address), by name. */
  publics: readonly string[]
  k: number
  /** The operator's list: used as given (names without a host file are dropped and reported). */
  pinned?: readonly string[]
  /** The node that admitted this one, kept in the list while it is new. */
  sponsor?: string
  /** Peers tincd holds a meta connection to right now. Undefined: unknown (tincd's dump failed). */
  connected?: ReadonlySet<string>
  now: number
  timers?: ConnectToTimers
  /** rendezvousOrder(self, publics), when the caller keeps it: hashing a thousand public peers costs milliseconds, and the list rarely changes. */
  order?: readonly string[]
}

export interface ConnectToPlan {
  connectTo: string[]
  /** Candidates sitting out, and until when. */
  benched: Array<{ name: string; until: number; strikes: number }>
  /** Pinned names that have no host file here. */
  unknownPins: string[]
  state: Map<string, CandidateState>
}

/** The candidates in this node's rendezvous order: highest score of sha256(self, candidate) first. */
export function rendezvousOrder(self: string, candidates: readonly string[]): string[] {
  const score = (c: string) => createHash('sha256').update(self).update('\0').update(c).digest().readBigUInt64BE(0)
  return [...new Set(candidates)]
    .filter((c) => c !== self)
    .map((c) => ({ c, s: score(c) }))
    .sort((a, b) => (a.s === b.s ? (a.c < b.c ? -1 : 1) : a.s > b.s ? -1 : 1))
    .map((x) => x.c)
}

/** One round: what to ConnectTo now, given what was chosen before (`previous`) and tincd's connections. */
export function planConnectTo(input: ConnectToInput, previous: ReadonlyMap<string, CandidateState>, chosenBefore: readonly string[]): ConnectToPlan {
  const timers = input.timers ?? DEFAULT_CONNECT_TO_TIMERS
  const publics = new Set(input.publics)
  if (input.pinned) {
    const connectTo = input.pinned.filter((n) => n !== input.self && publics.has(n))
    return { connectTo, benched: [], unknownPins: input.pinned.filter((n) => n !== input.self && !publics.has(n)), state: new Map() }
  }
  const order = input.order ?? rendezvousOrder(input.self, input.publics)
  const state = new Map<string, CandidateState>()
  for (const name of order) state.set(name, observe(previous.get(name), name, chosenBefore.includes(name), input, timers))
  const eligible = (name: string) => (state.get(name)?.benchedUntil ?? 0) <= input.now
  const k = Math.max(0, input.k)
  // Benched ones fill in only when too few others are left: some ConnectTo beats none.
  const chosen = [...order.filter(eligible), ...order.filter((n) => !eligible(n))].slice(0, k)
  if (input.sponsor && publics.has(input.sponsor) && !chosen.includes(input.sponsor) && input.sponsor !== input.self) chosen.push(input.sponsor)
  const benched = order.flatMap((name) => {
    const s = state.get(name)
    return s?.benchedUntil !== undefined && s.benchedUntil > input.now ? [{ name, until: s.benchedUntil, strikes: s.strikes }] : []
  })
  return { connectTo: chosen.sort(), benched, unknownPins: [], state }
}

/** A candidate's state after this round's observation. */
function observe(was: CandidateState | undefined, name: string, chosen: boolean, input: ConnectToInput, t: ConnectToTimers): CandidateState {
  const s: CandidateState = { ...(was ?? { strikes: 0 }) }
  // Without tincd's connection list nothing is known: nothing is benched or forgiven this round.
  if (!input.connected) return s
  if (input.connected.has(name)) {
    s.failingSince = undefined
    s.connectedSince ??= input.now
    if (input.now - s.connectedSince >= t.graceMs) s.strikes = 0
    return s
  }
  s.connectedSince = undefined
  if (!chosen) {
    s.failingSince = undefined
    return s
  }
  s.failingSince ??= input.now
  if (input.now - s.failingSince >= t.graceMs) {
    s.strikes++
    s.benchedUntil = input.now + Math.min(t.benchMs * 2 ** (s.strikes - 1), t.benchMaxMs)
    s.failingSince = undefined
  }
  return s
}
