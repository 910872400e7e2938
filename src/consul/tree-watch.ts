import type { Logger } from '../log.ts'
import { kvGetOne, kvKeys, kvList, type KvItem, type KvKeysResult, type KvListResult } from './kv.ts'
import { watchBlocking, watchGroup, watchPrefix, type Watch } from './watch.ts'

/**
 * Watches every key under a prefix and hands over the whole set on each change,
 * like a `?recurse` watch, but reads only what changed.
 *
 * A `?recurse` blocking query returns every value under the prefix each time any
 * one of them changes, so with N nodes each daemon reads N records per change
 * and the mesh as a whole reads N² (66 KB per daemon per change at N = 50).
 * Consul's KV API can't list only the entries modified since an index
 * (hashicorp/consul#4142), so this watch splits the work:
 * - one blocking `?keys` query on the prefix learns which keys exist (about
 *   20 bytes per key); it alone decides that a key is gone;
 * - one blocking query per key, which Consul wakes only when that key changes,
 *   reads its value.
 *
 * Each per-key query holds one HTTP connection to the agent, and Consul caps
 * connections per client address (`limits.http_max_conns_per_client`, 200 by
 * default). Above `perKeyLimit` keys the watch therefore falls back to one
 * `?recurse` read per change of the key list.
 */
export interface TreeSnapshot {
  /** The latest value of every key under the prefix that could be read, in key order. */
  items: KvItem[]
  /** Body bytes read since the previous snapshot. */
  bytes: number
  /** Consul hid some keys from this token. */
  filtered: boolean
}

export interface TreeWatchOptions {
  url: string
  token?: string
  prefix: string
  waitSeconds?: number
  /** Most keys watched one by one; 0 means a plain `?recurse` watch. */
  perKeyLimit: number
  /**
   * Keys the consumer refuses by name alone. They are listed with an empty value and never
   * read: a key like `nodes/../x` can't even be addressed by a URL path, and junk keys
   * shouldn't each cost a connection.
   */
  nameOnly?(key: string): boolean
  ratePerSecond?: number
  burst?: number
  backoffMinMs?: number
  backoffMaxMs?: number
  log: Logger
  onChange(snapshot: TreeSnapshot): void | Promise<void>
  onError?(err: unknown, attempt: number): void
}

type KeysRead = KvKeysResult & { full?: KvListResult }

export function watchTree(opts: TreeWatchOptions): Watch {
  const { perKeyLimit, onChange, ...tuning } = opts
  const conn = { url: opts.url, token: opts.token, waitSeconds: opts.waitSeconds }
  if (perKeyLimit <= 0) return watchPrefix({ ...tuning, onChange: (r) => onChange({ items: r.items, bytes: r.bytes, filtered: r.filtered }) })

  const items = new Map<string, KvItem>()
  const perKey = new Map<string, Watch>()
  // Keys whose first read has finished, either way. A snapshot waits for all of them, so a
  // start-up doesn't hand over a partial set (which would look like nodes leaving).
  const settled = new Set<string>()
  let listed: string[] | undefined
  let filtered = false
  let bytes = 0
  let stopped = false

  const deliver = async () => {
    if (stopped || !listed || listed.some((k) => !settled.has(k))) return
    const snapshot: TreeSnapshot = { items: listed.flatMap((k) => items.get(k) ?? []), bytes, filtered }
    bytes = 0
    await onChange(snapshot)
  }
  const deliverSafely = () => deliver().catch((err: unknown) => opts.log.error({ err, prefix: opts.prefix }, 'applying a consul change failed'))

  const forget = (key: string) => {
    void perKey.get(key)?.stop()
    perKey.delete(key)
    items.delete(key)
    settled.delete(key)
  }

  const watchKey = (key: string) => {
    perKey.set(
      key,
      watchBlocking({
        ...tuning,
        label: key,
        read: (index, signal) => kvGetOne({ ...conn, prefix: key, index, signal }),
        onChange: async (r) => {
          bytes += r.bytes
          // A 404 here means the key is on its way out; only the key list may say it is gone.
          if (r.item) items.set(key, r.item)
          const first = !settled.has(key)
          settled.add(key)
          if (r.item || first) await deliver()
        },
        onError: (err, attempt) => {
          // A key that can't be read must not hold back everyone else's changes.
          if (!settled.has(key)) {
            settled.add(key)
            void deliverSafely()
          }
          opts.onError?.(err, attempt)
        },
      }),
    )
  }

  const keysWatch = watchBlocking<KeysRead>({
    ...tuning,
    label: opts.prefix,
    // The fallback read happens inside `read`, so a failed one is retried with the same index.
    read: async (index, signal) => {
      const keys = await kvKeys({ ...conn, prefix: opts.prefix, index, signal })
      if (keys.keys.length <= perKeyLimit) return keys
      return { ...keys, full: await kvList({ ...conn, prefix: opts.prefix, signal }) }
    },
    onChange: async (r) => {
      bytes += r.bytes
      filtered = r.filtered
      if (r.full) {
        if (perKey.size) opts.log.info({ prefix: opts.prefix, keys: r.keys.length, perKeyLimit }, 'too many keys to watch one by one; reading the whole prefix on each change')
        for (const w of perKey.values()) void w.stop()
        perKey.clear()
        bytes += r.full.bytes
        filtered ||= r.full.filtered
        items.clear()
        for (const i of r.full.items) items.set(i.key, i)
        listed = r.full.items.map((i) => i.key)
        settled.clear()
        for (const k of listed) settled.add(k)
        await deliver()
        return
      }
      const next = [...r.keys].sort()
      const keep = new Set(next)
      const removed = (listed ?? []).filter((k) => !keep.has(k))
      for (const k of removed) forget(k)
      let addedNameOnly = false
      for (const k of next) {
        if (perKey.has(k)) continue
        if (!opts.nameOnly?.(k)) watchKey(k)
        else if (!settled.has(k)) {
          items.set(k, { key: k, value: new Uint8Array(), modifyIndex: 0 })
          settled.add(k)
          addedNameOnly = true
        }
      }
      const firstList = listed === undefined
      listed = next
      // A value change wakes this watch too (the prefix's index moved); the key's own watch delivers it.
      if (firstList || removed.length > 0 || addedNameOnly || next.length === 0) await deliver()
    },
  })

  return watchGroup(
    keysWatch,
    () => perKey.values(),
    async () => {
      stopped = true
      await Promise.all([keysWatch.stop(), ...[...perKey.values()].map((w) => w.stop())])
    },
  )
}
