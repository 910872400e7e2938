import { generateKeyPairSync } from 'node:crypto'
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { keyFingerprint } from '../src/tinc/hostfile.ts'
import type { NetworkRecord, NodeRecord } from '../src/mesh/record.ts'
import { kvLayout, type KvLayout } from '../src/mesh/kv-layout.ts'
import type { NodeEntry, ReconcileInput } from '../src/mesh/reconcile.ts'

/** A real PKCS#1 RSA public key, the format tincd -K writes. */
export function rsaPublicPem(bits = 1024): string {
  return generateKeyPairSync('rsa', { modulusLength: bits, publicKeyEncoding: { type: 'pkcs1', format: 'pem' }, privateKeyEncoding: { type: 'pkcs1', format: 'pem' } }).publicKey.trim()
}

export const NETWORK: NetworkRecord = { v: 1, cidr: '10.99.0.0/24', domain: 'mesh', createdAt: '2026-11-21T00:00:00.000Z' }

export function nodeRecord(name: string, octet: number, pem = rsaPublicPem(), extraHostLines: string[] = []): NodeRecord {
  const vpn = `10.99.0.${octet}`
  return {
    v: 1,
    name,
    vpnAddress: vpn,
    subnets: [`${vpn}/32`],
    addresses: [`198.18.0.${octet}`],
    port: 655,
    hostFile: [`Address = 198.18.0.${octet}`, 'Port = 655', `Subnet = ${vpn}/32`, ...extraHostLines, pem, ''].join('\n'),
    fingerprint: keyFingerprint(pem),
    updatedAt: '2026-11-21T00:00:00.000Z',
  }
}

/** The layout the reconciler tests use: keys are `tinc-consul/test/nodes/<name>`. */
export const LAYOUT: KvLayout = kvLayout('test')

/** A node's record as Consul lists it: its JSON bytes and the CreateIndex that makes it senior or junior. */
export function nodeEntry(record: NodeRecord | Record<string, unknown>, createIndex: number): NodeEntry {
  return { state: 'value', value: Buffer.from(JSON.stringify(record)), createIndex }
}

/** A reconcile() input for the test network: a complete listing of `nodes`, every other input read and empty. */
export function reconcileInput(nodes: Iterable<[string, NodeEntry]>, overrides: Partial<ReconcileInput> = {}): ReconcileInput {
  return {
    layout: LAYOUT,
    network: NETWORK,
    self: { name: 'self' },
    nodes: new Map([...nodes].map(([name, entry]) => [LAYOUT.nodesPrefix + name, entry])),
    complete: true,
    allocations: new Map(),
    revoked: new Set(),
    pins: new Map(),
    keep: new Set(),
    trustNewKeys: true,
    ...overrides,
  }
}

/** A tinc directory for renderer tests: tinc.conf naming `self`, an empty hosts/, under `root` (a fresh temp dir by default). */
export async function tincDirFixture(self = 'self', root?: string): Promise<string> {
  const dir = root ?? (await mkdtemp(join(tmpdir(), 'tinc-consul-render-')))
  await mkdir(join(dir, 'hosts'), { recursive: true })
  await writeFile(join(dir, 'tinc.conf'), `Name = ${self}\nStrictSubnets = yes\n`)
  return dir
}
