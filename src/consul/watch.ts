import type { Logger } from '../log.ts'
import type { ConsulClient, Reachability } from './client.ts'
import type { KvListResult } from './kv.ts'

/**
 * A blocking-query loop, following Consul's rules for the index
 * (https://developer.hashicorp.com/consul/api-docs/features/blocking):
 * - an index that goes backwards resets to 0, so the next read is a full,
 *   non-blocking one;
 * - an index of 0 is never blocked on (it is treated as 1);
 * - a return with the same index is a wait timeout, not a change;
 * - requests are rate-limited by a token bucket: isolated changes go through
 *   at once, a storm of changes is capped at `ratePerSecond`;
 * - errors back off exponentially with jitter up to a cap, and the loop keeps going.
 * Two rules make recovery fast once Consul answers again:
 * - the read after a failure doesn't block (it sends no index), so a watch learns at once
 *   whether anything changed while it couldn't read, instead of sitting in a 300 s wait on
 *   a key that didn't change, and its failure count clears as soon as Consul answers;
 * - a backoff pause ends early when the client sees its first success after a failure
 *   (`client.reach.onRecovered`), so one answered request wakes every paused watch. A watch
 *   whose early wake-up failed again sits out its next pause in full: while Consul answers
 *   some requests and refuses others (over its connection limit), the wake-ups must not
 *   turn backoff into a busy loop.
 * `onChange` sees every read whose index moved, including the first.
 */
interface WatchTuning {
  /** Sustained request rate once the burst is spent (default 20/s). */
  ratePerSecond?: number
  /** Requests allowed back to back before the rate applies (default 5). */
  burst?: number
  /** First backoff after a failure (default 250 ms). */
  backoffMinMs?: number
  /** Longest backoff (default 30 s). A watch that serves as a probe of Consul can pass a small cap. */
  backoffMaxMs?: number
  log: Logger
  onError?(err: unknown, attempt: number): void
}

export interface BlockingWatchOptions<R extends { index: number }> extends WatchTuning {
  /** The client the reads go through: its recovery wakes this watch's backoff. */
  client: { readonly reach: Reachability }
  /** What the logs call this watch (a key or prefix). */
  label: string
  /** One read; `index` 0 means "don't block". */
  read(index: number, signal: AbortSignal): Promise<R>
  onChange(result: R): void | Promise<void>
}

export interface WatchOptions extends WatchTuning {
  client: ConsulClient
  prefix: string
  waitSeconds?: number
  onChange(result: KvListResult): void | Promise<void>
}

export interface Watch {
  stop(): Promise<void>
  /** The index of the last read handed to onChange. */
  readonly index: number
  /** This watch's reads that failed in a row (0 once one is answered). Whether Consul answers at all is the client's `reach`. */
  readonly failures: number
  /** When Consul last answered this watch, changed or not. */
  readonly lastReadAt: Date | undefined
}

/**
 * One Watch made of a leading watch (whose index it reports) and the watches it started:
 * it is as unreachable as its worst member, and stops them all.
 */
export function watchGroup(lead: Watch, members: () => Iterable<Watch>, stop: () => Promise<void>): Watch {
  return {
    get index() {
      return lead.index
    },
    get failures() {
      return Math.max(lead.failures, ...[...members()].map((w) => w.failures))
    },
    get lastReadAt() {
      return lead.lastReadAt
    },
    stop,
  }
}

/** The next index to block on, given the previous one and what Consul returned. */
export function nextIndex(previous: number, returned: number): number {
  if (!Number.isFinite(returned) || returned < previous) return 0
  return returned < 1 ? 1 : returned
}

export function backoffMs(attempt: number, min: number, max: number, random = Math.random): number {
  const base = Math.min(max, min * 2 ** Math.max(0, attempt - 1))
  // Full jitter in the upper half, so many daemons don't retry in lock-step.
  return Math.round(base / 2 + (random() * base) / 2)
}

