import { spawnSync } from 'node:child_process'
import { defineCommand } from 'citty'
import { LabError, UsageError } from '../errors.ts'
import { runJoinDemo } from '../lab/demo.ts'
import { runNetworksDemo } from '../lab/demo-networks.ts'
import { labDown, labUp, openLab, readLabStates, type Lab } from '../lab/lab.ts'
import { listNamespaces } from '../lab/netns.ts'
import { provision } from '../lab/provision.ts'
import { CONSUL_VERSION } from '../lab/pins.ts'
import { NS_PREFIX } from '../lab/topology.ts'
import { run } from '../util/exec.ts'
import { described, envDefault, envFlag } from './env.ts'
import { parseIntFlag } from './parse.ts'

const step = (msg: string) => console.error(`▸ ${msg}`)

const idArg = { id: { type: 'string', description: described('Lab id (default: the only lab that is up)', 'lab-id'), default: process.env.TINC_CONSUL_LAB_ID } } as const

const provisionCmd = defineCommand({
  meta: { name: 'provision', description: `Make sure tincd, ip, nft, ping, dig, dnsperf and Consul v${CONSUL_VERSION} are on this machine (installs or builds what is missing)` },
  args: {
    check: { type: 'boolean', description: 'Only check; install and build nothing', default: false },
  },
  async run({ args }) {
    const report = await provision({ install: !args.check, progress: step })
    for (const [tool, path] of Object.entries(report.tools)) console.log(`ok  ${tool.padEnd(8)} ${path}`)
    console.log(`ok  ${'consul'.padEnd(8)} ${report.consul} (v${CONSUL_VERSION}, from ${report.consulSource})`)
  },
})

const upArgs = {
  nodes: { type: 'string', description: described('Number of tinc nodes', 'lab-nodes'), default: envDefault('lab-nodes', '3') },
  nat: { type: 'string', description: described('How many of them sit behind their own NAT router', 'lab-nat'), default: envDefault('lab-nat', '1') },
  'consul-servers': {
    type: 'string',
    description: described('Consul servers: 1 or 3 (0: no Consul at all, for installing it by hand)', 'lab-consul-servers'),
    default: envDefault('lab-consul-servers', '1'),
  },
  acl: { type: 'boolean', description: described('Enable Consul ACLs (default deny); the lab keeps the management token', 'lab-acl'), default: envFlag('lab-acl') },
  tinc: { type: 'boolean', description: described('Start tincd with hand-written host files (--no-tinc for bare nodes)', 'lab-tinc'), default: envFlag('lab-tinc', true) },
  'host-files': { type: 'string', description: described("Host files each node starts with: all, or seed (its own plus node1's)", 'lab-host-files'), default: envDefault('lab-host-files', 'all') },
} as const

function labOptionsFrom(args: { nodes: string; nat: string; 'consul-servers': string; acl: boolean; tinc: boolean; 'host-files': string }) {
  const nodes = parseIntFlag('nodes', args.nodes, 1, 20)
  const nat = parseIntFlag('nat', args.nat, 0, 19)
  const servers = parseIntFlag('consul-servers', args['consul-servers'], 0, 3)
  if (servers === 2) throw new UsageError('BAD_FLAG', '--consul-servers must be 0, 1 or 3, got 2')
  const hostFiles = args['host-files']
  if (hostFiles !== 'all' && hostFiles !== 'seed') throw new UsageError('BAD_FLAG', `--host-files must be all or seed, got "${hostFiles}"`)
  return { nodes, nat, consulServers: servers as 0 | 1 | 3, acl: args.acl, tinc: args.tinc, hostFiles: hostFiles as 'all' | 'seed' }
}

function describeLab(lab: Lab): void {
  const { plan, managementToken } = lab.state
  console.log(`lab ${plan.id}  (namespaces ${plan.prefix}-*, state in ${lab.state.runDir})`)
  for (const n of plan.nodes) {
    const where = n.behindNat ? `behind NAT (${n.underlayIp} → ${n.publicIp})` : `public ${n.publicIp}`
    console.log(`  ${n.name.padEnd(8)} vpn ${n.vpnIp.padEnd(12)} ${where.padEnd(38)} consul http://${n.controlIp}:8500`)
  }
  for (const s of plan.servers) console.log(`  ${s.name.padEnd(8)} Consul server                                         http://${s.controlIp}:8500`)
  if (managementToken) console.log(`  management token: ${managementToken}`)
}

const upCmd = defineCommand({
  meta: { name: 'up', description: 'Create a lab: namespaces, NAT routers, tincd on every node, and a Consul cluster. It stays up until `lab down`.' },
  args: upArgs,
  async run({ args }) {
    const lab = await labUp({ ...labOptionsFrom(args), keep: true, step })
    describeLab(lab)
  },
})

const downCmd = defineCommand({
  meta: { name: 'down', description: 'Stop every process of the lab and delete its namespaces, links and files (all labs unless --id)' },
  args: idArg,
  run({ args }) {
    const { removed, problems } = labDown({ id: args.id })
    console.log(removed.length ? `removed lab ${removed.join(', ')}` : 'no lab was up')
    if (problems.length) throw new LabError('LAB_TEARDOWN', `teardown problems:\n${problems.join('\n')}`)
    const left = listNamespaces().filter((ns) => ns.startsWith(NS_PREFIX))
    if (!args.id && left.length) throw new LabError('LAB_TEARDOWN', `namespaces still present: ${left.join(', ')}`)
  },
})

const statusCmd = defineCommand({
  meta: { name: 'status', description: 'Show the labs that are up' },
  run() {
    const states = readLabStates()
    if (states.length === 0) console.log('no lab is up')
    for (const s of states) describeLab(openLab(s.plan.id))
  },
})

