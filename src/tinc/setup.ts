import { randomBytes } from 'node:crypto'
import ipaddr from 'ipaddr.js'
import { existsSync } from 'node:fs'
import { chmod, mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { TincConsulError } from '../errors.ts'
import { run } from '../util/exec.ts'
import { writeFileAtomic } from '../util/atomic.ts'
import { replaceManagedBlock } from './conf-block.ts'
import { parseHostFile, renderHostFile } from './hostfile.ts'
import { DEFAULT_TINC_MODE, modeConfLines, type TincMode } from './mode.ts'
import { isTincName } from './names.ts'
import { readOwnRoutes, withOwnRoutes } from '../mesh/own-routes.ts'

/**
 * Everything `init` and `join` write into a tinc directory. Peers' host files
 * come from validated records; our own host file is written only here, from
 * local data, never from anything received.
 */
export interface NodeSetup {
  net: string
  name: string
  /** VPN address and the network's prefix length. */
  address: string
  prefixLength: number
  /** The IPv6 VPN address, in networks with an IPv6 range (always a /64, record.ts). */
  address6?: string
  port: number
  /** Where peers reach us; empty behind NAT. */
  publicAddresses: string[]
  publicKey: string
  connectTo: string[]
  peerHostFiles: Record<string, string>
  interface: string
  /** The file the hook scripts append tinc's events to, for the local daemon. */
  eventsFile: string
  /** Point systemd-resolved at the mesh's DNS for ~domain on the VPN interface (when it runs). */
  splitDns?: { domain: string; port: number }
  timers?: TincTimers
  /** The network's tinc mode (default router): a tun or a tap device, Subnet lines or none. */
  mode?: TincMode
}

/**
 * tinc 1.0's timers, in seconds, as init and join write them. Two tinc 1.0
 * behaviours pull KeyExpire in opposite directions:
 * - a burst of reachability changes (a node joining) can leave a peer holding
 *   a stale session key, and that peer's packets are dropped until the key
 *   expires (an hour by default): short keys bound the outage;
 * - every key renewal restarts the round of UDP probes after which tinc gives
 *   up on a broken direct path and relays through a meta connection: 30
 *   probes a second apart, then PingInterval, then PingTimeout. With keys
 *   shorter than that round a broken direct path is never given up.
 * 60 s keys with a 10 s PingInterval let the round finish (a cut direct path
 * fell back to a relay in 44 to 51 s in the lab) while still bounding the
 * stale-key outage to a minute. Joins now open a single first ConnectTo, which
 * removed the burst the stale key came from (docs/joining.md).
 */
export interface TincTimers {
  keyExpire: number
  pingInterval: number
}

export const DEFAULT_TINC_TIMERS: TincTimers = { keyExpire: 60, pingInterval: 10 }

export function tincTimerLines(t: TincTimers = DEFAULT_TINC_TIMERS): string[] {
  return [`KeyExpire = ${t.keyExpire}`, `PingInterval = ${t.pingInterval}`]
}

export const tincDirFor = (root: string, net: string): string => join(root, net)

/** Linux caps interface names at 15 bytes. */
export const defaultInterface = (net: string): string => `tinc-${net}`.slice(0, 15)

/**
 * A name safe to use as a Linux interface name: at most IFNAMSIZ-1 = 15 bytes, not "." or "..",
 * of letters, digits, "_", "." and "-" (the kernel allows more; this subset is safe to join into a
 * /sys path and to quote in an nft rule).
 */
export const isInterfaceName = (name: string): boolean => /^[A-Za-z0-9_.-]{1,15}$/.test(name) && name !== '.' && name !== '..'

/** The tun device tincd uses: `Interface` in tinc.conf, else tinc's default for the network. */
export async function interfaceOf(tincDir: string, net: string): Promise<string> {
  const text = await readFile(join(tincDir, 'tinc.conf'), 'utf8').catch(() => '')
  const entry = parseHostFile(text).entries.find((e) => e.key.toLowerCase() === 'interface')
  const name = entry?.value.trim()
  return name && isInterfaceName(name) ? name : defaultInterface(net)
}

/**
 * tinc.conf. The mode lines are written here, once, outside the managed block, like Name and
 * Interface: a network's mode is fixed when it is created, and tincd applies a new Mode or
 * DeviceType only when it restarts (a HUP keeps the device it has), so the daemon, which
 * rewrites only the block and only ever HUPs, could not make a change of mode take effect.
 * Status compares the two instead and reports a tinc.conf that disagrees with the network.
 */
export function renderTincConf(s: Pick<NodeSetup, 'name' | 'interface' | 'connectTo' | 'timers' | 'mode'>, previous?: string): string {
  if (previous !== undefined) {
    // Re-running keeps everything the operator added; only our block changes.
    return replaceManagedBlock(
      previous,
      s.connectTo.map((n) => `ConnectTo = ${n}`),
    )
  }
  const head = [
    '# Written by tinc-consul. Lines outside the managed block are yours: the daemon only rewrites the block.',
    `Name = ${s.name}`,
    `Mode = ${s.mode ?? DEFAULT_TINC_MODE}`,
    `Interface = ${s.interface}`,
    ...modeConfLines(s.mode ?? DEFAULT_TINC_MODE),
    // Listen and connect over IPv4 and IPv6 underlays alike. tinc 1.0's default, said explicitly:
    // on a host without IPv6 tincd just has no IPv6 socket.
    'AddressFamily = any',
    // Bounds tinc 1.0's stale-key outage yet lets it give up a broken direct path (see TincTimers).
    ...tincTimerLines(s.timers),
    '',
  ].join('\n')
  return replaceManagedBlock(
    head,
    s.connectTo.map((n) => `ConnectTo = ${n}`),
  )
}

const sh = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`

export function renderScripts(s: Pick<NodeSetup, 'address' | 'prefixLength' | 'address6' | 'eventsFile' | 'splitDns'>): Record<string, string> {
  const cidr = `${s.address}/${s.prefixLength}`
  // nodad: the address is ours by ipam/, and duplicate detection would hold it "tentative" (unusable)
  // for a second or more on a tap device; a failure (IPv6 disabled) leaves the IPv4 address working.
  const up6 = s.address6 ? [`ip -6 addr add ${s.address6}/64 dev "$INTERFACE" nodad || echo "tinc-up: could not add ${s.address6} (IPv6 disabled?)" >&2`] : []
  const down6 = s.address6 ? [`ip -6 addr del ${s.address6}/64 dev "$INTERFACE" 2>/dev/null`] : []
  const hook = (event: string) =>
    [
      '#!/bin/sh',
      '# Written by tinc-consul. tincd waits for this script, so it only appends one line',
      '# for the local daemon and returns: no daemon, a missing directory or a full file',
      '# costs nothing.',
      ...(event === 'subnet-up' || event === 'subnet-down' ? subnetRouteLines(s, event === 'subnet-up') : []),
      `f=${sh(s.eventsFile)}`,
      '[ -d "${f%/*}" ] || exit 0',
      '[ "$(wc -c < "$f" 2>/dev/null || echo 0)" -lt 1048576 ] || exit 0',
      `printf '%s ${event} %s %s %s\\n' "$(date +%s)" "\${NODE:--}" "\${SUBNET:--}" "\${REMOTEADDRESS:--}" >> "$f" 2>/dev/null`,
      'exit 0',
      '',
    ].join('\n')
  return {
    'tinc-up': [
      '#!/bin/sh',
      "# Written by tinc-consul: gives the VPN interface this node's address.",
      // The hooks write only into an existing directory, and /run starts empty at boot, where tincd
      // starts before the daemon: made here, the first host-up events are kept for it to replay.
      `mkdir -p ${sh(dirname(s.eventsFile))} 2>/dev/null`,
      `ip addr add ${cidr} dev "$INTERFACE"`,
      ...up6,
      'ip link set "$INTERFACE" up',
      ...splitDnsUp(s),
      '',
    ].join('\n'),
    'tinc-down': ['#!/bin/sh', '# Written by tinc-consul.', ...splitDnsDown(s), ...down6, `ip addr del ${cidr} dev "$INTERFACE" 2>/dev/null`, 'ip link set "$INTERFACE" down', ''].join('\n'),
    'host-up': hook('host-up'),
    'host-down': hook('host-down'),
    'subnet-up': hook('subnet-up'),
    'subnet-down': hook('subnet-down'),
  }
}

/**
 * The kernel route for a subnet behind another node (docs/subnets.md). tincd runs subnet-up and
 * subnet-down only for subnets it accepted, and with StrictSubnets those are the Subnet lines of our
 * host files: the approved routes, and the nodes' own VPN addresses, which the interface's prefix
 * already routes. So the script skips our own subnets (NODE = NAME) and any inside the VPN range,
 * and adds or removes a route through the tinc interface for the rest. SUBNET is checked against
 * tinc 1.0's exact output (net2str: dotted quad or eight hex groups, always with /prefix, the
 * weight already split off) before any use; anything else, a MAC in switch mode, is left alone.
 */
export function subnetRouteLines(s: Pick<NodeSetup, 'address' | 'prefixLength' | 'address6'>, up: boolean): string[] {
  const bits = s.prefixLength
  const mask = bits === 0 ? 0 : (0xffffffff << (32 - bits)) >>> 0
  const ip = s.address.split('.').reduce((n, o) => n * 256 + Number(o), 0)
  const net = (ip & mask) >>> 0
  // tinc writes each IPv6 group as %x: no leading zeros, no "::". Networks' IPv6 ranges are /64.
  const prefix6 = s.address6
    ? `${ipaddr.IPv6.parse(s.address6)
        .parts.slice(0, 4)
        .map((g) => g.toString(16))
        .join(':')}:`
    : undefined
  const octet = '(0|[1-9][0-9]{0,2})'
  return [
    '# Routes behind other nodes (docs/subnets.md): only subnets outside the VPN range, never our own.',
    'if [ "${NODE:-}" != "${NAME:-}" ] && [ -n "${INTERFACE:-}" ]; then',
    '  s="${SUBNET:-}" fam=""',
    // Whole-value check first: grep matches line by line, and SUBNET must be one line of these characters.
    '  case "$s" in *[!0-9a-f.:/]*) s="" ;; esac',
    `  if printf '%s\\n' "$s" | grep -Eqx '(${octet}\\.){3}${octet}/(0|[1-9][0-9]?)'; then`,
    `    set -- $(printf '%s' "$s" | tr './' '  ')`,
    `    if [ "$1" -le 255 ] && [ "$2" -le 255 ] && [ "$3" -le 255 ] && [ "$4" -le 255 ] && [ "$5" -le 32 ]; then`,
    `      fam=4`,
    `      [ "$5" -ge ${bits} ] && [ $(( (($1 << 24) + ($2 << 16) + ($3 << 8) + $4) & ${mask} )) -eq ${net} ] && fam=""`,
    '    fi',
    `  elif printf '%s\\n' "$s" | grep -Eqx '([0-9a-f]{1,4}:){7}[0-9a-f]{1,4}/(0|[1-9][0-9]{0,2})' && [ "\${s#*/}" -le 128 ]; then`,
    '    fam=6',
    ...(prefix6 ? [`    case "$s" in ${prefix6}*) [ "\${s#*/}" -ge 64 ] && fam="" ;; esac`] : []),
    '  fi',
    up
      ? '  [ -z "$fam" ] || ip -"$fam" route replace "$s" dev "$INTERFACE" || echo "subnet-up: could not route $s through $INTERFACE" >&2'
      : '  [ -z "$fam" ] || ip -"$fam" route del "$s" dev "$INTERFACE" 2>/dev/null',
    'fi',
  ]
}

/**
 * Split DNS through systemd-resolved: only ~domain goes to the mesh's server, on
 * this interface only, and resolved forgets it when the link goes. Nothing is
 * written to /etc/resolv.conf or /etc/hosts. `resolvectl status` fails when
 * resolved isn't running, and then the script leaves DNS alone.
 */
function splitDnsUp(s: Pick<NodeSetup, 'address' | 'address6' | 'splitDns'>): string[] {
  if (!s.splitDns) return []
  const port = s.splitDns.port
  // The daemon serves DNS on the IPv6 VPN address too: resolved gets both, and uses either.
  const v6 = s.address6 ? [port === 53 ? s.address6 : `[${s.address6}]:${port}`] : []
  const server = [port === 53 ? s.address : `${s.address}:${port}`, ...v6].join(' ')
  return [
    '# Split DNS: *.' + s.splitDns.domain + ' goes to tinc-consul on this node, everything else where it went before.',
    'if command -v resolvectl >/dev/null 2>&1 && resolvectl status >/dev/null 2>&1; then',
    `  resolvectl dns "$INTERFACE" ${server} && resolvectl domain "$INTERFACE" ${sh(`~${s.splitDns.domain}`)} || echo "tinc-up: resolvectl could not register ${s.splitDns.domain} DNS" >&2`,
    'fi',
  ]
}

function splitDnsDown(s: Pick<NodeSetup, 'splitDns'>): string[] {
  if (!s.splitDns) return []
  return ['if command -v resolvectl >/dev/null 2>&1 && resolvectl status >/dev/null 2>&1; then', '  resolvectl revert "$INTERFACE" 2>/dev/null', 'fi']
}

export function renderOwnHostFile(s: Pick<NodeSetup, 'publicAddresses' | 'port' | 'address' | 'address6' | 'publicKey'>): string {
  // tincd announces the Subnet lines of its own host file; the daemon reads the /128 back as vpnAddress6.
  const subnets = [`${s.address}/32`, ...(s.address6 ? [`${s.address6}/128`] : [])]
  return renderHostFile({ addresses: s.publicAddresses, port: s.port, subnets, options: [], publicKey: s.publicKey }).replace(
    /^# Written by tinc-consul from this node's record in Consul\. Local edits are overwritten\.\n/,
    "# This node's own host file, written by tinc-consul init/join. The daemon publishes it; edits are published too.\n",
  )
}

/** Writes every file of the setup into `dir` (which exists). Returns the paths that changed. */
export async function writeSetup(dir: string, s: NodeSetup): Promise<string[]> {
  if (!isTincName(s.name)) throw new TincConsulError('BAD_NAME', `not a tinc node name: ${s.name}`)
  const changed: string[] = []
  const put = async (rel: string, text: string, mode: number) => {
    if (await writeFileAtomic(join(dir, rel), text, mode)) changed.push(rel)
  }
  await mkdir(join(dir, 'hosts'), { recursive: true })
  const confPath = join(dir, 'tinc.conf')
  const previous = existsSync(confPath) ? await readFile(confPath, 'utf8') : undefined
  const ownName = previous === undefined ? undefined : parseHostFile(previous).entries.find((e) => e.key.toLowerCase() === 'name')?.value
  await put('tinc.conf', renderTincConf(s, ownName === s.name ? previous : undefined), 0o644)
  // The routes block is the operator's (`subnet add`): a re-run keeps it (src/mesh/own-routes.ts).
  const ownBefore = await readFile(join(dir, 'hosts', s.name), 'utf8').catch(() => '')
  await put(join('hosts', s.name), withOwnRoutes(renderOwnHostFile(s), readOwnRoutes(ownBefore)), 0o644)
  for (const [peer, text] of Object.entries(s.peerHostFiles)) {
    if (peer === s.name || !isTincName(peer)) continue
    await put(join('hosts', peer), text, 0o644)
  }
  for (const [file, text] of Object.entries(renderScripts(s))) await put(file, text, 0o755)
  return changed
}

/**
 * Generates an RSA key pair with `tincd -K` in `dir` (private key in
 * rsa_key.priv, mode 0600) and returns the public key PEM.
 */
export async function generateKey(dir: string, name: string, bits: number): Promise<string> {
  await mkdir(join(dir, 'hosts'), { recursive: true, mode: 0o755 })
  await writeFile(join(dir, 'tinc.conf'), `Name = ${name}\n`)
  await writeFile(join(dir, 'hosts', name), '')
  // tincd -K never prompts when stdin is not a terminal: it takes the default file names.
  await run(['tincd', '-c', dir, '-K', String(bits)], { timeoutMs: 120_000 })
  await chmod(join(dir, 'rsa_key.priv'), 0o600)
  // That tinc.conf only named the key's owner; writeSetup must start from scratch, not keep it.
  await rm(join(dir, 'tinc.conf'))
  return readPublicKey(dir, name)
}

export async function readPublicKey(dir: string, name: string): Promise<string> {
  const h = parseHostFile(await readFile(join(dir, 'hosts', name), 'utf8').catch(() => ''))
  if (!h.publicKey) throw new TincConsulError('NO_PUBLIC_KEY', `${join(dir, 'hosts', name)} has no RSA public key`)
  return h.publicKey
}

/** An existing node's identity in `dir`, if there is one with a private key. */
export async function existingNode(dir: string): Promise<{ name: string; publicKey: string; address?: string } | undefined> {
  const conf = await readFile(join(dir, 'tinc.conf'), 'utf8').catch(() => undefined)
  if (conf === undefined || !existsSync(join(dir, 'rsa_key.priv'))) return undefined
  const name = parseHostFile(conf).entries.find((e) => e.key.toLowerCase() === 'name')?.value
  if (!name || !isTincName(name)) return undefined
  const publicKey = await readPublicKey(dir, name).catch(() => undefined)
  if (!publicKey) return undefined
  const own = parseHostFile(await readFile(join(dir, 'hosts', name), 'utf8'))
  const subnet = own.entries
    .find((e) => e.key.toLowerCase() === 'subnet')
    ?.value.split('#')[0]
    ?.trim()
  return { name, publicKey, address: subnet?.replace(/\/32$/, '') }
}

/**
 * A staging directory next to `finalDir`, so a half-done setup never sits
 * where tincd looks: `commit` moves it into place, `discard` removes it.
 */
export async function stagingDir(finalDir: string): Promise<{ dir: string; commit(): Promise<void>; discard(): Promise<void> }> {
  const dir = join(dirname(finalDir), `.${finalDir.split('/').pop() ?? 'net'}.staging-${randomBytes(4).toString('hex')}`)
  await mkdir(dir, { recursive: true, mode: 0o755 })
  return {
    dir,
    async commit() {
      if (existsSync(finalDir)) {
        // Only with --force: keep the old directory beside it rather than delete someone's keys.
        await rename(finalDir, `${finalDir}.replaced-${new Date().toISOString().replace(/[:.]/g, '-')}`)
      }
      await rename(dir, finalDir)
    },
    discard: () => rm(dir, { recursive: true, force: true }),
  }
}
