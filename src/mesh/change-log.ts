import * as z from 'zod'
import { b64, type ConsulClient, type TxnOp, type TxnResult } from '../consul/client.ts'
import type { ChangeSource } from '../consul/feed-watch.ts'
import { readPrefixIndex } from '../consul/kv.ts'
import { ConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import { isTincName } from '../tinc/names.ts'
import type { KvLayout } from './kv-layout.ts'
import { decodeJson } from './record.ts'

/**
 * The change log: one small key, `<prefix>changes`, that names the records written in the
 * same transaction as it. Consul's KV API can't list what changed since an index
 * (hashicorp/consul#4142); with the log, a daemon blocks on one tiny query that wakes on any
 * record, reads the log (about 2 KB), and reads only the records it names. What the log says
 * is a hint, never a record: every named record is read from nodes/ and judged like any other,
 * so a forged entry costs one re-read, and an empty, unreadable or skipped log costs one full
 * read (rate limited), never a wrong file. docs/architecture.md ("The change feed") has the
 * reasoning and the measurements.
 *
 *   {"v":1,"seq":1042,"entries":[{"s":1041,"n":"laptop"},{"s":1042,"n":"nas"}]}
 *
 * `seq` is the last entry's number; entries are consecutive. Readers ignore fields they don't
 * know, so a later release can add some; a `v` they don't know reads as no log (a full read).
 */
export const CHANGE_LOG_VERSION = 1
/** Entries kept: a daemon that misses more changes than this between two reads reads everything once. */
export const CHANGE_LOG_ENTRIES = 64
/** Attempts at the log's check-and-set before a writer gives up on it and writes without it. */
const WRITE_ATTEMPTS = 8

/**
 * An entry: `s` its number, `n` the record's name, `p` the log's ModifyIndex when the writer read
 * it (the index of the logged write before this one), `w` the index of nodes/ the writer saw just
 * before writing. `w` above `p` means nodes/ changed after the previous logged write without a
 * log entry (an older release, or a hand-made write), which readers catch up on with a full read.
 */
const entrySchema = z.object({ s: z.number().int().nonnegative(), n: z.string().max(64), p: z.number().int().nonnegative().optional(), w: z.number().int().nonnegative().optional() })
export const changeLogSchema = z.object({ v: z.literal(CHANGE_LOG_VERSION), seq: z.number().int().nonnegative(), entries: z.array(entrySchema).max(4 * CHANGE_LOG_ENTRIES) })
export type ChangeLog = z.infer<typeof changeLogSchema>

/** The log after naming `names`: the same log with the entries appended, the oldest dropped. */
export function appendChanges(log: ChangeLog | undefined, names: readonly string[], seenAt?: { p: number; w: number }): ChangeLog {
  let seq = log?.seq ?? 0
  const added = names.map((n) => ({ s: ++seq, n, ...seenAt }))
  const entries = [...(log?.entries ?? []), ...added].slice(-CHANGE_LOG_ENTRIES)
  return { v: CHANGE_LOG_VERSION, seq, entries }
}

export interface LoggedTxn {
  result: TxnResult
  /** The log was written with the ops; false after the log's attempts ran out or the token may not write it. */
  logged: boolean
  /** Transactions sent. */
  attempts: number
  /** Attempts lost only because another writer changed the log in between. */
  logRetries: number
}

const permissionDenied = (what: string) => /permission denied/i.test(what)
const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/**
 * Runs `ops` in one transaction with the log naming `names` (nodes/ records the ops write or
 * delete). Another writer's log update makes the transaction roll back; it is re-read and sent
 * again after a jittered pause, so writers starting together spread out. A token without write
 * on the log (an older node policy), or a log that keeps changing, gets the ops written alone:
 * readers see a change the log doesn't explain and read everything once.
 */
export async function txnWithChangeLog(client: ConsulClient, layout: KvLayout, ops: TxnOp[], names: readonly string[], log?: Logger): Promise<LoggedTxn> {
  let logRetries = 0
  const alone = async (why: string, attempts: number): Promise<LoggedTxn> => {
    log?.warn({ key: layout.changes }, `${why}; writing without it (every daemon reads all records once)`)
    return { result: await client.txn(ops), logged: false, attempts, logRetries }
  }
  for (let attempt = 1; attempt <= WRITE_ATTEMPTS; attempt++) {
    const current = await client.kvGet(layout.changes)
    const parsed = current ? decodeJson(current.value, changeLogSchema) : undefined
    // Read last, right before the write: what nodes/ holds that the log doesn't account for.
    const nodes = await readPrefixIndex(client, layout.nodesPrefix)
    const next = appendChanges(parsed?.ok ? parsed.value : undefined, names, { p: current?.modifyIndex ?? 0, w: nodes.index })
    const logOp: TxnOp = { KV: { Verb: 'cas', Key: layout.changes, Value: b64(JSON.stringify(next)), Index: current?.modifyIndex ?? 0 } }
    let result: TxnResult
    try {
      result = await client.txn([...ops, logOp])
    } catch (err) {
      if (!(err instanceof ConsulError && err.status === 403)) throw err
      return alone('this token may not write the change log', attempt + 1)
    }
    if (result.ok) return { result, logged: true, attempts: attempt, logRetries }
    const onLog = result.errors.filter((e) => e.OpIndex === ops.length)
    // One of the caller's ops failed: that is the caller's answer, about the caller's ops only.
    if (onLog.length < result.errors.length) return { result: { ok: false, errors: result.errors.filter((e) => e.OpIndex < ops.length) }, logged: false, attempts: attempt, logRetries }
    if (onLog.some((e) => permissionDenied(e.What))) return alone('this token may not write the change log', attempt + 1)
    logRetries++
    // Full jitter over a doubling window (50 ms, 100 ms, … 3.2 s): writers that start together
    // (a rack powering up, a mass restart) spread out instead of colliding again in step.
    await pause(Math.random() * 25 * 2 ** attempt)
  }
  return alone('the change log kept changing under us', WRITE_ATTEMPTS + 1)
}

/** What a reader takes from the log after nodes/ moved to `index`. */
export type Explained = { names: string[]; seq: number } | { full: string } | { ahead: number }

/**
 * The reader's rule. `seen` is the seq it has read through (undefined: none yet). The log
 * explains nodes/ reaching `nodesIndex` only when it was written in the same transaction as
 * that change (its ModifyIndex is the same) and it holds every entry after `seen`. A log written
 * after that index (`ahead`) may explain the index nodes/ has reached since.
 */
export function explainChanges(read: { value: Uint8Array; modifyIndex: number } | undefined, nodesIndex: number, seen: number | undefined, readThrough = 0): Explained {
  if (!read) return { full: 'no change log' }
  const d = decodeJson(read.value, changeLogSchema)
  if (!d.ok) return { full: `change log unreadable: ${d.reason}` }
  const cl = d.value
  if (read.modifyIndex > nodesIndex) return { ahead: read.modifyIndex }
  if (read.modifyIndex !== nodesIndex) return { full: 'a record changed without a change-log entry' }
  if (seen === undefined) return { full: 'no baseline yet' }
  if (cl.seq <= seen) return { full: 'the change log went backwards' }
  const fresh = cl.entries.filter((e) => e.s > seen)
  const first = fresh[0]?.s
  if (first !== seen + 1 || fresh.some((e, i) => e.s !== first + i) || fresh.at(-1)?.s !== cl.seq) return { full: 'entries missing from the change log' }
  // Each writer saw nodes/ at or below the previous logged write (or below what this reader has
  // read): no change slipped in between without an entry.
  if (fresh.some((e) => e.p === undefined || e.w === undefined || e.w > Math.max(e.p, readThrough))) return { full: 'a record changed without a change-log entry' }
  const names = [...new Set(fresh.map((e) => e.n))].filter(isTincName)
  if (names.length > CHANGE_LOG_ENTRIES) return { full: 'too many changes to read one by one' }
  return { names, seq: cl.seq }
}

/** The log's seq as a baseline before a full read: whatever it names from then on is newer. No log yet is seq 0. */
export function changeLogSeq(read: { value: Uint8Array } | undefined): number | undefined {
  if (!read) return 0
  const d = decodeJson(read.value, changeLogSchema)
  return d.ok ? d.value.seq : undefined
}

/** The change log as the records watch's source (src/consul/feed-watch.ts). */
export function changeLogSource(client: ConsulClient, layout: KvLayout): ChangeSource {
  return {
    async baseline(signal) {
      const r = await client.kvGetOne(layout.changes, { signal })
      return { seen: changeLogSeq(r.item), bytes: r.bytes }
    },
    async explain(at, signal) {
      const r = await client.kvGetOne(layout.changes, { signal })
      const e = explainChanges(r.item, at.index, at.seen, at.readThrough)
      return { explained: 'names' in e ? { keys: e.names.map((n) => layout.node(n)), seen: e.seq } : e, bytes: r.bytes }
    },
  }
}
