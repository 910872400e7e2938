import { UsageError } from '../errors.ts'

/**
 * The lab's addressing plan, as a pure function of its options so it can be
 * tested without root. All underlay and control addresses sit in 198.18.0.0/15,
 * the range set aside for network benchmarks (RFC 2544), inside namespaces this
 * lab creates; nothing here routes to the machine's real networks.
 *
 *   hub namespace: bridge "ul"  (underlay, 198.18.0.0/24: public nodes .1-.99, NAT routers .101-.199)
 *                  bridge "ctl" (control,  198.19.0.0/24: nodes .1-.99, Consul servers .201-.205, host .254)
 *   NAT LAN j:     198.18.j.0/24, router .1, node .2
 *   VPN:           10.99.0.0/24 by default, node i at .i (only inside the nodes' tun devices)
 *
 * Consul's gossip needs two-way reachability, so agents talk over the control
 * bridge, which stands for the path Consul takes in production (the VPN, or a
 * private network between servers). NAT applies to the tinc underlay only.
 */
export interface LabOptions {
  nodes: number
  nat: number
  /** 0: the lab runs no Consul at all (a test starts agents from install's configs, on the VPN). */
  consulServers: 0 | 1 | 3
  acl: boolean
  /** Write hand-made tinc configs and start tincd on every node. */
  tinc: boolean
  /** Which host files each node starts with: every node's (as if copied by hand), or only its own plus node1's (the seed). */
  hostFiles: 'all' | 'seed'
  vpnCidr: string
}

export const DEFAULT_LAB_OPTIONS: LabOptions = { nodes: 3, nat: 1, consulServers: 1, acl: false, tinc: true, hostFiles: 'all', vpnCidr: '10.99.0.0/24' }

export interface LabNodePlan {
  name: string
  ns: string
  behindNat: boolean
  /** Address on its own underlay interface (public address, or NAT-LAN address). */
  underlayIp: string
  /** What other nodes see as this node's source address on the underlay. */
  publicIp: string
  controlIp: string
  vpnIp: string
  router?: { ns: string; uplinkIp: string; lanIp: string }
}

export interface LabServerPlan {
  name: string
  ns: string
  controlIp: string
}

export interface LabPlan {
  id: string
  prefix: string
  hubNs: string
  hostIf: string
  hostIp: string
  options: LabOptions
  nodes: LabNodePlan[]
  servers: LabServerPlan[]
}

export const NS_PREFIX = 'tcl'
const ID_RE = /^[0-9a-f]{4,8}$/

export function validateLabOptions(o: LabOptions): void {
  if (!Number.isInteger(o.nodes) || o.nodes < 1 || o.nodes > 20) throw new UsageError('LAB_OPTIONS', `--nodes must be 1-20, got ${o.nodes}`)
  if (!Number.isInteger(o.nat) || o.nat < 0 || o.nat >= o.nodes) {
    throw new UsageError('LAB_OPTIONS', `--nat must be 0-${o.nodes - 1} (at least one node must be public so others can reach it), got ${o.nat}`)
  }
  if (![0, 1, 3].includes(o.consulServers)) throw new UsageError('LAB_OPTIONS', `--consul-servers must be 0, 1 or 3, got ${String(o.consulServers)}`)
  if (o.consulServers === 0 && o.acl) throw new UsageError('LAB_OPTIONS', "ACLs need the lab's Consul servers: --acl with --consul-servers 0")
  const m = /^10\.(\d{1,3})\.(\d{1,3})\.0\/24$/.exec(o.vpnCidr)
  if (!m || Number(m[1]) > 255 || Number(m[2]) > 255) throw new UsageError('LAB_OPTIONS', `the lab's VPN CIDR must be a 10.x.y.0/24, got ${o.vpnCidr}`)
}

export function planLab(id: string, options: LabOptions): LabPlan {
  if (!ID_RE.test(id)) throw new UsageError('LAB_ID', `lab id must be 4-8 hex digits, got ${id}`)
  validateLabOptions(options)
  const prefix = `${NS_PREFIX}${id}`
  const vpnBase = options.vpnCidr.replace(/\.0\/24$/, '')
  const publicCount = options.nodes - options.nat
  const nodes: LabNodePlan[] = []
  for (let i = 1; i <= options.nodes; i++) {
    const name = `node${i}`
    const natIndex = i - publicCount
    const behindNat = natIndex >= 1
    const base = { name, ns: `${prefix}-${name}`, behindNat, controlIp: `198.19.0.${i}`, vpnIp: `${vpnBase}.${i}` }
    if (behindNat) {
      const router = { ns: `${prefix}-nat${natIndex}`, uplinkIp: `198.18.0.${100 + natIndex}`, lanIp: `198.18.${natIndex}.1` }
      nodes.push({ ...base, underlayIp: `198.18.${natIndex}.2`, publicIp: router.uplinkIp, router })
    } else {
      nodes.push({ ...base, underlayIp: `198.18.0.${i}`, publicIp: `198.18.0.${i}` })
    }
  }
  const servers: LabServerPlan[] = []
  for (let s = 1; s <= options.consulServers; s++) servers.push({ name: `consul${s}`, ns: `${prefix}-cs${s}`, controlIp: `198.19.0.${200 + s}` })
  return { id, prefix, hubNs: `${prefix}-hub`, hostIf: `${prefix}-h`, hostIp: '198.19.0.254', options, nodes, servers }
}

export function findNode(plan: LabPlan, name: string): LabNodePlan {
  const node = plan.nodes.find((n) => n.name === name)
  if (!node) throw new UsageError('LAB_NO_NODE', `no node "${name}" in lab ${plan.id}; nodes: ${plan.nodes.map((n) => n.name).join(', ')}`)
  return node
}

/** Every namespace the plan creates; teardown deletes exactly these (plus any stragglers with the prefix). */
export function namespacesOf(plan: LabPlan): string[] {
  return [plan.hubNs, ...plan.servers.map((s) => s.ns), ...plan.nodes.flatMap((n) => (n.router ? [n.router.ns, n.ns] : [n.ns]))]
}
