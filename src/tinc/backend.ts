import type { Logger } from '../log.ts'
import type { AcceptedPeer } from '../mesh/record.ts'
import { dumpReader, type DumpReaderOptions, type DumpResult } from './dump.ts'
import { confMode, type TincMode } from './mode.ts'
import { hostFileText } from './render.ts'
import { existingNode, generateKey, writeSetup, type NodeSetup } from './setup.ts'
import { signalTincd } from './signal.ts'

/**
 * What depends on the tinc release that runs the node, behind one object: how its files look,
 * how its keys are made, how it is told to reload and how its state is read. Everything else
 * (records, the view, DNS, services) is the same whatever the release, so a tinc 1.1 backend
 * (Ed25519 keys, `tinc` control socket dumps, `invitation` files left alone) is one new
 * implementation of this interface rather than edits across the mesh and status code.
 *
 * Only tinc 1.0 exists: Debian's 1.0.36 is what our users run and what the lab tests.
 */
export interface TincBackend {
  /** The release family, shown in status. */
  readonly release: '1.0'
  /** Writes tinc.conf, hosts/<self> and the scripts of a node; returns the files it changed. */
  writeSetup(dir: string, setup: NodeSetup): Promise<string[]>
  /** Makes the node's key pair in `dir` and returns its public key. */
  generateKey(dir: string, name: string, bits: number): Promise<string>
  /** The node already configured in `dir` (name, public key, VPN address), if any. */
  existingNode(dir: string): Promise<{ name: string; publicKey: string; address?: string } | undefined>
  /** A peer's host file, from its accepted record, for a network in `mode`, with the routes served behind it. */
  peerHostFile(peer: Pick<AcceptedPeer, 'record' | 'publicKey' | 'options'>, mode: TincMode, routes?: readonly string[]): string
  /** The Mode a tinc.conf sets (`router` when it sets none). */
  confMode(conf: string): string
  /** Makes the running tincd re-read its config and host files; false when there is none. */
  reload(pidFile: string, log: Logger): Promise<boolean>
  /** A reader of the running tincd's nodes, edges, subnets and connections. */
  stateReader(opts: DumpReaderOptions): () => Promise<DumpResult>
}

/** tinc 1.0: RSA keys by `tincd -K`, SIGHUP to reload, SIGUSR1/SIGUSR2 dumps into its log file. */
export const tinc10: TincBackend = {
  release: '1.0',
  writeSetup,
  generateKey,
  existingNode,
  peerHostFile: hostFileText,
  confMode,
  reload: (pidFile, log) => signalTincd(pidFile, 'SIGHUP', log),
  stateReader: dumpReader,
}

/** The backend for this node. One release today; the choice lives here when there are more. */
export const tincBackend = (): TincBackend => tinc10
