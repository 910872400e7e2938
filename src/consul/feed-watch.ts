import type { Logger } from '../log.ts'
import type { ConsulClient } from './client.ts'
import { readPrefixIndex, type KvItem } from './kv.ts'
import { watchBlocking, watchPrefix, type Watch } from './watch.ts'

/**
 * Watches every key under a prefix and hands over the whole set on each change, like a
 * `?recurse` watch, while reading only what changed.
 *
 * A `?recurse` blocking query returns every value under the prefix each time any one of them
 * changes: N records per daemon per change, N² for the mesh. Consul's KV API can't list the
 * entries modified since an index (hashicorp/consul#4142), so this watch takes two things:
 * - one blocking `?keys` query on the prefix without its slash, with "/" as separator. It
 *   answers with one name (the prefix) but its index covers every key under it, deletions
 *   included: a wake-up on any change for about 30 bytes, and one connection to the agent;
 * - a change source (the change log, src/mesh/change-log.ts) that says which keys changed up
 *   to that index, or that it can't tell.
 * The keys named are read one by one, without blocking. Whenever the source can't tell, a
 * named key is gone or can't be read, or Consul's index goes backwards, the whole prefix is
 * read once; such full reads are at least `fullReadMinMs` apart, so whoever can make the
 * source useless (a forged log) costs others a bounded re-read, and a full read every
 * `sweepMs` bounds what any missed change can cost.
 *
 * Only a full read removes a key. A named key that can't be read keeps its value (or stays
 * unreadable) until a full read settles it, and a listing Consul filtered by ACL says so
 * (`filtered`), since what it leaves out may still exist.
 */
export type KeyRead = { state: 'value'; item: KvItem } | { state: 'unreadable'; reason: string }

export interface TreeSnapshot {
  /** Every key the latest full read named, and every key read since, in key order. */
  keys: ReadonlyMap<string, KeyRead>
  /** The listing was filtered by ACL (X-Consul-Results-Filtered-By-ACLs): absence proves nothing. */
  filtered: boolean
  /** Body bytes read since the previous snapshot. */
  bytes: number
}

/** Which keys changed since `seen`, or why only a full read can tell. */
export interface ChangeSource {
  /** Read just before a full read: what the source has said up to now. Undefined when it can't say. */
  baseline(signal: AbortSignal): Promise<{ seen: number | undefined; bytes: number }>
  /**
   * After the prefix's index moved from `readThrough` (everything up to it has been read) to
   * `index`. `ahead`: the source was written after that index, at this one.
   */
  explain(
    at: { index: number; readThrough: number; seen: number | undefined },
    signal: AbortSignal,
  ): Promise<{ explained: { keys: string[]; seen: number } | { full: string } | { ahead: number }; bytes: number }>
}

export interface FeedWatchOptions {
  client: ConsulClient
  prefix: string
  waitSeconds?: number
  /** Without a source the watch is a plain `?recurse` one: the naive way, kept as the benchmarks' reference. */
  changes?: ChangeSource
  /**
   * Keys the consumer refuses by name alone. They are reported `unreadable` (reason
   * REFUSED_BY_NAME): a key like `nodes/../x` can't even be addressed by a URL path.
   */
  nameOnly?(key: string): boolean
  /** Least time between two full reads, on average over a few (default 5 s). */
  fullReadMinMs?: number
  /** A full read at least this often (default an hour). */
  sweepMs?: number
  ratePerSecond?: number
  burst?: number
  backoffMinMs?: number
  backoffMaxMs?: number
  log: Logger
  onChange(snapshot: TreeSnapshot): void | Promise<void>
  onError?(err: unknown, attempt: number): void
  /** A full read was applied, and why ("start", "sweep", or what the source could not tell). */
  onFullRead?(reason: string): void
}

/** Full reads that may follow each other at once before `fullReadMinMs` paces them. */
const FULL_READ_BURST = 3

/** The reason given for a key that `nameOnly` refused. */
export const REFUSED_BY_NAME = 'refused by name; not read'

