import type { AccessStatus } from '../mesh/daemon/access-follow.ts'
import type { DnsStats } from '../dns/server.ts'
import type { MeshService, ServiceRefusal } from '../mesh/services.ts'
import type { LocalLimits } from '../services/registrar.ts'
import type { ConsulHealth, NameConflict, SyncStats } from '../mesh/sync.ts'
import type { MeshView } from '../mesh/view.ts'
import { networkMode } from '../mesh/record.ts'
import type { TincMode } from '../tinc/mode.ts'
import type { DumpResult, TincDump } from '../tinc/dump.ts'
import type { PeerLink } from '../tinc/events.ts'
import type { RouteVerdict } from '../mesh/routes.ts'
import type { ConnectToPlan } from '../mesh/connect-to.ts'

/**
 * One picture of the mesh from this node, built from what the daemon already
 * holds (the view, the hook events, Consul's health) and what tincd says in its
 * dumps. Pure: the collector gathers the inputs, the endpoints only format this.
 */
export interface InterfaceCounters {
  rxBytes: number
  txBytes: number
  rxPackets: number
  txPackets: number
}

export interface StatusInputs {
  net: string
  self: string
  iface: string
  view?: MeshView
  /** The Mode this node's tinc.conf sets (what tincd runs once started with it), lower-cased. */
  tincConfMode?: string
  links: ReadonlyMap<string, PeerLink>
  tinc: DumpResult
  counters?: InterfaceCounters
  consul: ConsulHealth
  refusals: ReadonlyMap<string, string>
  sync: SyncStats
  dns?: DnsStats & { byHelpers: number; tcpOpen?: number; tcpRefused?: number }
  services: MeshService[]
  /** Service instances refused right now (not on a mesh node, wrong address, over the per-node cap). */
  servicesRefused?: readonly ServiceRefusal[]
  /** This node's registrar: its cap, and its definitions not registered. */
  localServices?: LocalLimits
  allocations: ReadonlyMap<string, string>
  /** Another writer keeps rewriting our record (a cloned machine). */
  conflict?: NameConflict
  /** Records listed in Consul that can't be judged yet (unreadable); their files are kept. */
  pending?: readonly string[]
  /** Routes behind nodes as last judged (src/mesh/routes.ts), and approvals that could not be read. */
  routes?: { verdicts: readonly RouteVerdict[]; refusedApprovals: ReadonlyArray<{ key: string; reason: string }> }
  /** The kernel's forwarding switches, read only when this node announces routes: "0" is a warning. */
  forwarding?: { ipv4?: string; ipv6?: string }
  /** The ConnectTo keeper's plan (src/mesh/connect-to.ts); absent when every public peer is kept. */
  connectTo?: Pick<ConnectToPlan, 'connectTo' | 'benched' | 'unknownPins'>
  /** The access policy on this node (src/mesh/daemon/access-follow.ts). */
  access?: AccessStatus
  now: Date
}

export type PathKind = 'self' | 'direct' | 'relayed' | 'unreachable' | 'unknown'

export interface NodeStatus {
  name: string
  /** VPN address, from the mesh view. */
  address?: string
  /** IPv6 VPN address, in networks with an IPv6 range (the node's record has one). */
  address6?: string
  public?: boolean
  /** Where tincd reaches it on the underlay, from the dump or the last host-up. */
  remote?: string
  reachable?: boolean
  path: PathKind
  /** The node packets go through when relayed. */
  via?: string
  /** The next hop of the meta connection. */
  nexthop?: string
  /** Last host-up/host-down seen through the hooks. */
  lastChange?: string
  /** Known to tincd but not in the view (an old host file), or the other way round. */
  inView: boolean
  inTinc: boolean
  /** The access policy keeps this node and us apart: DNS doesn't answer its name (docs/groups.md). */
  hidden?: true
}

