import { UsageError } from '../errors.ts'
import { isTincName } from '../tinc/names.ts'

/**
 * Where a network lives in Consul KV (documented in docs/architecture.md):
 *
 *   <prefix>network              {"v":1,"cidr":"10.99.0.0/24","domain":"mesh","createdAt":"…"}
 *   <prefix>nodes/<name>         one NodeRecord per node
 *   <prefix>revoked/<sha256hex>  a revoked key: {"name":"…","revokedAt":"…"}
 *
 * The prefix defaults to `tinc-consul/<net>/`.
 */
export interface KvLayout {
  prefix: string
  network: string
  nodesPrefix: string
  node(name: string): string
  revokedPrefix: string
  revoked(fingerprint: string): string
}

const NET_RE = /^[A-Za-z0-9_-]{1,32}$/

export function kvLayout(net: string, prefix = `tinc-consul/${net}/`): KvLayout {
  if (!NET_RE.test(net)) throw new UsageError('BAD_NET', `network name must be 1-32 letters, digits, "-" or "_", got ${JSON.stringify(net)}`)
  const p = prefix.endsWith('/') ? prefix : `${prefix}/`
  return {
    prefix: p,
    network: `${p}network`,
    nodesPrefix: `${p}nodes/`,
    node(name) {
      if (!isTincName(name)) throw new UsageError('BAD_NAME', `not a valid tinc node name: ${JSON.stringify(name)}`)
      return `${p}nodes/${name}`
    },
    revokedPrefix: `${p}revoked/`,
    revoked: (fp) => `${p}revoked/${fp.replace(/^sha256:/, '')}`,
  }
}
