import { DEFAULT_CONFIG_DIR } from '../config-file.ts'
import { DEFAULT_TINC_TIMERS } from '../tinc/setup.ts'
import { parseAddressFlags, parseIntFlag } from './parse.ts'
import { dnsArgs } from './dns-args.ts'
import { described, envDefault, envFlag } from './env.ts'

/** Flags `init` and `join` share: where files go and how the node is reached. */
export const setupArgs = {
  address: {
    type: 'string',
    description: described('Public HOST[:PORT] peers reach this node at; repeat or comma-separate. None: the node is behind NAT and connects out', 'address'),
    default: process.env.TINC_CONSUL_ADDRESS,
  },
  port: { type: 'string', description: described('tinc port', 'port'), default: envDefault('port', '655') },
  'key-size': { type: 'string', description: described('RSA key size; 2048 suits small CPUs', 'key-size'), default: envDefault('key-size', '4096') },
  dir: { type: 'string', description: described("tinc's config root; the network goes in <dir>/<net>", 'dir'), default: envDefault('dir', '/etc/tinc') },
  'config-dir': { type: 'string', description: described("Where the daemon's settings (<net>.env, with tokens) go", 'config-dir'), default: envDefault('config-dir', DEFAULT_CONFIG_DIR) },
  'run-dir': { type: 'string', description: described("Runtime directory; tinc's hook scripts report events to <run-dir>/<net>/", 'run-dir'), default: envDefault('run-dir', '/run/tinc-consul') },
  interface: { type: 'string', description: described('VPN interface name (default tinc-<net>, cut to 15 characters)', 'interface'), default: process.env.TINC_CONSUL_INTERFACE },
  'split-dns': {
    type: 'boolean',
    description: described(
      'tinc-up points systemd-resolved at the mesh DNS for ~<domain> on the VPN interface when resolved runs; tinc-down undoes it (--no-split-dns: leave resolved alone)',
      'split-dns',
    ),
    default: envFlag('split-dns', true),
  },
  'dns-port': { ...dnsArgs['dns-port'], description: described('The port `run` serves DNS on, for split DNS', 'dns-port') },
  'key-expire': {
    type: 'string',
    description: described("Seconds between tinc session-key renewals (tinc's KeyExpire; see docs/joining.md before changing it)", 'key-expire'),
    default: envDefault('key-expire', String(DEFAULT_TINC_TIMERS.keyExpire)),
  },
  'ping-interval': {
    type: 'string',
    description: described("Seconds between tinc's pings on idle connections (PingInterval)", 'ping-interval'),
    default: envDefault('ping-interval', String(DEFAULT_TINC_TIMERS.pingInterval)),
  },
  force: { type: 'boolean', description: 'Replace an existing node in <dir>/<net> (kept beside it), with a new key', default: false },
} as const

interface SetupArgValues {
  address?: string | string[]
  port: string
  'key-size': string
  dir: string
  'config-dir': string
  'run-dir': string
  interface?: string
  force: boolean
  'split-dns': boolean
  'dns-port': string
  'key-expire': string
  'ping-interval': string
}

/** The shared part of init's and join's options, from their flags. */
export function setupFrom(args: SetupArgValues) {
  const addr = parseAddressFlags(args.address)
  const started = Date.now()
  return {
    addresses: addr.hosts,
    port: addr.port ?? parseIntFlag('port', args.port, 1, 65535),
    keyBits: parseIntFlag('key-size', args['key-size'], 1024, 8192),
    root: args.dir,
    configDir: args['config-dir'],
    runDir: args['run-dir'],
    interface: args.interface || undefined,
    force: args.force,
    splitDns: args['split-dns'],
    dnsPort: parseIntFlag('dns-port', args['dns-port'], 1, 65535),
    timers: { keyExpire: parseIntFlag('key-expire', args['key-expire'], 10, 86400), pingInterval: parseIntFlag('ping-interval', args['ping-interval'], 1, 3600) },
    // Timestamped steps: people see where a slow join spends its time.
    progress: (s: string) => console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(5)}s] ${s}`),
  }
}
