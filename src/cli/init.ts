import { hostname } from 'node:os'
import { defineCommand } from 'citty'
import { DEFAULT_JOIN_PORT } from '../mesh/join-server.ts'
import { finishNode, installedConsulRole } from '../install/finish.ts'
import { initNode } from '../mesh/init.ts'
import { checkGroupName } from '../mesh/kv-layout.ts'
import { isUlaCidr6 } from '../mesh/record.ts'
import { UsageError } from '../errors.ts'
import { parseModeFlag } from '../tinc/mode.ts'
import { sanitizeTincName } from '../tinc/names.ts'
import { consulArgs, newNetworkArgs } from './common.ts'
import { described, envDefault, envFlag } from './env.ts'
import { finishArgs, placeFrom } from './install.ts'
import { parseIntFlag, rangeFlag } from './parse.ts'
import { requireNet } from './run.ts'
import { setupArgs, setupFrom } from './setup-args.ts'

export const initCommand = defineCommand({
  meta: { name: 'init', description: "Create a network in Consul (or add a public node to it): key, address, tinc config, scripts, tokens, and this node's record. Safe to run again." },
  args: {
    ...consulArgs,
    name: { type: 'string', description: described("This node's tinc name (default: the hostname, with anything but letters, digits and _ as _)", 'name'), default: process.env.TINC_CONSUL_NAME },
    ...newNetworkArgs,
    'join-port': { type: 'string', description: described("Port this node serves joins on; 0: it doesn't", 'join-port'), default: envDefault('join-port', String(DEFAULT_JOIN_PORT)) },
    'bare-service-names': {
      type: 'boolean',
      description: described(
        'When creating the network: register services in Consul under their own names (nfs) rather than tinc-<net>--<node>--nfs, and let node tokens write any service name (docs/services.md)',
        'bare-service-names',
      ),
      get default() {
        return envFlag('bare-service-names', false)
      },
    },
    cidr6: {
      type: 'string',
      description: described(
        'When creating the network: an IPv6 range inside the mesh, a unique local /64 (e.g. fd12:3456:789a::/64), or auto for a random one (RFC 4193); each node then gets a /128 too. Default: IPv4 only',
        'cidr6',
      ),
      default: process.env.TINC_CONSUL_CIDR6,
    },
    mode: {
      type: 'string',
      description: described("When creating the network: tinc's Mode on every node, router (tun, IP routing) or switch (tap, layer 2; docs/joining.md). Default router", 'mode'),
      default: process.env.TINC_CONSUL_MODE,
    },
    'infra-group': {
      type: 'string',
      description: described(
        "The infrastructure group (docs/groups.md) this public node's address comes from; created with --infra-cidr. Default: infra with --infra-cidr, else the network's only infrastructure group if it has one",
        'infra-group',
      ),
      default: process.env.TINC_CONSUL_INFRA_GROUP,
    },
    'infra-cidr': {
      type: 'string',
      description: described(
        "Create the infrastructure group with this IPv4 range (inside the network's, e.g. 10.20.0.0/22) and give this node its address from it. The network's first group: nodes in no group then reach only infrastructure",
        'infra-cidr',
      ),
      default: process.env.TINC_CONSUL_INFRA_CIDR,
    },
    ...setupArgs,
    ...finishArgs,
  },
  async run({ args }) {
    const net = requireNet(args.net)
    const res = await initNode({
      ...setupFrom(args),
      net,
      name: args.name || sanitizeTincName(hostname()),
      cidr: args.cidr || undefined,
      domain: args.domain,
      consulUrl: args.consul,
      token: args.token || undefined,
      prefix: args.prefix || undefined,
      joinPort: parseIntFlag('join-port', args['join-port'], 0, 65535),
      bareServiceNames: args['bare-service-names'],
      mode: parseModeFlag(args.mode),
      cidr6: parseCidr6Flag(args.cidr6),
      ...(args['infra-group'] ? { infraGroup: checkGroupName(args['infra-group']) } : {}),
      ...(args['infra-cidr'] ? { infraCidr: rangeFlag('infra-cidr', args['infra-cidr'], 4) } : {}),
    })
    console.log(`\n${res.createdNetwork ? 'Network created. ' : ''}This node has address ${res.address}${res.address6 ? ` and ${res.address6}` : ''}.`)
    // init needs a running Consul, so it installs only where install set that agent up (the
    // first server's `install --bootstrap`): then it finishes as `install` with that agent's
    // role would. Any other agent (a package's, a remote cluster, a dev agent) isn't ours to
    // re-bind or restart: the install command is printed instead (docs/deploy.md).
    const place = placeFrom(args, net)
    const role = await installedConsulRole(place.consulFileDir)
    await finishNode({
      ...place,
      role,
      command: 'init',
      install: args.install && role !== undefined,
      notInstalledBecause: args.install && !role ? `no Consul agent here that install set up` : undefined,
      dryRun: false,
      bootstrapExpect: 0,
      token: args.token || undefined,
      say: (l) => console.log(l),
    })
    console.log(`\nOne line to give each new machine: tinc-consul invite --net ${net}`)
  },
})

/** `--cidr6`: `auto`, or a unique local /64 written canonically; empty or absent: IPv4 only. */
export function parseCidr6Flag(value: string | undefined): string | undefined {
  if (value === undefined || value === '') return undefined
  if (value === 'auto' || isUlaCidr6(value)) return value
  throw new UsageError('BAD_FLAG', `--cidr6 must be auto or a unique local /64 written canonically (for example fd12:3456:789a::/64), got ${JSON.stringify(value)}`)
}
