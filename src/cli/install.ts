import { existsSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { hostname } from 'node:os'
import { delimiter, join } from 'node:path'
import { defineCommand } from 'citty'
import { configPath, defaultStateDir, parseConfig, renderConfig } from '../config-file.ts'
import { UsageError } from '../errors.ts'
import { applyInstall, describeStep, MANIFEST_PATH, uninstall } from '../install/apply.ts'
import { newGossipKey } from '../consul/gossip-key.ts'
import { CONSUL_BOOTSTRAP_FILE, CONSUL_CONFIG_FILE, newManagementToken, planInstall, type ConsulRole, type InstallInput } from '../install/plan.ts'
import { buildOwnRecord, readTincName } from '../mesh/publish.ts'
import { sanitizeTincName } from '../tinc/names.ts'
import { tincDirFor } from '../tinc/setup.ts'
import { run } from '../util/exec.ts'
import { consulArgs } from './common.ts'
import { defaultServicesDir } from './service-args.ts'
import { described, envDefault, envFlag } from './env.ts'
import { listFlag, parseIntFlag } from './parse.ts'
import { requireNet } from './run.ts'

const onPath = (cmd: string): string | undefined =>
  (process.env.PATH ?? '')
    .split(delimiter)
    .map((d) => join(d, cmd))
    .find((p) => p.startsWith('/') && existsSync(p))

/** Where the system is: "/" on a real machine; a packaging or test tree otherwise. */
const placeArgs = {
  root: {
    type: 'string',
    description: described(
      'Put units, the Consul config and the manifest under this directory instead of / and run no systemctl (packaging, tests); tinc and tinc-consul settings are read where --dir and --config-dir say',
      'root',
    ),
    default: envDefault('root', '/'),
  },
  'unit-dir': { type: 'string', description: described('Where unit files go', 'unit-dir'), default: envDefault('unit-dir', '/etc/systemd/system') },
  'consul-config-dir': { type: 'string', description: described("The Consul agent's -config-dir", 'consul-config-dir'), default: envDefault('consul-config-dir', '/etc/consul.d') },
  'dry-run': { type: 'boolean', description: 'Print every file and command, touch nothing', default: false },
} as const

/** systemctl runs only on the real system, and only where systemd is the init. */
function systemdHere(root: string): boolean {
  return root === '/' && existsSync('/run/systemd/system')
}

const under = (root: string, path: string) => (root === '/' ? path : join(root, path))

/** `key = "value"` from an HCL file we wrote, to keep a gossip key or token across re-runs. */
async function hclValue(path: string, key: string): Promise<string | undefined> {
  const text = await readFile(path, 'utf8').catch(() => '')
  return new RegExp(`^\\s*${key}\\s*=\\s*"([^"]+)"`, 'm').exec(text)?.[1]
}

export const installCommand = defineCommand({
  meta: {
    name: 'install',
    description:
      'Install the systemd units (tinc-consul@NET, the tinc@NET drop-in, consul) and the Consul agent config bound to the VPN address, then enable them. Run after init or join; --bootstrap starts the first Consul server before init.',
  },
  args: {
    ...consulArgs,
    dir: { type: 'string', description: described("tinc's config root; the network lives in <dir>/<net>", 'dir'), default: envDefault('dir', '/etc/tinc') },
    'consul-server': { type: 'boolean', description: described('This node runs one of the (three) Consul servers', 'consul-server'), default: envFlag('consul-server', false) },
    'consul-client': { type: 'boolean', description: described('This node runs a Consul client agent', 'consul-client'), default: envFlag('consul-client', false) },
    bootstrap: {
      type: 'boolean',
      description: 'First server only, before init: a one-server Consul on 127.0.0.1 with ACLs, a new gossip key and a management token; install again after init to move it onto the VPN',
      default: false,
    },
    name: { type: 'string', description: described('With --bootstrap: the tinc name init will give this node (default: the hostname, as init does)', 'name'), default: process.env.TINC_CONSUL_NAME },
    'consul-servers': {
      type: 'string',
      description: described('VPN addresses of the Consul servers, comma-separated (join writes them)', 'consul-servers'),
      default: process.env.TINC_CONSUL_CONSUL_SERVERS,
    },
    'bootstrap-expect': {
      type: 'string',
      description: described('0 joins the cluster the first server bootstrapped (the way deploy.md builds one); N>0 forms a new cluster once N servers have met', 'bootstrap-expect'),
      default: envDefault('bootstrap-expect', '0'),
    },
    'gossip-key': { type: 'string', description: described('Consul gossip key (join writes it; a first server makes one)', 'gossip-key'), default: process.env.TINC_CONSUL_GOSSIP_KEY },
    'agent-token': {
      type: 'string',
      description: described("Token of the Consul agent itself (default: the node's token, whose policy allows it)", 'agent-token'),
      default: process.env.TINC_CONSUL_AGENT_TOKEN,
    },
    datacenter: { type: 'string', description: described('Consul datacenter name (default: the network name)', 'datacenter'), default: process.env.TINC_CONSUL_DATACENTER },
    'consul-data-dir': { type: 'string', description: described("The Consul agent's data_dir", 'consul-data-dir'), default: envDefault('consul-data-dir', '/var/lib/consul') },
    bin: { type: 'string', description: described('Path of tinc-consul for ExecStart (default: tinc-consul on PATH)', 'bin'), default: process.env.TINC_CONSUL_BIN },
    'consul-bin': { type: 'string', description: described('Path of consul for ExecStart (default: consul on PATH)', 'consul-bin'), default: process.env.TINC_CONSUL_CONSUL_BIN },
    ...placeArgs,
  },
  async run({ args }) {
    const net = requireNet(args.net)
    const root = args.root
    if (args['consul-server'] && args['consul-client']) throw new UsageError('BAD_FLAG', '--consul-server and --consul-client exclude each other')
    if (args.bootstrap && !args['consul-server']) throw new UsageError('BAD_FLAG', '--bootstrap is for the first Consul server: add --consul-server')
    const role: ConsulRole | undefined = args.bootstrap ? 'bootstrap' : args['consul-server'] ? 'server' : args['consul-client'] ? 'client' : undefined
    const consulConfigDir = args['consul-config-dir']
    const existingConfig = join(under(root, consulConfigDir), CONSUL_CONFIG_FILE)

    let node: InstallInput['node']
    if (role === 'bootstrap') node = { name: args.name || sanitizeTincName(hostname()) }
    else {
      const tincDir = tincDirFor(args.dir, net)
      if (!existsSync(join(tincDir, 'tinc.conf')))
        throw new UsageError('NOT_SET_UP', `${tincDir}/tinc.conf is missing: run \`tinc-consul init\` or \`join\` first (or install --consul-server --bootstrap on the first server)`)
      const name = await readTincName(tincDir)
      node = { name, vpnAddress: (await buildOwnRecord(tincDir, name)).vpnAddress }
    }

    const envPath = configPath(args['config-dir'], net)
    const envText = await readFile(envPath, 'utf8').catch(() => undefined)
    const settings = envText === undefined ? undefined : parseConfig(envText, envPath)
    let managementToken: string | undefined
    let gossipKey: string | undefined
    let consul: InstallInput['consul']
    if (role) {
      // A re-run keeps what the running cluster already uses.
      gossipKey = args['gossip-key'] || (await hclValue(existingConfig, 'encrypt'))
      if (!gossipKey) {
        if (role === 'client')
          throw new UsageError(
            'NO_GOSSIP_KEY',
            "no Consul gossip key: `join` writes TINC_CONSUL_GOSSIP_KEY when the join endpoint has one; otherwise pass --gossip-key (from a server's /etc/consul.d/tinc-consul.hcl)",
          )
        gossipKey = newGossipKey()
      }
      if (role === 'bootstrap') managementToken = (await hclValue(join(under(root, consulConfigDir), CONSUL_BOOTSTRAP_FILE), 'initial_management')) ?? newManagementToken()
      // The node's own token from its settings, not an operator's CONSUL_HTTP_TOKEN still exported from init.
      const agentToken = args['agent-token'] || (role === 'bootstrap' ? managementToken : (settings?.TINC_CONSUL_TOKEN ?? args.token))
      if (!agentToken) throw new UsageError('NO_TOKEN', "no token for the Consul agent: the node's token (TINC_CONSUL_TOKEN, written by init/join) or --agent-token")
      consul = {
        role,
        servers: listFlag('consul-servers', args['consul-servers'] ?? '').filter((s) => !s.startsWith('127.')),
        bootstrapExpect: parseIntFlag('bootstrap-expect', args['bootstrap-expect'], 0, 7),
        gossipKey,
        agentToken,
        datacenter: args.datacenter || net.toLowerCase().replace(/_/g, '-'),
        dataDir: args['consul-data-dir'],
        configDir: consulConfigDir,
        fileDir: under(root, consulConfigDir),
        managementToken,
      }
    }
    const steps = await planInstall({
      net,
      node,
      consul,
      unitDir: under(root, args['unit-dir']),
      tincRoot: args.dir,
      settingsDir: args['config-dir'],
      bin: args.bin || onPath('tinc-consul') || '/usr/local/bin/tinc-consul',
      consulBin: args['consul-bin'] || onPath('consul') || '/usr/local/bin/consul',
      systemctl: systemdHere(root),
    })
    // A server's join endpoint hands the gossip key to new nodes: it goes in the net's settings.
    if (role === 'server' && gossipKey && settings && settings.TINC_CONSUL_GOSSIP_KEY !== gossipKey) {
      steps.unshift({
        kind: 'file',
        path: envPath,
        content: renderConfig({ ...settings, TINC_CONSUL_GOSSIP_KEY: gossipKey }),
        mode: 0o600,
        why: 'the join endpoint gives new nodes the gossip key',
        owner: 'config',
      })
    }

    if (args['dry-run']) {
      console.log(`tinc-consul install --dry-run: nothing was changed. It would:`)
      for (const s of steps) console.log(`  ${describeStep(s)}`)
      for (const s of steps) if (s.kind === 'file') console.log(`\n--- ${s.path}\n${s.content.trimEnd()}`)
    } else {
      await applyInstall(steps, { manifest: under(root, MANIFEST_PATH), say: (l) => console.log(l) })
    }
    if (!systemdHere(root)) console.log(`\n${root === '/' ? 'systemd is not running here' : `files are under ${root}`}: no systemctl was run.`)
    if (role === 'bootstrap') {
      console.log(`\nConsul's management token is in ${join(under(root, consulConfigDir), CONSUL_BOOTSTRAP_FILE)}. Next:`)
      console.log(`  export CONSUL_HTTP_TOKEN=${managementToken}`)
      console.log(`  tinc-consul init --net ${net} --name ${node?.name ?? ''} --cidr 10.20.0.0/16 --address <this server's public name>`)
      console.log(`  tinc-consul install --net ${net} --consul-server      # moves Consul onto the VPN address`)
    }
  },
})

export const uninstallCommand = defineCommand({
  meta: {
    name: 'uninstall',
    description: 'Undo install for one network: stop and disable tinc-consul@NET, remove the files install wrote (unless edited since). Keys, tokens and state stay unless --purge.',
  },
  args: {
    net: consulArgs.net,
    'config-dir': consulArgs['config-dir'],
    dir: { type: 'string', description: described("tinc's config root; the network lives in <dir>/<net>", 'dir'), default: envDefault('dir', '/etc/tinc') },
    consul: { type: 'boolean', description: 'Also stop the Consul agent and remove its unit and config (its data dir stays)', default: false },
    purge: { type: 'boolean', description: "Also delete the network's tinc keys and config, its tokens (<net>.env), service files and state: the node is gone for good", default: false },
    'state-dir': { type: 'string', description: described("The network's state directory", 'state-dir'), default: process.env.TINC_CONSUL_STATE_DIR },
    ...placeArgs,
  },
  async run({ args }) {
    const net = requireNet(args.net)
    const systemd = systemdHere(args.root)
    const stop = systemd ? [['systemctl', 'disable', '--now', `tinc-consul@${net}.service`], ...(args.consul ? [['systemctl', 'disable', '--now', 'consul.service']] : [])] : []
    const purge = args.purge ? [tincDirFor(args.dir, net), configPath(args['config-dir'], net), defaultServicesDir(args['config-dir'], net), args['state-dir'] ?? defaultStateDir(net)] : []
    if (args['dry-run']) console.log('tinc-consul uninstall --dry-run: nothing was changed.')
    await uninstall({ manifest: under(args.root, MANIFEST_PATH), net, consul: args.consul, stop, purge, dryRun: args['dry-run'], say: (l) => console.log(l) })
    if (systemd && !args['dry-run']) await run(['systemctl', 'daemon-reload'], { allowFailure: true })
    if (!args.purge)
      console.log(
        `\nKept: ${tincDirFor(args.dir, net)} (keys), ${configPath(args['config-dir'], net)} (tokens), the state in ${args['state-dir'] ?? defaultStateDir(net)}. tinc@${net} still runs the VPN. --purge removes them; ${MANIFEST_PATH} lists what install wrote.`,
      )
  },
})
