import { defineCommand } from 'citty'
import { defaultStateDir } from '../config-file.ts'
import { aclsEnabled, deleteNodeTokens } from '../consul/acl.ts'
import { createConsulClient } from '../consul/client.ts'
import { kvLayout } from '../mesh/kv-layout.ts'
import { TincConsulError, UsageError } from '../errors.ts'
import { loadPins, savePins } from '../mesh/pins.ts'
import { revokeNode } from '../mesh/revoke.ts'
import { isTincName } from '../tinc/names.ts'
import { consulArgs } from './common.ts'
import { described } from './env.ts'
import { requireNet } from './run.ts'

function requireName(name: string): string {
  if (!isTincName(name)) throw new UsageError('BAD_NAME', `not a valid tinc node name: ${JSON.stringify(name)} (letters, digits and _ only)`)
  return name
}

export const revokeCommand = defineCommand({
  meta: { name: 'revoke', description: 'Remove a node from the mesh for good: delete its record and revoke its key, so every node drops it and refuses that key under any name' },
  args: { ...consulArgs, name: { type: 'positional', description: 'Node to revoke', required: true } },
  async run({ args }) {
    const net = requireNet(args.net)
    const client = createConsulClient({ url: args.consul, token: args.token || undefined })
    const layout = kvLayout(net, args.prefix || undefined)
    const name = requireName(args.name)
    const { fingerprint } = await revokeNode(client, layout, name)
    console.log(`revoked ${name} (key ${fingerprint}); every node drops it on its next update`)
    if (!(await aclsEnabled(client))) return
    try {
      const gone = await deleteNodeTokens(client, layout, name)
      console.log(gone.length ? `deleted ${name}'s Consul token${gone.length > 1 ? 's' : ''} (${gone.join(', ')})` : `${name} had no Consul token left to delete`)
    } catch (err) {
      // The revocation above stands; only the token clean-up needs more rights.
      throw new TincConsulError(
        'TOKENS_LEFT',
        `${name} is revoked, but its Consul tokens could not be deleted (${err instanceof Error ? err.message : String(err)}): with a management token, run \`consul acl token list\` and \`consul acl token delete -id <accessor>\` for "tinc-consul node ${name}"`,
        { cause: err },
      )
    }
  },
})

const pinReset = defineCommand({
  meta: { name: 'reset', description: 'Forget the pinned key for a node, so its next record is trusted again (for a legitimate key rotation)' },
  args: {
    net: consulArgs.net,
    'state-dir': { type: 'string', description: described("The daemon's state directory (default /var/lib/tinc-consul/<net>)", 'state-dir'), default: process.env.TINC_CONSUL_STATE_DIR },
    name: { type: 'positional', description: 'Node whose pin to drop', required: true },
  },
  async run({ args }) {
    const net = requireNet(args.net)
    const name = requireName(args.name)
    const dir = args['state-dir'] ?? defaultStateDir(net)
    const pins = await loadPins(dir)
    const old = pins.get(name)
    if (!old) {
      console.log(`${name} has no pinned key in ${dir}; nothing to do`)
      return
    }
    pins.delete(name)
    await savePins(dir, pins)
    console.log(`dropped the pin for ${name} (${old}); the running daemon trusts its next key`)
  },
})

export const pinCommand = defineCommand({
  meta: { name: 'pin', description: 'Manage pinned peer keys' },
  subCommands: { reset: pinReset },
})
