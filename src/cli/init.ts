import { hostname } from 'node:os'
import { defineCommand } from 'citty'
import { DEFAULT_JOIN_PORT } from '../mesh/join-server.ts'
import { initNode } from '../mesh/init.ts'
import { sanitizeTincName } from '../tinc/names.ts'
import { consulArgs } from './common.ts'
import { described, envDefault, envFlag } from './env.ts'
import { parseIntFlag } from './parse.ts'
import { requireNet } from './run.ts'
import { setupArgs, setupFrom } from './setup-args.ts'

export const initCommand = defineCommand({
  meta: { name: 'init', description: "Create a network in Consul (or add a public node to it): key, address, tinc config, scripts, tokens, and this node's record. Safe to run again." },
  args: {
    ...consulArgs,
    name: { type: 'string', description: described("This node's tinc name (default: the hostname, with anything but letters, digits and _ as _)", 'name'), default: process.env.TINC_CONSUL_NAME },
    cidr: { type: 'string', description: described('VPN range, needed to create the network (e.g. 10.99.0.0/24)', 'cidr'), default: process.env.TINC_CONSUL_CIDR },
    domain: { type: 'string', description: described('DNS domain for node names', 'domain'), default: envDefault('domain', 'mesh') },
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
    ...setupArgs,
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
    })
    console.log(`\n${res.createdNetwork ? 'Network created. ' : ''}This node has address ${res.address}.`)
    console.log('Next:')
    console.log(`  tincd -n ${net} -c ${res.dir}          # start tinc`)
    console.log(`  tinc-consul run --net ${net}          # start the sidecar (reads ${res.configPath})`)
    console.log(`  tinc-consul invite --net ${net}       # one line to give each new machine`)
  },
})
