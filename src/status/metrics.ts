import { readdirSync } from 'node:fs'
import { Counter, Gauge, Registry } from 'prom-client'
import type { Status } from './model.ts'

/**
 * Prometheus metrics, filled from one Status per scrape. Counters that come
 * from elsewhere (tincd's byte totals, the DNS counters) are set to their
 * current value rather than incremented here: they reset when tincd or the
 * daemon restarts, which Prometheus' rate() handles for counters.
 */
export interface Metrics {
  registry: Registry
  /** Loads a status into the metrics, then returns the text exposition. */
  render(s: Status): Promise<string>
}

const PREFIX = 'tinc_consul_'

export function createMetrics(): Metrics {
  const registry = new Registry()
  declareProcessMetrics(registry)
  const m = declareMetrics(registry)
  return {
    registry,
    async render(s) {
      fillTinc(m, s)
      fillConsul(m, s)
      fillAccess(m, s)
      return registry.metrics()
    },
  }
}

type MetricSet = ReturnType<typeof declareMetrics>

/**
 * The process figures, read when scraped. prom-client's default set would also watch the event
 * loop's lag with a 10 ms timer, waking an idle daemon 100 times a second for a figure nobody
 * alerts on; these keep its names for the ones that matter.
 */
function declareProcessMetrics(registry: Registry): void {
  const g = (name: string, help: string, read: () => number) =>
    new Gauge({
      name: PREFIX + name,
      help,
      registers: [registry],
      collect() {
        this.set(read())
      },
    })
  const startedAt = Math.round(Date.now() / 1000 - process.uptime())
  new Counter({
    name: `${PREFIX}process_cpu_seconds_total`,
    help: 'User and system CPU time spent, in seconds',
    registers: [registry],
    collect() {
      const u = process.cpuUsage()
      this.reset()
      this.inc((u.user + u.system) / 1e6)
    },
  })
  g('process_resident_memory_bytes', 'Resident memory size in bytes', () => process.memoryUsage.rss())
  g('process_start_time_seconds', 'Start time of the process since the Unix epoch, in seconds', () => startedAt)
  g('process_open_fds', 'Open file descriptors', () => openFds())
  g('nodejs_heap_size_used_bytes', "V8's used heap size in bytes", () => process.memoryUsage().heapUsed)
  g('nodejs_heap_size_total_bytes', "V8's total heap size in bytes", () => process.memoryUsage().heapTotal)
}

function openFds(): number {
  try {
    return readdirSync('/proc/self/fd').length
  } catch {
    return 0
  }
}

function declareMetrics(registry: Registry) {
  const g = (name: string, help: string, labelNames: string[] = []) => new Gauge({ name: PREFIX + name, help, labelNames, registers: [registry] })
  const c = (name: string, help: string, labelNames: string[] = []) => new Counter({ name: PREFIX + name, help, labelNames, registers: [registry] })
  return {
    info: g('info', "This node: always 1, with its name, network and the network's tinc mode (router, switch; empty before the first view) as labels", ['node', 'net', 'mode']),
    tincdUp: g('tincd_up', '1 when tincd answered its last state dump'),
    bytes: c('tinc_bytes_total', 'Bytes through the VPN device, as tincd (or else the interface) counts them', ['direction']),
    nodes: g('nodes', 'Known nodes by how this node reaches them', ['path']),
    reachable: g('node_reachable', '1 when tincd reaches the node', ['node']),
    edges: g('edges', "Edges in tincd's edge list (one per direction)"),
    connections: g('connections', 'Meta connections tincd holds'),
    subnets: g('subnets', 'Subnets tincd knows'),
    skipped: g('tincd_dump_skipped_lines', "Lines of tincd's last dump that did not parse"),
    consulUp: g('consul_up', '1 when the latest request to Consul succeeded'),
    conflict: g('name_conflict', "1 when another writer keeps rewriting this node's record (a cloned machine)"),
    pending: g('records_unreadable', 'Records listed in Consul that could not be read; their files are kept'),
    lastSync: g('consul_last_sync_timestamp_seconds', 'When Consul last answered'),
    consulBytes: c('consul_read_bytes_total', 'Body bytes read from Consul'),
    fullReads: c('records_full_reads_total', 'Reads of every record: at start, and for changes the change log could not explain'),
    refused: c('records_refused_total', 'Node records refused (pinning, validation, revocation)'),
    refusedNow: g('records_refused', 'Node records refused right now'),
    servicesRefused: c('service_instances_refused_total', 'Service instances refused (not on a mesh node, wrong address, over the per-node cap)'),
    servicesRefusedNow: g('service_instances_refused', "Other nodes' service instances refused right now"),
    localServices: g('local_services', "This node's service definitions: registered, or refused (over --max-services, name too long)", ['state']),
    localServicesMax: g('local_services_max', 'The per-node cap on services (--max-services)'),
    healthy: g('service_healthy_instances', 'Healthy instances per service', ['service', 'protocol']),
    dns: c('dns_queries_total', 'DNS queries answered, by outcome', ['outcome']),
    dnsTcpOpen: g('dns_tcp_connections', 'DNS over TCP connections open now'),
    dnsTcpRefused: c('dns_tcp_refused_total', 'DNS over TCP connections refused: over the per-source or total limit'),
    accessTable: g('access_table', "The groups' nftables table on this node: 1 for its state (off, open, enforced, failed)", ['mode']),
    accessHidden: g('access_hidden_nodes', 'Nodes this node may not reach under the groups: DNS does not answer them'),
    accessRefused: g('access_policy_refused', 'Keys of the access policy refused right now (groups, associations)'),
  }
}

