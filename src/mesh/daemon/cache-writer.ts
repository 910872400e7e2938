import type { Logger } from '../../log.ts'
import { saveCache, type CachedView } from '../cache.ts'

/** How long the view cache waits for more changes before it is written. */
const CACHE_DELAY_MS = 1000

export interface CacheWriter {
  /** The newest state to cache; written a moment later. */
  set(view: CachedView): void
  /** Writes the newest state now (on stop), whether or not it was written before. */
  flush(): Promise<void>
}

/**
 * The cache is a fallback for restarts: written a moment after the applies that changed it
 * (a burst of changes costs one write), at most one write in flight, always the newest state,
 * and on stop. Never on the path to a host file.
 */
export function cacheWriter(stateDir: string, log: Logger): CacheWriter {
  let dirty: CachedView | undefined
  // The newest state, written or not: the last flush writes it again (unchanged bytes cost a
  // read), so a cache removed or damaged since the last write is back after a clean stop.
  let latest: CachedView | undefined
  let saving: Promise<void> | undefined
  let timer: NodeJS.Timeout | undefined
  const flush = (): Promise<void> => {
    clearTimeout(timer)
    timer = undefined
    if (saving || !dirty) return saving ?? Promise.resolve()
    const next = dirty
    dirty = undefined
    saving = saveCache(stateDir, next)
      .then(() => undefined)
      .catch((err: unknown) => log.warn({ err }, 'could not write the view cache'))
      .finally(() => {
        saving = undefined
        if (dirty) void flush()
      })
    return saving
  }
  return {
    set(view) {
      dirty = view
      latest = view
      if (timer) return
      timer = setTimeout(() => void flush(), CACHE_DELAY_MS)
      timer.unref()
    },
    async flush() {
      await saving
      dirty ??= latest
      await flush()
    },
  }
}
