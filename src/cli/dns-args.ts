import { DEFAULT_ANSWER_LIMITS, DEFAULT_TCP_LIMITS, type AnswerLimits, type TcpLimits } from '../dns/limits.ts'
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
    description: described('Helper processes sharing the UDP sockets: a number, or auto (one per extra core, at most 3) for a resolver under real load', 'dns-workers'),
    get default() {
      return envDefault('dns-workers', '0')
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
  'dns-max-instances': {
    type: 'string',
    description: described('Instances of one service name in an answer (its A and SRV records); the rest are left out, the same ones every time', 'dns-max-instances'),
    get default() {
      return envDefault('dns-max-instances', String(DEFAULT_ANSWER_LIMITS.maxInstances))
    },
  },
  'dns-max-instances-per-node': {
    type: 'string',
    description: described('Of those, instances on one node', 'dns-max-instances-per-node'),
    get default() {
      return envDefault('dns-max-instances-per-node', String(DEFAULT_ANSWER_LIMITS.maxInstancesPerNode))
    },
  },
  'dns-max-answer-bytes': {
    type: 'string',
    description: described('Largest reply in bytes (512-65535); a longer answer keeps the first records that fit', 'dns-max-answer-bytes'),
    get default() {
      return envDefault('dns-max-answer-bytes', String(DEFAULT_ANSWER_LIMITS.maxAnswerBytes))
    },
  },
  'dns-tcp-connections': {
    type: 'string',
    description: described('DNS over TCP connections open at once, over all addresses', 'dns-tcp-connections'),
    get default() {
      return envDefault('dns-tcp-connections', String(DEFAULT_TCP_LIMITS.connections))
    },
  },
  'dns-tcp-per-source': {
    type: 'string',
    description: described('Of those, from one source address', 'dns-tcp-per-source'),
    get default() {
      return envDefault('dns-tcp-per-source', String(DEFAULT_TCP_LIMITS.perSource))
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
  answers: AnswerLimits
  tcp: TcpLimits
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
  'dns-max-instances'?: string
  'dns-max-instances-per-node'?: string
  'dns-max-answer-bytes'?: string
  'dns-tcp-connections'?: string
  'dns-tcp-per-source'?: string
  'hosts-file'?: string
}): DnsSettings {
  const listen = listFlag('dns-listen', args['dns-listen'])
  const w = args['dns-workers'] ?? '0'
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
    answers: {
      maxInstances: parseIntFlag('dns-max-instances', args['dns-max-instances'] ?? String(DEFAULT_ANSWER_LIMITS.maxInstances), 1, 4096),
      maxInstancesPerNode: parseIntFlag('dns-max-instances-per-node', args['dns-max-instances-per-node'] ?? String(DEFAULT_ANSWER_LIMITS.maxInstancesPerNode), 1, 4096),
      // 512 holds the longest question, our OPT record and a record or two; TCP carries at most 65535.
      maxAnswerBytes: parseIntFlag('dns-max-answer-bytes', args['dns-max-answer-bytes'] ?? String(DEFAULT_ANSWER_LIMITS.maxAnswerBytes), 512, 65535),
    },
    tcp: {
      connections: parseIntFlag('dns-tcp-connections', args['dns-tcp-connections'] ?? String(DEFAULT_TCP_LIMITS.connections), 1, 65535),
      perSource: parseIntFlag('dns-tcp-per-source', args['dns-tcp-per-source'] ?? String(DEFAULT_TCP_LIMITS.perSource), 1, 65535),
    },
    hostsFile: args['hosts-file'] || undefined,
  }
}
