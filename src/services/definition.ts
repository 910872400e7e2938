import { constants, type Stats } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { basename, extname } from 'node:path'
import { parse as parseToml, TomlError } from 'smol-toml'
import type * as Yaml from 'yaml'
import * as z from 'zod'
import { TincConsulError } from '../errors.ts'
import { isDnsLabel } from '../dns/zone.ts'
import { modeProblem, scriptCheckProblem, scriptRefusal } from './strict-modes.ts'

/**
 * One service a node declares, as read from a file in its services directory.
 * Files are written by people (or `tinc-consul service add`) and are untrusted:
 * every field is checked here, unknown keys are errors (a typo like `intervall`
 * would otherwise silently fall back to a default), and each problem names the
 * file and the field.
 */
export type Protocol = 'tcp' | 'udp'

interface CheckTiming {
  intervalMs: number
  timeoutMs: number
}

/**
 * `agent` checks are run by Consul; `local` ones (script, and HTTP with an exact status,
 * which Consul can't express) are run by the daemon and reported to a TTL check, so the
 * agent never needs script checks turned on.
 */
export type CheckDefinition = { deregisterAfterMs: number } & (
  | ({ type: 'tcp' | 'udp' } & CheckTiming)
  | ({ type: 'http'; path: string; scheme: 'http' | 'https'; status?: number; tlsSkipVerify: boolean } & CheckTiming)
  | { type: 'ttl'; ttlMs: number }
  | ({ type: 'script'; command: string[] } & CheckTiming)
)

export interface ServiceDefinition {
  /** The file's name without its extension; the service's ID on the agent is built from it. */
  stem: string
  file: string
  /** The path it was read from (unset when parsed from text): a script check re-verifies it before each run. */
  path?: string
  name: string
  port: number
  protocol: Protocol
  tags: string[]
  meta: Record<string, string>
  check: CheckDefinition
}

export class DefinitionError extends TincConsulError {
  override name = 'DefinitionError'
  readonly file: string
  constructor(file: string, message: string, options?: { cause?: unknown; code?: string }) {
    super(options?.code ?? 'BAD_SERVICE_FILE', `${file}: ${message}`, options)
    this.file = file
  }
}

export const SERVICE_FILE_EXTENSIONS = ['.toml', '.yaml', '.yml', '.json'] as const
/** Editors' backups, dotfiles and READMEs in the directory are not service files. */
const FILE_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.(toml|ya?ml|json)$/
const MAX_FILE_BYTES = 64 * 1024

export const isServiceFile = (path: string): boolean => FILE_RE.test(basename(path))

/** Consul's minimum for deregister_critical_after. */
const MIN_DEREGISTER_MS = 60_000
export const DEFAULTS = { intervalMs: 10_000, timeoutMs: 2_000, deregisterAfterMs: 10 * 60_000, ttlMs: 5 * 60_000 } as const

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }

/** Go-style durations as Consul takes them: "10s", "1m30s", "500ms". */
export function parseDuration(s: string): number | undefined {
  if (!/^(\d+(\.\d+)?(ms|s|m|h))+$/.test(s)) return undefined
  let ms = 0
  for (const [, n, unit] of s.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h)/g)) ms += Number(n) * (UNITS[unit ?? ''] ?? NaN)
  return Number.isFinite(ms) ? Math.round(ms) : undefined
}

/** The short form back: 10000 → "10s", 90000 → "90s", 1500 → "1500ms". */
export function formatDuration(ms: number): string {
  if (ms % 60_000 === 0 && ms >= 60_000) return `${ms / 60_000}m`
  return ms % 1000 === 0 ? `${ms / 1000}s` : `${ms}ms`
}

const duration = (min: number, why = '') =>
  z.string().transform((s, ctx) => {
    const ms = parseDuration(s.trim())
    if (ms === undefined) {
      ctx.addIssue({ code: 'custom', message: `expected a duration like "10s", "2m" or "500ms" (got ${JSON.stringify(s)})` })
      return z.NEVER
    }
    if (ms < min) {
      ctx.addIssue({ code: 'custom', message: `must be at least ${formatDuration(min)}${why} (got ${JSON.stringify(s)})` })
      return z.NEVER
    }
    return ms
  })

const label = (what: string) => z.string().refine((s) => isDnsLabel(s.toLowerCase()), { message: `${what} must be a DNS label: letters, digits and "-", at most 63, not starting or ending with "-"` })

const checkSchema = z.strictObject({
  type: z.enum(['tcp', 'http', 'udp', 'ttl', 'script'], { message: 'expected one of tcp, http, udp, ttl, script' }).optional(),
  interval: duration(1000).optional(),
  timeout: duration(100).optional(),
  deregister_critical_after: duration(MIN_DEREGISTER_MS, ", Consul's minimum").optional(),
  path: z
    .string()
    .regex(/^\/[\x21-\x7e]*$/, 'expected a URL path starting with "/", without spaces')
    .max(1024)
    .optional(),
  status: z.number().int().min(100).max(599).optional(),
  scheme: z.enum(['http', 'https']).optional(),
  tls_skip_verify: z.boolean().optional(),
  ttl: duration(1000).optional(),
  command: z
    .array(z.string().min(1).max(4096))
    .min(1, 'expected the program and its arguments, e.g. ["/usr/local/bin/check-nfs"]')
    .max(64)
    .refine((c) => c[0]?.startsWith('/') ?? false, "the program must be an absolute path: the daemon's PATH is not yours")
    .optional(),
})

