import { defaultPrefix } from './kv-layout.ts'
import { DEFAULT_DNS_PORT } from '../dns/wire.ts'
import { configPath, writeConfig } from '../config-file.ts'
import { TincConsulError, UsageError } from '../errors.ts'
import { defaultInterface, stagingDir, tincDirFor, type TincTimers } from '../tinc/setup.ts'
import { tincBackend } from '../tinc/backend.ts'
import { parseHostFile } from '../tinc/hostfile.ts'
import { isTincName, parseHostPort } from '../tinc/names.ts'
import { eventsFileFor, publicNames } from './init.ts'
import { hostRange } from './ipam.ts'
import { decodeInvite, type Invite } from './invite.ts'
import type { JoinReply } from './join-wire.ts'
import { checkVpnAddress6, networkMode } from './record.ts'
import { redeemInvite, sanitizeHostFile } from './join-client.ts'
import { printable } from '../util/text.ts'

export interface JoinOptions {
  invite: string
  /** Defaults to the name the invite was made for. */
  name?: string
  addresses: string[]
  port: number
  keyBits: number
  root: string
  configDir: string
  /** Runtime directory; the hooks report to <runDir>/<net>/tinc-events. */
  runDir: string
  /** The local Consul agent the daemon will use. */
  consulUrl: string
  interface?: string
  force: boolean
  /** Register the mesh DNS with systemd-resolved in tinc-up (when resolved runs). */
  splitDns?: boolean
  dnsPort?: number
  /** tinc's KeyExpire and PingInterval (default DEFAULT_TINC_TIMERS). */
  timers?: TincTimers
  progress(step: string): void
  /** How long to keep asking while no endpoint answers at all (default 30 s). */
  retryForMs?: number
  now?: Date
}

export interface JoinResult {
  net: string
  name: string
  address: string
  /** The IPv6 VPN address, in networks with an IPv6 range. */
  address6?: string
  endpoint: string
  dir: string
  configPath: string
  consulServers: string[]
  /** Whether the reply carried the Consul gossip key (a client agent needs it). */
  gossipKey: boolean
  publicPeers: string[]
}

/**
 * Joins a network with an invite. Everything is written into a staging
 * directory and moved into place only after the join server said yes, so a
 * failed join leaves nothing behind and can simply be run again.
 */
export async function joinNetwork(o: JoinOptions): Promise<JoinResult> {
  const { inv, name, dir } = await checkJoin(o)
  const staging = await stagingDir(dir)
  try {
    o.progress(`generating a ${o.keyBits}-bit RSA key with tincd -K`)
    const publicKey = await tincBackend().generateKey(staging.dir, name, o.keyBits)
    const reply = await redeemInvite(
      inv,
      { name, publicKey, addresses: o.addresses, port: o.port },
      {
        retryForMs: o.retryForMs,
        onTry: (ep, err) => o.progress(!err ? `redeeming the invite at ${ep}` : err.code === 'JOIN_REFUSED' ? `${ep} refused the join: ${err.message}` : `${ep} did not answer (${err.message})`),
        onRetry: (ms) => o.progress(`no join endpoint answered; asking again in ${ms / 1000} s`),
      },
    )
    // The invite says where the network lives; a reply naming another prefix is refused rather
    // than written into this node's settings.
    const prefix = inv.prefix ?? defaultPrefix(inv.net)
    if (reply.prefix !== prefix) throw new TincConsulError('JOIN_BAD_REPLY', `the join server answered for KV prefix "${printable(reply.prefix)}", but the invite is for "${printable(prefix)}"`)
    o.progress(`joined as ${name} with address ${reply.address}${reply.address6 ? ` and ${reply.address6}` : ''}`)
    const peers: Record<string, string> = {}
    for (const [peer, text] of Object.entries(reply.hostFiles)) {
      if (peer === name) continue
      const clean = sanitizeHostFile(peer, text, reply.network)
      if (clean) peers[peer] = clean
    }
    const range = hostRange(reply.network.cidr)
    const bad6 = reply.address6 === undefined ? undefined : checkVpnAddress6(reply.address6, reply.network)
    if (bad6) throw new TincConsulError('JOIN_BAD_REPLY', `the join server handed out an unusable address: ${bad6}`)
    const first = firstConnect(peers, reply.endpoint)
    await tincBackend().writeSetup(staging.dir, {
      net: inv.net,
      name,
      address: reply.address,
      address6: reply.address6,
      prefixLength: range.prefixLength,
      port: o.port,
      publicAddresses: o.addresses,
      publicKey,
      connectTo: first,
      peerHostFiles: peers,
      interface: o.interface ?? defaultInterface(inv.net),
      eventsFile: eventsFileFor(o.runDir, inv.net),
      splitDns: o.splitDns === false ? undefined : { domain: reply.network.domain, port: o.dnsPort ?? DEFAULT_DNS_PORT },
      timers: o.timers,
      // The reply's network record says how the network runs. A join server of an older
      // release drops the field it doesn't know, so switch networks need join servers of
      // this release (docs/joining.md).
      mode: networkMode(reply.network),
    })
    await staging.commit()
    o.progress(`tinc config written to ${dir} (ConnectTo ${publicNames(peers).join(', ') || 'nobody yet'})`)
    const configPath = await writeSettings(o, inv, reply, first.length === 1 ? first[0] : undefined)
    o.progress(`daemon settings written to ${configPath}`)
    return {
      net: inv.net,
      name,
      address: reply.address,
      address6: reply.address6,
      endpoint: reply.endpoint,
      dir,
      configPath,
      consulServers: reply.consul.servers,
      gossipKey: !!reply.consul.gossipKey,
      publicPeers: publicNames(peers),
    }
  } catch (err) {
    await staging.discard()
    throw err
  }
}

