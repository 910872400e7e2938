import { defineCommand } from 'citty'
import { b64, type TxnOp } from '../consul/client.ts'
import { TincConsulError, UsageError } from '../errors.ts'
import { associatedWith, associationKeysNaming, groupMembers, newAssociationValue, newGroupValue, refusalOfNew } from '../mesh/groups.ts'
import { createGroup, forWriting, policyTxn } from '../mesh/group-admin.ts'
import { readIpam } from '../mesh/ipam.ts'
import { checkGroupName, kvLayout, type KvLayout } from '../mesh/kv-layout.ts'
import { pendingMoves } from '../mesh/move.ts'
import { readNodeRecords, type PolicyState } from '../mesh/network.ts'
import { consulArgs, groupArg, jsonArg, networkTarget, policyTarget, type NetworkTarget } from './common.ts'
import { groupMove } from './group-move.ts'
import { described, envFlag } from './env.ts'
import { rangeFlag } from './parse.ts'
import { requireNet } from './run.ts'
import { alignRows } from './table.ts'

/**
 * `tinc-consul group`: who may talk to whom (docs/groups.md). Every write takes an operator
 * token (node tokens only read `network/`), checks the new key by the rules every reader
 * applies (src/mesh/groups.ts) before writing it, and writes with check-and-set, so a
 * concurrent command makes the later one fail instead of overwriting.
 */

/** A transaction holds at most 64 operations; `rm --force` deletes the group and its associations in one. */
const MAX_TXN_OPS = 64

const layoutOf = (args: { net?: string; prefix?: string }): KvLayout => kvLayout(requireNet(args.net), args.prefix || undefined)

const groupAdd = defineCommand({
  meta: {
    name: 'add',
    description: "Create a group, a range of the network's VPN addresses (takes an operator token). Once a group exists, nodes in no group reach only infrastructure groups",
  },
  args: {
    ...consulArgs,
    name: groupArg('The new group'),
    cidr: {
      type: 'string',
      description: described("The group's IPv4 range, a CIDR inside the network's and overlapping no other group's (10.20.64.0/20)", 'group-cidr'),
      get default() {
        return process.env.TINC_CONSUL_GROUP_CIDR
      },
    },
    cidr6: {
      type: 'string',
      description: described("The group's IPv6 range, inside the network's cidr6 (networks with IPv6 only)", 'group-cidr6'),
      get default() {
        return process.env.TINC_CONSUL_GROUP_CIDR6
      },
    },
    infra: {
      type: 'boolean',
      description: described('An infrastructure group (public nodes, Consul servers): every node reaches it and is reached by it', 'group-infra'),
      default: envFlag('group-infra'),
    },
  },
  async run({ args }) {
    const name = checkGroupName(args.name)
    if (!args.cidr) throw new UsageError('BAD_FLAG', '--cidr is required: the IPv4 range of the group (or set TINC_CONSUL_GROUP_CIDR)')
    const value = newGroupValue({ cidr: rangeFlag('cidr', args.cidr, 4), cidr6: args.cidr6 ? rangeFlag('cidr6', args.cidr6, 6) : undefined, infra: args.infra })
    const t = await policyTarget(layoutOf(args), args)
    const { before: state, policy } = await createGroup(t.client, t.layout, t.network, name, value, t.policy)
    const first = state.read.policy.groups.length === 0
    const members = groupMembers(policy, (await readNodeRecords(t.client, t.layout, t.network)).records).members.get(name) ?? []
    console.log(
      `created group ${name} (${[value.cidr, value.cidr6].filter(Boolean).join(', ')}${value.infra ? ', infrastructure' : ''}) with ${members.length} member(s)${members.length ? `: ${members.join(', ')}` : ''}`,
    )
    if (first) console.log('This is the first group: from now on a node in no group reaches only the infrastructure groups.')
    if (!value.infra && !state.read.policy.groups.some((g) => g.infra)) console.log('No infrastructure group yet: add one for the public nodes (`group add NAME --cidr CIDR --infra`).')
  },
})

interface GroupRow {
  name: string
  cidr: string
  cidr6?: string
  infra: boolean
  members: string[]
  associations: string[]
}