const setCounter = (counter: Counter, value: number, labels: Record<string, string> = {}) => {
  counter.reset()
  counter.inc(labels, Math.max(0, value))
}

/** This node, tincd and the interface. */
function fillTinc(m: MetricSet, s: Status): void {
  m.info.reset()
  m.info.set({ node: s.node.name, net: s.node.net, mode: s.node.mode ?? '' }, 1)
  m.tincdUp.set(s.tincd.state === 'up' ? 1 : 0)
  m.bytes.reset()
  if (s.bytes.in !== undefined) m.bytes.inc({ direction: 'in' }, s.bytes.in)
  if (s.bytes.out !== undefined) m.bytes.inc({ direction: 'out' }, s.bytes.out)
  m.nodes.reset()
  for (const path of ['direct', 'relayed', 'unreachable', 'unknown'] as const) m.nodes.set({ path }, s.nodes.filter((n) => n.path === path).length)
  m.reachable.reset()
  for (const n of s.nodes) if (n.path !== 'self' && n.reachable !== undefined) m.reachable.set({ node: n.name }, n.reachable ? 1 : 0)
  m.edges.set(s.edges.length)
  m.connections.set(s.connections.length)
  m.subnets.set(s.subnets.length)
  m.skipped.set(s.tincd.skippedLines)
}

/** The groups (docs/groups.md): nothing before the daemon reports its access state. */
function fillAccess(m: MetricSet, s: Status): void {
  m.accessTable.reset()
  const a = s.access
  if (!a) return
  for (const mode of ['off', 'open', 'enforced', 'failed'] as const) m.accessTable.set({ mode }, a.firewall?.mode === mode ? 1 : 0)
  m.accessHidden.set(a.hidden.length)
  m.accessRefused.set(a.refused.length)
}

/** Consul, records, services and DNS. */
function fillConsul(m: MetricSet, s: Status): void {
  m.consulUp.set(s.consul.reachable ? 1 : 0)
  if (s.consul.lastSyncAt) m.lastSync.set(Date.parse(s.consul.lastSyncAt) / 1000)
  setCounter(m.refused, s.consul.refusedTotal)
  setCounter(m.consulBytes, s.consul.bytesRead)
  setCounter(m.fullReads, s.consul.fullReads)
  m.refusedNow.set(s.consul.refused.length)
  m.conflict.set(s.node.nameConflict ? 1 : 0)
  m.pending.set(s.consul.pending.length)
  setCounter(m.servicesRefused, s.consul.servicesRefusedTotal)
  m.servicesRefusedNow.set(s.consul.servicesRefused.length)
  m.localServices.reset()
  if (s.localServices) {
    m.localServices.set({ state: 'registered' }, s.localServices.registered)
    m.localServices.set({ state: 'refused' }, s.localServices.refused.length)
    m.localServicesMax.set(s.localServices.max)
  }
  m.healthy.reset()
  for (const svc of s.services) m.healthy.set({ service: svc.name, protocol: svc.protocol }, svc.instances.length)
  m.dns.reset()
  if (s.dns) {
    const { queries, refused, formerr } = s.dns
    m.dns.inc({ outcome: 'answered' }, Math.max(0, queries - refused - formerr))
    m.dns.inc({ outcome: 'refused' }, refused)
    m.dns.inc({ outcome: 'formerr' }, formerr)
    m.dns.inc({ outcome: 'truncated' }, s.dns.truncated)
    m.dnsTcpOpen.set(s.dns.tcpOpen ?? 0)
    setCounter(m.dnsTcpRefused, s.dns.tcpRefused ?? 0)
  }
}
