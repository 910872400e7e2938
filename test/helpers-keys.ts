import { generateKeyPairSync } from 'node:crypto'
import { keyFingerprint } from '../src/tinc/hostfile.ts'
import type { NetworkRecord, NodeRecord } from '../src/mesh/record.ts'

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
