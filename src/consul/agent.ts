import type { ConsulClient } from './client.ts'

/**
 * The local agent's service and check endpoints. Registration goes to the agent (never
 * the catalog): the agent runs the checks and re-syncs the catalog on its own, and a
 * node token can only ever register services on its own node this way.
 */
export interface AgentService {
  ID: string
  Service: string
  Address: string
  Port: number
  Tags: string[] | null
  Meta: Record<string, string> | null
}

export interface AgentCheck {
  CheckID: string
  ServiceID: string
  Status: 'passing' | 'warning' | 'critical' | 'maintenance'
  Output: string
  Type: string
}

export type CheckStatus = 'passing' | 'warning' | 'critical'

/** A filter expression matching one meta value (Consul's filter language; the value is quoted). */
export const metaFilter = (field: string, key: string, value: string): string => `${field}[${JSON.stringify(key)}] == ${JSON.stringify(value)}`

const withFilter = (path: string, filter: string | undefined) => (filter ? `${path}?filter=${encodeURIComponent(filter)}` : path)

export async function agentServices(client: ConsulClient, filter?: string): Promise<Record<string, AgentService>> {
  return (await client.request<Record<string, AgentService> | undefined>('GET', withFilter('/v1/agent/services', filter))) ?? {}
}

export async function agentChecks(client: ConsulClient, filter?: string): Promise<Record<string, AgentCheck>> {
  return (await client.request<Record<string, AgentCheck> | undefined>('GET', withFilter('/v1/agent/checks', filter))) ?? {}
}

/** Replaces the service and its checks: a check whose type changed must not linger beside the new one. */
export async function registerService(client: ConsulClient, registration: object): Promise<void> {
  await client.request('PUT', '/v1/agent/service/register?replace-existing-checks=true', registration)
}

export async function deregisterService(client: ConsulClient, id: string): Promise<void> {
  await client.request('PUT', `/v1/agent/service/deregister/${encodeURIComponent(id)}`)
}

/** Reports a TTL check's status; Consul keeps at most 4 KiB of output. */
export async function updateTtlCheck(client: ConsulClient, checkId: string, status: CheckStatus, output: string): Promise<void> {
  await client.request('PUT', `/v1/agent/check/update/${encodeURIComponent(checkId)}`, { Status: status, Output: output.slice(0, 4096) })
}
