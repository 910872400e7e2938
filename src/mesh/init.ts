import { randomBytes } from 'node:crypto'
import { existsSync, readFileSync } from 'node:fs'
import ipaddr from 'ipaddr.js'
import { join } from 'node:path'
import { aclsEnabled, createJoinServerToken, createNodeToken } from '../consul/acl.ts'
import { b64, createConsulClient, type ConsulClient, type KvEntry, type TxnOp } from '../consul/client.ts'
import { DEFAULT_DNS_PORT } from '../dns/wire.ts'
import { checkGroupName, kvLayout, type KvLayout } from './kv-layout.ts'
import { configPath, parseConfig, writeConfig } from '../config-file.ts'
import { TincConsulError, UsageError } from '../errors.ts'
import { keyFingerprint, parseHostFile } from '../tinc/hostfile.ts'
import { defaultInterface, stagingDir, tincDirFor, type TincTimers } from '../tinc/setup.ts'
import { tincBackend } from '../tinc/backend.ts'
import { isTincName } from '../tinc/names.ts'
import { allocateAddress, firstAddress6, hostRange, intToIp } from './ipam.ts'
import { makeRecord, validateRecord } from './publish.ts'
import { addressRanges, createNetwork, groupIn, readAccessPolicy, readNetwork, type AddressRanges, type NetworkWrite } from './network.ts'
import { createGroup } from './group-admin.ts'
import { newGroupValue } from './groups.ts'
import { endpointsFor, joinEndpointsValue } from './join-endpoints.ts'
import { peerHostFiles } from './peer-files.ts'
import { decodeJson, networkMode, networkRecordSchema, nodeRecordSchema, RECORD_VERSION, type NetworkRecord } from './record.ts'
import { DEFAULT_TINC_MODE, type TincMode } from '../tinc/mode.ts'
import { namingFor, policyScopeFor } from '../services/naming.ts'

export interface InitOptions {
  net: string
  name: string
  /** Required to create the network; checked against it otherwise. */
  cidr?: string
  domain: string
  addresses: string[]
  port: number
  keyBits: number
  consulUrl: string
  /** An operator token: init creates the network and the node's tokens. */
  token?: string
  prefix?: string
  root: string
  configDir: string
  /** Runtime directory; the hooks report to <runDir>/<net>/tinc-events. */
  runDir: string
  /** Serve joins from this node (0: don't). */
  joinPort: number
  interface?: string
  force: boolean
  /** Register the mesh DNS with systemd-resolved in tinc-up (when resolved runs). */
  splitDns?: boolean
  dnsPort?: number
  /** tinc's KeyExpire and PingInterval (default DEFAULT_TINC_TIMERS). */
  timers?: TincTimers
  /** Create the network with bare service names (Consul names = mesh names, any name writable) instead of scoped ones. */
  bareServiceNames?: boolean
  /** tinc's mode for a new network (default router); for an existing one, it must match if given. */
  mode?: TincMode
  /**
   * The IPv6 range for a new network: a ULA /64, or `auto` for a random one (RFC 4193). Absent:
   * IPv4 only. For an existing network it must match if given.
   */
  cidr6?: string
  /**
   * The infrastructure group this public node's address comes from (docs/groups.md): created
   * with `infraCidr` when it doesn't exist. Absent: the network's only infrastructure group, if it
   * has exactly one, else the whole network.
   */
  infraGroup?: string
  /** The infrastructure group's IPv4 range, to create it (with `infraGroup`, default `infra`). */
  infraCidr?: string
  progress(step: string): void
}

export interface InitResult {
  address: string
  /** The IPv6 VPN address, in networks with an IPv6 range. */
  address6?: string
  createdNetwork: boolean
  newKey: boolean
  dir: string
  configPath: string
  acl: boolean
}

/**
 * Creates the network if needed and sets this machine up as a public node of
 * it. Safe to run again: it reuses the key, the address and the tokens it
 * made the first time, and never makes a new key without `force`.
 */