/** A blocking `?recurse` watch on one prefix. */
export function watchPrefix(opts: WatchOptions): Watch {
  const { client, prefix, waitSeconds } = opts
  return watchBlocking({ ...opts, label: prefix, read: (index, signal) => client.kvList(prefix, { index, waitSeconds, signal }) })
}

/**
 * Waits `ms`, or less when the watch stops, or (given `reach`) when the client recovers.
 * Every listener goes when the pause ends: a daemon pauses for years, one leftover per pause would leak.
 */
function pause(ms: number, signal: AbortSignal, reach?: Reachability): Promise<'elapsed' | 'recovered'> {
  return new Promise((resolve) => {
    if (ms <= 0 || signal.aborted) return resolve('elapsed')
    let unsubscribe = () => {}
    const done = (how: 'elapsed' | 'recovered') => {
      clearTimeout(timer)
      signal.removeEventListener('abort', onAbort)
      unsubscribe()
      resolve(how)
    }
    const onAbort = () => done('elapsed')
    const timer = setTimeout(onAbort, ms)
    signal.addEventListener('abort', onAbort, { once: true })
    if (reach) unsubscribe = reach.onRecovered(() => done('recovered'))
  })
}

/** Isolated requests go at once; a run of them is held to `rate` per second after `burst`. */
function tokenBucket(rate: number, burst: number, signal: AbortSignal): () => Promise<void> {
  let tokens = burst
  let refilledAt = Date.now()
  return async () => {
    const now = Date.now()
    tokens = Math.min(burst, tokens + ((now - refilledAt) / 1000) * rate)
    refilledAt = now
    if (tokens < 1) {
      await pause(((1 - tokens) / rate) * 1000, signal)
      tokens = 1
      refilledAt = Date.now()
    }
    tokens -= 1
  }
}

export function watchBlocking<R extends { index: number }>(opts: BlockingWatchOptions<R>): Watch {
  const controller = new AbortController()
  const { signal } = controller
  const take = tokenBucket(opts.ratePerSecond ?? 20, opts.burst ?? 5, signal)
  let index = 0
  let delivered = 0
  let failures = 0
  let lastReadAt: Date | undefined
  // The previous pause was cut short by a recovery: the next one runs in full.
  let wokeEarly = false

  const failed = async (err: unknown) => {
    failures++
    opts.onError?.(err, failures)
    // A probe retries every second through an outage: the first failures say so, then one line a minute or so.
    if (failures <= 3 || failures % 60 === 0) opts.log.warn({ err, key: opts.label, attempt: failures }, 'consul read failed; keeping current state and retrying')
    const ms = backoffMs(failures, opts.backoffMinMs ?? 250, opts.backoffMaxMs ?? 30_000)
    wokeEarly = (await pause(ms, signal, wokeEarly ? undefined : opts.client.reach)) === 'recovered'
  }

  const loop = async () => {
    while (!signal.aborted) {
      await take()
      if (signal.aborted) break
      let result: R
      try {
        // After a failure, a read that doesn't block: what changed meanwhile arrives at once.
        result = await opts.read(failures > 0 ? 0 : index, signal)
      } catch (err) {
        if (!signal.aborted) await failed(err)
        continue
      }
      if (failures > 0) opts.log.info({ key: opts.label, after: failures }, 'consul reachable again')
      failures = 0
      wokeEarly = false
      lastReadAt = new Date()
      const next = nextIndex(index, result.index)
      if (next === 0) {
        opts.log.info({ key: opts.label, was: index, now: result.index }, 'consul index went backwards; re-reading from scratch')
        index = 0
        continue
      }
      const moved = next !== index
      index = next
      if (!moved) continue
      delivered = index
      try {
        await opts.onChange(result)
      } catch (err) {
        opts.log.error({ err, key: opts.label }, 'applying a consul change failed')
      }
    }
  }
  const running = loop()
  return {
    get index() {
      return delivered
    },
    get failures() {
      return failures
    },
    get lastReadAt() {
      return lastReadAt
    },
    async stop() {
      controller.abort()
      await running
    },
  }
}
