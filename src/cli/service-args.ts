import { join } from 'node:path'
import { DEFAULT_MAX_SERVICES } from '../services/registration.ts'
import { described, envDefault, envFlag } from './env.ts'

/** Where a network's service definitions live: beside its <net>.env, in the `<file>.d` habit. */
export const defaultServicesDir = (configDir: string, net: string): string => join(configDir, `${net}.services.d`)

export const servicesDirArg = {
  'services-dir': {
    type: 'string',
    description: described('Directory of service definitions (.toml, .yaml, .json; default <config-dir>/<net>.services.d)', 'services-dir'),
    get default() {
      return process.env.TINC_CONSUL_SERVICES_DIR
    },
  },
} as const

/** The service flags of `run`. */
export const serviceRunArgs = {
  ...servicesDirArg,
  'script-checks': {
    type: 'boolean',
    description: described('Allow script checks in service files; the daemon runs them (the agent never needs script checks on)', 'script-checks'),
    get default() {
      return envFlag('script-checks', false)
    },
  },
  'deregister-on-exit': {
    type: 'boolean',
    description: described("Deregister this node's services when the daemon stops cleanly (default: leave it to the health checks)", 'deregister-on-exit'),
    get default() {
      return envFlag('deregister-on-exit', false)
    },
  },
  'services-resync': {
    type: 'string',
    description: described("Seconds between comparing the agent's services with the files (re-registers after an agent restart)", 'services-resync'),
    get default() {
      return envDefault('services-resync', '10')
    },
  },
  'max-services': {
    type: 'string',
    description: described(
      'Most services one node may have: this node registers at most this many of its files (in file-name order), and takes at most this many instances from any other node; give every node the same value',
      'max-services',
    ),
    get default() {
      return envDefault('max-services', String(DEFAULT_MAX_SERVICES))
    },
  },
} as const
