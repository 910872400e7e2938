import { existsSync } from 'node:fs'
import { mkdir, mkdtemp, readFile, rename, rm, writeFile } from 'node:fs/promises'
import { homedir } from 'node:os'
import { join } from 'node:path'
import { spawn } from 'node:child_process'
import { ProvisionError } from '../errors.ts'
import { run, which } from '../util/exec.ts'
import { CONSUL_MODULE, CONSUL_NESTED_MODULES, CONSUL_VERSION } from './pins.ts'

/** A Debian package that provides a command the lab or a later feature needs. */
interface DebianTool {
  command: string
  pkg: string
  why: string
}

export const DEBIAN_TOOLS: readonly DebianTool[] = [
  { command: 'tincd', pkg: 'tinc', why: 'the VPN daemon itself' },
  { command: 'ip', pkg: 'iproute2', why: 'network namespaces, veths, tinc-up' },
  { command: 'nft', pkg: 'nftables', why: 'NAT routers and lab cut/heal' },
  { command: 'ping', pkg: 'iputils-ping', why: 'reachability checks' },
  { command: 'dig', pkg: 'bind9-dnsutils', why: 'DNS checks' },
  { command: 'dnsperf', pkg: 'dnsperf', why: 'DNS benchmarks' },
  // dnsmasq-base is the binary without the system service, so installing it starts nothing.
  { command: 'dnsmasq', pkg: 'dnsmasq-base', why: 'the reference server in the DNS benchmark' },
  { command: 'dot', pkg: 'graphviz', why: 'rendering /graph.svg, and checking /graph.dot in the status tests' },
]

export interface ProvisionReport {
  tools: Record<string, string>
  consul: string
  consulSource: 'CONSUL_BIN' | 'PATH' | 'cache' | 'built'
}

export interface ProvisionOptions {
  /** Allow `apt-get install` and `go build`; when false, only report what's missing. */
  install?: boolean
  progress?: (line: string) => void
  env?: NodeJS.ProcessEnv
}

export function cacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.TINC_CONSUL_CACHE_DIR) return env.TINC_CONSUL_CACHE_DIR
  const base = env.XDG_CACHE_HOME || join(homedir(), '.cache')
  return join(base, 'tinc-consul')
}

export function cachedConsulPath(env: NodeJS.ProcessEnv = process.env): string {
  return join(cacheDir(env), 'consul', `v${CONSUL_VERSION}`, 'consul')
}

/** Parses `consul version` output ("Consul v1.22.7\n…") into "1.22.7". */
export function parseConsulVersion(out: string): string | undefined {
  return /^Consul v(\d+\.\d+\.\d+\S*)/m.exec(out)?.[1]
}

/** Parses `tincd --version` output ("tinc version 1.0.36 (built …)") into "1.0.36". */
export function parseTincVersion(out: string): string | undefined {
  return /^tinc version (\d+\.\d+\.\d+)/m.exec(out)?.[1]
}

async function consulVersionOf(bin: string): Promise<string | undefined> {
  const r = await run([bin, 'version'], { allowFailure: true, timeoutMs: 20_000 }).catch(() => undefined)
  return r && r.code === 0 ? parseConsulVersion(r.stdout) : undefined
}

/** Finds a Consul binary of the pinned version without building anything. */
export async function findConsul(env: NodeJS.ProcessEnv = process.env): Promise<{ path: string; source: ProvisionReport['consulSource'] } | undefined> {
  const candidates: Array<[string | undefined, ProvisionReport['consulSource']]> = [
    [env.CONSUL_BIN, 'CONSUL_BIN'],
    [await which('consul', env), 'PATH'],
    [cachedConsulPath(env), 'cache'],
  ]
  for (const [path, source] of candidates) {
    if (!path || !existsSync(path)) continue
    if ((await consulVersionOf(path)) === CONSUL_VERSION) return { path, source }
  }
  return undefined
}

export async function requireConsul(env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const found = await findConsul(env)
  if (!found) {
    throw new ProvisionError('CONSUL_MISSING', `Consul v${CONSUL_VERSION} not found; run \`npm run provision\` (or set CONSUL_BIN to a v${CONSUL_VERSION} binary)`)
  }
  return found.path
}

