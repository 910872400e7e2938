import { existsSync } from 'node:fs'
import { hostname } from 'node:os'
import { delimiter, join } from 'node:path'
import { defineCommand } from 'citty'
import { configPath, defaultStateDir } from '../config-file.ts'
import { UsageError } from '../errors.ts'
import { applyInstall, MANIFEST_PATH, printPlan, uninstall } from '../install/apply.ts'
import { systemdRunning } from '../install/finish.ts'
import { planNodeInstall } from '../install/node.ts'
import { CONSUL_BOOTSTRAP_FILE, type ConsulRole } from '../install/plan.ts'
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

/** What the units run, and where the agent keeps its data. */
const runArgs = {
  'consul-data-dir': { type: 'string', description: described("The Consul agent's data_dir", 'consul-data-dir'), default: envDefault('consul-data-dir', '/var/lib/consul') },
  bin: { type: 'string', description: described('Path of tinc-consul for ExecStart (default: tinc-consul on PATH)', 'bin'), default: process.env.TINC_CONSUL_BIN },
  'consul-bin': { type: 'string', description: described('Path of consul for ExecStart (default: consul on PATH)', 'consul-bin'), default: process.env.TINC_CONSUL_CONSUL_BIN },
} as const

export const consulServerArg = {
  type: 'boolean',
  description: described('This node runs one of the (three) Consul servers', 'consul-server'),
  get default() {
    return envFlag('consul-server', false)
  },
} as const

/**
 * The flags `join` and `init` finish with (src/install/finish.ts): declared
 * once, here, beside install's own. `--no-install` (TINC_CONSUL_NO_INSTALL)
 * skips the install and prints the commands instead.
 */
export const finishArgs = {
  install: {
    type: 'boolean',
    description: described('Finish with what `install` does: on systemd, write, enable and start the units and the Consul agent config (--no-install: print the commands instead)', 'no-install'),
    negativeDescription: 'Set the node up, install nothing, print the commands to run',
    get default() {
      return !envFlag('no-install', false)
    },
  },
  root: placeArgs.root,
  'unit-dir': placeArgs['unit-dir'],
  'consul-config-dir': placeArgs['consul-config-dir'],
  ...runArgs,
} as const

interface PlaceArgValues {
  dir: string
  'config-dir': string
  root: string
  'unit-dir': string
  'consul-config-dir': string
  'consul-data-dir': string
  bin?: string
  'consul-bin'?: string
}

const under = (root: string, path: string) => (root === '/' ? path : join(root, path))

/** Where install's files go and what the units run, from install's (or join's, init's) flags. */
export function placeFrom(args: PlaceArgValues, net: string) {
  return {
    net,
    root: args.root,
    tincRoot: args.dir,
    settingsDir: args['config-dir'],
    unitDir: under(args.root, args['unit-dir']),
    consulConfigDir: args['consul-config-dir'],
    consulFileDir: under(args.root, args['consul-config-dir']),
    consulDataDir: args['consul-data-dir'],
    bin: args.bin || onPath('tinc-consul') || '/usr/local/bin/tinc-consul',
    consulBin: args['consul-bin'] || onPath('consul') || '/usr/local/bin/consul',
    manifest: under(args.root, MANIFEST_PATH),
    systemd: args.root === '/' && systemdRunning(),
  }
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
    'consul-server': consulServerArg,
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
    ...runArgs,
    ...placeArgs,
  },
  async run({ args }) {
    const net = requireNet(args.net)
    const root = args.root
    if (args['consul-server'] && args['consul-client']) throw new UsageError('BAD_FLAG', '--consul-server and --consul-client exclude each other')
    if (args.bootstrap && !args['consul-server']) throw new UsageError('BAD_FLAG', '--bootstrap is for the first Consul server: add --consul-server')
    const role: ConsulRole | undefined = args.bootstrap ? 'bootstrap' : args['consul-server'] ? 'server' : args['consul-client'] ? 'client' : undefined
    const place = placeFrom(args, net)
    const systemd = place.systemd
    const plan = await planNodeInstall({
      ...place,
      role,
      name: args.name || sanitizeTincName(hostname()),
      consulServers: args['consul-servers'] ? listFlag('consul-servers', args['consul-servers']) : undefined,
      gossipKey: args['gossip-key'] || undefined,
      agentToken: args['agent-token'] || undefined,
      token: args.token,
      bootstrapExpect: parseIntFlag('bootstrap-expect', args['bootstrap-expect'], 0, 7),
      datacenter: args.datacenter || undefined,
      systemctl: systemd,
    })
    const say = (l: string) => console.log(l)
    if (args['dry-run']) {
      say(`tinc-consul install --dry-run: nothing was changed. It would:`)
      printPlan(plan.steps, say)
    } else await applyInstall(plan.steps, { manifest: under(root, MANIFEST_PATH), say })
    if (!systemd) say(`\n${root === '/' ? 'systemd is not running here' : `files are under ${root}`}: no systemctl was run.`)
    if (role === 'bootstrap') {
      say(`\nConsul's management token is in ${join(under(root, args['consul-config-dir']), CONSUL_BOOTSTRAP_FILE)}. Next:`)
      say(`  export CONSUL_HTTP_TOKEN=${plan.managementToken}`)
      say(`  tinc-consul init --net ${net} --name ${plan.node.name} --cidr 10.20.0.0/16 --address <this server's public name>`)
      say(`  tinc-consul install --net ${net} --consul-server      # moves Consul onto the VPN address`)
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
    const systemd = args.root === '/' && systemdRunning()
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