async function listing(t: NetworkTarget & { policy: PolicyState }) {
  const state = t.policy
  const [nodes, held] = await Promise.all([readNodeRecords(t.client, t.layout, t.network), readIpam(t.client, t.layout)])
  const policy = state.read.policy
  const m = groupMembers(policy, nodes.records)
  const groups: GroupRow[] = policy.groups.map((g) => ({ ...g, members: m.members.get(g.name) ?? [], associations: associatedWith(policy, g.name) }))
  return {
    open: policy.groups.length === 0,
    groups,
    associations: policy.associations,
    ungrouped: m.ungrouped,
    split: m.split,
    moving: pendingMoves(nodes.records, held, policy),
    refused: state.read.refused,
    unreadable: nodes.unreadable,
    filtered: state.filtered,
  }
}

const groupLs = defineCommand({
  meta: { name: 'ls', description: 'List the groups with their ranges, members (by VPN address) and associations, nodes in no group, and keys refused (with why)' },
  args: { ...consulArgs, ...jsonArg },
  async run({ args }) {
    const l = await listing(await policyTarget(layoutOf(args), args))
    if (args.json) return void console.log(JSON.stringify(l, null, 2))
    if (l.filtered) console.log('consul hid part of network/ from this token: groups may be missing below')
    if (l.open) console.log('no groups: the network is open, every node reaches every node')
    else {
      const row = (g: GroupRow) => [
        g.name,
        g.cidr,
        g.cidr6 ?? '-',
        g.infra ? 'yes' : 'no',
        `${g.members.length}${g.members.length ? ` (${g.members.join(', ')})` : ''}`,
        g.associations.join(', ') || '-',
      ]
      console.log(alignRows([['GROUP', 'CIDR', 'CIDR6', 'INFRA', 'MEMBERS', 'ASSOCIATED'], ...l.groups.map(row)]).join('\n'))
      if (l.ungrouped.length) console.log(`in no group (reach only infrastructure groups): ${l.ungrouped.join(', ')}`)
    }
    for (const m of l.moving) console.log(`moving: ${m.node} from ${m.from} to ${m.to} (${m.group ?? 'no group'}); its sidecar hasn't renumbered it yet`)
    for (const s of l.split) console.log(`${s.node}'s IPv6 address is in ${s.group6 ?? 'no group'}, its IPv4 address in ${s.group ?? 'no group'}`)
    for (const r of l.refused) console.log(`refused: ${r.key}: ${r.reason}`)
    for (const u of l.unreadable) console.log(`record not usable, not listed as a member: ${u}`)
  },
})

const groupRm = defineCommand({
  meta: { name: 'rm', description: 'Remove a group (takes an operator token); refused while it has members or associations, unless --force, which removes its associations too' },
  args: {
    ...consulArgs,
    name: groupArg('The group'),
    // No environment variable: a destructive switch is only ever typed.
    force: { type: 'boolean', description: 'Remove it even with members (they fall into no group) and associations (removed with it)', default: false },
  },
  async run({ args }) {
    const name = checkGroupName(args.name)
    const t = await policyTarget(layoutOf(args), args)
    const key = t.layout.group(name)
    const state = forWriting(t.policy, t.layout)
    const item = state.items.find((i) => i.key === key)
    if (!item) throw new UsageError('NO_GROUP', `there is no group ${name}`)
    const associations = associationKeysNaming(state.items, t.layout, name)
    const members = groupMembers(state.read.policy, (await readNodeRecords(t.client, t.layout, t.network)).records).members.get(name) ?? []
    if (!args.force && (members.length || associations.length)) {
      const what = [
        members.length ? `members (${members.join(', ')}), who would fall into no group` : '',
        associations.length ? `associations (${associations.map((k) => k.slice(t.layout.associationsPrefix.length)).join(', ')})` : '',
      ]
      throw new UsageError('GROUP_IN_USE', `group ${name} has ${what.filter(Boolean).join(' and ')}; pass --force to remove it and its associations anyway`)
    }
    if (associations.length + 1 > MAX_TXN_OPS)
      throw new TincConsulError('TOO_MANY_ASSOCIATIONS', `group ${name} has ${associations.length} associations, more than one transaction can remove: dissociate some first`)
    const byKey = new Map(state.items.map((i) => [i.key, i.modifyIndex]))
    const ops: TxnOp[] = [key, ...associations].map((k) => ({ KV: { Verb: 'delete-cas', Key: k, Index: byKey.get(k) ?? 0 } }))
    await policyTxn(t.client, t.layout, ops, `the removal of group ${name}`, 'the group or one of its associations changed meanwhile')
    const left = state.read.policy.groups.filter((g) => g.name !== name).length
    console.log(`removed group ${name}${associations.length ? ` and ${associations.length} association(s)` : ''}${members.length ? `; ${members.join(', ')} now in no group` : ''}`)
    if (left === 0 && state.read.policy.groups.length > 0) console.log('That was the last group: the network is open again, every node reaches every node.')
  },
})

