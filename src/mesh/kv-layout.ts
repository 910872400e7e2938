import { UsageError } from '../errors.ts'
import { isDnsLabel } from '../dns/zone.ts'
import { isTincName } from '../tinc/names.ts'

/**
 * Where a network lives in Consul KV (documented in docs/architecture.md):
 *
 *   <prefix>network              {"v":1,"cidr":"10.99.0.0/24","domain":"mesh","createdAt":"…","serviceNames":"scoped"}
 *   <prefix>network/groups/<name>  an access group (docs/groups.md):
 *                                {"v":1,"cidr":"10.20.64.0/20"[,"cidr6":"fd00:…/64"][,"infra":true],"createdAt":"…"}
 *   <prefix>network/associations/<a>+<b>  two groups that reach each other, a < b: {"v":1,"at":"…"};
 *                                both under network/ so the daemon's ?recurse read of `network` sees them,
 *                                written only with an operator token (src/mesh/groups.ts)
 *   <prefix>nodes/<name>         one NodeRecord per node
 *   <prefix>changes              the change log: which records the latest writes touched (src/mesh/change-log.ts)
 *   <prefix>revoked/             empty; gives the prefix its own node in Consul's tree
 *   <prefix>revoked/<sha256hex>  a revoked key: {"name":"…","revokedAt":"…"}
 *   <prefix>ipam/                empty, like revoked/
 *   <prefix>ipam/<address>       who holds a VPN address: {"name":"…","at":"…"[,"releasedAt":"…"]};
 *                                a node's active entry written last is the address it must use
 *                                (`group move`, src/mesh/renumber.ts)
 *   <prefix>invites/<id hex>     an open invite (never the token): see src/mesh/invite.ts
 *   <prefix>aliases/             empty, like revoked/
 *   <prefix>aliases/<label>      an operator's DNS alias: the target name as plain text ("laptop", "nfs.service")
 *   <prefix>join-endpoints/<name> where a join server listens: {"v":1,"endpoints":["host:port",…],"at":"…"};
 *                                written only with a join-server or operator token, read by `invite`
 *   <prefix>subnet-approvals/    empty, like revoked/
 *   <prefix>subnet-approvals/<node>/<cidr, "/" as "_">  an operator's approval of a route the node
 *                                announces: {"v":1,"at":"…"}; written only with an operator token (docs/subnets.md)
 *
 * The prefix defaults to `tinc-consul/<net>/`.
 */
export interface KvLayout {
  prefix: string
  network: string
  nodesPrefix: string
  node(name: string): string
  changes: string
  revokedPrefix: string
  revoked(fingerprint: string): string
  ipamPrefix: string
  ipam(address: string): string
  invitesPrefix: string
  invite(id: string): string
  aliasesPrefix: string
  alias(label: string): string
  joinEndpointsPrefix: string
  joinEndpoint(name: string): string
  subnetApprovalsPrefix: string
  subnetApproval(node: string, cidr: string): string
  groupsPrefix: string
  group(name: string): string
  associationsPrefix: string
  /** The one key of an association, whichever order the two groups are given in. */
  association(a: string, b: string): string
}

const NET_RE = /^[A-Za-z0-9_-]{1,32}$/

/** A network name: it becomes a KV prefix, a file name and a systemd instance name. */
export const isNetName = (net: string): boolean => NET_RE.test(net)

/** Longest group name: short enough for table columns and for names other tools derive from it. */
const MAX_GROUP_NAME = 32

/** A group name: one lower-case DNS label of at most 32 characters, so it can't hold "/" or "+" (the association key's separator). */
export const isGroupName = (name: string): boolean => name.length <= MAX_GROUP_NAME && isDnsLabel(name)

/** The name, or a usage error saying what a group name must be. */
export function checkGroupName(name: string): string {
  if (!isGroupName(name))
    throw new UsageError('BAD_GROUP', `a group name must be one lower-case DNS label (letters, digits, inner dashes) of at most ${MAX_GROUP_NAME} characters, got ${JSON.stringify(name)}`)
  return name
}

/** Where a network lives unless --prefix says otherwise. */
export const defaultPrefix = (net: string): string => `tinc-consul/${net}/`

export function kvLayout(net: string, prefix = defaultPrefix(net)): KvLayout {
  if (!NET_RE.test(net)) throw new UsageError('BAD_NET', `network name must be 1-32 letters, digits, "-" or "_", got ${JSON.stringify(net)}`)
  const p = prefix.endsWith('/') ? prefix : `${prefix}/`
  return {
    prefix: p,
    network: `${p}network`,
    nodesPrefix: `${p}nodes/`,
    changes: `${p}changes`,
    node(name) {
      if (!isTincName(name)) throw new UsageError('BAD_NAME', `not a valid tinc node name: ${JSON.stringify(name)}`)
      return `${p}nodes/${name}`
    },
    revokedPrefix: `${p}revoked/`,
    revoked: (fp) => `${p}revoked/${fp.replace(/^sha256:/, '')}`,
    ipamPrefix: `${p}ipam/`,
    ipam: (address) => `${p}ipam/${address}`,
    invitesPrefix: `${p}invites/`,
    invite: (id) => {
      if (!/^[0-9a-f]{32}$/.test(id)) throw new UsageError('BAD_INVITE_ID', `not an invite id: ${JSON.stringify(id)}`)
      return `${p}invites/${id}`
    },
    aliasesPrefix: `${p}aliases/`,
    alias: (label) => {
      if (!isDnsLabel(label)) throw new UsageError('BAD_ALIAS', `an alias must be one lower-case DNS label (letters, digits, inner dashes), got ${JSON.stringify(label)}`)
      return `${p}aliases/${label}`
    },
    joinEndpointsPrefix: `${p}join-endpoints/`,
    joinEndpoint(name) {
      if (!isTincName(name)) throw new UsageError('BAD_NAME', `not a valid tinc node name: ${JSON.stringify(name)}`)
      return `${p}join-endpoints/${name}`
    },
    subnetApprovalsPrefix: `${p}subnet-approvals/`,
    subnetApproval(node, cidr) {
      if (!isTincName(node)) throw new UsageError('BAD_NAME', `not a valid tinc node name: ${JSON.stringify(node)}`)
      if (!/^[0-9a-f.:]+\/\d{1,3}$/.test(cidr)) throw new UsageError('BAD_CIDR', `not a canonical CIDR: ${JSON.stringify(cidr)}`)
      return `${p}subnet-approvals/${node}/${cidr.replace('/', '_')}`
    },
    groupsPrefix: `${p}network/groups/`,
    group: (name) => `${p}network/groups/${checkGroupName(name)}`,
    associationsPrefix: `${p}network/associations/`,
    association(a, b) {
      checkGroupName(a)
      checkGroupName(b)
      if (a === b) throw new UsageError('SAME_GROUP', `a group always reaches itself; associate ${JSON.stringify(a)} with another group`)
      // Code-unit order, the order readers check keys in (src/mesh/groups.ts).
      return a < b ? `${p}network/associations/${a}+${b}` : `${p}network/associations/${b}+${a}`
    },
  }
}
