import { randomUUID } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { join } from 'node:path'
import ipaddr from 'ipaddr.js'
import { isGossipKey } from '../consul/gossip-key.ts'
import { isNetName } from '../mesh/kv-layout.ts'
import { UsageError } from '../errors.ts'
import { isTincName } from '../tinc/names.ts'

/**
 * What `install` does, as data: the files it writes and the commands it runs.
 * `--dry-run` prints this list, a real run carries it out, and `uninstall`
 * reverses what a real run recorded.
 */
export type Step =
  /** owner: the network a file belongs to, 'shared' (the sidecar template) or 'consul'; uninstall goes by it. */
  { kind: 'file'; path: string; content: string; mode: number; why: string; owner: string } | { kind: 'command'; argv: string[]; why: string }

const repoFile = (rel: string) => fileURLToPath(new URL(`../../${rel}`, import.meta.url))

export type ConsulRole = 'server' | 'client' | 'bootstrap'

export interface InstallInput {
  net?: string
  /** This node's tinc name and VPN address (absent in bootstrap mode, before init: just the name it will have). */
  node?: { name: string; vpnAddress?: string }
  consul?: {
    role: ConsulRole
    /** Other servers' VPN addresses, for retry_join. */
    servers: string[]
    bootstrapExpect: number
    /** Base64 of 32 random bytes (what `consul keygen` prints). */
    gossipKey: string
    agentToken: string
    datacenter: string
    dataDir: string
    /** The agent's -config-dir, as the unit names it. */
    configDir: string
    /** Where its files are written: configDir, or configDir under --root. */
    fileDir: string
    /** Bootstrap only: the management token Consul creates at its first election. */
    managementToken?: string
  }
  unitDir: string
  /** tinc's config root (/etc/tinc) and tinc-consul's settings directory (/etc/tinc-consul), as the units name them. */
  tincRoot: string
  settingsDir: string
  bin: string
  consulBin: string
  /** Whether to run systemctl (systemd present and not writing under a --root). */
  systemctl: boolean
  /**
   * tincd carries traffic that must not stop (`adopt`): it is enabled and started if stopped,
   * never restarted; it takes the drop-in's --logfile at its next restart.
   */
  keepTincd?: boolean
}

export const CONSUL_CONFIG_FILE = 'tinc-consul.hcl'
export const CONSUL_BOOTSTRAP_FILE = 'tinc-consul-bootstrap.hcl'

export const newManagementToken = (): string => randomUUID()

const TOKEN_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/
const DC_RE = /^[a-z0-9-]{1,64}$/