export async function ensureDebianTools(opts: ProvisionOptions): Promise<Record<string, string>> {
  const say = opts.progress ?? (() => {})
  const missing: DebianTool[] = []
  for (const tool of DEBIAN_TOOLS) if (!(await which(tool.command))) missing.push(tool)
  if (missing.length > 0) {
    const pkgs = [...new Set(missing.map((t) => t.pkg))]
    const hint = `apt-get install -y ${pkgs.join(' ')}`
    if (!opts.install) throw new ProvisionError('TOOLS_MISSING', `missing ${missing.map((t) => t.command).join(', ')}; install with: ${hint}`)
    if (process.getuid?.() !== 0) throw new ProvisionError('TOOLS_MISSING', `missing ${missing.map((t) => t.command).join(', ')}; as root run: ${hint}`)
    if (!(await which('apt-get')))
      throw new ProvisionError(
        'TOOLS_MISSING',
        `missing ${missing.map((t) => t.command).join(', ')} and apt-get is not available; install the packages ${pkgs.join(', ')} with your distribution's package manager`,
      )
    say(`installing Debian packages: ${pkgs.join(' ')}`)
    const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' }
    await run(['apt-get', 'update', '-qq'], { env, timeoutMs: 600_000 }).catch((err: unknown) => {
      throw new ProvisionError('APT_FAILED', `apt-get update failed; fix apt and run: ${hint}`, { cause: err })
    })
    await run(['apt-get', 'install', '-y', '-qq', '--no-install-recommends', ...pkgs], { env, timeoutMs: 900_000 }).catch((err: unknown) => {
      throw new ProvisionError('APT_FAILED', `apt-get install failed; run it by hand to see why: ${hint}`, { cause: err })
    })
    const still = []
    for (const tool of missing) if (!(await which(tool.command))) still.push(tool.command)
    if (still.length > 0) throw new ProvisionError('TOOLS_MISSING', `still missing after apt-get install: ${still.join(', ')}`)
  }
  const found: Record<string, string> = {}
  for (const tool of DEBIAN_TOOLS) found[tool.command] = (await which(tool.command)) ?? ''
  const tinc = await run(['tincd', '--version'], { allowFailure: true })
  const tincVersion = parseTincVersion(tinc.stdout + tinc.stderr)
  if (!tincVersion?.startsWith('1.0.')) {
    throw new ProvisionError('TINC_VERSION', `tincd ${tincVersion ?? '(unknown version)'} found; tinc-consul targets tinc 1.0.x (Debian's "tinc" package)`)
  }
  found.tincd = `${found.tincd} (${tincVersion})`
  return found
}

async function findGo(): Promise<string> {
  const go = (await which('go')) ?? (existsSync('/usr/local/go/bin/go') ? '/usr/local/go/bin/go' : undefined)
  if (!go) {
    throw new ProvisionError('GO_MISSING', `Consul v${CONSUL_VERSION} must be built and no Go toolchain was found; install Go >= 1.25 (or set CONSUL_BIN to a Consul v${CONSUL_VERSION} binary)`)
  }
  return go
}

/**
 * The machine's GOPROXY without its `direct` fallback: modules come from the
 * configured module proxy or not at all, never straight from a VCS host.
 */
export function proxyOnly(goproxy: string): string {
  return goproxy
    .split(/[,|]/)
    .map((p) => p.trim())
    .filter((p) => p && p !== 'direct' && p !== 'off')
    .join(',')
}

async function moduleProxyOnly(go: string): Promise<string> {
  const configured = (await run([go, 'env', 'GOPROXY'])).stdout.trim()
  const proxies = proxyOnly(configured)
  if (!proxies) throw new ProvisionError('GO_NO_PROXY', `GOPROXY is "${configured}", which names no module proxy; set GOPROXY to your module proxy and run provisioning again`)
  return proxies
}

