import type { Logger } from '../log.ts'
import { kvList, type KvListResult } from './kv.ts'

/**
 * A blocking-query loop over one KV prefix, following Consul's rules for the
 * index (https://developer.hashicorp.com/consul/api-docs/features/blocking):
 * - an index that goes backwards resets to 0, so the next read is a full,
 *   non-blocking one;
 * - an index of 0 is never blocked on (it is treated as 1);
 * - a return with the same index is a wait timeout, not a change;
 * - requests are rate-limited by a token bucket: isolated changes go through
 *   at once, a storm of changes is capped at `ratePerSecond`;
 * - errors back off exponentially up to a cap, and the loop keeps going.
 * `onChange` sees every read whose index moved, including the first.
 */
interface WatchTuning {
  /** Sustained request rate once the burst is spent (default 20/s). */
  ratePerSecond?: number
  /** Requests allowed back to back before the rate applies (default 5). */
  burst?: number
  backoffMinMs?: number
  backoffMaxMs?: number
  log: Logger
  onError?(err: unknown, attempt: number): void
}

export interface BlockingWatchOptions<R extends { index: number }> extends WatchTuning {
  /** What the logs call this watch (a key or prefix). */
  label: string
  /** One read; `index` 0 means "don't block". */
  read(index: number, signal: AbortSignal): Promise<R>
  onChange(result: R): void | Promise<void>
}

export interface WatchOptions extends WatchTuning {
  url: string
  token?: string
  prefix: string
  waitSeconds?: number
  onChange(result: KvListResult): void | Promise<void>
}

export interface Watch {
  stop(): Promise<void>
  /** The index of the last read handed to onChange. */
  readonly index: number
  /** Reads that failed in a row (0 while Consul answers): what status calls "Consul unreachable". */
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
  return watchBlocking({ ...opts, label: opts.prefix, read: (index, signal) => kvList({ url: opts.url, token: opts.token, prefix: opts.prefix, index, waitSeconds: opts.waitSeconds, signal }) })
}

export function watchBlocking<R extends { index: number }>(opts: BlockingWatchOptions<R>): Watch {
  const controller = new AbortController()
  const rate = opts.ratePerSecond ?? 20
  const burst = opts.burst ?? 5
  let tokens = burst
  let refilledAt = Date.now()
  let index = 0
  let delivered = 0
  let failures = 0
  let lastReadAt: Date | undefined
  let stopped = false

  const pause = (ms: number) =>
    new Promise<void>((resolve) => {
      if (ms <= 0 || stopped) return resolve()
      // The listener must go when the timer fires: a daemon pauses for years, one abort listener per pause would leak.
      const done = () => {
        clearTimeout(t)
        controller.signal.removeEventListener('abort', done)
        resolve()
      }
      const t = setTimeout(done, ms)
      controller.signal.addEventListener('abort', done, { once: true })
    })

  const loop = async () => {
    while (!stopped) {
      const now = Date.now()
      tokens = Math.min(burst, tokens + ((now - refilledAt) / 1000) * rate)
      refilledAt = now
      if (tokens < 1) {
        await pause(((1 - tokens) / rate) * 1000)
        if (stopped) break
        tokens = 1
        refilledAt = Date.now()
      }
      tokens -= 1
      let result: R
      try {
        result = await opts.read(index, controller.signal)
      } catch (err) {
        if (stopped) break
        failures++
        opts.onError?.(err, failures)
        opts.log.warn({ err, key: opts.label, attempt: failures }, 'consul read failed; keeping current state and retrying')
        await pause(backoffMs(failures, opts.backoffMinMs ?? 250, opts.backoffMaxMs ?? 30_000))
        continue
      }
      if (failures > 0) opts.log.info({ key: opts.label, after: failures }, 'consul reachable again')
      failures = 0
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
      stopped = true
      controller.abort()
      await running
    },
  }
}
