import { defineCommand } from 'citty'
import { defaultStateDir } from '../config-file.ts'
import { createConsulClient } from '../consul/client.ts'
import { kvLayout } from '../mesh/kv-layout.ts'
import { QUERY_TYPES, query } from '../dns/client.ts'
import { hostsLines, writeHostsBlock } from '../dns/hosts-file.ts'
import { reverseName, reverseName6 } from '../dns/zone.ts'
import { RCODE, rcodeName, typeName, type DecodedRR } from '../dns/wire.ts'
import { TincConsulError, UsageError } from '../errors.ts'
import { parseAliases, removeAlias, setAlias } from '../mesh/aliases.ts'
import { loadCache } from '../mesh/cache.ts'
import { decodeJson, networkRecordSchema } from '../mesh/record.ts'
import { consulArgs } from './common.ts'
import { dnsArgs } from './dns-args.ts'
import { described, envDefault } from './env.ts'
import { parseIntFlag } from './parse.ts'
import { requireNet } from './run.ts'

const line = (rr: DecodedRR) => `${rr.name}.\t${rr.ttl}\t${typeName(rr.type)}\t${rr.data}`

export const resolveCommand = defineCommand({
  meta: { name: 'resolve', description: 'Ask the local tinc-consul DNS server about a name (or an address, for its PTR) and print the answer' },
  args: {
    name: { type: 'positional', description: 'A name such as laptop.mesh or nfs.service.mesh, or a VPN address', required: true },
    // Only so the network's env file (its DNS port) is loaded.
    net: consulArgs.net,
    'config-dir': consulArgs['config-dir'],
    type: { type: 'string', description: `Record type: ${Object.keys(QUERY_TYPES).join(', ')} (default A, or PTR for an address)` },
    server: { type: 'string', description: described('DNS server to ask', 'resolve-server'), default: envDefault('resolve-server', '127.0.0.1') },
    'dns-port': { ...dnsArgs['dns-port'], description: described('Its port', 'dns-port') },
    tcp: { type: 'boolean', description: 'Ask over TCP', default: false },
    timeout: { type: 'string', description: 'Seconds to wait for the answer', default: '2' },
    verbose: { type: 'boolean', description: 'Also print the authority and additional sections and the flags', default: false },
  },
  async run({ args }) {
    const rev = reverseName(args.name) ?? reverseName6(args.name)
    const typeArg = (args.type ?? (rev ? 'PTR' : 'A')).toUpperCase()
    const type = QUERY_TYPES[typeArg]
    if (type === undefined) throw new UsageError('BAD_FLAG', `--type must be one of ${Object.keys(QUERY_TYPES).join(', ')}, got ${JSON.stringify(args.type)}`)
    const name = rev && type === QUERY_TYPES.PTR ? rev : args.name
    if (!/^[A-Za-z0-9._-]{1,253}$/.test(name)) throw new UsageError('BAD_NAME', `not a DNS name: ${JSON.stringify(args.name)}`)
    const port = parseIntFlag('dns-port', args['dns-port'], 1, 65535)
    const timeoutMs = Math.round(Number(args.timeout) * 1000)
    if (!(timeoutMs > 0)) throw new UsageError('BAD_FLAG', `--timeout must be a positive number of seconds, got ${JSON.stringify(args.timeout)}`)
    const res = await query(name, type, { server: args.server, port, tcp: args.tcp, timeoutMs })
    if (args.verbose) {
      const f = Object.entries(res.flags)
        .filter(([, on]) => on)
        .map(([k]) => k)
      console.log(`;; ${rcodeName(res.rcode)} over ${res.transport}, flags: ${f.join(' ')}`)
    }
    for (const rr of res.answer) console.log(line(rr))
    if (args.verbose) {
      for (const rr of res.authority) console.log(`;; authority: ${line(rr)}`)
      for (const rr of res.additional.filter((r) => r.type !== 41)) console.log(`;; additional: ${line(rr)}`)
    }
    if (res.rcode === RCODE.NXDOMAIN) throw new TincConsulError('DNS_NXDOMAIN', `${name}: no such name`)
    if (res.rcode !== RCODE.NOERROR)
      throw new TincConsulError(
        'DNS_ERROR',
        `${name}: the server answered ${rcodeName(res.rcode)}${res.rcode === RCODE.REFUSED ? " (it only answers for the mesh's own zone)" : res.rcode === RCODE.SERVFAIL ? ' (the daemon has no view of the mesh yet)' : ''}`,
      )
    if (res.answer.length === 0) throw new TincConsulError('DNS_NODATA', `${name} exists but has no ${typeArg} record`)
  },
})