/** What a join checks before it makes a key or asks anyone: the invite, the name, and that the directory is free. */
async function checkJoin(o: Pick<JoinOptions, 'invite' | 'name' | 'root' | 'force' | 'now'>) {
  const inv = decodeInvite(o.invite)
  const now = o.now ?? new Date()
  if (inv.expiresAt <= now) throw new TincConsulError('INVITE_EXPIRED', `this invite expired at ${inv.expiresAt.toISOString()}; ask for a new one (tinc-consul invite --net ${inv.net})`)
  const name = o.name ?? inv.name
  if (!name) throw new UsageError('BAD_FLAG', 'give this node a --name (letters, digits and _)')
  if (!isTincName(name)) throw new UsageError('BAD_NAME', `not a valid tinc node name: ${JSON.stringify(name)} (letters, digits and _ only)`)
  if (inv.name && inv.name !== name) throw new UsageError('BAD_NAME', `this invite is for "${inv.name}"; drop --name or use --name ${inv.name}`)

  const dir = tincDirFor(o.root, inv.net)
  const existing = await tincBackend().existingNode(dir)
  if (existing && !o.force) throw new TincConsulError('ALREADY_JOINED', `${dir} is already set up as node "${existing.name}"; use --force to replace it (the old directory is kept beside it)`)
  return { inv, name, dir }
}

/**
 * `join --dry-run`: the same checks, then what the join would do, from the invite alone.
 * The invite can't be tried without spending it (redeeming is one Consul transaction that
 * deletes it), so nothing is generated, sent or written; the address, token, Consul
 * servers and gossip key are the reply's and are named, not shown.
 */
export async function describeJoin(o: Pick<JoinOptions, 'invite' | 'name' | 'root' | 'force' | 'now' | 'keyBits' | 'configDir'>): Promise<{ net: string; name: string; lines: string[] }> {
  const { inv, name, dir } = await checkJoin(o)
  const lines = [
    `generate a ${o.keyBits}-bit RSA key with tincd -K, in a staging directory beside ${dir}`,
    `redeem the invite (this spends it) at the first of ${inv.endpoints.join(', ')} that answers, as ${name}`,
    `write the tinc config into ${dir}${o.force ? ' (the old directory kept beside it)' : ''}: tinc.conf, hosts/ (this node and every peer in the reply), tinc-up, tinc-down and the hooks`,
    `write ${configPath(o.configDir, inv.net)} (0600): the node's Consul token, the Consul servers and the gossip key from the reply`,
  ]
  return { net: inv.net, name, lines }
}

const SPONSOR_MS = 3_600_000

/** The daemon's settings file: where the network lives, the tokens from the reply, and whether this node serves joins. */
function writeSettings(o: JoinOptions, inv: Invite, reply: JoinReply, sponsor: string | undefined): Promise<string> {
  return writeConfig(o.configDir, inv.net, {
    // The node that admitted us surely has our host file; the others get it through Consul. It stays
    // in the ConnectTo list for the first hour whatever the rendezvous order says.
    TINC_CONSUL_SPONSOR: sponsor,
    TINC_CONSUL_SPONSOR_UNTIL: sponsor && new Date(Date.now() + SPONSOR_MS).toISOString(),
    TINC_CONSUL_DIR: o.root,
    TINC_CONSUL_CONSUL: o.consulUrl,
    TINC_CONSUL_PREFIX: inv.prefix,
    TINC_CONSUL_TOKEN: reply.consul.token,
    TINC_CONSUL_JOIN_TOKEN: reply.consul.joinToken,
    // Serve joins only when the invite said so; without ACLs there is no token to say it with.
    TINC_CONSUL_JOIN_PORT: o.addresses.length && (reply.consul.joinToken || !reply.consul.token) ? undefined : '0',
    TINC_CONSUL_CONSUL_SERVERS: reply.consul.servers.join(','),
    TINC_CONSUL_GOSSIP_KEY: reply.consul.gossipKey,
    TINC_CONSUL_RUN_DIR: o.runDir,
    TINC_CONSUL_DNS_PORT: o.dnsPort && o.dnsPort !== DEFAULT_DNS_PORT ? String(o.dnsPort) : undefined,
  })
}

/**
 * The new node starts with one ConnectTo, the node whose endpoint answered: connecting to
 * every public node at once is a burst of topology changes, and tinc 1.0 can come out of
 * one holding a stale session key. The daemon adds the other public nodes moments later.
 */
function firstConnect(peers: Record<string, string>, endpoint: string): string[] {
  const host = parseHostPort(endpoint)?.host
  const names = publicNames(peers)
  const answered = names.find((n) => parseHostFile(peers[n] ?? '').entries.some((e) => e.key.toLowerCase() === 'address' && e.value.split(/\s+/)[0] === host))
  return answered ? [answered] : names
}
