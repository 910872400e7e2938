import { sha256 } from '@noble/hashes/sha2.js'
import { bytesToHex } from '@noble/hashes/utils.js'

/**
 * tinc host files, read as untrusted text and written only from an allow-list.
 * tinc's syntax is `Key = Value` (or `Key Value`), case-insensitive keys, `#`
 * comments, plus one PEM block holding the RSA public key.
 */
export interface HostFileEntry {
  key: string
  value: string
}

export interface ParsedHostFile {
  entries: HostFileEntry[]
  /** The PEM block, normalised to `-----BEGIN…-----\n<base64 lines>\n-----END…-----`. */
  publicKey: string | undefined
  /** Lines we could not read at all (garbage, a second key block, a broken block). */
  errors: string[]
}

const PEM_BEGIN = '-----BEGIN RSA PUBLIC KEY-----'
const PEM_END = '-----END RSA PUBLIC KEY-----'
const BASE64_LINE = /^[A-Za-z0-9+/]+={0,2}$/

export function parseHostFile(text: string): ParsedHostFile {
  const entries: HostFileEntry[] = []
  const errors: string[] = []
  let publicKey: string | undefined
  let pem: string[] | undefined
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim()
    if (pem) {
      if (line === PEM_END) {
        if (publicKey) errors.push('more than one public key block')
        else publicKey = [PEM_BEGIN, ...pem, PEM_END].join('\n')
        pem = undefined
      } else if (BASE64_LINE.test(line) && line.length <= 76) pem.push(line)
      else {
        errors.push('public key block has a line that is not base64')
        pem = undefined
      }
      continue
    }
    if (line === '' || line.startsWith('#')) continue
    if (line === PEM_BEGIN) {
      pem = []
      continue
    }
    const m = /^([A-Za-z][A-Za-z0-9]*)\s*(?:=\s*|\s+)(.*)$/.exec(line)
    if (!m?.[1] || m[2] === undefined) {
      errors.push(`unreadable line: ${JSON.stringify(line.slice(0, 60))}`)
      continue
    }
    entries.push({ key: m[1], value: m[2].trim() })
  }
  if (pem) errors.push('public key block is not closed')
  return { entries, publicKey, errors }
}

/** The DER bytes inside a PEM block. */
export function pemToDer(pem: string): Uint8Array {
  const body = pem
    .split('\n')
    .filter((l) => !l.startsWith('-----'))
    .join('')
  return new Uint8Array(Buffer.from(body, 'base64'))
}

/** SHA-256 of the key's DER bytes, as `sha256:<hex>`; what we pin and revoke by. */
export function keyFingerprint(pem: string): string {
  return `sha256:${bytesToHex(sha256(pemToDer(pem)))}`
}

/** A plausible RSA public key: DER SEQUENCE of a sane size (tinc keys are 1024-8192 bits). */
export function isPlausibleRsaKey(pem: string): boolean {
  const der = pemToDer(pem)
  return der.length >= 100 && der.length <= 1100 && der[0] === 0x30
}

/**
 * The host-file variables a peer may set about itself, and what each value may
 * look like. Anything else (Proxy, ScriptsInterpreter, Cipher, …) is dropped:
 * some of those run commands, the rest weaken the link.
 */
export const ALLOWED_OPTIONS: Readonly<Record<string, RegExp>> = {
  Compression: /^(?:[0-9]|1[01])$/,
  IndirectData: /^(?:yes|no)$/i,
  TCPOnly: /^(?:yes|no)$/i,
  PMTU: /^[0-9]{2,5}$/,
  ClampMSS: /^(?:yes|no)$/i,
  Weight: /^[0-9]{1,6}$/,
}

export interface RenderHostFile {
  addresses: string[]
  port: number
  subnets: string[]
  options: HostFileEntry[]
  publicKey: string
}

/** Writes a host file from validated parts only; the text is ours, never the record's. */
export function renderHostFile(h: RenderHostFile): string {
  const lines = [
    "# Written by tinc-consul from this node's record in Consul. Local edits are overwritten.",
    ...h.addresses.map((a) => `Address = ${a}`),
    `Port = ${h.port}`,
    ...h.subnets.map((s) => `Subnet = ${s}`),
    ...h.options.map((o) => `${o.key} = ${o.value}`),
    h.publicKey,
    '',
  ]
  return lines.join('\n')
}

export interface HostFileFields {
  /** From "Address = host [port]": tinc's optional port is dropped, Port is separate. */
  addresses: string[]
  port: number
  /** Subnet values without their "#weight". */
  subnets: string[]
  /** Lines on the allow-list, with canonical key spelling. */
  options: HostFileEntry[]
}

/** The fields a node record is made of, read from a parsed host file. */
export function hostFileFields(h: ParsedHostFile): HostFileFields {
  const values = (k: string) => h.entries.filter((e) => e.key.toLowerCase() === k).map((e) => e.value)
  const options = h.entries.flatMap((e) => {
    const k = Object.keys(ALLOWED_OPTIONS).find((o) => o.toLowerCase() === e.key.toLowerCase())
    return k && ALLOWED_OPTIONS[k]?.test(e.value) ? [{ key: k, value: e.value }] : []
  })
  return {
    addresses: values('address')
      .map((a) => a.split(/\s+/)[0] ?? '')
      .filter(Boolean),
    port: Number(values('port')[0] ?? 655),
    subnets: values('subnet').map((v) => v.split('#')[0]?.trim() ?? ''),
    options,
  }
}