export const hostsCommand = defineCommand({
  meta: {
    name: 'hosts',
    description: "Write the mesh's names into a managed block of a hosts file, from the daemon's last view (for machines without systemd-resolved or dnsmasq); `run --hosts-file` keeps it current",
  },
  args: {
    net: consulArgs.net,
    'config-dir': consulArgs['config-dir'],
    file: { type: 'string', description: described('The hosts file', 'hosts-file'), default: envDefault('hosts-file', '/etc/hosts') },
    'state-dir': { type: 'string', description: described("The daemon's state directory (default /var/lib/tinc-consul/<net>)", 'state-dir'), default: process.env.TINC_CONSUL_STATE_DIR },
    remove: { type: 'boolean', description: "Remove this network's block instead", default: false },
  },
  async run({ args }) {
    const net = requireNet(args.net)
    if (args.remove) {
      const changed = await writeHostsBlock(args.file, net, undefined)
      console.log(changed ? `removed the ${net} block from ${args.file}` : `${args.file} has no ${net} block`)
      return
    }
    const dir = args['state-dir'] ?? defaultStateDir(net)
    const cached = await loadCache(dir)
    if (!cached) throw new TincConsulError('NO_VIEW', `no view of the mesh in ${dir} yet; start \`tinc-consul run --net ${net}\` first (or pass --state-dir)`)
    const lines = hostsLines(
      cached.network.domain,
      cached.records.map((r) => ({ name: r.name, address: r.vpnAddress, address6: r.vpnAddress6 })),
    )
    const changed = await writeHostsBlock(args.file, net, lines)
    console.log(`${changed ? 'wrote' : 'kept'} ${lines.length} names in ${args.file}`)
  },
})

const aliasArgs = { ...consulArgs }

async function networkDomain(client: ReturnType<typeof createConsulClient>, key: string): Promise<string> {
  const item = await client.kvGet(key)
  if (!item) throw new TincConsulError('NO_NETWORK', `no network record at ${key}; run \`tinc-consul init\` first`)
  const d = decodeJson(item.value, networkRecordSchema)
  if (!d.ok) throw new TincConsulError('BAD_NETWORK', `the network record at ${key} is not valid: ${d.reason}`)
  return d.value.domain
}

const aliasSet = defineCommand({
  meta: { name: 'set', description: 'Make NAME.<domain> an alias (CNAME) of a node or service: `alias set files nas`, `alias set media jellyfin.service`' },
  args: {
    ...aliasArgs,
    name: { type: 'positional', description: 'The new name (one DNS label)', required: true },
    target: { type: 'positional', description: 'A node name or SVC.service', required: true },
  },
  async run({ args }) {
    const layout = kvLayout(requireNet(args.net), args.prefix || undefined)
    const client = createConsulClient({ url: args.consul, token: args.token || undefined })
    const domain = await networkDomain(client, layout.network)
    const target = await setAlias(client, layout, domain, args.name.toLowerCase(), args.target)
    console.log(`${args.name.toLowerCase()}.${domain} → ${target}.${domain} (every node serves it on its next update)`)
  },
})

const aliasRm = defineCommand({
  meta: { name: 'rm', description: 'Remove an alias' },
  args: { ...aliasArgs, name: { type: 'positional', description: 'The alias', required: true } },
  async run({ args }) {
    const layout = kvLayout(requireNet(args.net), args.prefix || undefined)
    const client = createConsulClient({ url: args.consul, token: args.token || undefined })
    await removeAlias(client, layout, args.name.toLowerCase())
    console.log(`removed ${args.name}`)
  },
})

const aliasList = defineCommand({
  meta: { name: 'list', description: 'List the aliases, and any that nodes refuse' },
  args: aliasArgs,
  async run({ args }) {
    const layout = kvLayout(requireNet(args.net), args.prefix || undefined)
    const client = createConsulClient({ url: args.consul, token: args.token || undefined })
    const domain = await networkDomain(client, layout.network)
    const { items } = await client.kvList(layout.aliasesPrefix)
    const read = parseAliases(items, layout, domain)
    for (const a of read.aliases) console.log(`${a.name}.${domain}\t→ ${a.target}.${domain}`)
    for (const r of read.refused) console.log(`refused: ${r.key}: ${r.reason}`)
    if (read.aliases.length + read.refused.length === 0) console.log('no aliases')
  },
})

export const aliasCommand = defineCommand({
  meta: { name: 'alias', description: 'Manage DNS aliases (CNAMEs to nodes or services), stored in Consul' },
  // The same flags as `list`, so `alias --net NET` parses (`NET` is not a subcommand).
  args: aliasArgs,
  subCommands: { set: aliasSet, rm: aliasRm, list: aliasList },
  default: 'list',
})
