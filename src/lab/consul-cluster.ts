import { randomUUID } from 'node:crypto'
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { join } from 'node:path'
import { createConsulClient, MEMBER_ALIVE, type ConsulClient } from '../consul/client.ts'
import { startDaemon, waitFor, type Daemon } from './daemon.ts'
import type { LabPlan } from './topology.ts'

export const CONSUL_HTTP_PORT = 8500

export interface ConsulClusterInfo {
  managementToken: string | undefined
  agentToken: string | undefined
}

/** The lab's agent policy, kept as a real file beside the other Consul configs. */
export const AGENT_POLICY_FILE = fileURLToPath(new URL('../../consul/lab-agent-policy.hcl', import.meta.url))

function agentConfig(plan: LabPlan, runDir: string, name: string, ip: string, server: boolean, tokens: { initial?: string; agent?: string }): object {
  return {
    datacenter: 'lab',
    node_name: name,
    server,
    ...(server ? { bootstrap_expect: plan.servers.length } : {}),
    data_dir: join(runDir, name, 'consul-data'),
    bind_addr: ip,
    advertise_addr: ip,
    // Loopback for the sidecar inside the namespace, the control address for the host's tests.
    client_addr: `127.0.0.1 ${ip}`,
    retry_join: plan.servers.filter((s) => s.controlIp !== ip).map((s) => s.controlIp),
    retry_interval: '1s',
    ports: { grpc: -1, grpc_tls: -1 },
    // The lab must never reach out of its namespaces: no update checks.
    disable_update_check: true,
    disable_anonymous_signature: true,
    enable_script_checks: false,
    enable_local_script_checks: false,
    log_level: 'info',
    performance: { raft_multiplier: 1 },
    leave_on_terminate: !server,
    ...(plan.options.acl
      ? {
          acl: {
            enabled: true,
            default_policy: 'deny',
            down_policy: 'extend-cache',
            enable_token_persistence: false,
            tokens: { ...(tokens.initial ? { initial_management: tokens.initial } : {}), ...(tokens.agent ? { agent: tokens.agent } : {}) },
          },
        }
      : {}),
  }
}

async function startAgent(plan: LabPlan, runDir: string, consulBin: string, name: string, ns: string, ip: string, server: boolean, tokens: { initial?: string; agent?: string }): Promise<Daemon> {
  const dir = join(runDir, name)
  await mkdir(join(dir, 'consul-data'), { recursive: true })
  await writeFile(join(dir, 'consul.json'), JSON.stringify(agentConfig(plan, runDir, name, ip, server, tokens), null, 2), { mode: 0o600 })
  return startConsulAgent(consulBin, runDir, name, ns)
}

/** Starts (or restarts, keeping its data dir) an agent whose config file the lab already wrote. */
export function startConsulAgent(consulBin: string, runDir: string, name: string, ns: string): Daemon {
  const dir = join(runDir, name)
  return startDaemon(`consul agent ${name}`, ns, [consulBin, 'agent', `-config-file=${join(dir, 'consul.json')}`], join(dir, 'consul.log'))
}

export function consulUrl(ip: string): string {
  return `http://${ip}:${CONSUL_HTTP_PORT}`
}

/**
 * Starts the servers, waits for a leader, bootstraps ACLs when asked (the lab
 * keeps the management token), then starts one client agent per node and waits
 * until every agent is an alive member.
 */
export async function startConsulCluster(plan: LabPlan, runDir: string, consulBin: string, daemons: Daemon[], step: (msg: string) => void): Promise<ConsulClusterInfo> {
  const managementToken = plan.options.acl ? randomUUID() : undefined
  const serverDaemons: Daemon[] = []
  for (const s of plan.servers) {
    const d = await startAgent(plan, runDir, consulBin, s.name, s.ns, s.controlIp, true, { initial: managementToken, agent: managementToken })
    daemons.push(d)
    serverDaemons.push(d)
  }
  const first = plan.servers[0]
  if (!first) throw new Error('a lab always has a Consul server')
  const admin = createConsulClient({ url: consulUrl(first.controlIp), token: managementToken, timeoutMs: 3000 })
  step(`waiting for a Consul leader among ${plan.servers.length} server(s)`)
  const leader = await waitFor('a Consul leader', async () => (await admin.leader()) || undefined, { timeoutMs: 60_000, daemons: serverDaemons })
  step(`Consul leader: ${leader}`)

  let agentToken: string | undefined
  if (plan.options.acl) {
    agentToken = randomUUID()
    const secret = agentToken
    // Right after election the ACL system may still be initialising; retry until it takes the writes.
    await waitFor('ACL bootstrap', () => createAgentToken(admin, secret).then(() => true), { timeoutMs: 30_000, daemons: serverDaemons })
    step('ACLs on (default deny); management token kept in the lab state')
  }
  for (const n of plan.nodes) daemons.push(await startAgent(plan, runDir, consulBin, n.name, n.ns, n.controlIp, false, { agent: agentToken }))

  const want = plan.servers.length + plan.nodes.length
  await waitFor(
    `${want} alive Consul members`,
    async () => {
      const alive = (await admin.members()).filter((m) => m.status === MEMBER_ALIVE)
      return alive.length >= want ? alive : undefined
    },
    { timeoutMs: 60_000, daemons },
  )
  step(`Consul: ${plan.servers.length} server(s) and ${plan.nodes.length} client agents are members`)
  return { managementToken, agentToken }
}

async function createAgentToken(admin: ConsulClient, secret: string): Promise<void> {
  const policies = await admin.request<Array<{ Name: string }>>('GET', '/v1/acl/policies')
  if (!policies.some((p) => p.Name === 'lab-agent')) {
    await admin.request('PUT', '/v1/acl/policy', { Name: 'lab-agent', Description: 'Consul client agents in the lab', Rules: await readFile(AGENT_POLICY_FILE, 'utf8') })
  }
  await admin.request('PUT', '/v1/acl/token', { SecretID: secret, Description: 'lab agents', Policies: [{ Name: 'lab-agent' }] })
}
