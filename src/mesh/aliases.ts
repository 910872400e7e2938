import type { ConsulClient } from '../consul/client.ts'
import type { KvItem } from '../consul/kv.ts'
import type { KvLayout } from './kv-layout.ts'
import { TincConsulError, UsageError } from '../errors.ts'
import { aliasTarget, isDnsLabel, type ZoneAlias } from '../dns/zone.ts'

/**
 * Operator-defined DNS names: `aliases/<label>` holds the target as plain text,
 * so `consul kv put tinc-consul/home/aliases/files nas` works as well as
 * `tinc-consul alias set files nas`. Values come from Consul and are checked
 * like everything else; a bad one is reported and left out, never fatal.
 */
export interface AliasRead {
  aliases: ZoneAlias[]
  refused: Array<{ key: string; reason: string }>
}

export function parseAliases(items: KvItem[], layout: KvLayout, domain: string): AliasRead {
  const aliases: ZoneAlias[] = []
  const refused: AliasRead['refused'] = []
  for (const item of items) {
    const name = item.key.slice(layout.aliasesPrefix.length)
    if (name === '') continue
    if (!isDnsLabel(name)) {
      refused.push({ key: item.key, reason: 'the key is not aliases/<one lower-case DNS label>' })
      continue
    }
    const raw = item.value ? Buffer.from(item.value) : Buffer.alloc(0)
    // Bigger than any name could be: not worth decoding.
    const target = raw.length <= 512 ? aliasTarget(raw.toString('utf8'), domain) : undefined
    if (!target) {
      refused.push({ key: item.key, reason: `the target must be a name in ${domain} such as "laptop" or "nfs.service"` })
      continue
    }
    aliases.push({ name, target })
  }
  return { aliases: aliases.sort((a, b) => a.name.localeCompare(b.name)), refused }
}

export async function setAlias(client: ConsulClient, layout: KvLayout, domain: string, name: string, target: string): Promise<string> {
  const bare = aliasTarget(target, domain)
  if (!bare) throw new UsageError('BAD_ALIAS_TARGET', `the target must be a node or service name in ${domain} (like "laptop" or "nfs.service"), got ${JSON.stringify(target)}`)
  const key = layout.alias(name)
  if (!(await client.kvPut(key, bare))) throw new TincConsulError('CONSUL_WRITE', `consul refused the write to ${key}`)
  return bare
}

/**
 * Removes an alias and, in the same transaction, makes sure the empty `aliases/` marker is
 * there: daemons ignore a read of aliases/ that comes back with nothing at all (a bad moment of
 * the store, not an operator deleting everything), so without the marker the last alias would
 * never disappear. Networks made before `init` wrote the marker get it here.
 */
export async function removeAlias(client: ConsulClient, layout: KvLayout, name: string): Promise<void> {
  const key = layout.alias(name)
  const current = await client.kvGet(key)
  if (!current) throw new UsageError('NO_ALIAS', `there is no alias ${JSON.stringify(name)}`)
  const res = await client.txn([{ KV: { Verb: 'delete-cas', Key: key, Index: current.modifyIndex } }, { KV: { Verb: 'set', Key: layout.aliasesPrefix, Value: '' } }])
  if (!res.ok) throw new TincConsulError('ALIAS_RACED', `the alias ${JSON.stringify(name)} changed while it was being removed; run alias rm again`)
}
