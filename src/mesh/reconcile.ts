import type { KvLayout } from './kv-layout.ts'
import { isTincName } from '../tinc/names.ts'
import { checkPeer, decodeJson, nodeRecordSchema, type AcceptedPeer, type Decoded, type NetworkRecord, type NodeRecord } from './record.ts'
import type { MeshView } from './view.ts'

/**
 * The trust core: (previous view, inputs) → view. Pure (no I/O, no clock) so every
 * rule can be tested without Consul or disk, and deterministic so a model test can
 * replay it. Every run re-judges every record, copies kept from the previous view
 * included: a copy accepted earlier is only as good as the rules it passes now.
 *
 * What can't be read is never taken as gone: an unreadable key keeps the copy
 * accepted before, and only a complete listing proves a record was deleted.
 */

/** One key under nodes/ as listed: its value, or why it could not be read. */
export type NodeEntry = { state: 'value'; value: Uint8Array | NodeRecord; createIndex: number } | { state: 'unreadable'; reason: string }

export interface OwnIdentity {
  name: string
  vpnAddress?: string
  vpnAddress6?: string
  fingerprint?: string
}

export interface ReconcileInput {
  layout: KvLayout
  network: NetworkRecord
  /** Our own identity from local files: never rendered, and its address and key are ours alone. */
  self: OwnIdentity
  /** nodes/ as listed, by full KV key. */
  nodes: ReadonlyMap<string, NodeEntry>
  /** Keys missing from `nodes` are confirmed gone (a successful, unfiltered, non-empty listing). */
  complete: boolean
  /** ipam/ active holders (address -> name). Empty map: the network has no ipam/. Undefined: unknown (cache only). */
  allocations: ReadonlyMap<string, string> | undefined
  /** Revoked fingerprints; undefined: unknown (cache only; nothing new is trusted). */
  revoked: ReadonlySet<string> | undefined
  pins: ReadonlyMap<string, string>
  /** Names the operator keeps by hand: never in the view, never rendered, never removed. */
  keep: ReadonlySet<string>
  /** False while new keys can't be checked against a fresh revoked/ read: new names stay pending. */
  trustNewKeys: boolean
  /**
   * Decoded and checked values by key and exact bytes, reused across runs so one change
   * costs one check instead of N. Only valid for one network record: clear it when the
   * network changes.
   */
  memo?: Map<string, { raw: Uint8Array; result: Decoded<AcceptedPeer> }>
}

/** invalid: the value itself is wrong; ownership: it claims what isn't its own; unreadable: it could not be read. */
export type RefusalKind = 'invalid' | 'ownership' | 'unreadable'

export interface Refusal {
  key: string
  name: string | undefined
  reason: string
  kind: RefusalKind
}

export interface ReconcileResult {
  view: MeshView
  /** At most one per key, sorted by key. A key can be refused while an older copy stays in the view. */
  refusals: Refusal[]
  /** Names accepted with no pin (or a spent one): pin these fingerprints. */
  newPins: Array<[string, string]>
  /**
   * Names whose host file must go: in the previous view and not in this one, or listed,
   * read and refused outright (so a file written before this run can't outlive its refusal).
   */
  removed: string[]
  /**
   * Listed but not decidable yet: unreadable with no good copy, or a current value with a new
   * key while new keys can't be trusted (its name may still be in the view with the old copy).
   * Their files are left as they are.
   */
  pending: string[]
}

interface Rules {
  input: ReconcileInput
  previous: MeshView | undefined
  /** Whether a key with no pin may be trusted now. */
  trustNew: boolean
}

/** Why one candidate for a name can't be used, or undefined when it can. */
type Verdict = { kind: RefusalKind; reason: string } | 'pending' | undefined

interface Candidate {
  peer: AcceptedPeer
  source: 'current' | 'kept'
  verdict: Verdict
}

/** Everything known about one name in this run. */
interface NameCase {
  name: string
  key: string
  listed: boolean
  candidates: Candidate[]
  /** Refusal notes in the order they were found: the current value's first, then the kept copy's. */
  notes: Array<{ kind: RefusalKind; reason: string }>
  unreadable: boolean
  pending: boolean
  accepted?: Candidate
}

export function reconcile(previous: MeshView | undefined, input: ReconcileInput): ReconcileResult {
  const rules: Rules = { input, previous, trustNew: input.trustNewKeys && input.revoked !== undefined }
  const refusals: Refusal[] = []
  const cases = collectCases(rules, refusals)
  claimIdentities(cases)
  return assemble(cases, rules, refusals)
}

