import { hostname } from 'node:os'
import { defineCommand } from 'citty'
import { createConsulClient } from '../consul/client.ts'
import { checkGroupName, kvLayout, type KvLayout } from '../mesh/kv-layout.ts'
import { groupIn, readNetworkAndPolicy, requireNetwork } from '../mesh/network.ts'
import { createInvite, listInvites, revokeInvite } from '../mesh/invite.ts'
import { listJoinEndpoints } from '../mesh/join-endpoints.ts'
import { printable } from '../util/text.ts'
import { consulArgs } from './common.ts'
import { described, envDefault } from './env.ts'
import { parseDurationFlag } from './parse.ts'
import { requireNet } from './run.ts'

// Invites live where node tokens can't reach: use the join-server token init wrote, if any.
const inviteConsulArgs = {
  ...consulArgs,
  token: {
    ...consulArgs.token,
    description: described('Consul token that may write invites/ (default: the join-server token init wrote, else TINC_CONSUL_TOKEN / CONSUL_HTTP_TOKEN)', 'join-token'),
    default: process.env.TINC_CONSUL_JOIN_TOKEN ?? consulArgs.token.default,
  },
} as const

const createArgs = {
  ...inviteConsulArgs,
  'serve-joins': { type: 'boolean', description: 'The new node is public and may serve joins itself (gets a join-server token: trust it like this one)', default: false },
  name: { type: 'string', description: described('Only a node of this name may use the invite (default: any name the joiner picks)', 'invite-name'), default: process.env.TINC_CONSUL_INVITE_NAME },
  ttl: { type: 'string', description: described('How long the invite stays valid', 'ttl'), default: envDefault('ttl', '1h') },
  group: {
    type: 'string',
    description: described("The group (docs/groups.md) the new node joins: its address comes from the group's range", 'invite-group'),
    default: process.env.TINC_CONSUL_INVITE_GROUP,
  },
} as const

const create = defineCommand({
  meta: { name: 'create', description: 'Print a one-time invite for a new machine (the default when no subcommand is given)' },
  args: createArgs,
  async run({ args }) {
    const net = requireNet(args.net)
    const groupName = args.group ? checkGroupName(args.group) : undefined
    const layout = kvLayout(net, args.prefix || undefined)
    const token = args.token || undefined
    const client = createConsulClient({ url: args.consul, token })
    const group = groupName === undefined ? undefined : await inviteGroup(client, layout, groupName)
    // Every join server, so the joiner can try the next when one is down. They come from
    // join-endpoints/, which only join servers and operators can write: a node can't list
    // itself by adding a port to its own record.
    const { endpoints, skipped } = await listJoinEndpoints(client, layout)
    // Key names come from Consul, which any writer of the prefix chose: printed clean.
    for (const why of skipped) console.error(`left out of the invite: join-endpoints/${printable(why)}`)
    const res = await createInvite({
      client,
      layout,
      net,
      endpoints: endpoints.slice(0, 16),
      name: args.name || undefined,
      ttlMs: parseDurationFlag('ttl', args.ttl, 30 * 86_400_000),
      createdBy: hostname().slice(0, 64),
      serveJoins: args['serve-joins'],
      group,
    })
    console.log(res.invite)
    console.error(
      `invite ${res.id.slice(0, 8)} for ${args.name || 'any name'}${group ? ` in group ${group}` : ''}, valid until ${res.expiresAt.toISOString()}, single use. On the new machine: tinc-consul join <invite>`,
    )
  },
})

/** Checks the group exists now, so a typo fails here rather than at the joiner's end. */
async function inviteGroup(client: ReturnType<typeof createConsulClient>, layout: KvLayout, name: string): Promise<string> {
  const { policy } = requireNetwork(await readNetworkAndPolicy(client, layout), layout)
  return groupIn(policy, layout, name).name
}

const list = defineCommand({
  meta: { name: 'list', description: 'Show open invites (ids, names, expiry); never the tokens, which Consul does not have' },
  args: { ...inviteConsulArgs },
  async run({ args }) {
    const net = requireNet(args.net)
    const all = await listInvites(createConsulClient({ url: args.consul, token: args.token || undefined }), kvLayout(net, args.prefix || undefined))
    if (all.length === 0) return console.log('no open invites')
    console.log(['ID'.padEnd(10), 'NAME'.padEnd(20), 'EXPIRES'.padEnd(26), 'STATE'].join(' '))
    for (const i of all)
      console.log([i.id.slice(0, 8).padEnd(10), (i.invite?.name ?? '(any)').padEnd(20), (i.invite?.expiresAt ?? '?').padEnd(26), i.invite ? (i.expired ? 'expired' : 'open') : 'unreadable'].join(' '))
  },
})

const revoke = defineCommand({
  meta: { name: 'revoke', description: 'Cancel an open invite by its id (the first 6 or more hex digits `invite list` shows)' },
  args: { ...inviteConsulArgs, id: { type: 'positional', description: 'Invite id', required: true } },
  async run({ args }) {
    const net = requireNet(args.net)
    const token = args.token || undefined
    const id = await revokeInvite(createConsulClient({ url: args.consul, token }), kvLayout(net, args.prefix || undefined), args.id)
    console.log(`invite ${id.slice(0, 8)} cancelled`)
  },
})

export const inviteCommand = defineCommand({
  meta: { name: 'invite', description: 'Make, list and cancel one-time invites. `invite --net NET` alone makes one.' },
  // The same flags as `create`, so `invite --net NET` parses (`NET` is not a subcommand).
  args: createArgs,
  subCommands: { create, list, revoke },
  default: 'create',
})
