import { readFile } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { ConsulError, TincConsulError } from '../errors.ts'
import type { ConsulClient } from './client.ts'

/**
 * Where a network's keys live, as far as its ACL policies need to know: the prefix, and the
 * node-key builder, which refuses a name that must not reach a policy. The domain's KvLayout
 * (src/mesh/kv-layout.ts) has this shape.
 */
export interface PolicyScope {
  prefix: string
  node(name: string): string
}

/**
 * A node policy's scope: where the network's keys live, and the service name prefixes, which
 * the domain derives from the network record (src/services/naming.ts): the network's, which
 * every node may read (`tinc-home--`), and each node's own, the only one it may write
 * (`tinc-home--node1--`). Both are '' when the network asks for bare names.
 */
export interface NodePolicyScope extends PolicyScope {
  services: string
  nodeServices(name: string): string
}

export const NODE_POLICY_TEMPLATE = fileURLToPath(new URL('../../consul/node-policy.hcl.tmpl', import.meta.url))

/** The per-node policy rules, from the template in consul/. Name and prefix are validated by the scope's node(). */
export async function nodePolicyRules(scope: NodePolicyScope, name: string): Promise<string> {
  scope.node(name) // throws on a bad name before it reaches a policy
  const services = scope.services
  const own = scope.nodeServices(name)
  // DNS label characters only: nothing that could end the quoted HCL string. The node's own
  // prefix must sit inside the network's, or the read rule wouldn't be the narrower grant.
  for (const p of [services, own]) if (!/^[a-z0-9-]*$/.test(p)) throw new TincConsulError('BAD_SERVICE_PREFIX', `not a service name prefix: ${JSON.stringify(p)}`)
  if (!own.startsWith(services)) throw new TincConsulError('BAD_SERVICE_PREFIX', `${JSON.stringify(own)} is not inside ${JSON.stringify(services)}`)
  const tmpl = await readFile(NODE_POLICY_TEMPLATE, 'utf8')
  return tmpl.replaceAll('{{prefix}}', scope.prefix).replaceAll('{{name}}', name).replaceAll('{{services}}', services).replaceAll('{{node_services}}', own)
}

export const JOIN_POLICY_TEMPLATE = fileURLToPath(new URL('../../consul/join-server-policy.hcl.tmpl', import.meta.url))

export interface CreatedToken {
  secretId: string
  accessorId: string
}

async function tokenFor(admin: ConsulClient, policyName: string, description: string, rules: string): Promise<CreatedToken> {
  const found = (await admin.request<Array<{ ID: string; Name: string }>>('GET', '/v1/acl/policies')).find((p) => p.Name === policyName)
  if (!found) await admin.request('PUT', '/v1/acl/policy', { Name: policyName, Description: description, Rules: rules })
  else {
    // A policy written by an older release: bring its rules up to this one's, so every
    // token that shares the policy (one per node) gets rights a new release needs.
    const current = await admin.request<{ Rules: string }>('GET', `/v1/acl/policy/${encodeURIComponent(found.ID)}`)
    if (current.Rules !== rules) await admin.request('PUT', `/v1/acl/policy/${encodeURIComponent(found.ID)}`, { Name: policyName, Description: description, Rules: rules })
  }
  const token = await admin.request<{ SecretID: string; AccessorID: string }>('PUT', '/v1/acl/token', { Description: description, Policies: [{ Name: policyName }] })
  return { secretId: token.SecretID, accessorId: token.AccessorID }
}

const policyBase = (layout: PolicyScope) => `tinc-consul-${layout.prefix.replace(/[^A-Za-z0-9_-]/g, '-')}`
const nodePolicyName = (layout: PolicyScope, name: string) => `${policyBase(layout)}${name}`.slice(0, 128)
const joinPolicyName = (layout: PolicyScope) => `${policyBase(layout)}join-server`.slice(0, 128)
const joinDescription = (name: string) => `tinc-consul join server (${name})`

/** Creates (or reuses) the node's policy and returns a new token for it. */
export async function createNodeToken(admin: ConsulClient, scope: NodePolicyScope, name: string): Promise<CreatedToken> {
  return tokenFor(admin, nodePolicyName(scope, name), `tinc-consul node ${name}`, await nodePolicyRules(scope, name))
}

/**
 * The token a public node's join endpoint uses. It must create other nodes'
 * records, addresses and tokens, so it holds `acl = "write"`: in Consul that is
 * as strong as a management token. Only nodes the operator trusts serve joins.
 */
export async function createJoinServerToken(admin: ConsulClient, layout: PolicyScope, name: string): Promise<CreatedToken> {
  layout.node(name)
  const rules = (await readFile(JOIN_POLICY_TEMPLATE, 'utf8')).replaceAll('{{prefix}}', layout.prefix)
  return tokenFor(admin, joinPolicyName(layout), joinDescription(name), rules)
}

/**
 * Deletes every token init or a join created for a node: the ones holding its
 * own policy, and its join endpoint's (told apart from other nodes' by their
 * description). Returns their accessor ids. A revoked node's tokens must stop
 * working, or it could still read the network and write its record.
 */
export async function deleteNodeTokens(admin: ConsulClient, layout: PolicyScope, name: string): Promise<string[]> {
  layout.node(name)
  const policies = await admin.request<Array<{ ID: string; Name: string }>>('GET', '/v1/acl/policies')
  const idOf = (policy: string) => policies.find((p) => p.Name === policy)?.ID
  const doomed: string[] = []
  const nodePolicy = idOf(nodePolicyName(layout, name))
  if (nodePolicy) for (const t of await tokensWith(admin, nodePolicy)) doomed.push(t.AccessorID)
  const joinPolicy = idOf(joinPolicyName(layout))
  if (joinPolicy) for (const t of await tokensWith(admin, joinPolicy)) if (t.Description === joinDescription(name)) doomed.push(t.AccessorID)
  for (const id of doomed) await deleteToken(admin, id)
  return doomed
}

function tokensWith(admin: ConsulClient, policyId: string): Promise<Array<{ AccessorID: string; Description: string }>> {
  return admin.request('GET', `/v1/acl/tokens?policy=${encodeURIComponent(policyId)}`)
}

export async function deleteToken(admin: ConsulClient, accessorId: string): Promise<void> {
  await admin.request('DELETE', `/v1/acl/token/${encodeURIComponent(accessorId)}`)
}

/** Whether the agent enforces ACLs. Consul answers 401 "ACL support disabled" when it doesn't. */
export async function aclsEnabled(client: ConsulClient): Promise<boolean> {
  try {
    await client.request('GET', '/v1/acl/token/self')
    return true
  } catch (err) {
    if (err instanceof ConsulError && /ACL support disabled/i.test(err.message)) return false
    if (err instanceof ConsulError && (err.status === 403 || err.status === 401)) return true
    throw err
  }
}
