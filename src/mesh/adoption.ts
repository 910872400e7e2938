import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { keyFingerprint, parseHostFile } from '../tinc/hostfile.ts'
import { isTincName } from '../tinc/names.ts'
import type { AcceptedPeer } from './record.ts'
import type { MeshView } from './view.ts'

/**
 * Hand-made peers during an adoption (docs/adopt.md). `tinc-consul adopt` puts each peer of a
 * hand-made network on the keep list as `NAME until-adopted`. While such a peer has no valid
 * record, its hand-made host file is the only thing that connects us to it, so it is kept. When
 * a record appears whose key is the one in the hand-made file, the peer has adopted: the file
 * becomes ours and is rendered from the record. A record with another key is refused and the
 * hand-made file kept: a name is not proof of identity, and without this rule anyone able to
 * write a record under a not-yet-adopted name would take that peer's place on every node.
 */

/** What is on disk under hosts/<name> for a name kept until adopted. */
export interface HandMadeFile {
  /** The key's fingerprint, or undefined when the file has no readable key. */
  fingerprint: string | undefined
  /** The file is one we rendered from a record: the adoption happened already. */
  rendered: boolean
  /** The address of its first /32 Subnet line, if any: the node's VPN address. */
  address?: string
}

export type AdoptionState = { state: 'managed' } | { state: 'hand-made'; reason: string; refused: boolean }

/** The header every host file we render from a record starts with (src/tinc/hostfile.ts). */
const RENDERED_HEADER = '# Written by tinc-consul from'

/**
 * The rule, for one name on the keep list as `until-adopted`: pure, so it is tested alone.
 * `file` is undefined when hosts/<name> doesn't exist; `record` is the peer the reconciler
 * accepted under that name, if any (so pins, revocation and ipam/ have been applied already).
 */
export function adoptionState(file: HandMadeFile | undefined, record: AcceptedPeer | undefined): AdoptionState {
  // No hand-made file (never was, or removed by hand): nothing to protect, an ordinary peer.
  if (!file || file.rendered) return { state: 'managed' }
  if (!record) return { state: 'hand-made', reason: 'no valid record in Consul yet: the hand-made host file is kept', refused: false }
  if (!file.fingerprint) return { state: 'hand-made', reason: "the hand-made host file has no readable RSA key to check the record's against: record refused, file kept", refused: true }
  // A public key is public: anyone who can get a record written under the name (an unnamed
  // invite, say) could copy it. The address is the hand-made file's too, or the record is not its node.
  if (file.fingerprint === record.record.fingerprint && file.address !== undefined && file.address !== record.record.vpnAddress)
    return {
      state: 'hand-made',
      reason: `the record's VPN address ${record.record.vpnAddress} differs from the hand-made host file's ${file.address}: record refused, file kept (kept until adopted)`,
      refused: true,
    }
  if (file.fingerprint === record.record.fingerprint) return { state: 'managed' }
  return {
    state: 'hand-made',
    reason: `the record's key ${record.record.fingerprint} differs from the hand-made host file's ${file.fingerprint}: record refused, file kept (kept until adopted)`,
    refused: true,
  }
}

export interface AdoptionResult {
  /** The view without the names still hand-made: what is rendered, served in DNS and pinned. */
  view: MeshView
  /** Names whose hand-made file stays, with why. */
  handMade: Map<string, { reason: string; refused: boolean }>
}

/** Applies the rule to every name kept until adopted. */
export function applyAdoption(view: MeshView, files: ReadonlyMap<string, HandMadeFile | undefined>): AdoptionResult {
  const handMade = new Map<string, { reason: string; refused: boolean }>()
  for (const [name, file] of files) {
    const s = adoptionState(file, view.peers.get(name))
    if (s.state === 'hand-made') handMade.set(name, { reason: s.reason, refused: s.refused })
  }
  if (handMade.size === 0) return { view, handMade }
  return { view: { network: view.network, peers: new Map([...view.peers].filter(([n]) => !handMade.has(n))) }, handMade }
}

/** Reads hosts/<name> for each name kept until adopted (never our own, never a non-node name). */
export async function readHandMadeFiles(tincDir: string, self: string, names: ReadonlySet<string>): Promise<Map<string, HandMadeFile | undefined>> {
  const files = new Map<string, HandMadeFile | undefined>()
  for (const name of names) {
    if (name === self || !isTincName(name)) continue
    const text = await readFile(join(tincDir, 'hosts', name), 'utf8').catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined
      // A file that exists but can't be read is kept, never taken as absent.
      return ''
    })
    files.set(name, text === undefined ? undefined : handMadeFile(text))
  }
  return files
}

export function handMadeFile(text: string): HandMadeFile {
  const h = parseHostFile(text)
  let fingerprint: string | undefined
  try {
    fingerprint = h.publicKey && h.errors.length === 0 ? keyFingerprint(h.publicKey) : undefined
  } catch {
    fingerprint = undefined
  }
  const address = h.entries
    .filter((e) => e.key.toLowerCase() === 'subnet')
    .map((e) => (e.value.split('#')[0] ?? '').trim())
    .find((v) => /^\d{1,3}(\.\d{1,3}){3}\/32$/.test(v))
    ?.replace(/\/32$/, '')
  return { fingerprint, rendered: text.startsWith(RENDERED_HEADER), ...(address ? { address } : {}) }
}
