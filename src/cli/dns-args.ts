import { DEFAULT_DNS_PORT } from '../dns/wire.ts'
import { described, envDefault, envFlag } from './env.ts'
import { listFlag, parseIntFlag } from './parse.ts'

/** The DNS flags of `run`; `resolve`, `init` and `join` share --dns-port so all agree without configuration. */
export const dnsArgs = {
  dns: {
    type: 'boolean',
    description: described("Serve the network's names over DNS (--no-dns turns it off)", 'dns'),
    get default() {
      return envFlag('dns', true)
    },
  },
  'dns-port': {
    type: 'string',
    description: described('DNS port, UDP and TCP, on every DNS address', 'dns-port'),
    get default() {
      return envDefault('dns-port', String(DEFAULT_DNS_PORT))
    },
  },
  'dns-listen': {
    type: 'string',
    description: described('Addresses to serve DNS on besides the VPN address, comma-separated ("" for none)', 'dns-listen'),
    get default() {
      return envDefault('dns-listen', '127.0.0.1')
    },
  },
  'dns-workers': {
    type: 'string',
    description: described('Helper processes sharing the UDP sockets: a number, or auto (one per extra core, at most 3)', 'dns-workers'),
    get default() {
      return envDefault('dns-workers', 'auto')
    },
  },
  'dns-node-ttl': {
    type: 'string',
    description: described('TTL in seconds of node names, reverse names and aliases', 'dns-node-ttl'),
    get default() {
      return envDefault('dns-node-ttl', '30')
    },
  },
  'dns-service-ttl': {
    type: 'string',
    description: described('TTL in seconds of service names', 'dns-service-ttl'),
    get default() {
      return envDefault('dns-service-ttl', '5')
    },
  },
  'dns-negative-ttl': {
    type: 'string',
    description: described('How long resolvers may cache "no such name" (the SOA minimum)', 'dns-negative-ttl'),
    get default() {
      return envDefault('dns-negative-ttl', '5')
    },
  },
  'hosts-file': {
    type: 'string',
    description: described('Also keep the names in a managed block of this hosts file (opt-in; e.g. /etc/hosts)', 'hosts-file'),
    get default() {
      return process.env.TINC_CONSUL_HOSTS_FILE
    },
  },
} as const

export interface DnsSettings {
  enabled: boolean
  port: number
  listen: string[]
  workers: number | 'auto'
  ttl: { node: number; service: number; negative: number }
  hostsFile?: string
}

export function dnsSettings(args: {
  dns?: boolean
  'dns-port'?: string
  'dns-listen'?: string
  'dns-workers'?: string
  'dns-node-ttl'?: string
  'dns-service-ttl'?: string
  'dns-negative-ttl'?: string
  'hosts-file'?: string
}): DnsSettings {
  const listen = listFlag('dns-listen', args['dns-listen'])
  const w = args['dns-workers'] ?? 'auto'
  return {
    enabled: args.dns !== false,
    port: parseIntFlag('dns-port', args['dns-port'] ?? String(DEFAULT_DNS_PORT), 1, 65535),
    listen,
    workers: w === 'auto' ? 'auto' : parseIntFlag('dns-workers', w, 0, 16),
    ttl: {
      node: parseIntFlag('dns-node-ttl', args['dns-node-ttl'] ?? '30', 0, 86400),
      service: parseIntFlag('dns-service-ttl', args['dns-service-ttl'] ?? '5', 0, 86400),
      negative: parseIntFlag('dns-negative-ttl', args['dns-negative-ttl'] ?? '5', 0, 86400),
    },
    hostsFile: args['hosts-file'] || undefined,
  }
}
