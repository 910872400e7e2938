/* eslint-disable no-console -- the demo's job is to print the story */
import type { AccessPolicy, Group } from '../mesh/access-policy.ts'
import { intToIp, ipToInt } from '../mesh/ipam.ts'
import { kvLayout } from '../mesh/kv-layout.ts'
import { LAB_NETNAME, type Lab } from './lab.ts'
import { newPaths, policyExpectation, startListeners, takeMatrix, waitApplied, watchOpening, type MatrixNode } from './reach-matrix.ts'
import { labConfigDir } from './tinc-manual.ts'

/** The port of the listeners the matrix connects to. */
const PORT = 7000
/** How long the demo waits for the association's new paths to open. */
const OPEN_WITHIN_MS = 60_000

interface PlannedGroup extends Group {
  members: MatrixNode[]
}

interface DemoPrinter {
  show(node: string, argv: string[]): void
  indent(text: string): void
}

/** An aligned block of IPv4 addresses: `bits` is its prefix length. */
interface Block {
  base: number
  bits: number
}

const sizeOf = (bits: number) => 2 ** (32 - bits)
const holds = (b: Block, ip: number) => ip >= b.base && ip < b.base + sizeOf(b.bits)
const overlap = (a: Block, b: Block) => a.base < b.base + sizeOf(b.bits) && b.base < a.base + sizeOf(a.bits)
const blockAt = (ip: number, bits: number): Block => ({ base: Math.floor(ip / sizeOf(bits)) * sizeOf(bits), bits })

/** The smallest aligned block holding every address. */
function enclosing(ips: number[]): Block {
  const lo = Math.min(...ips)
  const hi = Math.max(...ips)
  let bits = 32
  while (bits > 0 && !holds(blockAt(lo, bits), hi)) bits--
  return blockAt(lo, bits)
}

/**
 * CIDRs for groups of nodes, each holding its members' addresses and no other node's: the
 * smallest block around the members, then widened, while it stays inside the network and clear of
 * every other node and group, to leave room for new members. Undefined when a group can't fit.
 */
function fitCidrs(all: readonly MatrixNode[], groups: MatrixNode[][], network: string): string[] | undefined {
  const [netAddr, netBitsText] = network.split('/')
  const net = blockAt(ipToInt(netAddr ?? ''), Number(netBitsText))
  const ips = (ns: readonly MatrixNode[]) => ns.map((n) => ipToInt(n.address))
  const clear = (b: Block, members: MatrixNode[]) => all.every((n) => members.includes(n) || !holds(b, ipToInt(n.address)))
  const blocks = groups.map((g) => enclosing(ips(g)))
  if (!blocks.every((b, i) => b.bits >= net.bits && holds(net, b.base) && clear(b, groups[i] ?? []))) return undefined
  for (const [i, g] of groups.entries()) {
    for (;;) {
      const b = blocks[i]
      const wider = b && b.bits > net.bits ? blockAt(b.base, b.bits - 1) : undefined
      if (!wider || !clear(wider, g) || blocks.some((o, j) => j !== i && overlap(o, wider))) break
      blocks[i] = wider
    }
  }
  return blocks.map((b) => `${intToIp(b.base)}/${b.bits}`)
}

/**
 * The demo's groups, from the addresses the joins gave out: infra (--infra) holding the first
 * node, and eng and ops holding runs of the others by address, as many nodes as CIDRs allow, as
 * evenly as they allow. Nodes left over are in no group.
 */
export function planGroups(nodes: readonly MatrixNode[], network: string): PlannedGroup[] | undefined {
  const [first, ...others] = nodes
  if (!first || others.length < 2 || !nodes.every((n) => /^\d+\.\d+\.\d+\.\d+$/.test(n.address))) return undefined
  const rest = [...others].sort((a, b) => ipToInt(a.address) - ipToInt(b.address))
  let best: { members: MatrixNode[][]; cidrs: string[]; score: number } | undefined
  for (let k = 1; k < rest.length; k++) {
    for (let j = 1; k + j <= rest.length; j++) {
      // More nodes in groups first, then groups of more even size.
      const score = (k + j) * 100 - Math.abs(k - j)
      if (best && score <= best.score) continue
      const members = [[first], rest.slice(0, k), rest.slice(k, k + j)]
      const cidrs = fitCidrs(nodes, members, network)
      if (cidrs) best = { members, cidrs, score }
    }
  }
  if (!best) return undefined
  const { members, cidrs } = best
  return ['infra', 'eng', 'ops'].map((name, i) => ({ name, cidr: cidrs[i] ?? '', infra: i === 0, members: members[i] ?? [] }))
}