const pairArgs = { ...consulArgs, a: groupArg('One group'), b: groupArg('The other group') } as const

const groupAssociate = defineCommand({
  meta: { name: 'associate', description: 'Let the members of two groups reach each other, both ways (takes an operator token)' },
  args: pairArgs,
  async run({ args }) {
    const key = layoutOf(args).association(args.a, args.b)
    const t = await policyTarget(layoutOf(args), args)
    const state = forWriting(t.policy, t.layout)
    const existing = state.items.find((i) => i.key === key)
    const refused = state.read.refused.find((r) => r.key === key)
    if (existing && !refused) return void console.log(`${args.a} and ${args.b} are associated already`)
    if (existing) throw new UsageError('ASSOCIATION_REFUSED', `${key} exists but is refused (${refused?.reason}); dissociate and associate again`)
    const value = newAssociationValue()
    const refusal = refusalOfNew(state.items, t.layout, t.network, key, value)
    if (refusal) throw new UsageError('ASSOCIATION_REFUSED', `can't associate ${args.a} and ${args.b}: ${refusal}`)
    // Both groups are written back unchanged (same bytes, check-and-set): a `group rm` racing
    // this then fails its delete-cas, instead of leaving an association to a group that is gone.
    const groups = state.items.filter((i) => i.key === t.layout.group(args.a) || i.key === t.layout.group(args.b))
    const touch = groups.map((g): TxnOp => ({ KV: { Verb: 'cas', Key: g.key, Value: Buffer.from(g.value).toString('base64'), Index: g.modifyIndex } }))
    await policyTxn(
      t.client,
      t.layout,
      [{ KV: { Verb: 'cas', Key: key, Value: b64(JSON.stringify(value)), Index: 0 } }, ...touch],
      `the association of ${args.a} and ${args.b}`,
      'one of the groups changed meanwhile',
    )
    console.log(`associated ${args.a} and ${args.b}: their members reach each other`)
  },
})

const groupDissociate = defineCommand({
  meta: { name: 'dissociate', description: 'Undo an association: the members of the two groups no longer reach each other (takes an operator token)' },
  args: pairArgs,
  async run({ args }) {
    const key = layoutOf(args).association(args.a, args.b)
    const t = await networkTarget(layoutOf(args), args)
    const found = (await t.client.kvGetOne(key)).item
    if (!found) throw new UsageError('NOT_ASSOCIATED', `${args.a} and ${args.b} are not associated`)
    await policyTxn(t.client, t.layout, [{ KV: { Verb: 'delete-cas', Key: key, Index: found.modifyIndex } }], `the dissociation of ${args.a} and ${args.b}`, 'the association changed meanwhile')
    console.log(`dissociated ${args.a} and ${args.b}`)
  },
})

export const groupCommand = defineCommand({
  meta: { name: 'group', description: 'Who may talk to whom: groups of VPN addresses and the associations between them (docs/groups.md)' },
  // The same flags as `ls`, so `group --net NET` parses (`NET` is not a subcommand).
  args: groupLs.args,
  subCommands: { add: groupAdd, ls: groupLs, rm: groupRm, associate: groupAssociate, dissociate: groupDissociate, move: groupMove },
  default: 'ls',
})
