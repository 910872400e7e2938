import { createHash } from 'node:crypto'
import type { NodePolicyScope, PolicyScope } from '../consul/acl.ts'

/**
 * The one mapping between a mesh service name (what the definition file says and DNS serves:
 * `nfs` → `nfs.service.mesh`) and the name the service has in Consul.
 *
 * Consul's ACLs scope service writes by name prefix only, and a service write is not tied to a
 * node: re-posting another node's catalog entry with an instance (`catalog/register` with its
 * existing address) needs only service write on the instance's name, and so does
 * `catalog/deregister` by service ID. A prefix shared by every node of a network would let each
 * node add, move, fail or remove the others' instances. So the names are scoped per node:
 * node `node1` of network `home` registers `nfs` as `tinc-home--node1--nfs`, and its token may
 * write `tinc-home--node1--` and nothing else (consul/node-policy.hcl.tmpl). Consul can't stop
 * node1 from filing one of its own names under node2 in the catalog, so every reader checks that
 * the name's node part is the node the instance is filed under (src/mesh/services.ts). A node
 * can then never take the name of another workload in a shared Consul, nor a name of another
 * network or another node. Networks that want Consul names equal to the mesh names (`nfs` in
 * Consul too) opt out with bare names, recorded in the network record so that every node
 * registers and reads the same way; they get none of this protection.
 *
 * Why this shape:
 * - `tinc-` says who owns the name in Consul's UI and keeps clear of names other workloads pick.
 * - The network and node parts are the names themselves when those are already DNS labels
 *   without `--` (the usual case: `home`, `home-lab`, `node1`). Any other name (upper case, `_`,
 *   `--`) becomes a lower-case label plus `-` and 6 hex digits of its SHA-256 (`My_Laptop` →
 *   `my-laptop-3c1e0a`): names differing only in case or `_` stay apart, and every Consul name is
 *   lower case. That matters because Consul's ACL prefixes are case-sensitive while its catalog
 *   looks service names up case-insensitively: with mixed case, two nodes' prefixes could differ
 *   for the ACLs and still name the same service in a health read.
 * - A double dash ends each part. No part contains `--` nor ends in `-`, so no prefix starts
 *   another's: `tinc-home--` does not cover `tinc-home-lab--web`, which a single dash
 *   (`tinc-home-` covering `tinc-home-lab-web`) would, and `tinc-home--node1--` does not cover
 *   `tinc-home--node12--web`. A tinc node name has no `-` at all, so a plain node part never has
 *   one and a hashed one always does: the two kinds never meet either.
 * - Every character is a DNS label character, so the Consul names stay usable in Consul's own
 *   DNS (`tinc-home--node1--nfs.service.consul`) as long as the whole name fits in 63 characters.
 */
export type ServiceNameMode = 'scoped' | 'bare'

export interface ServiceNaming {
  readonly mode: ServiceNameMode
  /** What every Consul name of the network starts with: `tinc-home--`, '' for bare names. */
  readonly prefix: string
  /** What one node's Consul names start with, and its policy's service_prefix: `tinc-home--node1--`, '' for bare names. */
  nodePrefix(node: string): string
  /** The name node `node` registers `meshName` under. */
  toConsul(node: string, meshName: string): string
  /** The mesh name, or undefined when the Consul name is outside the network's scope or has no node part. */
  toMesh(consulName: string): string | undefined
  /** Whether `consulName` is one of `node`'s names. Bare names don't say whose they are: always true. */
  belongsTo(consulName: string, node: string): boolean
}

/** The longest Consul service name that is still one DNS label. */
export const MAX_CONSUL_NAME = 63

const PLAIN_LABEL = /^[a-z0-9]+(?:-[a-z0-9]+)*$/

/** One part of a prefix: the name itself when it is a plain label, else a label with a hash of the name. */
export function scopeLabel(name: string): string {
  if (PLAIN_LABEL.test(name)) return name
  const clean = name
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, '-')
    .replace(/^-+|-+$/g, '')
  const hash = createHash('sha256').update(name).digest('hex').slice(0, 6)
  // Never the hash alone: it always has a '-', so it can't be a plain tinc name (which has none).
  return `${clean || 'x'}-${hash}`
}

export const scopedPrefix = (net: string): string => `tinc-${scopeLabel(net)}--`

export function serviceNaming(net: string, mode: ServiceNameMode): ServiceNaming {
  if (mode === 'bare') return { mode, prefix: '', nodePrefix: () => '', toConsul: (_node, name) => name, toMesh: (name) => name, belongsTo: () => true }
  const prefix = scopedPrefix(net)
  const nodePrefix = (node: string) => `${prefix}${scopeLabel(node)}--`
  return {
    mode,
    prefix,
    nodePrefix,
    toConsul: (node, name) => nodePrefix(node) + name,
    toMesh(name) {
      if (!name.startsWith(prefix)) return undefined
      const rest = name.slice(prefix.length)
      // The node part is everything up to the first `--`: it never holds one itself.
      const cut = rest.indexOf('--')
      return cut > 0 && cut + 2 < rest.length ? rest.slice(cut + 2) : undefined
    },
    belongsTo: (name, node) => name.startsWith(nodePrefix(node)),
  }
}

/**
 * The naming a network record asks for. `serviceNames` is optional: a record without it was
 * written by a release that registered bare names, and its nodes' tokens may write any name,
 * so it keeps meaning bare names (nothing changes for a network on upgrade). `init` writes the
 * field on every network it creates: `scoped` unless told `--bare-service-names`.
 */
export const namingFor = (net: string, network: { serviceNames?: ServiceNameMode }): ServiceNaming => serviceNaming(net, network.serviceNames ?? 'bare')

/** The node policy's scope for a network: its KV layout, and the service name prefixes of the network and of each node. */
export function policyScopeFor(layout: PolicyScope, net: string, network: { serviceNames?: ServiceNameMode }): NodePolicyScope {
  const naming = namingFor(net, network)
  return { prefix: layout.prefix, node: (name) => layout.node(name), services: naming.prefix, nodeServices: (name) => naming.nodePrefix(name) }
}