/** `group add` for each planned group, as an operator on `at`; a group whose members aren't the planned ones is a failure. */
async function addGroups(lab: Lab, at: string, planned: PlannedGroup[], out: DemoPrinter): Promise<number> {
  const env = { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' }
  const flags = ['--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, at)]
  let failures = 0
  for (const g of planned) {
    const argv = ['group', 'add', g.name, '--cidr', g.cidr, ...(g.infra ? ['--infra'] : [])]
    out.show(at, argv)
    const r = await lab.cli(at, [...argv, ...flags], { env, allowFailure: true })
    out.indent(r.code === 0 ? r.stdout : `FAILED: ${r.stderr.trim()}`)
    const members = /with \d+ member\(s\)(?:: (.*))?$/m.exec(r.stdout)?.[1] ?? ''
    const want = g.members.map((n) => n.name).join(', ')
    if (members !== want) {
      console.log(`    MISMATCH: ${g.name} should hold ${want} by the addresses the joins gave out`)
      failures++
    }
  }
  out.show(at, ['group', 'ls'])
  const ls = await lab.cli(at, ['group', 'ls', ...flags], { env, allowFailure: true })
  out.indent(ls.code === 0 ? ls.stdout : `FAILED: ${ls.stderr.trim()}`)
  return failures + (ls.code === 0 ? 0 : 1)
}

/** Takes and prints the matrix under `policy`; returns the number of cells that differ from mayReach(). */
async function matrixStep(lab: Lab, nodes: readonly MatrixNode[], title: string, policy: AccessPolicy): Promise<number> {
  const { lines, diffs } = await takeMatrix(lab, nodes, policy, title, PORT)
  console.log()
  for (const line of lines) console.log(`  ${line}`)
  const cells = nodes.length * (nodes.length - 1)
  console.log(
    diffs.length === 0
      ? `  all ${cells} ordered pairs, TCP and ICMP alike, are what mayReach() says (✗ would mark a cell that isn't)`
      : `  MISMATCH with mayReach():\n${diffs.map((d) => `    ${d}`).join('\n')}`,
  )
  return diffs.length
}

/** Waits for every node's status to show `policy` applied; a node that never does is a failure (printed). */
async function applied(lab: Lab, nodes: readonly MatrixNode[], policy: AccessPolicy, what: string): Promise<number> {
  try {
    await waitApplied(lab, nodes, policy, what)
    return 0
  } catch (err) {
    console.log(`  FAILED: ${err instanceof Error ? err.message : String(err)}`)
    return 1
  }
}

/**
 * `group associate` with watchers on every path it should open; prints when each opened, measured
 * from the start of the command, and returns the number of paths that never did.
 */
async function associateTimed(lab: Lab, at: string, nodes: readonly MatrixNode[], before: AccessPolicy, after: AccessPolicy, out: DemoPrinter): Promise<number> {
  const [a, b] = after.associations[0] ?? ['', '']
  const paths = newPaths(nodes, policyExpectation(before), policyExpectation(after))
  const watch = await watchOpening(lab, paths, PORT, OPEN_WITHIN_MS)
  const env = { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' }
  const argv = ['group', 'associate', a, b]
  out.show(at, argv)
  const t0 = Date.now()
  const r = await lab.cli(at, [...argv, '--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, at)], { env, allowFailure: true })
  const cliDone = Date.now()
  out.indent(r.code === 0 ? r.stdout : `FAILED: ${r.stderr.trim()}`)
  const opened = await watch.opened()
  const failures = (r.code === 0 ? 0 : 1) + (await applied(lab, nodes, after, `the association ${a}+${b}`))
  const appliedBy = Date.now()
  // The association's value carries the moment the command made it, just before its write to Consul.
  const stored = await lab.consul(at).kvGet(kvLayout(LAB_NETNAME).association(a, b))
  const written = Date.parse((JSON.parse(stored?.value ?? '{}') as { at?: string }).at ?? '')
  const times = [...opened].map(([path, when]) => ({ path, when }))
  const never = times.filter((t) => t.when === undefined).map((t) => t.path)
  const last = Math.max(...times.map((t) => t.when ?? Number.NaN))
  const since = (ms: number) => `${ms - written} ms`
  console.log(
    `\nassociate → new paths open: ${never.length ? `NEVER for ${never.join(', ')} within ${OPEN_WITHIN_MS / 1000} s` : `${since(last)} from the association's write to Consul to the last of its ${times.length} new paths opening`} (the command took ${cliDone - t0} ms in all, ${written - t0} ms of it before the write, mostly starting up)`,
  )
  console.log(`  per path, after the write: ${times.map((t) => `${t.path} ${t.when === undefined ? 'never' : since(t.when)}`).join(', ')}`)
  console.log(
    `  (TCP from each node, a connection every 50 ms; a path's time is the start of its first connection that worked; asked once the paths were open, every node's status showed the association applied ${since(appliedBy)} after the write)`,
  )
  return failures + never.length
}

/**
 * Issue 20's story, on the nodes the joins made: an operator makes an infrastructure group around
 * the first node and two groups of the others, with ranges computed from their addresses; the
 * reachability matrix (TCP and ICMP, every ordered pair) before and after `group associate`,
 * against mayReach(), and how long the association takes to open the new paths. Returns the failures.
 */
export async function groupsDemo(lab: Lab, joined: readonly MatrixNode[], out: DemoPrinter): Promise<number> {
  const nodes = joined.map(({ name, address }) => ({ name, address }))
  const planned = planGroups(nodes, lab.state.plan.options.vpnCidr)
  const at = nodes[0]?.name
  if (!planned || !at) {
    console.log(`\ngroups: FAILED: no three groups fit the addresses ${nodes.map((n) => `${n.name} ${n.address}`).join(', ')} (the demo needs at least three nodes)`)
    return 1
  }
  const [infra, eng, ops] = planned
  console.log(`\ngroups: who may talk to whom. Ranges fitted to the addresses the joins gave out:`)
  for (const g of planned)
    console.log(`  ${g.name.padEnd(6)} ${g.cidr.padEnd(16)} ${g.members.map((n) => `${n.name} (${n.address})`).join(', ')}${g.infra ? '   infrastructure: reaches and is reached by every node' : ''}`)
  const ungrouped = nodes.filter((n) => !planned.some((g) => g.members.includes(n)))
  if (ungrouped.length) console.log(`  (none) ${''.padEnd(16)} ${ungrouped.map((n) => `${n.name} (${n.address})`).join(', ')}   in no group: reaches only infrastructure`)
  console.log(`Every node gets a listener on its VPN address, port ${PORT}, for the matrix.`)
  await startListeners(lab, nodes, PORT)
  let failures = await addGroups(lab, at, planned, out)
  const groups = planned.map(({ name, cidr, infra }) => ({ name, cidr, infra }))
  const grouped: AccessPolicy = { groups, associations: [] }
  const pair = [eng?.name ?? '', ops?.name ?? ''].sort() as [string, string]
  const associated: AccessPolicy = { groups, associations: [pair] }
  failures += await applied(lab, nodes, grouped, 'the groups')
  failures += await matrixStep(
    lab,
    nodes,
    `groups ${planned.map((g) => g.name).join('/')}, no association (${infra?.name} reaches everyone; ${eng?.name} and ${ops?.name} only themselves and ${infra?.name})`,
    grouped,
  )
  failures += await associateTimed(lab, at, nodes, grouped, associated, out)
  failures += await matrixStep(lab, nodes, `after \`group associate ${pair.join(' ')}\``, associated)
  return failures
}