/** The `exclude` block of Consul's own go.mod; a requiring module must repeat it. */
export function excludeBlock(goMod: string): string {
  const block = /^exclude\s*\(([\s\S]*?)^\)/m.exec(goMod)
  const lines =
    block?.[1]
      ?.split('\n')
      .map((l) => l.replace(/\/\/.*$/, '').trim())
      .filter(Boolean) ?? []
  const single = [...goMod.matchAll(/^exclude\s+([^\s(].*)$/gm)].map((m) => (m[1] ?? '').replace(/\/\/.*$/, '').trim())
  const all = [...lines, ...single].filter(Boolean)
  return all.length ? `exclude (\n${all.map((l) => `\t${l}`).join('\n')}\n)\n` : ''
}

/** The throwaway module that requires Consul, its nested-module pins and its excludes. */
export function buildGoMod(goLine: string, upstreamMod: string): string {
  const requires = [`${CONSUL_MODULE} v${CONSUL_VERSION}`, ...Object.entries(CONSUL_NESTED_MODULES).map(([m, v]) => `${m} ${v}`)]
  return `module tinc-consul/consul-build\n\ngo ${goLine}\n\nrequire (\n${requires.map((r) => `\t${r}`).join('\n')}\n)\n\n${excludeBlock(upstreamMod)}`
}

/**
 * Builds the pinned Consul from its Go module. `go install module@version`
 * refuses Consul because its go.mod has replace directives, so we build it as a
 * dependency of a throwaway module, where those replaces don't apply and the
 * published api/sdk submodules are used instead.
 */
async function buildConsul(opts: ProvisionOptions): Promise<string> {
  const say = opts.progress ?? (() => {})
  const go = await findGo()
  const target = cachedConsulPath(opts.env)
  await mkdir(join(target, '..'), { recursive: true })
  const work = await mkdtemp(join(cacheDir(opts.env), 'build-'))
  // GOTOOLCHAIN=local: a too-old Go should fail with our message, not fetch a toolchain.
  const env = { ...process.env, GOTOOLCHAIN: 'local', CGO_ENABLED: '0', GOFLAGS: `${process.env.GOFLAGS ?? ''} -mod=mod`.trim(), GOPROXY: await moduleProxyOnly(go) }
  try {
    say(`building Consul v${CONSUL_VERSION} from its Go module (first time only; takes several minutes)`)
    const dl = await run([go, 'mod', 'download', '-json', `${CONSUL_MODULE}@v${CONSUL_VERSION}`], { env, cwd: work, timeoutMs: 900_000, allowFailure: true })
    if (dl.code !== 0) {
      throw new ProvisionError('CONSUL_BUILD', `go could not download ${CONSUL_MODULE}@v${CONSUL_VERSION}: ${dl.stderr.trim() || dl.stdout.trim()}`)
    }
    const info = JSON.parse(dl.stdout) as { GoMod?: string }
    const upstreamMod = info.GoMod ? await readFile(info.GoMod, 'utf8') : ''
    const goLine = /^go (\S+)/m.exec(upstreamMod)?.[1] ?? '1.25'
    await writeFile(join(work, 'go.mod'), buildGoMod(goLine, upstreamMod))
    await writeFile(join(work, 'tools.go'), `//go:build tools\n\npackage tools\n\nimport _ "${CONSUL_MODULE}"\n`)
    await runGoWithProgress(go, ['mod', 'tidy'], work, env, say, 'resolving dependencies (go mod tidy)', 'modules downloaded')
    await runGoWithProgress(go, ['build', '-v', '-trimpath', '-ldflags', '-s -w', '-o', `${target}.${process.pid}.tmp`, CONSUL_MODULE], work, env, say, 'compiling Consul', 'packages compiled')
    if ((await consulVersionOf(`${target}.${process.pid}.tmp`)) !== CONSUL_VERSION) {
      throw new ProvisionError('CONSUL_BUILD', `the built binary does not report Consul v${CONSUL_VERSION}`)
    }
    await rename(`${target}.${process.pid}.tmp`, target)
    return target
  } finally {
    await rm(work, { recursive: true, force: true })
    await rm(`${target}.${process.pid}.tmp`, { force: true })
  }
}

/**
 * Runs a long go command and reports progress every 15 seconds. `go mod tidy`
 * names each module it downloads and `go build -v` each package it compiles;
 * counting those lines is the closest thing to a progress bar go offers.
 */
function runGoWithProgress(go: string, args: string[], cwd: string, env: NodeJS.ProcessEnv, say: (line: string) => void, label: string, unit: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const started = Date.now()
    const child = spawn(go, args, { cwd, env, stdio: ['ignore', 'ignore', 'pipe'] })
    let count = 0
    let tail: string[] = []
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => {
      for (const line of chunk.split('\n')) {
        if (!line) continue
        if (line.startsWith('go: downloading ') || /^[\w.-]+(\/[\w.@~+-]+)*$/.test(line)) count++
        else tail = [...tail, line].slice(-20)
      }
    })
    const elapsed = () => {
      const secs = Math.round((Date.now() - started) / 1000)
      return `${Math.floor(secs / 60)}m${String(secs % 60).padStart(2, '0')}s`
    }
    const ticker = setInterval(() => say(`  ${label}: ${count} ${unit} so far, ${elapsed()} elapsed`), 15_000)
    child.on('error', (err) => {
      clearInterval(ticker)
      reject(new ProvisionError('CONSUL_BUILD', `cannot run go: ${err.message}`, { cause: err }))
    })
    child.on('close', (code) => {
      clearInterval(ticker)
      if (code === 0) {
        say(`  ${label}: done, ${count} ${unit} in ${elapsed()}`)
        resolve()
      } else reject(new ProvisionError('CONSUL_BUILD', `go ${args[0]} failed (exit ${code}): ${tail.slice(-5).join(' | ')}`))
    })
  })
}

/**
 * Makes sure every real part is on the machine: Debian tools (installed with
 * apt-get when missing and allowed) and the pinned Consul (found, or built once
 * into the per-user cache). Idempotent: a second run only checks.
 */
export async function provision(opts: ProvisionOptions = {}): Promise<ProvisionReport> {
  const env = opts.env ?? process.env
  const tools = await ensureDebianTools(opts)
  const found = await findConsul(env)
  if (found) return { tools, consul: found.path, consulSource: found.source }
  if (!opts.install) throw new ProvisionError('CONSUL_MISSING', `Consul v${CONSUL_VERSION} not found; run \`npm run provision\` to build it`)
  if (env.CONSUL_BIN) opts.progress?.(`CONSUL_BIN=${env.CONSUL_BIN} is not Consul v${CONSUL_VERSION}; building the pinned version instead`)
  const path = await buildConsul({ ...opts, env })
  return { tools, consul: path, consulSource: 'built' }
}
