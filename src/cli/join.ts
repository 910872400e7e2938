import { hostname } from 'node:os'
import { defineCommand } from 'citty'
import { finishNode, fromInviteAlone, type FinishOptions } from '../install/finish.ts'
import { decodeInvite } from '../mesh/invite.ts'
import { describeJoin, joinNetwork } from '../mesh/join.ts'
import { sanitizeTincName } from '../tinc/names.ts'
import { described, envDefault } from './env.ts'
import { consulServerArg, finishArgs, placeFrom } from './install.ts'
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
    ...finishArgs,
    'consul-server': consulServerArg,
    'dry-run': { type: 'boolean', description: "Print what join and the install after it would do from the invite alone; the invite isn't spent (trying it would spend it)", default: false },
  },
  async run({ args }) {
    const inv = decodeInvite(args.invite)
    const setup = setupFrom(args)
    const name = args.name || inv.name || sanitizeTincName(hostname())
    const finish = (net: string, o: Pick<FinishOptions, 'role' | 'known' | 'describe'>) =>
      finishNode({ ...placeFrom(args, net), ...o, command: 'join', install: args.install, dryRun: args['dry-run'], bootstrapExpect: 0, say: (l) => console.log(l) })
    if (args['dry-run']) {
      const plan = await describeJoin({ ...setup, invite: args.invite, name })
      console.log(`tinc-consul join --dry-run: nothing was changed and the invite is not spent. It would:`)
      for (const l of plan.lines) console.log(`  ${l}`)
      await finish(plan.net, { role: args['consul-server'] ? 'server' : 'client', ...fromInviteAlone(plan.name) })
      return
    }
    const res = await joinNetwork({ ...setup, invite: args.invite, name, consulUrl: args.consul, retryForMs: parseIntFlag('retry', args.retry, 0, 3600) * 1000 })
    console.log(`\nJoined ${res.net} as ${res.name} with address ${res.address}${res.address6 ? ` and ${res.address6}` : ''}.`)
    // A client agent needs the servers and the gossip key; a reply without them means the
    // network's Consul isn't one install set up, and the local agent stays the operator's.
    const role = args['consul-server'] ? 'server' : res.consulServers.length && res.gossipKey ? 'client' : undefined
    if (!role) console.log(`The join reply named no Consul servers and gossip key: the Consul agent at ${args.consul} is yours to run, and install covers tincd and the sidecar only.`)
    await finish(res.net, { role })
  },
})