/** With ACLs on, the node's token and (serving joins) the join-server token: reused from the settings file on a re-run. */
async function nodeTokens(o: InitOptions, x: { client: ConsulClient; layout: KvLayout; network: NetworkRecord; reuse: boolean }) {
  const acl = await aclsEnabled(x.client)
  const file = configPath(o.configDir, o.net)
  const previous = existsSync(file) ? parseConfig(readFileSync(file, 'utf8'), file) : {}
  let nodeToken = x.reuse ? previous.TINC_CONSUL_TOKEN : undefined
  let joinToken = x.reuse ? previous.TINC_CONSUL_JOIN_TOKEN : undefined
  if (acl) {
    nodeToken ??= (await createNodeToken(x.client, policyScopeFor(x.layout, o.net, x.network), o.name)).secretId
    if (o.joinPort > 0) joinToken ??= (await createJoinServerToken(x.client, x.layout, o.name)).secretId
    o.progress(`Consul tokens ready (ACLs on): this node may write only its own record${o.joinPort > 0 ? '; the join endpoint has its own token' : ''}`)
  }
  return { acl, nodeToken, joinToken }
}

export async function initNode(o: InitOptions): Promise<InitResult> {
  if (!isTincName(o.name)) throw new UsageError('BAD_NAME', `not a valid tinc node name: ${JSON.stringify(o.name)} (letters, digits and _ only)`)
  if (o.addresses.length === 0) throw new UsageError('BAD_FLAG', 'init sets up a public node: give --address with the host name or IP address peers reach it at')
  if (o.infraGroup !== undefined) checkGroupName(o.infraGroup)
  const layout = kvLayout(o.net, o.prefix)
  const client = createConsulClient({ url: o.consulUrl, token: o.token })

  const { network, created } = await ensureNetwork(o, layout, client)
  if (created) o.progress(`created network ${o.net} (${network.cidr}, names under .${network.domain}, ${networkMode(network)} mode)`)
  else o.progress(`network ${o.net} exists (${network.cidr}, ${networkMode(network)} mode)`)
  hostRange(network.cidr)

  const dir = tincDirFor(o.root, o.net)
  const existing = await tincBackend().existingNode(dir)
  if (existing && existing.name !== o.name && !o.force)
    throw new TincConsulError('DIR_IN_USE', `${dir} already belongs to node "${existing.name}"; use --name ${existing.name}, or --force to replace it (the old directory is kept beside it)`)
  const reuse = existing?.name === o.name && !o.force
  const staging = reuse ? undefined : await stagingDir(dir)
  try {
    let publicKey: string
    if (reuse && existing) {
      publicKey = existing.publicKey
      o.progress(`reusing the key in ${dir}`)
    } else {
      o.progress(`generating a ${o.keyBits}-bit RSA key with tincd -K`)
      publicKey = await tincBackend().generateKey((staging as { dir: string }).dir, o.name, o.keyBits)
    }

    const current = await client.kvGet(layout.node(o.name))
    const range = await addressRangesFor(o, { layout, client, network, known: current !== undefined })
    const res = await reserveAndPublish(o, { layout, client, network, publicKey, range, current })
    o.progress(`address ${res.address}${res.address6 ? ` and ${res.address6}` : ''} reserved and record published`)

    const { acl, nodeToken, joinToken } = await nodeTokens(o, { client, layout, network, reuse })

    const judged = await peerHostFiles(client, layout, network, { name: o.name, vpnAddress: res.address, vpnAddress6: res.address6, fingerprint: keyFingerprint(publicKey) })
    for (const r of judged.refusals) o.progress(`left out ${r.key}: ${r.reason}`)
    const peers = judged.files
    const setup = {
      net: o.net,
      name: o.name,
      address: res.address,
      address6: res.address6,
      prefixLength: hostRange(network.cidr).prefixLength,
      port: o.port,
      publicAddresses: o.addresses,
      publicKey,
      connectTo: publicNames(peers),
      peerHostFiles: peers,
      interface: o.interface ?? defaultInterface(o.net),
      eventsFile: eventsFileFor(o.runDir, o.net),
      splitDns: o.splitDns === false ? undefined : { domain: network.domain, port: o.dnsPort ?? DEFAULT_DNS_PORT },
      timers: o.timers,
      mode: networkMode(network),
    }
    if (staging) {
      await tincBackend().writeSetup(staging.dir, setup)
      await staging.commit()
    } else await tincBackend().writeSetup(dir, setup)
    o.progress(`tinc config written to ${dir}`)
    const cfg = await writeConfig(o.configDir, o.net, {
      TINC_CONSUL_DIR: o.root,
      TINC_CONSUL_CONSUL: o.consulUrl,
      TINC_CONSUL_PREFIX: o.prefix,
      TINC_CONSUL_TOKEN: nodeToken,
      TINC_CONSUL_JOIN_TOKEN: joinToken,
      TINC_CONSUL_JOIN_PORT: String(o.joinPort),
      TINC_CONSUL_RUN_DIR: o.runDir,
      TINC_CONSUL_DNS_PORT: o.dnsPort && o.dnsPort !== DEFAULT_DNS_PORT ? String(o.dnsPort) : undefined,
    })
    o.progress(`daemon settings written to ${cfg}`)
    return { address: res.address, address6: res.address6, createdNetwork: created, newKey: !reuse, dir, configPath: cfg, acl }
  } catch (err) {
    await staging?.discard()
    throw err
  }
}

