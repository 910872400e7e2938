import { defineCommand } from 'citty'
import { UsageError } from '../errors.ts'
import { checkGroupName, kvLayout } from '../mesh/kv-layout.ts'
import { readNodeRecord, releaseOld, reserveMove, waitMoved, type MovePlan } from '../mesh/move.ts'
import { groupIn } from '../mesh/network.ts'
import { isTincName } from '../tinc/names.ts'
import { consulArgs, groupArg, policyTarget } from './common.ts'
import { described, envDefault } from './env.ts'
import { parseIntFlag } from './parse.ts'
import { requireNet } from './run.ts'

/** How long `group move` waits for the node to take its new address, by default. */
const DEFAULT_WAIT_SECONDS = 60

const addresses = (a: string, b: string | undefined) => (b === undefined ? a : `${a} and ${b}`)

/**
 * `tinc-consul group move NODE GROUP` (docs/groups.md): gives a node an address in another group.
 * It takes an operator token (ipam/ is written by operators and join servers only).
 */
export const groupMove = defineCommand({
  meta: {
    name: 'move',
    description:
      "Move a node to another group: reserve it an address in the group's range; the node's sidecar renumbers itself (host file, tinc-up, interface, tincd) and the old address is released once it has (takes an operator token)",
  },
  args: {
    ...consulArgs,
    node: { type: 'positional', description: 'The node to move (its tinc name)', required: true },
    group: groupArg('The group to move it into'),
    wait: {
      type: 'string',
      description: described('Seconds to wait for the node to take its new address (0: reserve it and return; a later run releases the old one)', 'move-wait'),
      get default() {
        return envDefault('move-wait', String(DEFAULT_WAIT_SECONDS))
      },
    },
  },
  async run({ args }) {
    if (!isTincName(args.node)) throw new UsageError('BAD_NAME', `not a valid tinc node name: ${JSON.stringify(args.node)}`)
    const groupName = checkGroupName(args.group)
    const waitMs = parseIntFlag('wait', args.wait, 0, 3600) * 1000
    const { layout, client, network, policy: state } = await policyTarget(kvLayout(requireNet(args.net), args.prefix || undefined), args)
    const group = groupIn(state, layout, groupName)
    const policy = state.read.policy
    const record = await readNodeRecord(client, layout, network, args.node)
    const plan = await reserveMove(client, layout, policy, group, record)
    console.log(describePlan(plan))
    const started = Date.now()
    const moved = plan.already ? record : waitMs > 0 ? await waitMoved(client, layout, network, plan, waitMs) : undefined
    if (!moved) {
      console.log(
        `${plan.node} has not taken ${addresses(plan.to, plan.to6)} yet${waitMs > 0 ? ` (waited ${waitMs / 1000} s)` : ''}: its sidecar renumbers it when it next reads Consul. ${addresses(plan.from, plan.from6)} stays ${plan.node}'s until then; run this command again afterwards to release it.`,
      )
      return
    }
    if (!plan.already) console.log(`${plan.node} now has ${addresses(moved.vpnAddress, moved.vpnAddress6)} (${((Date.now() - started) / 1000).toFixed(1)} s)`)
    const released = await releaseOld(client, layout, moved)
    if (released.length) console.log(`released ${released.join(', ')}`)
  },
})

function describePlan(p: MovePlan): string {
  if (p.already) return `${p.node} is in group ${p.group} already, with ${addresses(p.from, p.from6)}`
  const from = `${p.fromGroup ? `group ${p.fromGroup}` : 'no group'} (${addresses(p.from, p.from6)})`
  return `moving ${p.node} from ${from} to group ${p.group}: reserved ${addresses(p.to, p.to6 === p.from6 ? undefined : p.to6)} for it; its sidecar renumbers it`
}
