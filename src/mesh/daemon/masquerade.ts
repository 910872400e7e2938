import type { Logger } from '../../log.ts'
import type { OwnRoute } from '../own-routes.ts'
import { dropTableLines, loadNftScript } from './nft.ts'

/**
 * Masquerading for LANs behind this node whose hosts don't route the VPN range back
 * (`subnet add CIDR --masquerade`, docs/subnets.md): traffic from the VPN range going to the LAN
 * leaves with this node's LAN address. It lives in an nftables table of our own,
 * `ip tinc-consul-<net>`, so it never touches the operator's rules, and each change replaces the
 * whole table in one nft transaction: applying the same set twice changes nothing, and an empty
 * set removes the table.
 */
export const masqueradeTable = (net: string): string => `tinc-consul-${net}`

/** The nft script that makes the table hold exactly these rules (or not exist, for none). */
export function masqueradeScript(net: string, vpnCidr: string, routes: readonly OwnRoute[]): string {
  const table = masqueradeTable(net)
  const lans = routes.filter((r) => r.masquerade && !r.cidr.includes(':')).map((r) => r.cidr)
  const reset = dropTableLines('ip', table)
  if (lans.length === 0) return `${reset.join('\n')}\n`
  const rules = lans.map((lan) => `    ip saddr ${vpnCidr} ip daddr ${lan} masquerade`)
  return [...reset, `table ip ${table} {`, '  chain postrouting {', '    type nat hook postrouting priority srcnat; policy accept;', ...rules, '  }', '}', ''].join('\n')
}

export interface MasqueradeKeeper {
  /** Makes the table match; nft runs only when the rules differ from what this process last applied. */
  apply(vpnCidr: string, routes: readonly OwnRoute[]): Promise<void>
}

export function masqueradeKeeper(net: string, log: Logger, nft: (script: string) => Promise<void> = loadNftScript): MasqueradeKeeper {
  // Nothing applied yet: a node that never masquerades never runs nft.
  let applied = masqueradeScript(net, '0.0.0.0/0', [])
  return {
    async apply(vpnCidr, routes) {
      const script = masqueradeScript(net, vpnCidr, routes)
      if (script === applied) return
      try {
        await nft(script)
        applied = script
        log.info({ table: masqueradeTable(net), lans: routes.filter((r) => r.masquerade).map((r) => r.cidr) }, 'masquerade rules updated')
      } catch (err) {
        log.error({ err, table: masqueradeTable(net) }, 'could not update the masquerade rules (is nft installed, and are we root?); retrying at the next change')
      }
    },
  }
}
