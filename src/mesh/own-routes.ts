import { TincConsulError } from '../errors.ts'
import { readManagedBlock, replaceManagedBlock } from '../tinc/conf-block.ts'
import { isCanonicalRoute } from './route-cidr.ts'

/**
 * The routes this node announces live in its own host file, in a managed block that
 * `tinc-consul subnet add/rm` rewrites: tincd announces (and routes to itself) the Subnet lines of
 * its own host file, and the daemon publishes the block's lines as the record's `routes`. Whether
 * to masquerade a LAN is a comment line in the same block, so one file says everything about
 * the node's routes. The block is local data written by the CLI, never from the network.
 *
 *   # BEGIN tinc-consul routes
 *   Subnet = 192.168.1.0/24
 *   Subnet = 192.168.2.0/24
 *   # masquerade 192.168.2.0/24
 *   # END tinc-consul routes
 */
export const ROUTES_TAG = 'routes'

export interface OwnRoute {
  cidr: string
  /** SNAT traffic from the VPN range to this LAN to the node's own LAN address (hosts that don't route back). */
  masquerade: boolean
}

const SUBNET_LINE = /^Subnet\s*=\s*(\S+)$/i
const MASQUERADE_LINE = /^#\s*masquerade\s+(\S+)$/

/** The routes of the block, in its order; a line we didn't write (not a canonical CIDR) is an error, not a guess. */
export function readOwnRoutes(hostFile: string): OwnRoute[] {
  const lines = readManagedBlock(hostFile, ROUTES_TAG).map((l) => l.trim())
  const masq = new Set(lines.flatMap((l) => MASQUERADE_LINE.exec(l)?.[1] ?? []))
  const routes: OwnRoute[] = []
  for (const line of lines) {
    const cidr = SUBNET_LINE.exec(line)?.[1]
    if (cidr === undefined) continue
    if (!isCanonicalRoute(cidr)) throw new TincConsulError('HOST_FILE_BAD', `the routes block of our host file has "Subnet = ${cidr}", not a canonical CIDR; use tinc-consul subnet rm/add`)
    routes.push({ cidr, masquerade: masq.has(cidr) })
  }
  return routes
}

/** The host file with the block holding `routes` (removed when there are none); everything else stays byte for byte. */
export function withOwnRoutes(hostFile: string, routes: readonly OwnRoute[]): string {
  const body = routes.flatMap((r) => [`Subnet = ${r.cidr}`, ...(r.masquerade ? [`# masquerade ${r.cidr}`] : [])])
  return replaceManagedBlock(hostFile, body.length ? body : undefined, ROUTES_TAG)
}

/** The host file without the routes block: what the record's own fields (address, key, /32) come from. */
export const withoutOwnRoutes = (hostFile: string): string => replaceManagedBlock(hostFile, undefined, ROUTES_TAG)