type Step =
  | { kind: 'none'; index: number; bytes: number }
  | { kind: 'keys'; index: number; bytes: number; items: KvItem[]; seen: number }
  | { kind: 'full'; index: number; bytes: number; items: KvItem[]; filtered: boolean; seen: number | undefined; reason: string }

export function watchFeed(opts: FeedWatchOptions): Watch {
  const { changes, onChange, ...tuning } = opts
  if (!changes) return watchPrefix({ ...tuning, onChange: (r) => onChange({ keys: valuesOf(r.items, opts.nameOnly), bytes: r.bytes, filtered: r.filtered }) })
  const feed = new Feed(opts, changes)
  return watchBlocking<Step>({ ...tuning, label: opts.prefix, read: (index, signal) => feed.step(index, signal), onChange: (s) => feed.apply(s) })
}

const readOf = (item: KvItem, nameOnly?: (key: string) => boolean): KeyRead => (nameOnly?.(item.key) ? { state: 'unreadable', reason: REFUSED_BY_NAME } : { state: 'value', item })

const byKey = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0)

/** In key order, as a snapshot hands them over. */
const valuesOf = (items: KvItem[], nameOnly?: (key: string) => boolean): Map<string, KeyRead> =>
  new Map(items.map((item) => [item.key, readOf(item, nameOnly)] as const).sort(([a], [b]) => byKey(a, b)))

const sleep = (ms: number, signal: AbortSignal) =>
  new Promise<void>((resolve) => {
    const t = setTimeout(done, ms)
    signal.addEventListener('abort', done, { once: true })
    function done() {
      clearTimeout(t)
      signal.removeEventListener('abort', done)
      resolve()
    }
  })

/** The watch's state: what each key read as, how far the source has been followed, and when the last full read was. */
class Feed {
  private reads = new Map<string, KeyRead>()
  private filtered = false
  private seen: number | undefined
  private index = 0
  /** When the last few full reads were made, oldest first. */
  private fullReadsAt: number[] = []

  constructor(
    private readonly opts: FeedWatchOptions,
    private readonly changes: ChangeSource,
  ) {}

  /** One read: block until the prefix moves, then read what the source names, or everything. */
  async step(blockOn: number, signal: AbortSignal): Promise<Step> {
    if (this.index === 0) return this.full('start', 0, 0, signal)
    if (Date.now() - (this.fullReadsAt.at(-1) ?? -Infinity) > (this.opts.sweepMs ?? 3_600_000)) {
      // The index may not have moved since the last change we applied, and the watch hands over
      // only reads whose index moved: a sweep is applied here, and the loop sees no change.
      const sweep = await this.full('sweep', this.index, 0, signal)
      await this.apply(sweep)
      return { kind: 'none', index: this.index, bytes: 0 }
    }
    const probe = await this.probe(blockOn, signal)
    if (probe.index === this.index) return { kind: 'none', index: this.index, bytes: probe.bytes }
    if (probe.index < this.index) {
      // A store restored from an older snapshot. The loop would drop a read whose index went
      // backwards and start again from 0, so this one is applied here, and the loop sees no change.
      await this.apply(await this.full('the index went backwards', 0, probe.bytes, signal))
      return { kind: 'none', index: this.index, bytes: 0 }
    }
    const { index, explained, bytes } = await this.explain(probe.index, signal)
    const read = probe.bytes + bytes
    if ('full' in explained) return this.full(explained.full, index, read, signal)
    return this.readKeys(index, explained, read, signal)
  }

