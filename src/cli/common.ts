import { DEFAULT_CONFIG_DIR } from '../config-file.ts'
import { described, envDefault } from './env.ts'

/** Flags shared by every command that talks to a network in Consul. */
export const consulArgs = {
  net: {
    type: 'string',
    description: described('tinc network name', 'net'),
    get default() {
      return process.env.TINC_CONSUL_NET
    },
    required: false,
  },
  consul: {
    type: 'string',
    description: described('Consul agent HTTP address (also CONSUL_HTTP_ADDR)', 'consul'),
    get default() {
      return envDefault('consul', process.env.CONSUL_HTTP_ADDR ? httpUrl(process.env.CONSUL_HTTP_ADDR) : 'http://127.0.0.1:8500')
    },
  },
  token: {
    type: 'string',
    description: described('Consul ACL token (also CONSUL_HTTP_TOKEN)', 'token'),
    get default() {
      return process.env.TINC_CONSUL_TOKEN ?? process.env.CONSUL_HTTP_TOKEN
    },
  },
  prefix: {
    type: 'string',
    description: described('KV prefix (default tinc-consul/<net>/)', 'prefix'),
    get default() {
      return process.env.TINC_CONSUL_PREFIX
    },
  },
  // Read before any flag (src/config-file.ts); listed so every network command accepts it.
  'config-dir': {
    type: 'string',
    description: described('Where init/join wrote <net>.env (tokens, paths), loaded before flags', 'config-dir'),
    get default() {
      return envDefault('config-dir', DEFAULT_CONFIG_DIR)
    },
  },
} as const

/** The settings a new network is created with, shared by `init` and `adopt` (whichever creates it). */
export const newNetworkArgs = {
  cidr: {
    type: 'string',
    description: described('VPN range, needed to create the network (e.g. 10.99.0.0/24; adopt reads it from tinc-up when absent)', 'cidr'),
    get default() {
      return process.env.TINC_CONSUL_CIDR
    },
  },
  domain: {
    type: 'string',
    description: described('DNS domain for node names', 'domain'),
    get default() {
      return envDefault('domain', 'mesh')
    },
  },
} as const

/** CONSUL_HTTP_ADDR is often given without a scheme ("127.0.0.1:8500"). */
export function httpUrl(addr: string): string {
  return /^https?:\/\//.test(addr) ? addr : `http://${addr}`
}
