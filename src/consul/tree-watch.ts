import type { Logger } from '../log.ts'
import type { ConsulClient } from './client.ts'
import type { KvItem, KvKeysResult, KvListResult, KvOneResult } from './kv.ts'
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
 * A listed key is never reported missing because a read of it failed: it is `unreadable`
 * until a read succeeds (the watch keeps retrying it), and a key that had a value keeps it
 * through failed reads. Only the listing removes a key, and a listing Consul filtered by ACL
 * says so (`filtered`), since what it leaves out may still exist.
 *
 * Each per-key query holds one HTTP connection to the agent, and Consul caps
 * connections per client address (`limits.http_max_conns_per_client`, 200 by
 * default). Above `perKeyLimit` keys the watch therefore falls back to one
 * `?recurse` read per change of the key list.
 */
export type KeyRead = { state: 'value'; item: KvItem } | { state: 'unreadable'; reason: string }

export interface TreeSnapshot {
  /** Every key the latest successful listing named, in key order: its latest value, or why it could not be read. */
  keys: ReadonlyMap<string, KeyRead>
  /** The listing was filtered by ACL (X-Consul-Results-Filtered-By-ACLs): absence proves nothing. */
  filtered: boolean
  /** Body bytes read since the previous snapshot. */
  bytes: number
}

export interface TreeWatchOptions {
  client: ConsulClient
  prefix: string
  waitSeconds?: number
  /** Most keys watched one by one; 0 means a plain `?recurse` watch. */
  perKeyLimit: number
  /**
   * Keys the consumer refuses by name alone. They are reported `unreadable` (reason
   * REFUSED_BY_NAME) and never read: a key like `nodes/../x` can't even be addressed by a
   * URL path, and junk keys shouldn't each cost a connection.
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

/** The reason given for a key that `nameOnly` refused. */
export const REFUSED_BY_NAME = 'refused by name; not read'

const valuesOf = (items: KvItem[]): Map<string, KeyRead> => new Map(items.map((item) => [item.key, { state: 'value', item }]))

const reasonOf = (err: unknown): string => (err instanceof Error ? err.message : String(err))

type KeysRead = KvKeysResult & { full?: KvListResult }

export function watchTree(opts: TreeWatchOptions): Watch {
  const { perKeyLimit, onChange, client, ...tuning } = opts
  if (perKeyLimit <= 0) return watchPrefix({ ...tuning, client, onChange: (r) => onChange({ keys: valuesOf(r.items), bytes: r.bytes, filtered: r.filtered }) })
  const tree = new Tree(opts)
  const keysWatch = watchBlocking<KeysRead>({
    ...tuning,
    client,
    label: opts.prefix,
    // The fallback read happens inside `read`, so a failed one is retried as part of the listing.
    read: async (index, signal) => {
      const keys = await client.kvKeys(opts.prefix, { index, waitSeconds: opts.waitSeconds, signal })
      if (keys.keys.length <= perKeyLimit) return keys
      return { ...keys, full: await client.kvList(opts.prefix, { signal }) }
    },
    onChange: (r) => (r.full ? tree.fullRead(r, r.full) : tree.listing(r)),
  })
  return watchGroup(
    keysWatch,
    () => tree.perKey.values(),
    async () => {
      tree.stopped = true
      await Promise.all([keysWatch.stop(), ...[...tree.perKey.values()].map((w) => w.stop())])
    },
  )
}

/** The watch's state: what each listed key read as, and the per-key watches. */
class Tree {
  readonly perKey = new Map<string, Watch>()
  stopped = false
  private readonly reads = new Map<string, KeyRead>()
  // Keys whose first read has finished, either way. A snapshot waits for all of them, so a
  // start-up doesn't hand over a set where keys not read yet look like nodes leaving.
  private readonly attempted = new Set<string>()
  private listed: string[] | undefined
  private filtered = false
  private bytes = 0

  constructor(private readonly opts: TreeWatchOptions) {}

  private async deliver(): Promise<void> {
    if (this.stopped || !this.listed || this.listed.some((k) => !this.attempted.has(k))) return
    const keys = new Map<string, KeyRead>()
    for (const k of this.listed) {
      const read = this.reads.get(k)
      if (read) keys.set(k, read)
    }
    const snapshot: TreeSnapshot = { keys, filtered: this.filtered, bytes: this.bytes }
    this.bytes = 0
    await this.opts.onChange(snapshot)
  }

