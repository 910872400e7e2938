import type { KvItem } from '../../consul/kv.ts'
import type { ZoneAlias } from '../../dns/zone.ts'
import type { Logger } from '../../log.ts'
import { parseAliases } from '../aliases.ts'
import type { KvLayout } from '../kv-layout.ts'
import { meshServices, type MeshService, type ServiceRefusal } from '../services.ts'
import type { MeshView } from '../view.ts'

export interface MeshState {
  view: MeshView
  aliases: ZoneAlias[]
  /** Healthy instances only, each checked against the view. */
  services: MeshService[]
}

export interface StateFeed {
  aliases(): ZoneAlias[]
  services(): MeshService[]
  /** Aliases as read from Consul; checked against the network's domain. Returns whether they changed. */
  setAliasItems(items: KvItem[], domain: string): boolean
  /** Aliases from the cache (already checked once, checked again on load). */
  setAliases(aliases: ZoneAlias[]): void
  /** Emits the state for `view` (DNS, the hosts block); services are judged against it here. */
  emit(view: MeshView | undefined, rawServices: ReadonlyMap<string, unknown[]>): void
  readonly servicesRefusedTotal: number
  /** Service instances refused at the last emit, with the reason (shown by status). */
  servicesRefused(): ServiceRefusal[]
}

/**
 * The feed for renderers other than tinc's (DNS, the hosts block). Services are kept raw and
 * judged against the view at each emit, so a node that joins after its service was registered
 * makes that service appear without another read. A refusal is logged when its reason first
 * appears, not at every emit.
 */
export function stateFeed(layout: KvLayout, net: string, log: Logger, onState: ((s: MeshState) => void) | undefined, maxServicesPerNode?: number): StateFeed {
  let aliases: ZoneAlias[] = []
  let services: MeshService[] = []
  let lastAliasRefusals = ''
  let lastServiceRefusals = new Set<string>()
  let servicesRefused: ServiceRefusal[] = []
  let servicesRefusedTotal = 0
  return {
    aliases: () => aliases,
    services: () => services,
    get servicesRefusedTotal() {
      return servicesRefusedTotal
    },
    servicesRefused: () => servicesRefused,
    setAliasItems(items, domain) {
      const read = parseAliases(items, layout, domain)
      const refusedNow = JSON.stringify(read.refused)
      if (refusedNow !== lastAliasRefusals) for (const x of read.refused) log.warn({ key: x.key, reason: x.reason }, 'refused a DNS alias from consul')
      lastAliasRefusals = refusedNow
      if (JSON.stringify(read.aliases) === JSON.stringify(aliases)) return false
      aliases = read.aliases
      return true
    },
    setAliases(a) {
      aliases = a
    },
    emit(view, rawServices) {
      if (!view) return
      const judged = meshServices(rawServices, view, net, maxServicesPerNode)
      const now = new Set(judged.refused.map((r) => `${r.service}\0${r.id}\0${r.reason}`))
      for (const r of judged.refused) {
        if (lastServiceRefusals.has(`${r.service}\0${r.id}\0${r.reason}`)) continue
        servicesRefusedTotal++
        log.warn({ service: r.service, id: r.id, reason: r.reason }, 'refused a service instance from consul')
      }
      lastServiceRefusals = now
      servicesRefused = judged.refused
      services = judged.services
      onState?.({ view, aliases, services })
    },
  }
}
