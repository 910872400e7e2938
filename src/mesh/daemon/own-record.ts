import type { ConsulClient } from '../../consul/client.ts'
import { backoffMs } from '../../consul/watch.ts'
import type { KvItem } from '../../consul/kv.ts'
import type { KeyRead } from '../../consul/feed-watch.ts'
import type { Logger } from '../../log.ts'
import type { KvLayout } from '../kv-layout.ts'
import { buildOwnRecord, publishRecord, sameRecordContent } from '../publish.ts'
import { decodeJson, nodeRecordSchema, type NetworkRecord, type NodeRecord } from '../record.ts'

/** Rewrites of our record by someone else that we answer before giving up. */
export const MAX_CONFLICT_ATTEMPTS = 3

/**
 * Another writer keeps putting a different record under our name: a cloned VM or a restored
 * backup with the same tinc name. Shown in status until the daemon restarts or our host file changes.
 */
export interface NameConflict {
  ours: string
  /** The other record's fingerprint, or why it could not be read. */
  theirs: string
  attempts: number
  gaveUp: boolean
  since: string
}

export interface OwnRecordOptions {
  client: ConsulClient
  layout: KvLayout
  tincDir: string
  self: string
  joinPort?: number
  log: Logger
  /** Whether our key is revoked as far as the daemon's own revoked/ read knows. */
  revokedLocally(fingerprint: string): boolean
}

export interface OwnRecordKeeper {
  /** Publish now (network known or changed, host file changed). Resets a conflict when `reset`. */
  publish(opts?: { reset?: boolean }): Promise<void>
  /** What the latest nodes/ snapshot says about our key; `absent` only from a complete listing. */
  observe(read: KeyRead | undefined, absent: boolean): Promise<void>
  setNetwork(network: NetworkRecord): void
  conflict(): NameConflict | undefined
  /** Our record as built from disk (cached until the host file changes). */
  own(): Promise<NodeRecord>
  stop(): void
}

/**
 * What a read of our own key calls for: nothing (ours, a read from before our write, a foreign
 * write already answered, or a conflict given up), a publish (we haven't published since start
 * or since our host file changed, so the record is just old), or an answer to a foreign write.
 */
export function judgeOwnKey(item: KvItem, ours: NodeRecord, s: { since: number | undefined; answered: number | undefined; gaveUp: boolean }): 'ignore' | 'publish' | 'foreign' {
  const d = decodeJson(item.value, nodeRecordSchema)
  if (d.ok && sameRecordContent(ours, d.value)) return 'ignore'
  if (s.since === undefined) return 'publish'
  if (item.modifyIndex < s.since || item.modifyIndex === s.answered || s.gaveUp) return 'ignore'
  return 'foreign'
}

/** One more foreign write of our record: after MAX_CONFLICT_ATTEMPTS answers, give up. */
export function nextConflict(was: NameConflict | undefined, ours: string, theirs: string, now: Date): NameConflict {
  const attempts = (was?.attempts ?? 0) + 1
  const gaveUp = attempts > MAX_CONFLICT_ATTEMPTS
  return { ours, theirs, attempts: Math.min(attempts, MAX_CONFLICT_ATTEMPTS), gaveUp, since: was?.since ?? now.toISOString() }
}

/**
 * Keeps `nodes/<self>` equal to our host file. A record that someone else rewrote is put back,
 * but with a growing, jittered delay and only MAX_CONFLICT_ATTEMPTS times: two daemons with one
 * name would otherwise rewrite each other forever, waking every daemon in the mesh each time.
 */
interface KeeperState {
  network?: NetworkRecord
  mine?: NodeRecord
  conflict?: NameConflict
  failures: number
  /** The ModifyIndex our last publish left the key at or above; undefined until we have published. */
  since?: number
  /** The foreign write already answered: every nodes/ snapshot repeats it until ours is back. */
  answered?: number
  retry?: NodeJS.Timeout
  stopped: boolean
}

export function ownRecordKeeper(opts: OwnRecordOptions): OwnRecordKeeper {
  const log = opts.log.child({ component: 'publish' })
  const st: KeeperState = { failures: 0, stopped: false }
  const own = async () => (st.mine ??= await buildOwnRecord(opts.tincDir, opts.self, undefined, opts.joinPort))
  const publishNow = (): Promise<void> => publishOwn(opts, st, own, log)
  return {
    publish: async (o) => {
      if (o?.reset) {
        st.mine = undefined
        st.conflict = undefined
        st.since = undefined
      }
      await publishNow()
    },
    observe: async (read, absent) => {
      if (!st.network || st.stopped) return
      if (!read) {
        // Deleted by hand or lost with a store: put it back, even after a conflict gave up.
        if (absent) await publishNow()
        return
      }
      if (read.state !== 'value') return
      const ours = await own().catch(() => undefined)
      const verdict = ours ? judgeOwnKey(read.item, ours, { since: st.since, answered: st.answered, gaveUp: st.conflict?.gaveUp === true }) : 'ignore'
      if (verdict === 'publish') return publishNow()
      if (verdict !== 'foreign') return
      st.answered = read.item.modifyIndex
      await onForeign(st, read, own, publishNow, log)
    },
    setNetwork: (n) => {
      st.network = n
    },
    conflict: () => st.conflict,
    own,
    stop: () => {
      st.stopped = true
      clearTimeout(st.retry)
    },
  }
}

async function publishOwn(opts: OwnRecordOptions, st: KeeperState, own: () => Promise<NodeRecord>, log: Logger): Promise<void> {
  const network = st.network
  if (!network || st.stopped) return
  clearTimeout(st.retry)
  try {
    const record = await own()
    // Ask Consul too, not only our copy of revoked/: that watch may lag a revocation.
    if (opts.revokedLocally(record.fingerprint) || (await opts.client.kvGet(opts.layout.revoked(record.fingerprint)))) {
      log.error({ fingerprint: record.fingerprint }, 'our key is revoked; not publishing (re-join with a new key)')
      return
    }
    st.since = (await publishRecord(opts.client, opts.layout, network, record, log)).since
    st.failures = 0
  } catch (err) {
    st.failures++
    const delay = backoffMs(st.failures, 500, 30_000)
    log.error({ err, retryInMs: delay }, 'could not publish our record; retrying')
    st.retry = setTimeout(() => void publishOwn(opts, st, own, log), delay)
  }
}

async function onForeign(st: KeeperState, item: KeyRead & { state: 'value' }, own: () => Promise<NodeRecord>, publishNow: () => Promise<void>, log: Logger): Promise<void> {
  const theirs = decodeJson(item.item.value, nodeRecordSchema)
  const was = st.conflict
  const conflict = nextConflict(st.conflict, (await own()).fingerprint, theirs.ok ? theirs.value.fingerprint : `unreadable (${theirs.reason})`, new Date())
  st.conflict = conflict
  clearTimeout(st.retry)
  if (conflict.gaveUp) {
    if (!was?.gaveUp)
      log.error(
        { ours: conflict.ours, theirs: conflict.theirs, attempts: conflict.attempts },
        'another daemon keeps writing a different record under our name (a cloned machine?); no longer rewriting it. Stop the other one, or give one of them a new name, then restart this daemon',
      )
    return
  }
  const delay = backoffMs(conflict.attempts, 1000, 30_000)
  log.warn({ ours: conflict.ours, theirs: conflict.theirs, attempt: conflict.attempts, retryInMs: delay }, 'our record was rewritten by someone else; putting ours back')
  st.retry = setTimeout(() => void publishNow(), delay)
}