/**
 * Where this node's addresses come from. A node already in the network keeps its address (`group
 * move` moves it), so its groups are looked up only when --infra-cidr asks for the group to be
 * made; a new node starts in infrastructure.
 */
async function addressRangesFor(o: InitOptions, c: { layout: KvLayout; client: ConsulClient; network: NetworkRecord; known: boolean }): Promise<AddressRanges> {
  if (!c.known) return infraRange(o, c)
  if (o.infraCidr !== undefined && (await infraRange(o, c)).cidr !== c.network.cidr)
    o.progress(`${o.name} is in the network already and keeps its address; \`tinc-consul group move ${o.name} GROUP\` moves it`)
  return addressRanges(c.network)
}

/**
 * Public nodes and Consul servers belong in an infrastructure group (docs/groups.md), which every
 * node reaches: init gives this node its address from one. `--infra-cidr` creates the group (the
 * network's first group closes it: nodes in no group then reach only infrastructure); otherwise
 * the one named, or the network's only one. Without any, the address comes from the network.
 */
async function infraRange(o: InitOptions, c: { layout: KvLayout; client: ConsulClient; network: NetworkRecord }): Promise<AddressRanges> {
  const { layout, client, network } = c
  const name = checkGroupName(o.infraGroup ?? 'infra')
  const state = await readAccessPolicy(client, layout, network)
  if (o.infraCidr !== undefined) {
    const found = state.read.policy.groups.find((g) => g.name === name)
    if (found?.infra && found.cidr === o.infraCidr) return addressRanges(network, found)
    if (found)
      throw new UsageError('GROUP_EXISTS', `group ${name} exists already (${found.cidr}${found.infra ? '' : ', not infrastructure'}); drop --infra-cidr to use it, or name another with --infra-group`)
    const { before, policy } = await createGroup(client, layout, network, name, newGroupValue({ cidr: o.infraCidr, infra: true }), state)
    o.progress(
      `created infrastructure group ${name} (${o.infraCidr})${before.read.policy.groups.length === 0 ? ': the first group, so from now on a node in no group reaches only infrastructure' : ''}`,
    )
    const made = policy.groups.find((g) => g.name === name)
    if (!made) throw new TincConsulError('GROUP_RACED', `group ${name} was created but is not in the policy read back; look at \`tinc-consul group ls\``)
    return addressRanges(network, made)
  }
  if (o.infraGroup !== undefined) {
    const g = groupIn(state, layout, name)
    if (!g.infra) throw new UsageError('NOT_INFRA', `group ${name} is not an infrastructure group: public nodes go in one (\`group add NAME --cidr CIDR --infra\`)`)
    return addressRanges(network, g)
  }
  if (state.filtered)
    throw new TincConsulError('ACL_DENIED', `consul hid part of ${layout.network}/ from this token, so init can't tell which infrastructure group this node belongs in: use an operator token`)
  const infra = state.read.policy.groups.filter((g) => g.infra)
  if (infra.length > 1) throw new UsageError('WHICH_INFRA', `the network has ${infra.length} infrastructure groups (${infra.map((g) => g.name).join(', ')}): name one with --infra-group`)
  const only = infra[0]
  if (!only) return addressRanges(network)
  o.progress(`this node's address comes from infrastructure group ${only.name} (${only.cidr})`)
  return addressRanges(network, only)
}

