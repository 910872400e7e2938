import { spawnSync } from 'node:child_process'
import { LabError } from '../errors.ts'
import { run } from '../util/exec.ts'
import { processAlive as alive } from '../util/proc.ts'
import type { LabNodePlan, LabPlan } from './topology.ts'

/** Runs a batch of `ip` commands in one namespace (or the root one) with a single process. */
async function ipBatch(ns: string | undefined, lines: string[]): Promise<void> {
  const argv = ns ? ['ip', '-n', ns, '-batch', '-'] : ['ip', '-batch', '-']
  await run(argv, { input: `${lines.join('\n')}\n` })
}

async function addNamespace(ns: string): Promise<void> {
  await run(['ip', 'netns', 'add', ns])
  await ipBatch(ns, ['link set lo up'])
}

/**
 * A veth pair from the hub's bridge into a namespace. Created inside the hub so
 * nothing ever appears in the root namespace except the single host link.
 */
async function attach(plan: LabPlan, bridge: 'ul' | 'ctl', hubSide: string, ns: string, nsSide: string, cidr: string): Promise<void> {
  await ipBatch(plan.hubNs, [`link add ${hubSide} type veth peer name ${nsSide} netns ${ns}`, `link set ${hubSide} master ${bridge} up`])
  await ipBatch(ns, [`addr add ${cidr} dev ${nsSide}`, `link set ${nsSide} up`])
}

const NAT_RULES = `
table ip tcl_nat {
  chain nat_post { type nat hook postrouting priority srcnat; oifname "up0" masquerade; }
  # Like a home router: an unsolicited packet from outside is dropped before conntrack confirms it,
  # so it leaves no entry behind. Otherwise a peer's first UDP probe, arriving before the node
  # behind NAT sent its own, creates an entry that then shadows the outgoing mapping, and two
  # nodes behind NAT never reach each other directly.
  chain nat_pre { type filter hook prerouting priority mangle; iifname "up0" ct state new drop; }
  # Only replies come back in: nobody outside can open a connection to the node.
  chain nat_fw { type filter hook forward priority filter; policy drop; ct state established,related accept; iifname "lan0" oifname "up0" accept; }
}
`

/** Every node gets an empty "cut" set; lab cut/heal add and remove peers' addresses. */
const CUT_RULES = `
table inet tcl_cut {
  set peers { type ipv4_addr; }
  chain cut_in { type filter hook input priority filter; ip saddr @peers drop; }
  chain cut_out { type filter hook output priority filter; ip daddr @peers drop; }
}
`

async function buildNode(plan: LabPlan, node: LabNodePlan): Promise<void> {
  await addNamespace(node.ns)
  await attach(plan, 'ctl', `c-${node.name}`, node.ns, 'ctl0', `${node.controlIp}/24`)
  if (node.router) {
    const r = node.router
    await addNamespace(r.ns)
    await attach(plan, 'ul', `u-${r.ns.slice(plan.prefix.length + 1)}`, r.ns, 'up0', `${r.uplinkIp}/24`)
    await ipBatch(r.ns, [`link add lan0 type veth peer name ul0 netns ${node.ns}`, `addr add ${r.lanIp}/24 dev lan0`, 'link set lan0 up'])
    await ipBatch(node.ns, [`addr add ${node.underlayIp}/24 dev ul0`, 'link set ul0 up', `route add default via ${r.lanIp}`])
    await run(['sysctl', '-q', '-w', 'net.ipv4.ip_forward=1'], { netns: r.ns })
    await run(['nft', '-f', '-'], { netns: r.ns, input: NAT_RULES })
  } else {
    await attach(plan, 'ul', `u-${node.name}`, node.ns, 'ul0', `${node.underlayIp}/24`)
  }
  await run(['nft', '-f', '-'], { netns: node.ns, input: CUT_RULES })
}

/** Creates every namespace, bridge and link in the plan. On failure the caller tears down by prefix. */
export async function buildNetwork(plan: LabPlan): Promise<void> {
  await addNamespace(plan.hubNs)
  await ipBatch(plan.hubNs, ['link add ul type bridge', 'link set ul up', 'link add ctl type bridge', 'link set ctl up'])
  // The one link into the root namespace, so tests and `lab` commands reach every Consul agent's HTTP port.
  await ipBatch(undefined, [`link add ${plan.hostIf} type veth peer name host netns ${plan.hubNs}`, `addr add ${plan.hostIp}/24 dev ${plan.hostIf}`, `link set ${plan.hostIf} up`])
  await ipBatch(plan.hubNs, ['link set host master ctl up'])
  for (const s of plan.servers) {
    await addNamespace(s.ns)
    await attach(plan, 'ctl', `c-${s.name}`, s.ns, 'ctl0', `${s.controlIp}/24`)
  }
  for (const node of plan.nodes) await buildNode(plan, node)
}

export interface LabLan {
  /** The LAN's name for lab.exec ("lan1"), and its namespace, named with the lab's prefix so teardown removes it. */
  name: string
  ns: string
  cidr: string
  /** The node's address on the LAN (the LAN's router) and the one host's. */
  routerIp: string
  hostIp: string
}