  private deliverSafely(): void {
    this.deliver().catch((err: unknown) => this.opts.log.error({ err, prefix: this.opts.prefix }, 'applying a consul change failed'))
  }

  private forget(key: string): void {
    void this.perKey.get(key)?.stop()
    this.perKey.delete(key)
    this.reads.delete(key)
    this.attempted.delete(key)
  }

  /** A read of one key came back. A 404 while the listing still names the key means it is on its way out: only the listing may say it is gone. */
  private async keyRead(key: string, r: KvOneResult): Promise<void> {
    this.bytes += r.bytes
    if (r.item) this.reads.set(key, { state: 'value', item: r.item })
    else if (this.reads.get(key)?.state !== 'value') this.reads.set(key, { state: 'unreadable', reason: 'listed, but not found when read' })
    const first = !this.attempted.has(key)
    this.attempted.add(key)
    if (r.item || first) await this.deliver()
  }

  /** A read of one key failed: a key with a value keeps it; one without is unreadable, and no longer holds back the snapshot. */
  private keyFailed(key: string, err: unknown, attempt: number): void {
    if (this.reads.get(key)?.state !== 'value') this.reads.set(key, { state: 'unreadable', reason: reasonOf(err) })
    if (!this.attempted.has(key)) {
      this.attempted.add(key)
      this.deliverSafely()
    }
    this.opts.onError?.(err, attempt)
  }

  private watchKey(key: string): void {
    const { client, waitSeconds } = this.opts
    const { ratePerSecond, burst, backoffMinMs, backoffMaxMs, log } = this.opts
    const w = watchBlocking({
      client,
      ratePerSecond,
      burst,
      backoffMinMs,
      backoffMaxMs,
      log,
      label: key,
      read: (index, signal) => client.kvGetOne(key, { index, waitSeconds, signal }),
      onChange: (r) => this.keyRead(key, r),
      onError: (err, attempt) => this.keyFailed(key, err, attempt),
    })
    this.perKey.set(key, w)
  }

  /** A new key listing (at or under the per-key limit): start and stop per-key watches to match. */
  async listing(r: KvKeysResult): Promise<void> {
    this.bytes += r.bytes
    // A listing that stops (or starts) being filtered changes what absence proves, even with the same keys.
    const filterChanged = this.filtered !== r.filtered
    this.filtered = r.filtered
    const next = [...r.keys].sort()
    const keep = new Set(next)
    const removed = (this.listed ?? []).filter((k) => !keep.has(k))
    for (const k of removed) this.forget(k)
    let refusedNew = false
    for (const k of next) {
      if (this.perKey.has(k)) continue
      if (!this.opts.nameOnly?.(k)) this.watchKey(k)
      else if (!this.attempted.has(k) || this.reads.get(k)?.state === 'value') {
        this.reads.set(k, { state: 'unreadable', reason: REFUSED_BY_NAME })
        this.attempted.add(k)
        refusedNew = true
      }
    }
    const firstList = this.listed === undefined
    this.listed = next
    // A value change wakes this watch too (the prefix's index moved); the key's own watch delivers it.
    if (firstList || removed.length > 0 || refusedNew || filterChanged || next.length === 0) await this.deliver()
  }

  /** Above the per-key limit: one `?recurse` read stands for every key. */
  async fullRead(keys: KvKeysResult, full: KvListResult): Promise<void> {
    if (this.perKey.size) this.opts.log.info({ prefix: this.opts.prefix, keys: keys.keys.length, perKeyLimit: this.opts.perKeyLimit }, 'too many keys to watch one by one; reading the whole prefix on each change')
    for (const w of this.perKey.values()) void w.stop()
    this.perKey.clear()
    this.bytes += keys.bytes + full.bytes
    this.filtered = keys.filtered || full.filtered
    this.reads.clear()
    for (const [k, read] of valuesOf(full.items)) this.reads.set(k, read)
    this.listed = full.items.map((i) => i.key)
    this.attempted.clear()
    for (const k of this.listed) this.attempted.add(k)
    await this.deliver()
  }
}