/** Rules 1 and 6: one case per valid name that is neither ours nor kept by hand, current value first. */
function collectCases(rules: Rules, refusals: Refusal[]): NameCase[] {
  const { input, previous } = rules
  const prefix = input.layout.nodesPrefix
  const excluded = (name: string) => name === input.self.name || input.keep.has(name)
  const cases = new Map<string, NameCase>()
  for (const [key, entry] of input.nodes) {
    // An empty value at the prefix itself is a folder marker, not a record.
    if (key === prefix) continue
    const name = key.startsWith(prefix) ? key.slice(prefix.length) : undefined
    if (!isTincName(name)) {
      refusals.push({ key, name: undefined, reason: 'key is not nodes/<valid tinc name>', kind: 'invalid' })
      continue
    }
    if (excluded(name)) continue
    const c: NameCase = { name, key, listed: true, candidates: [], notes: [], unreadable: false, pending: false }
    if (entry.state === 'unreadable') {
      c.unreadable = true
      c.notes.push({ kind: 'unreadable', reason: `could not be read: ${entry.reason}` })
    } else {
      const decoded = decodeEntry(key, name, entry, input)
      if (decoded.ok) c.candidates.push(judge(decoded.value, 'current', name, rules))
      else c.notes.push({ kind: 'invalid', reason: decoded.reason })
    }
    cases.set(name, c)
  }
  const networkChanged = previous !== undefined && JSON.stringify(previous.network) !== JSON.stringify(input.network)
  for (const [name, peer] of previous?.peers ?? []) {
    if (excluded(name)) continue
    let c = cases.get(name)
    // Rule 4: a complete listing without the key proves it was deleted.
    if (!c && input.complete) continue
    c ??= { name, key: `${prefix}${name}`, listed: false, candidates: [], notes: [], unreadable: false, pending: false }
    cases.set(name, c)
    // An unchanged record decodes to the very object accepted before (the memo), and judging
    // one object again gives the same verdict: reuse it.
    const current = c.candidates[0]
    if (!networkChanged && current?.peer === peer) {
      c.candidates.push({ ...current, source: 'kept' })
      continue
    }
    const rechecked = networkChanged ? checkPeer(peer.record, { network: input.network, keyName: name }) : undefined
    if (rechecked && !rechecked.ok) c.notes.push({ kind: 'invalid', reason: `the copy accepted before: ${rechecked.reason}` })
    else c.candidates.push(judge(peer, 'kept', name, rules))
  }
  return [...cases.values()].sort((a, b) => compare(a.name, b.name))
}

/** Decodes and checks a listed value once per key and bytes (the memo), stamping its CreateIndex. */
function decodeEntry(key: string, name: string, entry: Extract<NodeEntry, { state: 'value' }>, input: ReconcileInput): Decoded<AcceptedPeer> {
  const { value, createIndex } = entry
  const raw = value instanceof Uint8Array ? value : undefined
  const hit = raw ? input.memo?.get(key) : undefined
  // The watch hands over the same bytes object for a key that did not change: no need to compare them.
  const same = raw !== undefined && hit !== undefined && (hit.raw === raw || Buffer.compare(hit.raw, raw) === 0)
  if (hit && same && (!hit.result.ok || hit.result.value.createIndex === createIndex)) return hit.result
  let result: Decoded<AcceptedPeer>
  if (hit && same && hit.result.ok) result = { ok: true, value: { ...hit.result.value, createIndex } }
  else {
    const decoded = raw ? decodeJson(raw, nodeRecordSchema) : { ok: true as const, value: value as NodeRecord }
    const checked = decoded.ok ? checkPeer(decoded.value, { network: input.network, keyName: name }) : decoded
    result = checked.ok ? { ok: true, value: { ...checked.value, createIndex } } : checked
  }
  if (raw && input.memo) input.memo.set(key, { raw, result })
  return result
}

/** Rules 2 and 5 for one candidate alone: our own identity, revocation, pin, ipam, and whether its key may be trusted yet. */
function judge(peer: AcceptedPeer, source: Candidate['source'], name: string, rules: Rules): Candidate {
  const reason = ownershipRefusal(peer, name, rules.input)
  if (reason !== undefined) return { peer, source, verdict: { kind: 'ownership', reason } }
  // A key seen for the first time waits for a fresh revoked/ read, unless this name already had it.
  const fp = peer.record.fingerprint
  if (!rules.trustNew && effectivePin(name, rules.input) === undefined && rules.previous?.peers.get(name)?.record.fingerprint !== fp) return { peer, source, verdict: 'pending' }
  return { peer, source, verdict: undefined }
}

/** Why a candidate claims what isn't its own, or undefined when it doesn't. */
function ownershipRefusal(peer: AcceptedPeer, name: string, input: ReconcileInput): string | undefined {
  const { fingerprint: fp, vpnAddress: vpn, vpnAddress6: vpn6 } = peer.record
  const self = input.self
  if (vpn === self.vpnAddress) return `address ${vpn} is this node's own (${self.name})`
  if (vpn6 !== undefined && vpn6 === self.vpnAddress6) return `address ${vpn6} is this node's own (${self.name})`
  if (fp === self.fingerprint) return `key ${fp} is this node's own (${self.name})`
  if (name.toLowerCase() === self.name.toLowerCase()) return `name "${name}" differs only in case from this node's own (${self.name})`
  if (input.revoked?.has(fp)) return `key ${fp} is revoked`
  const pin = effectivePin(name, input)
  if (pin !== undefined && pin !== fp) return `key ${fp} differs from the pinned ${pin}; run \`tinc-consul pin reset ${name}\` if the key really changed`
  const allocations = input.allocations
  if (allocations && allocations.size > 0) {
    const holder = allocations.get(vpn)
    if (holder !== name) return holder ? `address ${vpn} is allocated to ${holder}` : `address ${vpn} was never allocated (ipam/${vpn} is missing)`
    const holder6 = vpn6 === undefined ? name : allocations.get(vpn6)
    if (holder6 !== name) return holder6 ? `address ${vpn6} is allocated to ${holder6}` : `address ${vpn6} was never allocated (ipam/${vpn6} is missing)`
  }
  return undefined
}