export interface Status {
  at: string
  node: {
    name: string
    net: string
    interface: string
    address?: string
    address6?: string
    public?: boolean
    nameConflict?: NameConflict
    /** The network's tinc mode, from its record (known once the view is). */
    mode?: TincMode
    /** tinc.conf's Mode, only when it differs from the network's: this node can't talk to the rest. */
    tincConfMode?: string
    /** This node announces routes but the kernel doesn't forward: LAN hosts are unreachable from the mesh. */
    forwardingOff?: string
  }
  tincd: { state: DumpResult['state']; pid?: number; reason?: string; skippedLines: number }
  bytes: { in?: number; out?: number; source: 'tincd' | 'interface' | 'none' }
  interface?: InterfaceCounters
  nodes: NodeStatus[]
  edges: NonNullable<TincDump['edges']>
  subnets: NonNullable<TincDump['subnets']>
  connections: NonNullable<TincDump['connections']>
  consul: {
    reachable: boolean
    lastSyncAt?: string
    index: number
    failures: number
    refusedTotal: number
    refused: Array<{ key: string; reason: string }>
    pending: string[]
    servicesRefusedTotal: number
    /** Other nodes' service instances refused right now, each with the reason. */
    servicesRefused: ServiceRefusal[]
    emptyReadsIgnored: number
    /** Body bytes read from Consul since the daemon started. */
    bytesRead: number
    /** Reads of every record (start, and changes the change log could not explain), and the latest reason. */
    fullReads: number
    lastFullReadReason?: string
  }
  dns?: DnsStats & { byHelpers: number; tcpOpen?: number; tcpRefused?: number }
  services: MeshService[]
  /** This node's own services: the cap (--max-services), how many are registered, and the files refused. */
  localServices?: LocalLimits
  allocations: Array<{ address: string; node: string }>
  /** Subnets behind nodes: served, awaiting approval, refused (with the reason), approved but not announced. */
  routes: RouteVerdict[]
  /** Approvals under subnet-approvals/ that could not be used, with the reason. */
  refusedApprovals: Array<{ key: string; reason: string }>
  /** The public nodes this node keeps a ConnectTo to, those sitting out after going silent, and pins with no host file. */
  connectTo?: { chosen: string[]; benched: Array<{ name: string; until: string; strikes: number }>; unknownPins: string[] }
  /** Groups and associations as this node applies them: its group, the names hidden from it, the table's state. */
  access?: AccessStatus
}

/**
 * How packets reach a node, by tinc 1.0's rules: `via` is where UDP packets go (another node
 * when the path needs IndirectData), and until a UDP probe has come back (`min` PMTU 0) tinc
 * sends over the meta connection, i.e. through `nexthop`. Returns the relay, if any.
 */
function routeOf(name: string, d: { via?: string; nexthop?: string; minPmtu?: number } | undefined): string | undefined {
  const via = d?.via && d.via !== '-' ? d.via : undefined
  if (via && via !== name) return via
  const hop = d?.nexthop && d.nexthop !== '-' ? d.nexthop : undefined
  if (d?.minPmtu === 0 && hop && hop !== name) return hop
  return undefined
}

function pathOf(name: string, self: string, reachable: boolean | undefined, relay: string | undefined): PathKind {
  if (name === self) return 'self'
  if (reachable === false) return 'unreachable'
  if (reachable === undefined) return 'unknown'
  return relay ? 'relayed' : 'direct'
}

/** The network's mode, and tinc.conf's when the two disagree (a node set up by hand or by an older release). */
function modeOf(i: StatusInputs): Pick<Status['node'], 'mode' | 'tincConfMode'> {
  if (!i.view) return {}
  const mode = networkMode(i.view.network)
  return { mode, ...(i.tincConfMode !== undefined && i.tincConfMode !== mode ? { tincConfMode: i.tincConfMode } : {}) }
}

/** A warning when this node announces routes of a family its kernel doesn't forward (docs/subnets.md: the operator sets it). */
function forwardingOf(i: StatusInputs): Pick<Status['node'], 'forwardingOff'> {
  const own = (i.routes?.verdicts ?? []).filter((v) => v.node === i.self && v.state !== 'unannounced')
  const off = [
    ...(i.forwarding?.ipv4 === '0' && own.some((v) => !v.cidr.includes(':')) ? ['net.ipv4.ip_forward'] : []),
    ...(i.forwarding?.ipv6 === '0' && own.some((v) => v.cidr.includes(':')) ? ['net.ipv6.conf.all.forwarding'] : []),
  ]
  return off.length ? { forwardingOff: `this node announces subnets but ${off.join(' and ')} is 0: set it to 1, or the mesh can't reach its LAN` } : {}
}

