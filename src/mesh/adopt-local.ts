import { existsSync } from 'node:fs'
import { readdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import ipaddr from 'ipaddr.js'
import { TincConsulError, UsageError } from '../errors.ts'
import { BLOCK_BEGIN, replaceManagedBlock } from '../tinc/conf-block.ts'
import { hostFileFields, isPlausibleRsaKey, keyFingerprint, parseHostFile, type HostFileEntry } from '../tinc/hostfile.ts'
import { confMode, isTincMode, TINC_MODES, type TincMode } from '../tinc/mode.ts'
import { isTincName } from '../tinc/names.ts'
import { handMadeFile } from './adoption.ts'

/**
 * The first step of `tinc-consul adopt`: what a hand-made tinc 1.0 node is, read from its own
 * files only (tinc.conf, its host file, tinc-up, hosts/). Nothing here writes or asks Consul, so
 * a garbage or hostile file stops adopt with a clear error before anything changed.
 */
export interface LocalFiles {
  dir: string
  conf: string | undefined
  /** hosts/<Name>, read once Name is known. */
  ownHost: string | undefined
  tincUp: string | undefined
  privateKey: boolean
  /** Other files in hosts/ named like a node, with their text. */
  peers: Map<string, string>
}

export interface LocalNode {
  dir: string
  name: string
  mode: TincMode
  conf: string
  ownHostText: string
  publicKey: string
  fingerprint: string
  /** The VPN address this node keeps: its own /32. */
  address: string
  addresses: string[]
  port: number
  options: HostFileEntry[]
  /** Other subnets in its host file: routes to announce (`subnet add`), kept in the file. */
  extraSubnets: string[]
  /** The range tinc-up configures (`ip addr add A/NN`, `ifconfig … netmask`), when it says. */
  tincUpCidr?: string
  /** Hand-made peers: every other node-named file in hosts/ we didn't render, with its key's fingerprint if readable. */
  peers: Array<{ name: string; fingerprint: string | undefined }>
}

export async function readLocalFiles(dir: string): Promise<LocalFiles> {
  const read = (rel: string) => readFile(join(dir, rel), 'utf8').catch(() => undefined)
  const conf = await read('tinc.conf')
  const name = conf === undefined ? undefined : parseHostFile(conf).entries.find((e) => e.key.toLowerCase() === 'name')?.value
  const ownHost = name && isTincName(name) ? await read(join('hosts', name)) : undefined
  const keyFile = conf === undefined ? undefined : parseHostFile(conf).entries.find((e) => e.key.toLowerCase() === 'privatekeyfile')?.value
  const entries = await readdir(join(dir, 'hosts'), { withFileTypes: true }).catch(() => [])
  const peers = new Map<string, string>()
  for (const e of entries) if (e.isFile() && isTincName(e.name) && e.name !== name) peers.set(e.name, (await read(join('hosts', e.name))) ?? '')
  return { dir, conf, ownHost, tincUp: await read('tinc-up'), privateKey: existsSync(keyFile ? keyFile : join(dir, 'rsa_key.priv')), peers }
}

/** Checks the node's files and says what it is; throws a clear error on anything adopt can't keep as it is. */
export function inspectLocalNode(f: LocalFiles, o: { vpnAddress?: string }): LocalNode {
  const confPath = join(f.dir, 'tinc.conf')
  if (f.conf === undefined)
    throw new TincConsulError('ADOPT_NO_TINC', `no ${confPath}: adopt runs on a node of a hand-made tinc network (give --dir and --net so that <dir>/<net>/tinc.conf is its config)`)
  const conf = parseHostFile(f.conf)
  if (conf.errors.length) throw new TincConsulError('ADOPT_BAD_TINC_CONF', `${confPath}: ${conf.errors[0]}; fix it by hand, then adopt again`)
  const name = conf.entries.find((e) => e.key.toLowerCase() === 'name')?.value
  if (!name || !isTincName(name)) throw new TincConsulError('ADOPT_BAD_TINC_CONF', `${confPath} has no valid "Name =" line (letters, digits and _ only), got ${JSON.stringify(name ?? '')}`)
  const mode = confMode(f.conf)
  if (!isTincMode(mode)) throw new TincConsulError('ADOPT_BAD_MODE', `${confPath} sets Mode = ${mode}; tinc-consul runs ${TINC_MODES.join(' and ')} networks only`)
  if (!f.privateKey) throw new TincConsulError('ADOPT_NO_KEY', `${f.dir} has no private key (rsa_key.priv or PrivateKeyFile): adopt keeps the node's key and makes none`)
  const hostPath = join(f.dir, 'hosts', name)
  if (f.ownHost === undefined) throw new TincConsulError('ADOPT_BAD_HOST_FILE', `cannot read ${hostPath}, this node's own host file`)
  const h = parseHostFile(f.ownHost)
  if (h.errors.length) throw new TincConsulError('ADOPT_BAD_HOST_FILE', `${hostPath}: ${h.errors[0]}`)
  if (!h.publicKey || !isPlausibleRsaKey(h.publicKey)) throw new TincConsulError('ADOPT_BAD_HOST_FILE', `${hostPath} has no usable RSA public key`)
  const fields = hostFileFields(h)
  const ports = h.entries.filter((e) => e.key.toLowerCase() === 'port').map((e) => Number(e.value))
  if (!ports.every((p) => Number.isInteger(p) && p >= 1 && p <= 65535)) throw new TincConsulError('ADOPT_BAD_HOST_FILE', `${hostPath}: Port is not a port number`)
  const tincUpCidr = f.tincUp === undefined ? undefined : tincUpRanges(f.tincUp)[0]
  const address = chooseAddress(fields.subnets, tincUpCidr, o.vpnAddress, hostPath)
  return {
    dir: f.dir,
    name,
    mode,
    conf: f.conf,
    ownHostText: f.ownHost,
    publicKey: h.publicKey,
    fingerprint: keyFingerprint(h.publicKey),
    address,
    addresses: fields.addresses,
    port: fields.port,
    options: fields.options,
    extraSubnets: fields.subnets.filter((s) => s !== `${address}/32` && s !== address),
    tincUpCidr,
    // A peer file we rendered already (a re-run, a node set up by init) is no hand-made peer.
    peers: [...f.peers]
      .map(([peer, text]) => ({ name: peer, file: handMadeFile(text) }))
      .filter((p) => !p.file.rendered)
      .map((p) => ({ name: p.name, fingerprint: p.file.fingerprint }))
      .sort((a, b) => (a.name < b.name ? -1 : 1)),
  }
}

const asHost = (s: string) => (s.endsWith('/32') ? s.slice(0, -3) : s)

/** The node's own /32 (the VPN address it keeps): the only one, or the one --vpn-address names. */
function chooseAddress(subnets: string[], tincUpCidr: string | undefined, wanted: string | undefined, hostPath: string): string {
  const own = subnets.filter((s) => ipaddr.IPv4.isValidFourPartDecimal(asHost(s)) && (s.endsWith('/32') || !s.includes('/'))).map(asHost)
  if (wanted !== undefined) {
    if (!ipaddr.IPv4.isValidFourPartDecimal(wanted)) throw new UsageError('BAD_FLAG', `--vpn-address must be an IPv4 address, got ${JSON.stringify(wanted)}`)
    const fromUp = tincUpCidr?.split('/')[0]
    if (!own.includes(wanted) && fromUp !== wanted && own.length > 0)
      throw new UsageError('BAD_FLAG', `--vpn-address ${wanted} is not one of this node's /32 subnets in ${hostPath} (${own.join(', ')})`)
    return wanted
  }
  if (own.length === 1 && own[0]) return own[0]
  if (own.length > 1)
    throw new UsageError('ADOPT_WHICH_ADDRESS', `${hostPath} has several /32 subnets (${own.join(', ')}): choose this node's VPN address with --vpn-address; the others become routes to announce`)
  throw new UsageError('ADOPT_NO_ADDRESS', `${hostPath} has no "Subnet = <address>/32" line: give this node's VPN address with --vpn-address${tincUpCidr ? ` (tinc-up sets ${tincUpCidr})` : ''}`)
}

/** The interface addresses tinc-up sets, as A/NN: `ip addr add A/NN …` and `ifconfig IF A netmask M`. */
export function tincUpRanges(script: string): string[] {
  const out: string[] = []
  for (const m of script.matchAll(/\bip\s+(?:-4\s+)?a(?:ddr(?:ess)?)?\s+a(?:dd)?\s+(\d{1,3}(?:\.\d{1,3}){3})\/(\d{1,2})\b/g)) {
    if (ipaddr.IPv4.isValidFourPartDecimal(m[1] ?? '') && Number(m[2]) <= 32) out.push(`${m[1]}/${m[2]}`)
  }
  for (const m of script.matchAll(/\bifconfig\s+\S+\s+(?:inet\s+)?(\d{1,3}(?:\.\d{1,3}){3})\s+netmask\s+(\d{1,3}(?:\.\d{1,3}){3})\b/g)) {
    try {
      out.push(`${m[1]}/${ipaddr.IPv4.parse(m[2] ?? '').prefixLengthFromSubnetMask() ?? NaN}`)
    } catch {
      // Not a netmask: not a range we can use.
    }
  }
  return out.filter((c) => !c.endsWith('/NaN'))
}

/** A4/NN → the range's network form (10.99.0.7/24 → 10.99.0.0/24). */
export function rangeOf(addressCidr: string): string {
  const [, bits] = ipaddr.IPv4.parseCIDR(addressCidr)
  return `${ipaddr.IPv4.networkAddressFromCIDR(addressCidr).toString()}/${bits}`
}

/**
 * The node's own host file with `address`/32 as its first Subnet line, which is the one the
 * daemon publishes as its address; every other line stays as it was. Unchanged when it already is.
 */
export function ownHostWithAddressFirst(text: string, address: string): string {
  const lines = text.split('\n')
  const isSubnet = (l: string) => /^\s*subnet\s*(?:=|\s)/i.test(l)
  const value = (l: string) => asHost((l.replace(/^\s*subnet\s*=?\s*/i, '').split('#')[0] ?? '').trim())
  const first = lines.findIndex(isSubnet)
  if (first >= 0 && value(lines[first] ?? '') === address) return text
  const rest = lines.filter((l) => !(isSubnet(l) && value(l) === address))
  const at = rest.findIndex((l) => isSubnet(l) || l.trim().startsWith('-----BEGIN'))
  const line = `Subnet = ${address}/32`
  return at < 0 ? `${rest.join('\n').replace(/\n*$/, '\n')}${line}\n` : [...rest.slice(0, at), line, ...rest.slice(at)].join('\n')
}

/** tinc.conf with our managed ConnectTo block added (empty: the daemon fills it); lines outside it stay. */
export const confWithBlock = (conf: string): string => (conf.split('\n').some((l) => l.trim() === BLOCK_BEGIN) ? conf : replaceManagedBlock(conf, []))
