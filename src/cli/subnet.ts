import { readFile, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { defineCommand } from 'citty'
import { UsageError } from '../errors.ts'
import { approveRoute, cidrArg, listRoutes, refuseVpnOverlap, unapproveRoute } from '../mesh/approvals.ts'
import { kvLayout } from '../mesh/kv-layout.ts'
import { readOwnRoutes, withOwnRoutes, type OwnRoute } from '../mesh/own-routes.ts'
import { readTincName } from '../mesh/publish.ts'
import { networkMode } from '../mesh/record.ts'
import { MAX_ROUTES, routesOverlap } from '../mesh/routes.ts'
import { isTincName } from '../tinc/names.ts'
import { tincDirFor } from '../tinc/setup.ts'
import { writeFileAtomic } from '../util/atomic.ts'
import { consulArgs, jsonArg, networkTarget, type NetworkTarget } from './common.ts'
import { described, envFlag } from './env.ts'
import { requireNet } from './run.ts'
import { setupArgs } from './setup-args.ts'
import { alignRows } from './table.ts'

const cidrPositional = { type: 'positional', description: 'The subnet, as a CIDR without host bits: 192.168.1.0/24, fd00:1::/64', required: true } as const
const nodeArg = { type: 'positional', description: 'The node that announces it', required: true } as const
const localArgs = { ...consulArgs, dir: setupArgs.dir } as const

const target = (args: { net?: string; prefix?: string; consul: string; token?: string }): Promise<NetworkTarget> => networkTarget(kvLayout(requireNet(args.net), args.prefix || undefined), args)

/** This node's host file and its routes block, for `add` and `rm`. */
async function ownHostFile(args: { net?: string; dir: string }): Promise<{ path: string; text: string; name: string; routes: OwnRoute[] }> {
  const dir = tincDirFor(args.dir, requireNet(args.net))
  const name = await readTincName(dir)
  const path = join(dir, 'hosts', name)
  const text = await readFile(path, 'utf8')
  return { path, text, name, routes: readOwnRoutes(text) }
}

async function writeOwnRoutes(path: string, text: string, routes: OwnRoute[]): Promise<void> {
  await writeFileAtomic(path, withOwnRoutes(text, routes), (await stat(path)).mode & 0o7777)
}

/** The kernel setting a router node needs: we report it, the operator sets it (docs/subnets.md). */
async function forwardingHint(cidr: string): Promise<string> {
  const file = cidr.includes(':') ? '/proc/sys/net/ipv6/conf/all/forwarding' : '/proc/sys/net/ipv4/ip_forward'
  const value = (await readFile(file, 'utf8').catch(() => '')).trim()
  const sysctl = cidr.includes(':') ? 'net.ipv6.conf.all.forwarding=1' : 'net.ipv4.ip_forward=1'
  return value === '0' ? `\nThis node does not forward packets yet: set ${sysctl} (sysctl -w, and in /etc/sysctl.d/ to keep it).` : ''
}

const subnetAdd = defineCommand({
  meta: { name: 'add', description: "Announce a subnet behind this node (its LAN); every node routes it once an operator approves it. Edits this node's own host file" },
  args: {
    ...localArgs,
    cidr: cidrPositional,
    masquerade: {
      type: 'boolean',
      description: described("Masquerade traffic from the VPN to this LAN as this node's LAN address, for LAN hosts with no route back (IPv4)", 'masquerade'),
      default: envFlag('masquerade'),
    },
  },
  async run({ args }) {
    const cidr = cidrArg(args.cidr)
    const { network } = await target(args)
    if (networkMode(network) === 'switch')
      throw new UsageError('SWITCH_MODE', 'this network is in switch mode, where tincd learns MAC addresses and routes no subnets: bridge the LAN into the tap device instead')
    refuseVpnOverlap(cidr, network)
    if (args.masquerade && cidr.includes(':')) throw new UsageError('BAD_FLAG', '--masquerade is for IPv4 LANs only; give IPv6 LAN hosts a route back instead')
    const own = await ownHostFile(args)
    const others = own.routes.filter((r) => r.cidr !== cidr)
    const clash = others.find((r) => routesOverlap(r.cidr, cidr))
    if (clash) throw new UsageError('CIDR_OVERLAPS', `${cidr} overlaps ${clash.cidr}, which this node already announces`)
    if (others.length >= MAX_ROUTES) throw new UsageError('TOO_MANY_ROUTES', `a node announces at most ${MAX_ROUTES} subnets`)
    const routes = own.routes.some((r) => r.cidr === cidr)
      ? own.routes.map((r) => (r.cidr === cidr ? { cidr, masquerade: args.masquerade } : r))
      : [...own.routes, { cidr, masquerade: args.masquerade }]
    await writeOwnRoutes(own.path, own.text, routes)
    console.log(
      `${own.name} announces ${cidr}${args.masquerade ? ' (masqueraded)' : ''}. Nodes route it once an operator runs: tinc-consul subnet approve ${own.name} ${cidr}${await forwardingHint(cidr)}`,
    )
  },
})

const subnetRm = defineCommand({
  meta: { name: 'rm', description: 'Stop announcing a subnet behind this node' },
  args: { ...localArgs, cidr: cidrPositional },
  async run({ args }) {
    const own = await ownHostFile(args)
    if (!own.routes.some((r) => r.cidr === args.cidr))
      throw new UsageError('NO_ROUTE', `${own.name} does not announce ${args.cidr} (it announces ${own.routes.map((r) => r.cidr).join(', ') || 'nothing'})`)
    await writeOwnRoutes(
      own.path,
      own.text,
      own.routes.filter((r) => r.cidr !== args.cidr),
    )
    console.log(`${own.name} no longer announces ${args.cidr}; its approval, if any, stays until \`subnet unapprove\``)
  },
})

const subnetLs = defineCommand({
  meta: { name: 'ls', description: 'List the subnets nodes announce: served, awaiting approval, refused (with the reason), approved but not announced' },
  args: { ...consulArgs, ...jsonArg },
  async run({ args }) {
    const t = await target(args)
    const l = await listRoutes(t.client, t.layout, t.network)
    if (args.json) return void console.log(JSON.stringify({ routes: l.judgement.verdicts, refusedApprovals: l.approvals.refused, unreadable: l.unreadable }, null, 2))
    const rows = [['NODE', 'SUBNET', 'STATE', 'DETAIL'], ...l.judgement.verdicts.map((v) => [v.node, v.cidr, v.state, v.state === 'served' ? `approved ${v.approvedAt ?? ''}` : (v.reason ?? '')])]
    console.log(l.judgement.verdicts.length ? alignRows(rows).join('\n') : 'no subnets announced or approved')
    for (const r of l.approvals.refused) console.log(`refused approval: ${r.key}: ${r.reason}`)
    for (const u of l.unreadable) console.log(`record not usable, its routes are not listed: ${u}`)
  },
})

function nodeName(node: string): string {
  if (!isTincName(node)) throw new UsageError('BAD_NAME', `not a valid tinc node name: ${JSON.stringify(node)}`)
  return node
}

const subnetApprove = defineCommand({
  meta: { name: 'approve', description: "Approve NODE's subnet (takes an operator token): every node routes it, unless it overlaps an older approval" },
  args: { ...consulArgs, node: nodeArg, cidr: cidrPositional },
  async run({ args }) {
    const node = nodeName(args.node)
    const cidr = cidrArg(args.cidr)
    const t = await target(args)
    refuseVpnOverlap(cidr, t.network)
    const made = await approveRoute(t.client, t.layout, node, cidr)
    console.log(made ? `approved ${node}'s ${cidr}; \`tinc-consul subnet ls\` shows whether it is served` : `${node}'s ${cidr} was approved already`)
  },
})

const subnetUnapprove = defineCommand({
  meta: { name: 'unapprove', description: "Withdraw the approval of NODE's subnet (takes an operator token): every node drops its Subnet line and route" },
  args: { ...consulArgs, node: nodeArg, cidr: cidrPositional },
  async run({ args }) {
    const node = nodeName(args.node)
    // Only the spelling is checked: an approval that overlaps the VPN (never served) can still be withdrawn.
    const cidr = cidrArg(args.cidr)
    const t = await target(args)
    await unapproveRoute(t.client, t.layout, node, cidr)
    console.log(`withdrew the approval of ${node}'s ${cidr}`)
  },
})

export const subnetCommand = defineCommand({
  meta: { name: 'subnet', description: 'Subnets behind nodes (home routers): announce, approve, list (docs/subnets.md)' },
  // The same flags as `ls`, so `subnet --net NET` parses (`NET` is not a subcommand).
  args: subnetLs.args,
  subCommands: { add: subnetAdd, rm: subnetRm, ls: subnetLs, approve: subnetApprove, unapprove: subnetUnapprove, revoke: subnetUnapprove },
  default: 'ls',
})