/**
 * Reserves this node's addresses (IPv4, and IPv6 where the network has a range) and writes its
 * record, in one transaction: a name taken meanwhile leaves nothing reserved.
 */
async function reserveAndPublish(
  o: InitOptions,
  c: { layout: KvLayout; client: ConsulClient; network: NetworkRecord; publicKey: string; range: AddressRanges; current: KvEntry | undefined },
): Promise<{ address: string; address6?: string }> {
  const { layout, client, network, publicKey, current } = c
  const nodeKey = layout.node(o.name)
  const currentRecord = current && decodeJson(current.value, nodeRecordSchema)
  if (current && currentRecord?.ok && currentRecord.value.fingerprint !== keyFingerprint(publicKey)) {
    throw new TincConsulError('NAME_TAKEN', `"${o.name}" is already in the network with another key; pick another --name, or \`tinc-consul revoke ${o.name}\` first`)
  }
  const joinPort = o.joinPort > 0 ? o.joinPort : undefined
  const recordFor = (address: string, address6: string | undefined) =>
    makeRecord({ name: o.name, vpnAddress: address, vpnAddress6: address6, addresses: o.addresses, port: o.port, publicKey, joinPort })
  // Checked before anything is written; any address the allocation hands out passes the same checks.
  const refused = validateRecord(recordFor(intToIp(hostRange(network.cidr).first), firstAddress6(network.cidr6)), network)
  if (refused) throw new TincConsulError('OWN_RECORD_INVALID', `our record would be refused by peers: ${refused}`)
  const res = await allocateAddress({
    client,
    layout,
    cidr: c.range.cidr,
    cidr6: c.range.cidr6,
    name: o.name,
    records: [o.name],
    with: (address, address6): TxnOp[] => [
      { KV: { Verb: 'cas', Key: nodeKey, Value: b64(JSON.stringify(recordFor(address, address6))), Index: current?.modifyIndex ?? 0 } },
      // Listed as a join server from the start, so an invite made before `run` is up finds it.
      ...(joinPort && o.addresses.length ? [{ KV: { Verb: 'set', Key: layout.joinEndpoint(o.name), Value: b64(joinEndpointsValue(endpointsFor(o.addresses, joinPort))) } }] : []),
    ],
  })
  if (!res.ok) throw new TincConsulError('NAME_RACE', `"${o.name}" was written by someone else meanwhile; run init again`)
  return res
}

/**
 * The network to set this node up in: the one in Consul (its markers added if an older init
 * left any out), or a new one from --cidr, made by the one network writer.
 */
