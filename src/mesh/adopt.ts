import { existsSync, readFileSync } from 'node:fs'
import { copyFile, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { aclsEnabled, createNodeToken, deleteToken, type CreatedToken } from '../consul/acl.ts'
import { b64, createConsulClient, type ConsulClient, type TxnOp } from '../consul/client.ts'
import { configPath, parseConfig, writeConfig } from '../config-file.ts'
import { DEFAULT_DNS_PORT } from '../dns/wire.ts'
import { TincConsulError, UsageError } from '../errors.ts'
import { policyScopeFor } from '../services/naming.ts'
import { renderScripts, tincDirFor } from '../tinc/setup.ts'
import { writeFileAtomic } from '../util/atomic.ts'
import { confWithBlock, inspectLocalNode, ownHostWithAddressFirst, rangeOf, readLocalFiles, type LocalNode } from './adopt-local.ts'
import { adoptedRoutes, hostFileWithRoutes, type AdoptedRoutes } from './adopt-routes.ts'
import { approveRoute } from './approvals.ts'
import { txnWithChangeLog } from './change-log.ts'
import { eventsFileFor, newNetworkRecord } from './init.ts'
import { hostRange, inRange, readIpam, type IpamEntry } from './ipam.ts'
import { keepPath, loadKeepList, UNTIL_ADOPTED } from './keep.ts'
import { kvLayout, type KvLayout } from './kv-layout.ts'
import { createNetwork, readNetwork } from './network.ts'
import { makeRecord, validateRecord } from './publish.ts'
import { decodeJson, networkMode, nodeRecordSchema, type NetworkRecord, type NodeRecord } from './record.ts'

export interface AdoptOptions {
  net: string
  /** tinc's config root: the node is <root>/<net>. */
  root: string
  configDir: string
  runDir: string
  consulUrl: string
  /** An operator token, used for this run only and never stored. */
  token?: string
  prefix?: string
  /** The network's range, to create it; derived from tinc-up when absent. */
  cidr?: string
  domain: string
  /** Which /32 is this node's, when its host file has several (or none). */
  vpnAddress?: string
  splitDns?: boolean
  dnsPort?: number
  dryRun: boolean
  progress(step: string): void
}

/** What adopt will do in Consul, decided from reads only. */
export interface ConsulPlan {
  network: NetworkRecord
  createNetwork: boolean
  /** The check-and-set index for ipam/<address>: 0 to create it. */
  ipamIndex: number
  record: NodeRecord
  /** The check-and-set index for nodes/<name>: 0 to create it (a re-run updates its own). */
  recordIndex: number
  acl: boolean
  /** The hand-made host file's LAN subnets, announced and approved; and those left as they are. */
  routes: AdoptedRoutes
}

/** One file adopt writes: where, what, and the hand-made original kept beside it. */
export interface FileWrite {
  path: string
  text: string
  mode: number
  backup?: string
  /** Shown instead of the text (the settings file holds a token). */
  summary?: string
}

export interface AdoptResult {
  layout: KvLayout
  node: LocalNode
  plan: ConsulPlan
  files: FileWrite[]
  keepNames: string[]
  configPath: string
}

/**
 * Moves a node of a hand-made tinc 1.0 network into tinc-consul without re-keying: its name,
 * key and VPN address stay, its record and address claim are published in one transaction, it
 * gets its own node token, and its hand-made peers are kept until they adopt too (docs/adopt.md).
 * With `dryRun` everything is read and checked, nothing is written and no token is made.
 */
export async function adoptNode(o: AdoptOptions): Promise<AdoptResult> {
  const layout = kvLayout(o.net, o.prefix)
  const dir = tincDirFor(o.root, o.net)
  const node = inspectLocalNode(await readLocalFiles(dir), { vpnAddress: o.vpnAddress })
  o.progress(`${dir}: node ${node.name}, ${node.mode} mode, key ${node.fingerprint}, VPN address ${node.address}`)
  const client = createConsulClient({ url: o.consulUrl, token: o.token })
  const plan = await planConsul(o, node, client, layout)
  for (const r of plan.routes.routes) o.progress(`hosts/${node.name} routes ${r}: announced as this node's route and approved (you run adopt as the operator)`)
  for (const k of plan.routes.kept) o.progress(`hosts/${node.name} also has "Subnet = ${k.subnet}": left in the file, not announced (${k.reason})`)
  const files = await planFiles(o, node, plan)
  const keepNames = await keepAdditions(o, node)
  const settings = configPath(o.configDir, o.net)
  if (o.dryRun) return { layout, node, plan, files, keepNames, configPath: settings }
  const token = await publishAdoption(o, { node, plan, client, layout })
  for (const f of files) await writeOne(f)
  await writeConfig(o.configDir, o.net, settingsFor(o, token))
  await writeKeep(o, keepNames)
  return { layout, node, plan, files, keepNames, configPath: settings }
}

/** Reads the network, ipam/ and our name's record, and checks that this node fits: nothing is written. */
async function planConsul(o: AdoptOptions, node: LocalNode, client: ConsulClient, layout: KvLayout): Promise<ConsulPlan> {
  const found = await readNetwork(client, layout)
  let network: NetworkRecord
  if (found) {
    if (!inRange(hostRange(found.cidr), node.address))
      throw new TincConsulError('ADOPT_NETWORK_MISMATCH', `network ${o.net} in Consul is ${found.cidr}, and ${node.name}'s address ${node.address} is not a host address in it`)
    if (networkMode(found) !== node.mode)
      throw new TincConsulError('ADOPT_NETWORK_MISMATCH', `network ${o.net} in Consul runs in ${networkMode(found)} mode, but ${node.name}'s tinc.conf says ${node.mode}`)
    if (o.cidr && o.cidr !== found.cidr) throw new TincConsulError('ADOPT_NETWORK_MISMATCH', `network ${o.net} already exists with CIDR ${found.cidr}, not ${o.cidr}; drop --cidr`)
    network = found
  } else {
    const cidr = o.cidr ?? (node.tincUpCidr ? rangeOf(node.tincUpCidr) : undefined)
    if (!cidr) throw new UsageError('ADOPT_NO_CIDR', `network ${o.net} does not exist yet and ${node.dir}/tinc-up doesn't say its range: give --cidr (for example 10.99.0.0/24)`)
    network = newNetworkRecord({ cidr, domain: o.domain, mode: node.mode })
    if (!inRange(hostRange(cidr), node.address)) throw new UsageError('BAD_FLAG', `${node.name}'s address ${node.address} is not a host address in ${cidr}`)
  }
  const routes = adoptedRoutes(node.extraSubnets, network)
  const record = makeRecord({ name: node.name, vpnAddress: node.address, addresses: node.addresses, port: node.port, options: node.options, publicKey: node.publicKey, routes: routes.routes })
  const refused = validateRecord(record, network)
  if (refused) throw new TincConsulError('OWN_RECORD_INVALID', `${node.name}'s record would be refused by peers: ${refused}`)
  return {
    network,
    createNetwork: !found,
    ipamIndex: await ipamIndexFor(client, layout, node),
    record,
    recordIndex: await recordIndexFor(client, layout, node),
    acl: await aclsEnabled(client),
    routes,
  }
}

/** Our address's ipam/ entry: free, ours, or released (take it over); held by another node stops adopt. */
async function ipamIndexFor(client: ConsulClient, layout: KvLayout, node: LocalNode): Promise<number> {
  const held = (await readIpam(client, layout)).get(node.address)
  if (!held) return 0
  if (!held.entry) throw new TincConsulError('ADOPT_ADDRESS_TAKEN', `${layout.ipam(node.address)} is unreadable, so ${node.address} can't be claimed for ${node.name}; fix that entry by hand`)
  if (held.entry.name !== node.name && !held.entry.releasedAt) throw addressTaken(layout, node, held.entry.name)
  return held.index
}

const addressTaken = (layout: KvLayout, node: LocalNode, holder: string) =>
  new TincConsulError(
    'ADOPT_ADDRESS_TAKEN',
    `address ${node.address} is held by node "${holder}" (${layout.ipam(node.address)}), and node "${node.name}" has it in its tinc config: give one of the two another address by hand (tinc-up and its Subnet line), then adopt again`,
  )

/** Our name's record: absent, or ours (same key: a re-run); another key under our name stops adopt. */
async function recordIndexFor(client: ConsulClient, layout: KvLayout, node: LocalNode): Promise<number> {
  const current = await client.kvGet(layout.node(node.name))
  if (!current) {
    const names = (await client.kvKeys(layout.nodesPrefix)).keys.map((k) => k.slice(layout.nodesPrefix.length))
    const clash = names.find((n) => n !== node.name && n.toLowerCase() === node.name.toLowerCase())
    if (clash) throw new TincConsulError('ADOPT_NAME_TAKEN', `node "${clash}" is in the network, and "${node.name}" differs from it only in case: peers would refuse one of them`)
    return 0
  }
  const d = decodeJson(current.value, nodeRecordSchema)
  if (!d.ok || d.value.fingerprint !== node.fingerprint)
    throw new TincConsulError(
      'ADOPT_NAME_TAKEN',
      `"${node.name}" is already in the network with ${d.ok ? `another key (${d.value.fingerprint}, this node's is ${node.fingerprint})` : 'an unreadable record'}; if that is a stale entry, \`tinc-consul revoke ${node.name}\` first`,
    )
  return current.modifyIndex
}

/** The network (if new), the node's token, then its record and address claim in one transaction. Returns the node token. */
async function publishAdoption(o: AdoptOptions, c: { node: LocalNode; plan: ConsulPlan; client: ConsulClient; layout: KvLayout }): Promise<string | undefined> {
  const { node, plan, client, layout } = c
  if (plan.createNetwork) {
    const res = await createNetwork(client, layout, plan.network)
    if (!res.created) throw new TincConsulError('ADOPT_NETWORK_RACE', `network ${o.net} was created by someone else meanwhile; run adopt again to check this node against it`)
    o.progress(`created network ${o.net} (${plan.network.cidr}, names under .${plan.network.domain}, ${networkMode(plan.network)} mode)`)
  }
  let created: CreatedToken | undefined
  const reused = plan.acl ? previousNodeToken(o) : undefined
  if (plan.acl && !reused) created = await createNodeToken(client, policyScopeFor(layout, o.net, plan.network), node.name)
  // Approved before they are announced: a peer that renders the record never goes without them.
  for (const cidr of plan.routes.routes) await approveRoute(client, layout, node.name, cidr)
  const claim: IpamEntry = { name: node.name, at: new Date().toISOString() }
  const ops: TxnOp[] = [
    { KV: { Verb: 'cas', Key: layout.ipam(node.address), Value: b64(JSON.stringify(claim)), Index: plan.ipamIndex } },
    { KV: { Verb: 'cas', Key: layout.node(node.name), Value: b64(JSON.stringify(plan.record)), Index: plan.recordIndex } },
  ]
  const res = (await txnWithChangeLog(client, layout, ops, [node.name])).result
  if (!res.ok) {
    if (created) await deleteToken(client, created.accessorId).catch(() => undefined)
    if (res.errors.some((e) => e.OpIndex === 0)) {
      const holder = (await readIpam(client, layout)).get(node.address)?.entry?.name
      throw holder && holder !== node.name ? addressTaken(layout, node, holder) : new TincConsulError('ADOPT_RACE', `${layout.ipam(node.address)} changed meanwhile; run adopt again`)
    }
    throw new TincConsulError('ADOPT_RACE', `${layout.node(node.name)} was written by someone else meanwhile; run adopt again`)
  }
  o.progress(`claimed ${node.address} and published ${node.name}'s record in one transaction`)
  if (plan.acl) o.progress(`${reused ? 'reusing the node token in the settings file' : 'created this node\u2019s own Consul token'}: it may write only its own record`)
  return reused ?? created?.secretId
}

/** On a re-run, the node token the first run stored; never the operator's token. */
function previousNodeToken(o: AdoptOptions): string | undefined {
  const file = configPath(o.configDir, o.net)
  if (!existsSync(file)) return undefined
  const t = parseConfig(readFileSync(file, 'utf8'), file).TINC_CONSUL_TOKEN
  return t && t !== o.token ? t : undefined
}

function settingsFor(o: AdoptOptions, token: string | undefined): Record<string, string | undefined> {
  return {
    TINC_CONSUL_DIR: o.root,
    TINC_CONSUL_CONSUL: o.consulUrl,
    TINC_CONSUL_PREFIX: o.prefix,
    TINC_CONSUL_TOKEN: token,
    TINC_CONSUL_JOIN_PORT: '0',
    TINC_CONSUL_RUN_DIR: o.runDir,
    TINC_CONSUL_DNS_PORT: o.dnsPort && o.dnsPort !== DEFAULT_DNS_PORT ? String(o.dnsPort) : undefined,
  }
}

const OURS = /Written by tinc-consul/

/**
 * The node's files after adoption: tinc.conf with the managed block, our scripts (the VPN address
 * and range as they were, plus the event hooks), and its own host file with its address first.
 * A hand-made file that is replaced is kept beside it as `<file>.pre-adopt` (once: a re-run
 * keeps the first copy).
 */
async function planFiles(o: AdoptOptions, node: LocalNode, plan: Pick<ConsulPlan, 'network' | 'routes'>): Promise<FileWrite[]> {
  const { network } = plan
  const dir = node.dir
  const scripts = renderScripts({
    address: node.address,
    prefixLength: hostRange(network.cidr).prefixLength,
    eventsFile: eventsFileFor(o.runDir, o.net),
    splitDns: o.splitDns === false ? undefined : { domain: network.domain, port: o.dnsPort ?? DEFAULT_DNS_PORT },
  })
  const out: FileWrite[] = []
  const add = async (path: string, text: string, mode: number, backup: string) => {
    const old = await readFile(path, 'utf8').catch(() => undefined)
    if (old === text) return
    out.push({ path, text, mode, ...(old !== undefined && !OURS.test(old) && !existsSync(backup) ? { backup } : {}) })
  }
  await add(join(dir, 'tinc.conf'), confWithBlock(node.conf), 0o644, join(dir, 'tinc.conf.pre-adopt'))
  // Never a second file in hosts/ (tincd would read any hosts/<name>): the backup goes beside it.
  await add(join(dir, 'hosts', node.name), hostFileWithRoutes(ownHostWithAddressFirst(node.ownHostText, node.address), plan.routes.routes), 0o644, join(dir, `hosts.${node.name}.pre-adopt`))
  for (const [file, text] of Object.entries(scripts)) await add(join(dir, file), text, 0o755, join(dir, `${file}.pre-adopt`))
  out.push({
    path: configPath(o.configDir, o.net),
    text: '',
    mode: 0o600,
    summary: `the daemon's settings: Consul ${o.consulUrl}, tinc dir ${o.root}, and this node's own token (ACLs on) - never the operator's`,
  })
  return out
}

async function writeOne(f: FileWrite): Promise<void> {
  if (f.summary) return
  if (f.backup) await copyFile(f.path, f.backup)
  await writeFileAtomic(f.path, f.text, f.mode)
}

/** Hand-made peers to put on the keep list as `until-adopted`: every one not on it already. */
async function keepAdditions(o: AdoptOptions, node: LocalNode): Promise<string[]> {
  const list = await loadKeepList(keepPath(o.configDir, o.net))
  return node.peers.map((p) => p.name).filter((n) => !list.names.has(n) && !list.untilAdopted.has(n))
}

async function writeKeep(o: AdoptOptions, names: string[]): Promise<void> {
  if (names.length === 0) return
  const path = keepPath(o.configDir, o.net)
  const old = await readFile(path, 'utf8').catch(() => '')
  const lines = ['# Added by tinc-consul adopt: hand-made peers, kept until they adopt with the key in their hand-made file.', ...names.map((n) => `${n} ${UNTIL_ADOPTED}`)]
  await writeFileAtomic(path, `${old}${old === '' || old.endsWith('\n') ? '' : '\n'}${lines.join('\n')}\n`, 0o644)
}
