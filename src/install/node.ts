import { existsSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { configPath, parseConfig, renderConfig } from '../config-file.ts'
import { newGossipKey } from '../consul/gossip-key.ts'
import { UsageError } from '../errors.ts'
import { buildOwnRecord, readTincName } from '../mesh/publish.ts'
import { tincDirFor } from '../tinc/setup.ts'
import { CONSUL_BOOTSTRAP_FILE, CONSUL_CONFIG_FILE, newManagementToken, planInstall, type ConsulRole, type InstallInput, type Step } from './plan.ts'

/**
 * One node's install, from what is on disk: its tinc name and VPN address from
 * the tinc directory, its token, Consul servers and gossip key from the
 * settings init/join wrote. `install` and the finish step of `join` and `init`
 * both plan through here, so there is one way units and configs are written.
 */
export interface NodeInstallOptions {
  net: string
  role?: ConsulRole
  /** Bootstrap only (before init): the tinc name init will give this node. */
  name?: string
  /** tinc's config root and the settings directory, as the units name them. */
  tincRoot: string
  settingsDir: string
  /** Where unit files and the Consul config are written (under --root, if any). */
  unitDir: string
  /** The agent's -config-dir as the unit names it, and where its files are written. */
  consulConfigDir: string
  consulFileDir: string
  consulDataDir: string
  /** Flags that override what the settings say. */
  consulServers?: string[]
  gossipKey?: string
  agentToken?: string
  /** An operator's token: the agent's token only when the node has none of its own. */
  token?: string
  bootstrapExpect: number
  datacenter?: string
  bin: string
  consulBin: string
  systemctl: boolean
  /** Never restart a running tincd (adopt): see InstallInput. */
  keepTincd?: boolean
  /**
   * The node and its settings, when they aren't on disk yet: `join --dry-run`
   * plans from the invite alone, with stand-ins for what the reply would bring.
   */
  known?: { node: { name: string; vpnAddress: string }; settings: Record<string, string> }
}

export interface NodeInstallPlan {
  steps: Step[]
  node: { name: string; vpnAddress?: string }
  /** Bootstrap only: the token Consul makes the management token at its first election. */
  managementToken?: string
}

/** `key = "value"` from an HCL file we wrote, to keep a gossip key or token across re-runs. */
export async function hclValue(path: string, key: string): Promise<string | undefined> {
  const text = await readFile(path, 'utf8').catch(() => '')
  return new RegExp(`^\\s*${key}\\s*=\\s*"?([^"\\s]+)"?`, 'm').exec(text)?.[1]
}

async function nodeFor(o: NodeInstallOptions): Promise<NodeInstallPlan['node']> {
  if (o.known) return o.known.node
  if (o.role === 'bootstrap') return { name: o.name ?? '' }
  const tincDir = tincDirFor(o.tincRoot, o.net)
  if (!existsSync(join(tincDir, 'tinc.conf')))
    throw new UsageError('NOT_SET_UP', `${tincDir}/tinc.conf is missing: run \`tinc-consul init\` or \`join\` first (or install --consul-server --bootstrap on the first server)`)
  const name = await readTincName(tincDir)
  return { name, vpnAddress: (await buildOwnRecord(tincDir, name)).vpnAddress }
}

async function settingsFor(o: NodeInstallOptions): Promise<Record<string, string> | undefined> {
  if (o.known) return o.known.settings
  const path = configPath(o.settingsDir, o.net)
  const text = await readFile(path, 'utf8').catch(() => undefined)
  return text === undefined ? undefined : parseConfig(text, path)
}

export async function planNodeInstall(o: NodeInstallOptions): Promise<NodeInstallPlan> {
  const node = await nodeFor(o)
  const settings = await settingsFor(o)
  const role = o.role
  let consul: InstallInput['consul']
  let managementToken: string | undefined
  if (role) {
    const existing = join(o.consulFileDir, CONSUL_CONFIG_FILE)
    // A re-run keeps what the running cluster already uses.
    let gossipKey = o.gossipKey || settings?.TINC_CONSUL_GOSSIP_KEY || (await hclValue(existing, 'encrypt'))
    if (!gossipKey) {
      if (role === 'client')
        throw new UsageError(
          'NO_GOSSIP_KEY',
          "no Consul gossip key: `join` writes TINC_CONSUL_GOSSIP_KEY when the join endpoint has one; otherwise pass --gossip-key (from a server's /etc/consul.d/tinc-consul.hcl)",
        )
      gossipKey = newGossipKey()
    }
    if (role === 'bootstrap') managementToken = (await hclValue(join(o.consulFileDir, CONSUL_BOOTSTRAP_FILE), 'initial_management')) ?? newManagementToken()
    // The node's own token from its settings, not an operator's CONSUL_HTTP_TOKEN still exported from init.
    const agentToken = o.agentToken || (role === 'bootstrap' ? managementToken : (settings?.TINC_CONSUL_TOKEN ?? o.token))
    if (!agentToken) throw new UsageError('NO_TOKEN', "no token for the Consul agent: the node's token (TINC_CONSUL_TOKEN, written by init/join) or --agent-token")
    const servers = o.consulServers ?? (settings?.TINC_CONSUL_CONSUL_SERVERS ?? '').split(',').filter(Boolean)
    consul = {
      role,
      servers: servers.filter((s) => !s.startsWith('127.')),
      bootstrapExpect: o.bootstrapExpect,
      gossipKey,
      agentToken,
      datacenter: o.datacenter || o.net.toLowerCase().replace(/_/g, '-'),
      dataDir: o.consulDataDir,
      configDir: o.consulConfigDir,
      fileDir: o.consulFileDir,
      managementToken,
    }
  }
  const steps = await planInstall({
    net: o.net,
    node,
    consul,
    unitDir: o.unitDir,
    tincRoot: o.tincRoot,
    settingsDir: o.settingsDir,
    bin: o.bin,
    consulBin: o.consulBin,
    systemctl: o.systemctl,
    keepTincd: o.keepTincd,
  })
  // A server's join endpoint hands the gossip key to new nodes: it goes in the net's settings.
  if (role === 'server' && consul && settings && settings.TINC_CONSUL_GOSSIP_KEY !== consul.gossipKey) {
    steps.unshift({
      kind: 'file',
      path: configPath(o.settingsDir, o.net),
      content: renderConfig({ ...settings, TINC_CONSUL_GOSSIP_KEY: consul.gossipKey }),
      mode: 0o600,
      why: 'the join endpoint gives new nodes the gossip key',
      owner: 'config',
    })
  }
  return { steps, node, managementToken }
}
