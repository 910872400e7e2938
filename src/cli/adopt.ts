import { defineCommand } from 'citty'
import { finishNode } from '../install/finish.ts'
import { adoptNode, type AdoptResult } from '../mesh/adopt.ts'
import { keepPath } from '../mesh/keep.ts'
import { markerKeys } from '../mesh/network.ts'
import { consulArgs, newNetworkArgs } from './common.ts'
import { described } from './env.ts'
import { finishArgs, placeFrom } from './install.ts'
import { parseIntFlag } from './parse.ts'
import { requireNet } from './run.ts'
import { setupArgs } from './setup-args.ts'

export const adoptCommand = defineCommand({
  meta: {
    name: 'adopt',
    description:
      "Move this node of a hand-made tinc 1.0 network into tinc-consul, keeping its name, key and VPN address: publishes its record, makes its own Consul token, and keeps hand-made peers' host files until they adopt too (docs/adopt.md)",
  },
  args: {
    ...consulArgs,
    ...newNetworkArgs,
    'vpn-address': {
      type: 'string',
      description: described("This node's VPN address, when its host file has several /32 subnets or none", 'vpn-address'),
      default: process.env.TINC_CONSUL_VPN_ADDRESS,
    },
    dir: setupArgs.dir,
    'config-dir': setupArgs['config-dir'],
    'run-dir': setupArgs['run-dir'],
    'split-dns': setupArgs['split-dns'],
    'dns-port': setupArgs['dns-port'],
    ...finishArgs,
    'dry-run': { type: 'boolean', description: 'Print every file and Consul write adopt would make; change nothing and create no token', default: false },
  },
  async run({ args }) {
    const net = requireNet(args.net)
    const started = Date.now()
    const res = await adoptNode({
      net,
      root: args.dir,
      configDir: args['config-dir'],
      runDir: args['run-dir'],
      consulUrl: args.consul,
      token: args.token || undefined,
      prefix: args.prefix || undefined,
      cidr: args.cidr || undefined,
      vpnAddress: args['vpn-address'] || undefined,
      domain: args.domain,
      splitDns: args['split-dns'],
      dnsPort: parseIntFlag('dns-port', args['dns-port'], 1, 65535),
      dryRun: args['dry-run'],
      progress: (s) => console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(5)}s] ${s}`),
    })
    if (args['dry-run']) printDryRun(res, keepPath(args['config-dir'], net))
    else printDone(res)
    await finishNode({ ...placeFrom(args, net), command: 'adopt', keepTincd: true, install: args.install, dryRun: args['dry-run'], bootstrapExpect: 0, say: (l) => console.log(l) })
  },
})

function printDryRun(r: AdoptResult, keepFile: string): void {
  const say = (l: string) => console.log(l)
  say(`\ntinc-consul adopt --dry-run: nothing was changed and no token was made. It would:`)
  const kv = (verb: string, key: string, value: unknown) => say(`  Consul ${verb} ${key} = ${JSON.stringify(value)}`)
  const { plan, node, layout } = r
  if (plan.createNetwork) say(`  Consul create (cas=0) ${layout.network} = ${JSON.stringify(plan.network)}, with the empty markers ${markerKeys(layout).join(', ')}`)
  for (const cidr of plan.routes.routes) kv('create (unless approved already)', layout.subnetApproval(node.name, cidr), { v: 1, at: '<now>' })
  kv(`cas=${plan.ipamIndex}`, layout.ipam(node.address), { name: node.name, at: '<now>' })
  kv(`cas=${plan.recordIndex}`, layout.node(node.name), plan.record)
  say(plan.acl ? `  Consul ACL: create (or reuse) the policy for ${node.name} and one token for it (write on its own record only)` : '  Consul ACLs are off: no token')
  for (const f of r.files) {
    say(`  write ${f.path}${f.backup ? ` (the hand-made one kept as ${f.backup})` : ''}${f.summary ? `: ${f.summary}` : ':'}`)
    if (!f.summary) for (const l of f.text.trimEnd().split('\n')) say(`      ${l}`)
  }
  if (r.keepNames.length) say(`  append to ${keepFile}: ${r.keepNames.map((n) => `"${n} until-adopted"`).join(', ')}`)
  say('  tincd keeps running: nothing is restarted or signalled')
}

function printDone(r: AdoptResult): void {
  const { node } = r
  console.log(`\nAdopted ${node.name}: address ${node.address}, its key unchanged. tincd kept running (nothing was restarted).`)
  for (const f of r.files) if (f.backup) console.log(`  ${f.path} replaced; the hand-made one is kept as ${f.backup}`)
  if (r.keepNames.length) console.log(`  hand-made peers kept until they adopt with the same key: ${r.keepNames.join(', ')}`)
  for (const cidr of r.plan.routes.routes) console.log(`  ${cidr}: routed by every node, announced by ${node.name} and approved (\`tinc-consul subnet ls\`)`)
  for (const k of r.plan.routes.kept) console.log(`  "Subnet = ${k.subnet}" stays in hosts/${node.name}, not announced: ${k.reason}`)
  console.log(`  settings (with this node's own token, not yours) in ${r.configPath}`)
}
