import type { MeshState } from '../mesh/sync.ts'
import type { ZoneInput } from './zone.ts'

export interface ZoneSettings {
  self: string
  ttl: ZoneInput['ttl']
}

/**
 * The DNS renderer's view of the mesh state. Kept separate from the server so
 * the zone is plain data: the same input goes to the helper processes.
 */
export function zoneInputFrom(state: MeshState, settings: ZoneSettings, serial: number): ZoneInput {
  const nodes = [...state.view.peers.values()].map(({ record }) => ({
    name: record.name,
    address: record.vpnAddress,
    address6: record.vpnAddress6,
    public: record.addresses.length > 0,
    fingerprint: record.fingerprint,
  }))
  const services = state.services.map((s) => ({ name: s.name, protocol: s.protocol, instances: s.instances.map((i) => ({ node: i.node, address: i.address, port: i.port, tags: i.tags })) }))
  return { domain: state.view.network.domain, cidr: state.view.network.cidr, cidr6: state.view.network.cidr6, self: settings.self, nodes, services, aliases: state.aliases, ttl: settings.ttl, serial }
}

/** SOA serials only go up: seconds since the epoch, or one more than last time when changes come faster. */
export function nextSerial(previous: number): number {
  return Math.max(previous + 1, Math.floor(Date.now() / 1000)) >>> 0
}
