import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { DnsServer } from '../dns/server.ts'
import type { SyncDaemon } from '../mesh/sync.ts'
import type { LocalLimits } from '../services/registrar.ts'
import type { DumpResult } from '../tinc/dump.ts'
import { tincBackend } from '../tinc/backend.ts'
import type { PeerLink } from '../tinc/events.ts'
import { interfaceOf } from '../tinc/setup.ts'
import { buildStatus, type InterfaceCounters, type Status, type StatusInputs } from './model.ts'

/**
 * Gathers a status from what the daemon holds and what tincd and the kernel
 * report. tincd is asked through its dump signals at most once a second,
 * however many requests arrive (the dump reader shares and caches reads), and a
 * tincd that is down is a state in the result, never an error.
 */
export interface CollectorOptions {
  net: string
  self: string
  tincDir: string
  pidFile: string
  /** tincd's log file, where its dumps land. */
  logFile: string
  sync: SyncDaemon
  dns?: DnsServer
  /** This node's services registrar, when it runs. */
  services?: { limits(): LocalLimits }
  links: ReadonlyMap<string, PeerLink>
  /** For tests: a stand-in for signalling tincd. */
  readDump?: () => Promise<DumpResult>
}

/** The Mode in tinc.conf, or undefined when tinc.conf can't be read. */
export async function tincConfModeOf(tincDir: string): Promise<string | undefined> {
  const text = await readFile(join(tincDir, 'tinc.conf'), 'utf8').catch(() => undefined)
  return text === undefined ? undefined : tincBackend().confMode(text)
}

export async function readCounters(iface: string): Promise<InterfaceCounters | undefined> {
  const dir = join('/sys/class/net', iface, 'statistics')
  const read = (f: string) => readFile(join(dir, f), 'utf8').then((t) => Number(t.trim()))
  try {
    const [rxBytes, txBytes, rxPackets, txPackets] = await Promise.all([read('rx_bytes'), read('tx_bytes'), read('rx_packets'), read('tx_packets')])
    if (![rxBytes, txBytes, rxPackets, txPackets].every(Number.isFinite)) return undefined
    return { rxBytes, txBytes, rxPackets, txPackets } as InterfaceCounters
  } catch {
    return undefined
  }
}

/** The routes as last judged, and the kernel's forwarding switches when this node announces any. */
async function routesOf(sync: SyncDaemon, self: string): Promise<Pick<StatusInputs, 'routes' | 'forwarding'>> {
  const r = sync.routes()
  const verdicts = r.judgement?.verdicts ?? []
  if (!verdicts.some((v) => v.node === self)) return { routes: { verdicts, refusedApprovals: r.refusedApprovals } }
  const read = async (f: string) => (await readFile(f, 'utf8').catch(() => undefined))?.trim()
  const [ipv4, ipv6] = await Promise.all([read('/proc/sys/net/ipv4/ip_forward'), read('/proc/sys/net/ipv6/conf/all/forwarding')])
  return { routes: { verdicts, refusedApprovals: r.refusedApprovals }, forwarding: { ipv4, ipv6 } }
}

export interface Collector {
  snapshot(): Promise<Status>
}

export async function createCollector(opts: CollectorOptions): Promise<Collector> {
  const iface = await interfaceOf(opts.tincDir, opts.net)
  const readDump = opts.readDump ?? tincBackend().stateReader({ logFile: opts.logFile, pidFile: opts.pidFile })
  return {
    async snapshot() {
      // tinc.conf is read on each snapshot (a small file): a Mode edited by hand shows at once.
      const [tinc, counters, tincConfMode] = await Promise.all([readDump(), readCounters(iface), tincConfModeOf(opts.tincDir)])
      return buildStatus({
        net: opts.net,
        self: opts.self,
        iface,
        view: opts.sync.view(),
        tincConfMode,
        links: opts.links,
        tinc,
        counters,
        consul: opts.sync.consul(),
        refusals: opts.sync.refusals(),
        sync: opts.sync.stats,
        dns: opts.dns?.stats(),
        services: opts.sync.services(),
        servicesRefused: opts.sync.servicesRefused(),
        localServices: opts.services?.limits(),
        allocations: opts.sync.allocations(),
        conflict: opts.sync.conflict(),
        pending: opts.sync.pending(),
        ...(await routesOf(opts.sync, opts.self)),
        connectTo: opts.sync.connectTo(),
        access: opts.sync.access(),
        now: new Date(),
      })
    },
  }
}
