import type { Logger } from '../../log.ts'
import { saveCache, type CachedView } from '../cache.ts'

/**
 * How long the view cache waits for more changes before it is written: at a thousand records it
 * is most of a megabyte, and a restart reads Consul anyway, so a change that only adds or updates
 * waits long. One that takes trust away (a peer removed, a key revoked) is written soon, so a
 * crash right after it can't bring the old view back from the cache. Each wait is stretched by up
 * to as long again at random, so daemons that saw the same change don't all write at once.
 */
export const CACHE_DELAY_MS = { soon: 1000, later: 30_000 }

export interface CacheWriter {
  /**
   * The newest state to cache, built only when it is written: a burst of applies builds it once.
   * `soon` when the change takes trust away (see CACHE_DELAY_MS).
   */
  set(view: () => CachedView, when?: 'soon' | 'later'): void
  /** Writes the newest state now (on stop), whether or not it was written before. */
  flush(): Promise<void>
}

/**
 * The cache is a fallback for restarts: written a while after the applies that changed it
 * (a burst of changes costs one write), at most one write in flight, always the newest state,
 * and on stop. Never on the path to a host file.
 */
export function cacheWriter(stateDir: string, log: Logger, delays: Record<'soon' | 'later', number> = CACHE_DELAY_MS): CacheWriter {
  let dirty: (() => CachedView) | undefined
  // The newest state, written or not: the last flush writes it again (unchanged bytes cost a
  // read), so a cache removed or damaged since the last write is back after a clean stop.
  let latest: (() => CachedView) | undefined
  let saving: Promise<void> | undefined
  let timer: NodeJS.Timeout | undefined
  let dueAt = 0
  const flush = (): Promise<void> => {
    clearTimeout(timer)
    timer = undefined
    if (saving || !dirty) return saving ?? Promise.resolve()
    const next = dirty
    dirty = undefined
    saving = Promise.resolve()
      .then(() => saveCache(stateDir, next()))
      .then(() => undefined)
      .catch((err: unknown) => log.warn({ err }, 'could not write the view cache'))
      .finally(() => {
        saving = undefined
        // A state set while this one was written has its own timer; one whose timer fired meanwhile goes now.
        if (dirty && !timer) void flush()
      })
    return saving
  }
  return {
    set(view, when = 'later') {
      dirty = view
      latest = view
      const due = Date.now() + delays[when] * (1 + Math.random())
      if (timer && dueAt <= due) return
      clearTimeout(timer)
      dueAt = due
      timer = setTimeout(() => void flush(), due - Date.now())
      timer.unref()
    },
    async flush() {
      await saving
      dirty ??= latest
      await flush()
    },
  }
}
