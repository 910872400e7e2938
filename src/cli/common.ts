import { DEFAULT_CONFIG_DIR } from '../config-file.ts'
import { createConsulClient, type ConsulClient } from '../consul/client.ts'
import type { KvLayout } from '../mesh/kv-layout.ts'
import { readNetwork, readNetworkAndPolicy, requireNetwork, type PolicyState } from '../mesh/network.ts'
import type { NetworkRecord } from '../mesh/record.ts'
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

/** `--json` of the listing commands. */
export const jsonArg = { json: { type: 'boolean', description: 'Print JSON', default: false } } as const

/** A group named on the command line (docs/groups.md). */
export const groupArg = (what: string) => ({ type: 'positional', description: `${what}: one lower-case DNS label, at most 32 characters`, required: true }) as const

/** What a command on a network's records works with: the network as it is in Consul now. */
export interface NetworkTarget {
  layout: KvLayout
  client: ConsulClient
  network: NetworkRecord
}

const clientOf = (args: { consul: string; token?: string }): ConsulClient => createConsulClient({ url: args.consul, token: args.token || undefined })

/** The network at `layout`, or NO_NETWORK when `tinc-consul init` hasn't made it yet. */
export async function networkTarget(layout: KvLayout, args: { consul: string; token?: string }): Promise<NetworkTarget> {
  const client = clientOf(args)
  return { layout, client, network: requireNetwork(await readNetwork(client, layout), layout) }
}

/** networkTarget with the access policy, both from one read (readNetworkAndPolicy). */
export async function policyTarget(layout: KvLayout, args: { consul: string; token?: string }): Promise<NetworkTarget & { policy: PolicyState }> {
  const client = clientOf(args)
  return { layout, client, ...requireNetwork(await readNetworkAndPolicy(client, layout), layout) }
}

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