const META_KEY = /^[A-Za-z0-9_-]{1,128}$/
const fileSchema = z.strictObject({
  name: label('name').optional(),
  port: z
    .number({ error: (iss) => (iss.input === undefined ? 'required: the port the service listens on' : undefined) })
    .int('expected a whole number')
    .min(1, 'expected 1 to 65535')
    .max(65535, 'expected 1 to 65535'),
  protocol: z.enum(['tcp', 'udp'], { message: 'expected tcp or udp' }).optional(),
  tags: z.array(label('a tag')).max(32).optional(),
  meta: z
    .record(z.string(), z.string().max(512))
    .refine((m) => Object.keys(m).length <= 32, 'at most 32 entries')
    .superRefine((m, ctx) => {
      for (const k of Object.keys(m)) {
        if (!META_KEY.test(k)) ctx.addIssue({ code: 'custom', path: [k], message: 'keys are letters, digits, "_" and "-" (Consul\'s rule)' })
        else if (/^(mesh|consul)-/i.test(k)) ctx.addIssue({ code: 'custom', path: [k], message: '"mesh-" and "consul-" keys are reserved' })
      }
    })
    .optional(),
  check: checkSchema.optional(),
})

/** Fields that belong to one check type only: naming them for another type is an error, not ignored. */
const ONLY_FOR: Record<string, ReadonlyArray<string>> = {
  path: ['http'],
  status: ['http'],
  scheme: ['http'],
  tls_skip_verify: ['http'],
  ttl: ['ttl'],
  command: ['script'],
  interval: ['tcp', 'udp', 'http', 'script'],
  timeout: ['tcp', 'udp', 'http', 'script'],
}

export interface ParseOptions {
  /** Script checks run a command on this node; they are refused unless the operator turned them on. */
  allowScripts: boolean
}

/** Checks parsed data (from any of the three formats) and fills in the defaults. */
export function definitionFrom(data: unknown, file: string, opts: ParseOptions): ServiceDefinition {
  const name = basename(file)
  const stem = name.slice(0, name.length - extname(name).length)
  const r = fileSchema.safeParse(data)
  if (!r.success) throw new DefinitionError(name, r.error.issues.map(describeIssue).join('; '))
  const v = r.data
  const serviceName = (v.name ?? stem).toLowerCase()
  if (!isDnsLabel(serviceName)) throw new DefinitionError(name, `name: missing, and the file name "${stem}" is not a DNS label to use instead`)
  const protocol = v.protocol ?? 'tcp'
  const c = v.check ?? {}
  const type = c.type ?? protocol
  for (const [field, types] of Object.entries(ONLY_FOR)) {
    if ((c as Record<string, unknown>)[field] !== undefined && !types.includes(type)) throw new DefinitionError(name, `check.${field}: not used by a ${type} check (only ${types.join(', ')})`)
  }
  if (type === 'udp' && protocol !== 'udp') throw new DefinitionError(name, 'check.type: a udp check needs protocol = "udp"')
  if (type === 'script' && !opts.allowScripts)
    throw new DefinitionError(name, 'check.type: script checks run commands on this node and are off; start the daemon with --script-checks (TINC_CONSUL_SCRIPT_CHECKS=1) to allow them')
  if (type === 'script' && !c.command) throw new DefinitionError(name, 'check.command: required for a script check')
  const deregisterAfterMs = c.deregister_critical_after ?? DEFAULTS.deregisterAfterMs
  const intervalMs = c.interval ?? DEFAULTS.intervalMs
  const timeoutMs = c.timeout ?? Math.min(DEFAULTS.timeoutMs, intervalMs)
  if (type !== 'ttl' && timeoutMs > intervalMs) throw new DefinitionError(name, `check.timeout: longer than the interval (${formatDuration(timeoutMs)} > ${formatDuration(intervalMs)})`)
  let check: CheckDefinition
  if (type === 'ttl') check = { type, ttlMs: c.ttl ?? DEFAULTS.ttlMs, deregisterAfterMs }
  else if (type === 'http')
    check = {
      type,
      path: c.path ?? '/',
      scheme: c.scheme ?? 'http',
      tlsSkipVerify: c.tls_skip_verify ?? false,
      ...(c.status !== undefined ? { status: c.status } : {}),
      intervalMs,
      timeoutMs,
      deregisterAfterMs,
    }
  else if (type === 'script') check = { type, command: c.command ?? [], intervalMs, timeoutMs, deregisterAfterMs }
  else check = { type, intervalMs, timeoutMs, deregisterAfterMs }
  return { stem, file: name, name: serviceName, port: v.port, protocol, tags: [...new Set((v.tags ?? []).map((t) => t.toLowerCase()))], meta: v.meta ?? {}, check }
}