/**
 * A LAN behind a node, as behind a home router: a namespace holding one host, linked to the node
 * by a veth pair. With `routeBack` the host routes the VPN range through the node; without it,
 * it knows only its own LAN (a host that can't be configured), so the node must masquerade.
 */
export async function addLan(plan: LabPlan, node: LabNodePlan, index: number, cidr: string, opts: { routeBack: boolean }): Promise<LabLan> {
  const m = /^(\d+\.\d+\.\d+)\.0\/(\d+)$/.exec(cidr)
  if (!m) throw new LabError('LAB_LAN', `a lab LAN is an x.y.z.0/N, got ${cidr}`)
  const lan: LabLan = { name: `lan${index}`, ns: `${plan.prefix}-lan${index}`, cidr, routerIp: `${m[1]}.1`, hostIp: `${m[1]}.2` }
  await addNamespace(lan.ns)
  await ipBatch(node.ns, [`link add ${lan.name} type veth peer name eth0 netns ${lan.ns}`, `addr add ${lan.routerIp}/${m[2]} dev ${lan.name}`, `link set ${lan.name} up`])
  await ipBatch(lan.ns, [`addr add ${lan.hostIp}/${m[2]} dev eth0`, 'link set eth0 up', ...(opts.routeBack ? [`route add ${plan.options.vpnCidr} via ${lan.routerIp}`] : [])])
  return lan
}

/** Drops (or restores) underlay traffic between two nodes, in both directions. */
export async function setCut(a: LabNodePlan, b: LabNodePlan, cut: boolean): Promise<void> {
  if (a.name === b.name) throw new LabError('LAB_CUT_SELF', 'cannot cut a node from itself')
  for (const [self, peer] of [
    [a, b],
    [b, a],
  ] as const) {
    const r = await run(['nft', cut ? 'add' : 'delete', 'element', 'inet', 'tcl_cut', 'peers', `{ ${peer.publicIp} }`], { netns: self.ns, allowFailure: true })
    if (r.code !== 0 && cut) throw new LabError('LAB_CUT', `cannot cut ${self.name} from ${peer.name}: ${r.stderr.trim()}`)
    // Deleting an absent element fails; healing a pair that was never cut is not an error.
  }
}

/**
 * Deletes lab host links in the root namespace. Deleting the hub namespace
 * removes them too, but the kernel does that asynchronously, and a test (or the
 * next lab) checks right away.
 */
export function deleteHostLinksSync(match: RegExp): void {
  const r = spawnSync('ip', ['-o', 'link', 'show'], { encoding: 'utf8' })
  for (const line of r.stdout.split('\n')) {
    const name = /^\d+: ([^:@]+)/.exec(line)?.[1]
    if (name && match.test(name)) spawnSync('ip', ['link', 'del', name])
  }
}

export function listNamespaces(): string[] {
  const r = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' })
  if (r.status !== 0) return []
  return r.stdout
    .split('\n')
    .map((l) => l.split(' ')[0] ?? '')
    .filter(Boolean)
}

export function pidsIn(ns: string): number[] {
  const r = spawnSync('ip', ['netns', 'pids', ns], { encoding: 'utf8' })
  return r.stdout
    .split('\n')
    .map((l) => Number(l.trim()))
    .filter((n) => Number.isInteger(n) && n > 0)
}

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms)
}

/**
 * Stops every process in the given namespaces and deletes them. Synchronous on
 * purpose: it must also work from a signal or exit handler, where the event loop
 * may not run again. Extra pids (recorded at spawn) are killed too, in case one
 * left its namespace.
 */
/**
 * Stops every process in the given namespaces (plus extra pids): SIGTERM, a
 * grace period, then SIGKILL. Synchronous so it also works from exit handlers.
 */
export function killNamespaceProcessesSync(namespaces: string[], extraPids: number[] = [], graceMs = 5000): void {
  const signal = (sig: NodeJS.Signals) => {
    const pids = new Set([...namespaces.flatMap(pidsIn), ...extraPids.filter(alive)])
    for (const pid of pids) {
      try {
        process.kill(pid, sig)
      } catch {
        /* already gone */
      }
    }
    return pids
  }
  let pids = signal('SIGTERM')
  const deadline = Date.now() + graceMs
  while ([...pids].some(alive) && Date.now() < deadline) sleepSync(50)
  pids = new Set([...pids].filter(alive))
  if (pids.size > 0) {
    signal('SIGKILL')
    const hard = Date.now() + 2000
    while ([...pids].some(alive) && Date.now() < hard) sleepSync(20)
  }
}

/**
 * Stops every process in the given namespaces and deletes them. Synchronous on
 * purpose: it must also work from a signal or exit handler, where the event loop
 * may not run again. Extra pids (recorded at spawn) are killed too, in case one
 * left its namespace.
 */
export function teardownNamespacesSync(namespaces: string[], extraPids: number[] = [], graceMs = 5000): string[] {
  const problems: string[] = []
  killNamespaceProcessesSync(namespaces, extraPids, graceMs)
  for (const ns of namespaces) {
    const r = spawnSync('ip', ['netns', 'del', ns], { encoding: 'utf8' })
    if (r.status !== 0 && listNamespaces().includes(ns)) problems.push(`ip netns del ${ns}: ${r.stderr.trim()}`)
  }
  return problems
}