const execCmd = defineCommand({
  meta: { name: 'exec', description: "Run a command inside a node's namespace: lab exec NODE -- CMD…  (NODE: node1…, nat1…, consul1…, hub)" },
  args: { ...idArg, node: { type: 'positional', description: 'Node name', required: true } },
  run({ args, rawArgs }) {
    const dash = rawArgs.indexOf('--')
    const argv = dash >= 0 ? rawArgs.slice(dash + 1) : []
    if (argv.length === 0) throw new UsageError('BAD_ARGS', 'usage: tinc-consul lab exec NODE -- CMD [ARGS…]')
    const lab = openLab(args.id)
    const r = spawnSync('ip', ['netns', 'exec', lab.nsOf(args.node), ...argv], { stdio: 'inherit' })
    if (r.error) throw new LabError('LAB_EXEC', `cannot run ${argv[0]}: ${r.error.message}`)
    process.exitCode = r.status ?? 1
  },
})

const pairArgs = { ...idArg, a: { type: 'positional', description: 'First node', required: true }, b: { type: 'positional', description: 'Second node', required: true } } as const

const cutCmd = defineCommand({
  meta: { name: 'cut', description: 'Drop underlay traffic between nodes A and B (both directions)' },
  args: pairArgs,
  async run({ args }) {
    await openLab(args.id).cut(args.a, args.b)
    console.log(`cut ${args.a} ⇹ ${args.b}`)
  },
})

const healCmd = defineCommand({
  meta: { name: 'heal', description: 'Restore underlay traffic between nodes A and B' },
  args: pairArgs,
  async run({ args }) {
    await openLab(args.id).heal(args.a, args.b)
    console.log(`healed ${args.a} ⇄ ${args.b}`)
  },
})

const demoCmd = defineCommand({
  meta: {
    name: 'demo',
    description:
      'The story end to end: a lab with no tinc config, `init` on node1, an invite and a `join` for every other node (some behind NAT), a ping matrix and join-to-ping times, a service, then groups and the reachability matrix before and after `group associate`; then teardown',
  },
  args: {
    nodes: { type: 'string', description: described('Number of nodes', 'demo-nodes'), default: envDefault('demo-nodes', '5') },
    nat: { type: 'string', description: described('How many sit behind their own NAT router (the last ones)', 'demo-nat'), default: envDefault('demo-nat', '3') },
    'consul-servers': upArgs['consul-servers'],
    acl: { type: 'boolean', description: described('Consul ACLs on (--no-acl to turn them off)', 'demo-acl'), default: envFlag('demo-acl', true) },
    'key-size': { type: 'string', description: described("RSA key size for the demo's nodes", 'demo-key-size'), default: envDefault('demo-key-size', '2048') },
  },
  async run({ args }) {
    const opts = labOptionsFrom({ nodes: args.nodes, nat: args.nat, 'consul-servers': args['consul-servers'], acl: args.acl, tinc: false, 'host-files': 'all' })
    if (opts.nodes - opts.nat < 2) throw new UsageError('BAD_FLAG', 'the demo needs at least two public nodes (--nodes minus --nat)')
    const lab = await labUp({ ...opts, step })
    try {
      const { plan } = lab.state
      console.log(`lab ${plan.id}: ${plan.nodes.length} bare machines (no tinc config, no keys), ${plan.servers.length} Consul server(s), ACLs ${opts.acl ? 'on' : 'off'}`)
      for (const n of plan.nodes) console.log(`  ${n.name.padEnd(8)} ${n.behindNat ? `behind NAT (${n.underlayIp} → ${n.publicIp})` : `public ${n.publicIp}`}`)
      const { failures } = await runJoinDemo(lab, { keyBits: parseIntFlag('key-size', args['key-size'], 1024, 8192), step })
      if (failures > 0) throw new LabError('DEMO_FAILED', 'the demo saw a failure (see above)')
    } finally {
      lab.down()
      const left = (await run(['ip', 'netns', 'list'])).stdout.split('\n').filter((l) => l.startsWith(NS_PREFIX))
      console.log(left.length ? `\nleft behind: ${left.join(', ')}` : '\nlab torn down: no namespaces, processes or files left behind')
    }
  },
})

const demoNetworksCmd = defineCommand({
  meta: {
    name: 'demo-networks',
    description:
      'The networks people already run: a hand-made tinc network adopts node by node while every pair pings (the longest interruption printed), then a LAN behind a public node and one behind NAT are announced, approved and pinged from every node; then teardown',
  },
  args: {
    'consul-servers': upArgs['consul-servers'],
  },
  async run({ args }) {
    const opts = labOptionsFrom({ nodes: '3', nat: '1', 'consul-servers': args['consul-servers'], acl: true, tinc: true, 'host-files': 'all' })
    const lab = await labUp({ ...opts, step })
    try {
      const { failures } = await runNetworksDemo(lab)
      if (failures > 0) throw new LabError('DEMO_FAILED', 'the demo saw a failure (see above)')
    } finally {
      lab.down()
      const left = (await run(['ip', 'netns', 'list'])).stdout.split('\n').filter((l) => l.startsWith(NS_PREFIX))
      console.log(left.length ? `\nleft behind: ${left.join(', ')}` : '\nlab torn down: no namespaces, processes or files left behind')
    }
  },
})

export const labCommand = defineCommand({
  meta: { name: 'lab', description: 'A network-namespace lab with real tincd and Consul: the demo and the integration-test harness (needs root)' },
  subCommands: { provision: provisionCmd, up: upCmd, down: downCmd, status: statusCmd, exec: execCmd, cut: cutCmd, heal: healCmd, demo: demoCmd, 'demo-networks': demoNetworksCmd },
})
