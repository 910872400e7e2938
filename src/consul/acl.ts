import { readFile } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import type { ConsulClient } from './client.ts'
import type { KvLayout } from './kv-layout.ts'

export const NODE_POLICY_TEMPLATE = fileURLToPath(new URL('../../consul/node-policy.hcl.tmpl', import.meta.url))

/** The per-node policy rules, from the template in consul/. Name and prefix are validated by KvLayout. */
export async function nodePolicyRules(layout: KvLayout, name: string): Promise<string> {
  layout.node(name) // throws on a bad name before it reaches a policy
  const tmpl = await readFile(NODE_POLICY_TEMPLATE, 'utf8')
  return tmpl.replaceAll('{{prefix}}', layout.prefix).replaceAll('{{name}}', name)
}

/** Creates (or reuses) the node's policy and returns a new token's SecretID. */
export async function createNodeToken(admin: ConsulClient, layout: KvLayout, name: string): Promise<string> {
  const policyName = `tinc-consul-${layout.prefix.replace(/[^A-Za-z0-9_-]/g, '-')}${name}`.slice(0, 128)
  const existing = await admin.request<Array<{ Name: string }>>('GET', '/v1/acl/policies')
  if (!existing.some((p) => p.Name === policyName)) {
    await admin.request('PUT', '/v1/acl/policy', { Name: policyName, Description: `tinc-consul node ${name}`, Rules: await nodePolicyRules(layout, name) })
  }
  const token = await admin.request<{ SecretID: string }>('PUT', '/v1/acl/token', { Description: `tinc-consul node ${name}`, Policies: [{ Name: policyName }] })
  return token.SecretID
}