async function ensureNetwork(o: InitOptions, layout: KvLayout, client: ConsulClient): Promise<NetworkWrite> {
  const found = await readNetwork(client, layout)
  if (!found && !o.cidr) throw new UsageError('BAD_FLAG', `network ${o.net} does not exist yet: give --cidr (for example 10.99.0.0/24) to create it`)
  const res = await createNetwork(client, layout, found ?? newNetworkRecord(o))
  if (!res.created && o.cidr && res.network.cidr !== o.cidr)
    throw new TincConsulError('NETWORK_MISMATCH', `network ${o.net} already exists with CIDR ${res.network.cidr}, not ${o.cidr}; drop --cidr to join it as it is, or pick another --net`)
  if (!res.created && o.bareServiceNames && namingFor(o.net, res.network).mode !== 'bare')
    throw new TincConsulError('NETWORK_MISMATCH', `network ${o.net} already exists with scoped service names; --bare-service-names applies only when creating a network`)
  if (!res.created && o.mode && networkMode(res.network) !== o.mode)
    throw new TincConsulError(
      'NETWORK_MISMATCH',
      `network ${o.net} already exists in ${networkMode(res.network)} mode, not ${o.mode}; drop --mode to add this node as the network is (the mode is chosen when a network is created)`,
    )
  if (!res.created && o.cidr6 && o.cidr6 !== 'auto' && res.network.cidr6 !== o.cidr6)
    throw new TincConsulError(
      'NETWORK_MISMATCH',
      `network ${o.net} already exists ${res.network.cidr6 ? `with IPv6 range ${res.network.cidr6}` : 'without an IPv6 range'}, not ${o.cidr6}; drop --cidr6 (the range is chosen when a network is created)`,
    )
  if (!res.created && o.cidr6 === 'auto' && !res.network.cidr6)
    throw new TincConsulError('NETWORK_MISMATCH', `network ${o.net} already exists without an IPv6 range; drop --cidr6 (the range is chosen when a network is created)`)
  return res
}

/** A new network's record from init's settings (adopt's too), checked before anything is written. */
export function newNetworkRecord(o: Pick<InitOptions, 'cidr' | 'domain' | 'bareServiceNames' | 'mode' | 'cidr6'>): NetworkRecord {
  // serviceNames is written explicitly on every new network: a record without it means bare names (older releases).
  const record: NetworkRecord = {
    v: RECORD_VERSION,
    cidr: o.cidr ?? '',
    domain: o.domain,
    createdAt: new Date().toISOString(),
    serviceNames: o.bareServiceNames ? 'bare' : 'scoped',
    // Only switch is written: absent means router, so a router network's record is what it was before the field existed.
    ...(o.mode && o.mode !== DEFAULT_TINC_MODE ? { mode: o.mode } : {}),
    ...(o.cidr6 ? { cidr6: o.cidr6 === 'auto' ? randomUla64() : o.cidr6 } : {}),
  }
  const check = networkRecordSchema.safeParse(record)
  if (!check.success) throw new UsageError('BAD_FLAG', `bad network settings: ${check.error.issues[0]?.message ?? 'invalid'}`)
  hostRange(record.cidr)
  return record
}

/**
 * A random RFC 4193 range: fd00::/8, a 40-bit Global ID from the system's RNG, and subnet 0, so
 * two networks merged later (or a site's own ULA) almost surely don't overlap.
 */
export function randomUla64(): string {
  const [g0 = 0, g1 = 0, g2 = 0, g3 = 0, g4 = 0] = randomBytes(5)
  return `${new ipaddr.IPv6([0xfd00 + g0, g1 * 256 + g2, g3 * 256 + g4, 0, 0, 0, 0, 0]).toRFC5952String()}/64`
}

export const eventsFileFor = (runDir: string, net: string): string => join(runDir, net, 'tinc-events')

/** Names whose host file has an Address: the ones to ConnectTo. */
export function publicNames(hostFiles: Record<string, string>): string[] {
  return Object.entries(hostFiles)
    .filter(([, text]) => parseHostFile(text).entries.some((e) => e.key.toLowerCase() === 'address'))
    .map(([name]) => name)
    .sort()
}