/** The pinned fingerprint for a name; a pin on a revoked key is spent (revoke and re-join is how a name gets a new key). */
function effectivePin(name: string, input: ReconcileInput): string | undefined {
  const pin = input.pins.get(name)
  return pin !== undefined && !input.revoked?.has(pin) ? pin : undefined
}

/**
 * Rule 3: one node per VPN address (IPv4 and IPv6 each), one name per key, one node per case-insensitive name,
 * whatever ipam/ says. Names go by seniority (the CreateIndex of their first usable
 * candidate, then the name); the first to claim keeps it, and a later one falls back to
 * its kept copy if that one doesn't collide. (Our own identity was ruled out in `judge`.)
 */
function claimIdentities(cases: NameCase[]): void {
  const holders: Holders = { address: new Map(), key: new Map(), name: new Map() }
  const ranked = cases.map((c) => ({ c, rank: c.candidates.find((x) => x.verdict === undefined)?.peer.createIndex ?? Number.POSITIVE_INFINITY }))
  ranked.sort((a, b) => a.rank - b.rank || compare(a.c.name, b.c.name))
  for (const { c } of ranked) {
    for (const cand of c.candidates) {
      const label = cand.source === 'kept' ? 'the copy accepted before: ' : ''
      if (cand.verdict === 'pending') c.pending ||= cand.source === 'current'
      else if (cand.verdict) c.notes.push({ kind: cand.verdict.kind, reason: `${label}${cand.verdict.reason}` })
      else {
        const conflict = collision(cand.peer, c.name, holders)
        if (conflict) c.notes.push({ kind: 'ownership', reason: `${label}${conflict}` })
        else {
          c.accepted = cand
          claim(cand.peer, c.name, holders)
          break
        }
      }
    }
    if (!c.accepted && c.unreadable) c.pending = true
  }
}

/** Who holds each VPN address (IPv4 and IPv6 share one map: their spellings never meet), key and lower-cased name. */
interface Holders {
  address: Map<string, string>
  key: Map<string, string>
  name: Map<string, string>
}

function claim(peer: AcceptedPeer, name: string, holders: Holders): void {
  const { vpnAddress, vpnAddress6, fingerprint } = peer.record
  holders.address.set(vpnAddress, name)
  if (vpnAddress6 !== undefined) holders.address.set(vpnAddress6, name)
  holders.key.set(fingerprint, name)
  holders.name.set(name.toLowerCase(), name)
}

function collision(peer: AcceptedPeer, name: string, holders: Holders): string | undefined {
  const { vpnAddress, vpnAddress6, fingerprint } = peer.record
  const byAddress = holders.address.get(vpnAddress)
  if (byAddress) return `address ${vpnAddress} is already held by ${byAddress}, which came first`
  const byAddress6 = vpnAddress6 === undefined ? undefined : holders.address.get(vpnAddress6)
  if (byAddress6) return `address ${vpnAddress6} is already held by ${byAddress6}, which came first`
  const byKey = holders.key.get(fingerprint)
  if (byKey) return `key ${fingerprint} is already used by ${byKey}, which came first`
  const byName = holders.name.get(name.toLowerCase())
  if (byName) return `name "${name}" differs only in case from ${byName}, which came first`
  return undefined
}

function assemble(cases: NameCase[], rules: Rules, refusals: Refusal[]): ReconcileResult {
  const peers = new Map<string, AcceptedPeer>()
  const newPins: Array<[string, string]> = []
  const pending: string[] = []
  const refusedOutright: string[] = []
  for (const c of cases) {
    if (c.accepted) {
      peers.set(c.name, c.accepted.peer)
      // Only a value read now is pinned: a kept copy under a reset pin waits for its successor.
      if (c.accepted.source === 'current' && rules.trustNew && effectivePin(c.name, rules.input) === undefined) newPins.push([c.name, c.accepted.peer.record.fingerprint])
    }
    if (c.pending) pending.push(c.name)
    else if (!c.accepted && c.listed) refusedOutright.push(c.name)
    const [first] = c.notes
    if (first) refusals.push({ key: c.key, name: c.name, kind: first.kind, reason: c.notes.map((n) => n.reason).join('; ') })
  }
  const gone = [...(rules.previous?.peers.keys() ?? [])].filter((name) => !peers.has(name))
  const removed = [...new Set([...gone, ...refusedOutright])].sort(compare)
  refusals.sort((a, b) => compare(a.key, b.key))
  return { view: { network: rules.input.network, peers }, refusals, newPins, removed, pending }
}

/** Code-unit order: the same on every machine, whatever its locale. */
function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0
}