  /**
   * What the source says about `index`. A source already past it (another write landed between
   * the wake-up and its read) is asked again about the prefix's index now, if that is where it is.
   */
  private async explain(index: number, signal: AbortSignal): Promise<{ index: number; explained: { keys: string[]; seen: number } | { full: string }; bytes: number }> {
    const first = await this.changes.explain({ index, readThrough: this.index, seen: this.seen }, signal)
    if (!('ahead' in first.explained)) return { index, explained: first.explained, bytes: first.bytes }
    const now = await this.probe(0, signal)
    if (now.index !== first.explained.ahead) return { index, explained: { full: 'records changed while the change log was read' }, bytes: first.bytes + now.bytes }
    const second = await this.changes.explain({ index: now.index, readThrough: this.index, seen: this.seen }, signal)
    const explained = 'ahead' in second.explained ? { full: 'records changed while the change log was read' } : second.explained
    return { index: now.index, explained, bytes: first.bytes + now.bytes + second.bytes }
  }

  private async readKeys(index: number, explained: { keys: string[]; seen: number }, bytes: number, signal: AbortSignal): Promise<Step> {
    const items: KvItem[] = []
    let read = bytes
    for (const key of explained.keys) {
      const r = await this.opts.client.kvGetOne(key, { signal }).catch(() => undefined)
      // Gone, or not readable now: only a full read may say which.
      if (!r?.item) return this.full(r ? `${key} is gone` : `${key} could not be read`, index, read, signal)
      read += r.bytes
      items.push(r.item)
    }
    return { kind: 'keys', index, bytes: read, items, seen: explained.seen }
  }

  /** The prefix's index: blocking on `index`, or at once with 0. */
  probe(index: number, signal: AbortSignal) {
    return readPrefixIndex(this.opts.client, this.opts.prefix, { index, waitSeconds: this.opts.waitSeconds, signal })
  }

  private async full(reason: string, atLeast: number, bytes: number, signal: AbortSignal): Promise<Step> {
    // The oldest of the last few full reads sets the pace: a full read right after start-up (a
    // write during an outage) goes at once, a steady stream of them is held to one per interval.
    const wait = (this.fullReadsAt[0] ?? -Infinity) + FULL_READ_BURST * (this.opts.fullReadMinMs ?? 5000) - Date.now()
    if (this.fullReadsAt.length >= FULL_READ_BURST && wait > 0) await sleep(wait, signal)
    // The baseline first: whatever the source names after it is at least as new as the list.
    const base = await this.changes.baseline(signal)
    const list = await this.opts.client.kvList(this.opts.prefix, { signal })
    this.fullReadsAt = [...this.fullReadsAt, Date.now()].slice(-FULL_READ_BURST)
    return { kind: 'full', index: Math.max(list.index, atLeast), bytes: bytes + base.bytes + list.bytes, items: list.items, filtered: list.filtered, seen: base.seen, reason }
  }

  async apply(step: Step): Promise<void> {
    this.index = step.index
    if (step.kind === 'none') return
    if (step.kind === 'keys') {
      // Map order is key order (full reads are sorted): a changed key keeps its place, and only a new one re-sorts.
      const added = step.items.some((item) => !this.reads.has(item.key))
      for (const item of step.items) this.reads.set(item.key, readOf(item, this.opts.nameOnly))
      if (added) this.reads = new Map([...this.reads].sort(([a], [b]) => byKey(a, b)))
      this.seen = step.seen
    } else {
      if (step.items.length === 0 && this.reads.size > 0) {
        // A prefix that holds at least our own record read as empty: a bad moment of the store, not
        // everyone leaving. The consumer sees the empty read (and doesn't take it); the next change
        // is read in full again, so what we keep is never handed on as current.
        this.seen = undefined
        return this.opts.onChange({ keys: new Map(), filtered: step.filtered, bytes: step.bytes })
      }
      this.opts.onFullRead?.(step.reason)
      if (step.reason !== 'start') this.opts.log.info({ prefix: this.opts.prefix, reason: step.reason, keys: step.items.length }, 'read every record once')
      this.reads = valuesOf(step.items, this.opts.nameOnly)
      this.filtered = step.filtered
      this.seen = step.seen
    }
    // A copy: the consumer keeps the snapshot while this map moves on.
    await this.opts.onChange({ keys: new Map(this.reads), filtered: this.filtered, bytes: step.bytes })
  }
}