function describeIssue(issue: z.core.$ZodIssue): string {
  const at = issue.path.map(String).join('.')
  if (issue.code === 'unrecognized_keys') return issue.keys.map((k) => `${at ? `${at}.` : ''}${k}: unknown field`).join('; ')
  return `${at || '(top level)'}: ${issue.message}`
}

/**
 * The YAML parser is a fifth of the code the daemon would load at start, and most nodes have no
 * YAML service file: it is imported with the first one (readDefinition), not with the daemon.
 */
let yaml: typeof Yaml.default | undefined

/** Loads the YAML parser; parseDefinitionText needs it for .yaml and .yml text. */
export async function loadYamlParser(): Promise<void> {
  // yaml is CommonJS: import() gives its exports as `default`, and the bundle gives nothing else.
  yaml ??= (await import('yaml')).default
}

function yamlParser(): typeof Yaml.default {
  if (!yaml) throw new Error('the YAML parser is not loaded (call loadYamlParser first)')
  return yaml
}

/** Parses one file's text by its extension. A .yaml or .yml file needs loadYamlParser() first. */
export function parseDefinitionText(text: string, file: string, opts: ParseOptions): ServiceDefinition {
  const name = basename(file)
  const ext = extname(name).toLowerCase()
  let data: unknown
  if ((ext === '.yaml' || ext === '.yml') && !yaml) yamlParser()
  try {
    if (ext === '.toml') data = parseToml(text)
    else if (ext === '.yaml' || ext === '.yml') data = yamlParser().parse(text, { uniqueKeys: true, prettyErrors: true })
    else if (ext === '.json') data = JSON.parse(text)
    else throw new DefinitionError(name, `not a service file (expected ${SERVICE_FILE_EXTENSIONS.join(', ')})`)
  } catch (err) {
    if (err instanceof DefinitionError) throw err
    throw new DefinitionError(name, `not valid ${ext === '.yml' ? 'YAML' : ext.slice(1).toUpperCase()}: ${syntaxMessage(err)}`, { cause: err })
  }
  return definitionFrom(data, name, opts)
}

function syntaxMessage(err: unknown): string {
  if (err instanceof TomlError) return `${err.message.split('\n')[0]?.replace(/^Invalid TOML document: /, '') ?? 'invalid'} at line ${err.line}, column ${err.column}`
  if (yaml && err instanceof yaml.YAMLParseError) return (err.message.split('\n')[0] ?? 'invalid').replace(/:$/, '')
  return (err as Error).message
}

export async function readDefinition(path: string, opts: ParseOptions): Promise<ServiceDefinition> {
  const name = basename(path)
  if (!isServiceFile(name)) throw new DefinitionError(name, `not a service file name (letters, digits, "_", "-", "." ending in ${SERVICE_FILE_EXTENSIONS.join(', ')})`)
  let file: { text: string; st: Stats; link: boolean }
  try {
    file = await readOpen(path, name)
  } catch (err) {
    if (err instanceof DefinitionError) throw err
    throw new DefinitionError(name, `cannot read: ${(err as Error).message}`, { cause: err })
  }
  if (/\.ya?ml$/i.test(name)) await loadYamlParser()
  const def = { ...parseDefinitionText(file.text, name, opts), path }
  if (def.check.type === 'script') {
    // The file we read (by its descriptor), then the path and the program as they stand now.
    const problem = file.link ? `${path} is a symbolic link` : (modeProblem(path, file.st) ?? (await scriptCheckProblem(path, def.check.command)))
    if (problem) throw new DefinitionError(name, scriptRefusal(path, problem), { code: 'INSECURE_SCRIPT_CHECK' })
  }
  return def
}

/**
 * Reads through one descriptor, so the checks see the very file whose text was parsed. It is
 * opened without following a link first, to know whether it is one (a link is still read, as
 * only script checks are refused for it), and non-blocking, so a FIFO can't hang the daemon.
 */
async function readOpen(path: string, name: string): Promise<{ text: string; st: Stats; link: boolean }> {
  const flags = constants.O_RDONLY | constants.O_NONBLOCK
  let link = false
  let fh: FileHandle
  try {
    fh = await open(path, flags | constants.O_NOFOLLOW)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ELOOP') throw err
    link = true
    fh = await open(path, flags)
  }
  try {
    const st = await fh.stat()
    if (!st.isFile()) throw new DefinitionError(name, 'not a regular file')
    if (st.size > MAX_FILE_BYTES) throw new DefinitionError(name, `larger than ${MAX_FILE_BYTES / 1024} KiB`)
    return { text: await fh.readFile('utf8'), st, link }
  } finally {
    await fh.close()
  }
}