/** Every value that lands in a config file is checked first: nothing in them is quoted or escaped. */
function checkInput(i: InstallInput): void {
  if (i.net !== undefined && !isNetName(i.net)) throw new UsageError('BAD_NET', `network name must be 1-32 letters, digits, "-" or "_", got ${JSON.stringify(i.net)}`)
  if (i.node && !isTincName(i.node.name)) throw new UsageError('BAD_NAME', `not a tinc node name: ${JSON.stringify(i.node.name)}`)
  if (i.node?.vpnAddress !== undefined && !ipaddr.IPv4.isValidFourPartDecimal(i.node.vpnAddress)) throw new UsageError('BAD_ADDRESS', `not an IPv4 address: ${JSON.stringify(i.node.vpnAddress)}`)
  for (const p of [i.bin, i.consulBin, i.unitDir, i.tincRoot, i.settingsDir, i.consul?.dataDir, i.consul?.configDir, i.consul?.fileDir]) {
    if (p !== undefined && (!p.startsWith('/') || /["\s\\%$]/.test(p)))
      throw new UsageError('BAD_PATH', `paths in units and configs must be absolute, without spaces, quotes, % or $: ${JSON.stringify(p)}`)
  }
  const c = i.consul
  if (!c) return
  if (!isGossipKey(c.gossipKey)) throw new UsageError('BAD_GOSSIP_KEY', 'the gossip key must be 32 bytes in base64, as `consul keygen` prints')
  if (!TOKEN_RE.test(c.agentToken)) throw new UsageError('BAD_TOKEN', 'the agent token must be a Consul token (a UUID)')
  if (c.managementToken !== undefined && !TOKEN_RE.test(c.managementToken)) throw new UsageError('BAD_TOKEN', 'the management token must be a UUID')
  if (!DC_RE.test(c.datacenter)) throw new UsageError('BAD_DATACENTER', `a datacenter name is lowercase letters, digits and "-": ${JSON.stringify(c.datacenter)}`)
  for (const s of c.servers) if (!ipaddr.IPv4.isValidFourPartDecimal(s)) throw new UsageError('BAD_ADDRESS', `not a Consul server address: ${JSON.stringify(s)}`)
  if (!Number.isInteger(c.bootstrapExpect) || c.bootstrapExpect < 0 || c.bootstrapExpect > 7) throw new UsageError('BAD_FLAG', '--bootstrap-expect must be 0 to 7')
  if (!i.node || (c.role !== 'bootstrap' && !i.node.vpnAddress)) throw new UsageError('NOT_SET_UP', 'a Consul agent on the VPN needs the node set up first: run init or join')
}

const fill = (tmpl: string, values: Record<string, string>) => tmpl.replace(/\{\{(\w+)\}\}/g, (m, k: string) => values[k] ?? m)

export async function planInstall(i: InstallInput): Promise<Step[]> {
  checkInput(i)
  return [...(await sidecarSteps(i)), ...(await consulSteps(i)), ...systemctlSteps(i)]
}

/** The sidecar's unit and tincd's drop-in, once the node has a VPN address. */
async function sidecarSteps(i: InstallInput): Promise<Step[]> {
  const steps: Step[] = []
  const unit = (name: string) => join(i.unitDir, name)
  if (i.net && i.node?.vpnAddress) {
    const tmpl = await readFile(repoFile('systemd/tinc-consul@.service'), 'utf8')
    // Paths other than the defaults go into the unit, so the daemon looks where install looked.
    const flags = [...(i.tincRoot !== '/etc/tinc' ? [` --dir ${i.tincRoot}`] : []), ...(i.settingsDir !== '/etc/tinc-consul' ? [` --config-dir ${i.settingsDir}`] : [])].join('')
    const content = tmpl
      .replace('ExecStart=/usr/local/bin/tinc-consul run --net %i', `ExecStart=${i.bin} run --net %i${flags}`)
      .replaceAll('/etc/tinc-consul/', `${i.settingsDir}/`)
      .replace('ReadWritePaths=/etc/tinc/%i', `ReadWritePaths=${i.tincRoot}/%i`)
    steps.push({ kind: 'file', path: unit('tinc-consul@.service'), content, mode: 0o644, why: 'the sidecar unit (one instance per network)', owner: 'shared' })
    steps.push({
      kind: 'file',
      path: unit(`tinc@${i.net}.service.d/tinc-consul.conf`),
      content: await readFile(repoFile('systemd/tinc@.service.d/tinc-consul.conf'), 'utf8'),
      mode: 0o644,
      why: 'tincd logs to a file, where its state dumps can be read',
      owner: i.net,
    })
  }
  return steps
}

/** The Consul agent's unit and config (server or client), and its user. */
async function consulSteps(i: InstallInput): Promise<Step[]> {
  const steps: Step[] = []
  const c = i.consul
  if (c) {
    const tmpl = await readFile(repoFile('systemd/consul.service'), 'utf8')
    steps.push({
      kind: 'file',
      path: join(i.unitDir, 'consul.service'),
      content: tmpl.replaceAll('/usr/local/bin/consul', i.consulBin).replaceAll('-config-dir=/etc/consul.d', `-config-dir=${c.configDir}`),
      mode: 0o644,
      why: 'the Consul agent unit',
      owner: 'consul',
    })
    const server = c.role !== 'client'
    const values = {
      net: i.net ?? '(none yet)',
      datacenter: c.datacenter,
      node: i.node?.name ?? '',
      data_dir: c.dataDir,
      // Before init there is no VPN address: the first server starts on loopback, alone.
      bind: c.role === 'bootstrap' ? '127.0.0.1' : (i.node?.vpnAddress ?? ''),
      retry_join: c.servers
        .filter((s) => s !== i.node?.vpnAddress)
        .map((s) => `"${s}"`)
        .join(', '),
      bootstrap_expect: String(c.role === 'bootstrap' ? 1 : c.bootstrapExpect),
      encrypt: c.gossipKey,
      agent_token: c.agentToken,
    }
    const config = fill(await readFile(repoFile(`consul/${server ? 'server' : 'client'}.hcl.tmpl`), 'utf8'), values)
    // 0640 root:consul: it holds the gossip key and a token.
    steps.push({ kind: 'file', path: join(c.fileDir, CONSUL_CONFIG_FILE), content: config, mode: 0o640, why: `Consul ${server ? 'server' : 'client'} agent, bound to ${values.bind}`, owner: 'consul' })
    if (c.managementToken) {
      const boot = `# Written by \`tinc-consul install --consul-server --bootstrap\`. Consul makes this the\n# management token at the first election; it is what \`init\` and \`invite\` use.\nacl {\n  tokens {\n    initial_management = "${c.managementToken}"\n  }\n}\n`
      steps.push({ kind: 'file', path: join(c.fileDir, CONSUL_BOOTSTRAP_FILE), content: boot, mode: 0o640, why: 'the management token for the new cluster', owner: 'consul' })
    }
    if (i.systemctl) {
      steps.push({
        kind: 'command',
        argv: ['sh', '-c', 'getent passwd consul >/dev/null || useradd --system --home-dir /var/lib/consul --shell /usr/sbin/nologin consul'],
        why: 'Consul runs as its own user',
      })
      steps.push({
        kind: 'command',
        argv: ['chgrp', 'consul', join(c.fileDir, CONSUL_CONFIG_FILE), ...(c.managementToken ? [join(c.fileDir, CONSUL_BOOTSTRAP_FILE)] : [])],
        why: 'the agent reads its config',
      })
    }
  }
  return steps
}

function systemctlSteps(i: InstallInput): Step[] {
  const steps: Step[] = []
  const c = i.consul
  if (i.systemctl) {
    steps.push({ kind: 'command', argv: ['systemctl', 'daemon-reload'], why: 'systemd reads the new units' })
    // tincd first: its tinc-up makes the VPN address the agent binds to. On a node that
    // join or init just set up, nothing runs yet, and an agent started first fails to bind.
    if (i.net && i.node?.vpnAddress) {
      const units = [`tinc@${i.net}.service`, `tinc-consul@${i.net}.service`]
      steps.push({ kind: 'command', argv: ['systemctl', 'enable', ...units], why: 'tincd and the sidecar start at boot' })
      if (i.keepTincd) {
        steps.push({ kind: 'command', argv: ['systemctl', 'start', units[0] ?? ''], why: 'tincd runs with this unit (one already running is left alone: no interruption)' })
        steps.push({ kind: 'command', argv: ['systemctl', 'restart', units[1] ?? ''], why: 'the sidecar runs with this unit' })
      }
      // A restart, not --now: a tincd already running must pick up the drop-in's --logfile.
      else steps.push({ kind: 'command', argv: ['systemctl', 'restart', ...units], why: 'tincd and the sidecar run with these units' })
    }
    if (c)
      steps.push(
        { kind: 'command', argv: ['systemctl', 'enable', 'consul.service'], why: 'the agent starts at boot' },
        { kind: 'command', argv: ['systemctl', 'restart', 'consul.service'], why: 'the agent runs with this config' },
      )
  }
  return steps
}
