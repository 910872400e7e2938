import { hostname } from 'node:os'
import { defineCommand } from 'citty'
import { eventsFileFor } from '../mesh/init.ts'
import { decodeInvite } from '../mesh/invite.ts'
import { joinNetwork } from '../mesh/join.ts'
import { sanitizeTincName } from '../tinc/names.ts'
import { described, envDefault } from './env.ts'
import { parseAddressFlags, parseIntFlag } from './parse.ts'
import { setupArgs } from './setup-args.ts'

export const joinCommand = defineCommand({
  meta: { name: 'join', description: 'Join a network with a one-time invite: makes a key, redeems the invite at a public node, and writes the tinc config and the daemon\'s settings' },
  args: {
    invite: { type: 'positional', description: 'The invite (one line, from `tinc-consul invite`)', required: true },
    name: { type: 'string', description: described('This node\'s tinc name (default: the invite\'s, else the hostname)', 'name'), default: process.env.TINC_CONSUL_NAME },
    consul: { type: 'string', description: described('The local Consul agent the daemon will use', 'consul'), default: envDefault('consul', 'http://127.0.0.1:8500') },
    ...setupArgs,
  },
  async run({ args }) {
    const inv = decodeInvite(args.invite)
    const addr = parseAddressFlags(args.address as string | string[] | undefined)
    const started = Date.now()
    const step = (s: string) => console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(5)}s] ${s}`)
    const res = await joinNetwork({
      invite: args.invite,
      name: args.name || inv.name || sanitizeTincName(hostname()),
      addresses: addr.hosts,
      port: addr.port ?? parseIntFlag('port', args.port, 1, 65535),
      keyBits: parseIntFlag('key-size', args['key-size'], 1024, 8192),
      root: args.dir,
      configDir: args['config-dir'],
      eventsFile: eventsFileFor(args['run-dir'], inv.net),
      consulUrl: args.consul,
      interface: args.interface || undefined,
      force: args.force,
      progress: step,
    })
    console.log(`\nJoined ${res.net} as ${res.name} with address ${res.address}.`)
    console.log('Next:')
    if (res.consulServers.length) console.log(`  run a Consul agent that joins ${res.consulServers.join(', ')} (see docs/operations.md)`)
    console.log(`  tincd -n ${res.net} -c ${res.dir}          # start tinc`)
    console.log(`  tinc-consul run --net ${res.net}          # start the sidecar (reads ${res.configPath})`)
  },
})
