import { existsSync, readFileSync } from 'node:fs'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { isNetName } from './mesh/kv-layout.ts'
import { UsageError } from './errors.ts'
import { writeFileAtomic } from './util/atomic.ts'

/**
 * A network's settings as written by `init` and `join`: one KEY=VALUE file per
 * network, `/etc/tinc-consul/<net>.env` by default, mode 0600 because it holds
 * tokens. The same file is a systemd EnvironmentFile, and every command loads
 * it for its --net before reading flags, so flags and the environment still win.
 */
export const DEFAULT_CONFIG_DIR = '/etc/tinc-consul'
const KEY_RE = /^(TINC_CONSUL_[A-Z0-9_]+)$/

export const configPath = (dir: string, net: string): string => join(dir, `${net}.env`)

/** Where a network's pins and cached view live unless --state-dir says otherwise. */
export const defaultStateDir = (net: string): string => `/var/lib/tinc-consul/${net}`

export function parseConfig(text: string, path: string): Record<string, string> {
  const out: Record<string, string> = {}
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim()
    if (!line || line.startsWith('#')) return
    const eq = line.indexOf('=')
    const key = line.slice(0, eq)
    if (eq < 1 || !KEY_RE.test(key)) throw new UsageError('BAD_CONFIG', `${path}:${i + 1}: expected TINC_CONSUL_NAME=value`)
    out[key] = line.slice(eq + 1).replace(/^"(.*)"$/, '$1')
  })
  return out
}

export function renderConfig(values: Record<string, string | undefined>): string {
  const lines = ['# Written by tinc-consul init/join. Read by every tinc-consul command for this network', '# and usable as a systemd EnvironmentFile. Holds tokens: keep it 0600.']
  for (const [k, v] of Object.entries(values)) {
    if (v === undefined) continue
    if (!KEY_RE.test(k) || /[\n\r]/.test(v)) throw new UsageError('BAD_CONFIG', `cannot write ${k}`)
    lines.push(`${k}=${v}`)
  }
  return `${lines.join('\n')}\n`
}

export async function writeConfig(dir: string, net: string, values: Record<string, string | undefined>): Promise<string> {
  const path = configPath(dir, net)
  await mkdir(dir, { recursive: true, mode: 0o755 })
  await writeFileAtomic(path, renderConfig(values), 0o600, { durable: true })
  return path
}

function flagValue(argv: string[], flag: string): string | undefined {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] ?? ''
    if (a === '--') break
    if (a === `--${flag}`) return argv[i + 1]
    if (a.startsWith(`--${flag}=`)) return a.slice(flag.length + 3)
  }
  return undefined
}

/** What the last preload took from the file, so a reload can tell the file's values from the real environment's. */
let fromFile: Record<string, string> = {}

/** Loads the network's config file into `env` for keys not already set. Returns the file's path if it was read. */
export function preloadConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): string | undefined {
  return applyConfig(readConfigFor(argv, env), env)
}

/**
 * Consul's own variables are part of the environment, which beats the file:
 * an operator who exported a management token in CONSUL_HTTP_TOKEN to run
 * `revoke` must not be overruled by the node's own token in <net>.env.
 */
const CONSUL_ALIASES = new Map([
  ['TINC_CONSUL_TOKEN', 'CONSUL_HTTP_TOKEN'],
  ['TINC_CONSUL_CONSUL', 'CONSUL_HTTP_ADDR'],
])

function applyConfig(found: { path: string; values: Record<string, string> } | undefined, env: NodeJS.ProcessEnv): string | undefined {
  if (!found) return undefined
  for (const [k, v] of Object.entries(found.values)) {
    const alias = CONSUL_ALIASES.get(k)
    if (env[k] !== undefined || (alias && env[alias] !== undefined)) continue
    env[k] = v
    fromFile[k] = v
  }
  return found.path
}

function readConfigFor(argv: string[], env: NodeJS.ProcessEnv): { path: string; values: Record<string, string> } | undefined {
  const net = flagValue(argv, 'net') ?? env.TINC_CONSUL_NET
  if (!net || !isNetName(net)) return undefined
  const dir = flagValue(argv, 'config-dir') ?? env.TINC_CONSUL_CONFIG_DIR ?? DEFAULT_CONFIG_DIR
  const path = configPath(dir, net)
  if (!existsSync(path)) return undefined
  return { path, values: parseConfig(readFileSync(path, 'utf8'), path) }
}

/**
 * Reads the config file again for a daemon's SIGHUP: values that came from the
 * old file give way to the new file's, and the real environment still wins. A
 * file that no longer parses throws and leaves the environment as it was.
 */
export function reloadConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): string | undefined {
  const found = readConfigFor(argv, env)
  for (const [k, v] of Object.entries(fromFile)) if (env[k] === v) delete env[k]
  fromFile = {}
  return applyConfig(found, env)
}