export function buildStatus(i: StatusInputs): Status {
  const dump = i.tinc.dump
  const dumped = new Map((i.tinc.state === 'up' ? (dump?.nodes ?? []) : []).map((n) => [n.name, n]))
  const names = new Set([...(i.view ? i.view.peers.keys() : []), ...dumped.keys(), ...i.links.keys(), i.self])
  const hidden = new Set(i.access?.hidden ?? [])
  const nodes: NodeStatus[] = [...names].sort().map((name) => {
    const rec = i.view?.peers.get(name)?.record
    const d = dumped.get(name)
    const link = i.links.get(name)
    // The dump is tincd's own word and the freshest; the hooks cover a tincd we couldn't ask.
    const reachable = name === i.self ? true : d ? d.reachable : i.tinc.state === 'up' ? false : link?.up
    const relay = d && reachable ? routeOf(name, d) : undefined
    return {
      name,
      ...(rec ? { address: rec.vpnAddress, ...(rec.vpnAddress6 ? { address6: rec.vpnAddress6 } : {}), public: rec.addresses.length > 0 } : {}),
      ...(d?.address ? { remote: d.port ? `${d.address}:${d.port}` : d.address } : link?.remote ? { remote: link.remote } : {}),
      ...(reachable !== undefined ? { reachable } : {}),
      path: pathOf(name, i.self, reachable, relay),
      ...(relay ? { via: relay } : {}),
      ...(d?.nexthop && d.nexthop !== '-' ? { nexthop: d.nexthop } : {}),
      ...(link ? { lastChange: link.since.toISOString() } : {}),
      inView: rec !== undefined,
      inTinc: d !== undefined,
      ...(hidden.has(name) ? { hidden: true as const } : {}),
    }
  })
  const selfRec = i.view?.peers.get(i.self)?.record
  const fromTinc = i.tinc.state === 'up' && dump?.bytesIn !== undefined && dump.bytesOut !== undefined
  const c = i.consul
  return {
    at: i.now.toISOString(),
    node: {
      name: i.self,
      net: i.net,
      interface: i.iface,
      ...(selfRec ? { address: selfRec.vpnAddress, ...(selfRec.vpnAddress6 ? { address6: selfRec.vpnAddress6 } : {}), public: selfRec.addresses.length > 0 } : {}),
      ...(i.conflict ? { nameConflict: i.conflict } : {}),
      ...modeOf(i),
      ...forwardingOf(i),
    },
    tincd: { state: i.tinc.state, ...(i.tinc.state === 'up' ? { pid: i.tinc.pid } : { reason: i.tinc.reason }), skippedLines: dump?.skipped ?? 0 },
    bytes: fromTinc ? { in: dump.bytesIn, out: dump.bytesOut, source: 'tincd' } : i.counters ? { in: i.counters.rxBytes, out: i.counters.txBytes, source: 'interface' } : { source: 'none' },
    ...(i.counters ? { interface: i.counters } : {}),
    nodes,
    edges: i.tinc.state === 'up' ? (dump?.edges ?? []) : [],
    subnets: i.tinc.state === 'up' ? (dump?.subnets ?? []) : [],
    connections: i.tinc.state === 'up' ? (dump?.connections ?? []) : [],
    consul: {
      reachable: c.reachable,
      ...(c.lastReadAt ? { lastSyncAt: c.lastReadAt.toISOString() } : {}),
      index: c.index,
      failures: c.failures,
      refusedTotal: i.sync.refusedTotal,
      refused: [...i.refusals].map(([key, reason]) => ({ key, reason })),
      pending: [...(i.pending ?? [])],
      servicesRefusedTotal: i.sync.servicesRefusedTotal,
      servicesRefused: [...(i.servicesRefused ?? [])],
      emptyReadsIgnored: i.sync.emptyReadsIgnored,
      bytesRead: i.sync.bytesRead,
      fullReads: i.sync.fullReads,
      ...(i.sync.lastFullReadReason ? { lastFullReadReason: i.sync.lastFullReadReason } : {}),
    },
    ...(i.dns ? { dns: i.dns } : {}),
    services: i.services,
    ...(i.localServices ? { localServices: i.localServices } : {}),
    routes: [...(i.routes?.verdicts ?? [])],
    refusedApprovals: [...(i.routes?.refusedApprovals ?? [])],
    ...(i.connectTo
      ? {
          connectTo: {
            chosen: [...i.connectTo.connectTo],
            benched: i.connectTo.benched.map((b) => ({ name: b.name, until: new Date(b.until).toISOString(), strikes: b.strikes })),
            unknownPins: [...i.connectTo.unknownPins],
          },
        }
      : {}),
    ...(i.access ? { access: i.access } : {}),
    allocations: [...i.allocations].map(([address, node]) => ({ address, node })).sort((a, b) => a.address.localeCompare(b.address, undefined, { numeric: true })),
  }
}

/** tincstat's exact shape, so status-bar scripts written for it keep working. */
export interface Tincstat {
  total_bytes_in: number
  total_bytes_out: number
  connections: Array<{ name: string; ip: string; port: number }>
}

export function tincstat(s: Status): Tincstat {
  return {
    total_bytes_in: Math.trunc(s.bytes.in ?? 0),
    total_bytes_out: Math.trunc(s.bytes.out ?? 0),
    connections: s.connections.map((c) => ({ name: c.name, ip: c.address ?? '', port: c.port ?? 0 })),
  }
}
