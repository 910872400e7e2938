import { hostname } from 'node:os'
import { defineCommand } from 'citty'
import { decodeInvite } from '../mesh/invite.ts'
import { joinNetwork } from '../mesh/join.ts'
import { sanitizeTincName } from '../tinc/names.ts'
import { described, envDefault } from './env.ts'
import { parseIntFlag } from './parse.ts'
import { setupArgs, setupFrom } from './setup-args.ts'

export const joinCommand = defineCommand({
  meta: { name: 'join', description: "Join a network with a one-time invite: makes a key, redeems the invite at a public node, and writes the tinc config and the daemon's settings" },
  args: {
    invite: { type: 'positional', description: 'The invite (one line, from `tinc-consul invite`)', required: true },
    name: { type: 'string', description: described("This node's tinc name (default: the invite's, else the hostname)", 'name'), default: process.env.TINC_CONSUL_NAME },
    consul: { type: 'string', description: described('The local Consul agent the daemon will use', 'consul'), default: envDefault('consul', 'http://127.0.0.1:8500') },
    retry: {
      type: 'string',
      description: described('Seconds to keep asking while no join endpoint answers at all (a join server starting or restarting); 0 asks once', 'join-retry'),
      default: envDefault('join-retry', '30'),
    },
    ...setupArgs,
  },
  async run({ args }) {
    const inv = decodeInvite(args.invite)
    const res = await joinNetwork({
      ...setupFrom(args),
      invite: args.invite,
      name: args.name || inv.name || sanitizeTincName(hostname()),
      consulUrl: args.consul,
      retryForMs: parseIntFlag('retry', args.retry, 0, 3600) * 1000,
    })
    console.log(`\nJoined ${res.net} as ${res.name} with address ${res.address}.`)
    console.log('Next:')
    if (res.consulServers.length) console.log(`  run a Consul agent that joins ${res.consulServers.join(', ')} (see docs/operations.md)`)
    console.log(`  tincd -n ${res.net} -c ${res.dir}          # start tinc`)
    console.log(`  tinc-consul run --net ${res.net}          # start the sidecar (reads ${res.configPath})`)
  },
})
