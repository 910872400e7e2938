import { createHash } from 'node:crypto'
import { existsSync } from 'node:fs'
import { mkdir, readFile, rm, rmdir } from 'node:fs/promises'
import { dirname } from 'node:path'
import { TincConsulError } from '../errors.ts'
import { writeFileAtomic } from '../util/atomic.ts'
import { run } from '../util/exec.ts'
import type { Step } from './plan.ts'

/**
 * What install wrote, so uninstall removes exactly that, and only files nobody
 * edited since: a unit someone changed by hand is kept and named.
 */
interface Manifest {
  v: 1
  files: Record<string, { sha256: string; owner: string }>
}

export const MANIFEST_PATH = '/var/lib/tinc-consul/install.json'

const sha256 = (s: string | Buffer) => createHash('sha256').update(s).digest('hex')
async function readManifest(path: string): Promise<Manifest> {
  const text = await readFile(path, 'utf8').catch(() => undefined)
  if (text === undefined) return { v: 1, files: {} }
  try {
    const m = JSON.parse(text) as Manifest
    if (m.v === 1 && m.files && typeof m.files === 'object') return m
  } catch {
    // fall through: a damaged manifest is reported, never replaced by an empty one
  }
  throw new TincConsulError('BAD_MANIFEST', `${path} is damaged; fix or delete it by hand`)
}

async function writeManifest(path: string, m: Manifest): Promise<void> {
  await mkdir(dirname(path), { recursive: true })
  await writeFileAtomic(path, `${JSON.stringify(m, null, 2)}\n`, 0o600)
}

export type Say = (line: string) => void

export const describeStep = (s: Step): string => (s.kind === 'file' ? `write ${s.path} (${s.mode.toString(8).padStart(4, '0')}): ${s.why}` : `run ${s.argv.join(' ')}: ${s.why}`)

/** Runs one of install's commands; tests pass a fake one instead of running systemctl. */
export type StepRunner = (argv: string[]) => Promise<{ code: number | null; stderr: string }>

const runStep: StepRunner = (argv) => run(argv, { allowFailure: true, timeoutMs: 120_000 })

/** What `--dry-run` prints: every step, then every file's contents. */
export function printPlan(steps: Step[], say: Say): void {
  for (const s of steps) say(`  ${describeStep(s)}`)
  for (const s of steps) if (s.kind === 'file') say(`\n--- ${s.path}\n${s.content.trimEnd()}`)
}

/** Carries out install's steps, recording each file and its owner in the manifest for uninstall. */
export async function applyInstall(steps: Step[], opts: { manifest: string; say: Say; run?: StepRunner }): Promise<void> {
  const manifest = await readManifest(opts.manifest)
  for (const s of steps) {
    if (s.kind === 'file') {
      const path = s.path
      await mkdir(dirname(path), { recursive: true })
      const changed = await writeFileAtomic(path, s.content, s.mode)
      // The network's settings file belongs to init/join: uninstall leaves it to --purge.
      if (s.owner !== 'config') {
        manifest.files[s.path] = { sha256: sha256(s.content), owner: s.owner }
        // Recorded as soon as written: a later step that fails still leaves uninstall its list.
        await writeManifest(opts.manifest, manifest)
      }
      opts.say(`${changed ? 'wrote    ' : 'unchanged'} ${path}: ${s.why}`)
    } else {
      const r = await (opts.run ?? runStep)(s.argv)
      if (r.code !== 0) throw new TincConsulError('INSTALL_STEP', `\`${s.argv.join(' ')}\` failed (${s.why}): ${r.stderr.trim() || `exit ${r.code}`}`)
      opts.say(`ran       ${s.argv.join(' ')}: ${s.why}`)
    }
  }
}

export interface UninstallOptions {
  manifest: string
  net: string
  /** Also the Consul agent's unit and config. */
  consul: boolean
  /** Commands to stop and disable units first (empty under --root or without systemd). */
  stop: string[][]
  /** Directories with keys and state, removed only when asked (--purge). */
  purge: string[]
  dryRun: boolean
  say: Say
}

/**
 * Reverses install for one network: stops its units, then removes the files
 * install recorded for it (and the shared sidecar template once no network uses
 * it). Keys, tokens and the view cache stay unless `purge` lists them.
 */
export async function uninstall(o: UninstallOptions): Promise<void> {
  const manifest = await readManifest(o.manifest)
  const owners = new Set([o.net, ...(o.consul ? ['consul'] : [])])
  const othersUseTemplate = Object.values(manifest.files).some((f) => !['consul', 'shared', o.net].includes(f.owner))
  const mine = Object.entries(manifest.files).filter(([, f]) => owners.has(f.owner) || (f.owner === 'shared' && !othersUseTemplate))
  for (const argv of o.stop) {
    if (o.dryRun) {
      o.say(`would run ${argv.join(' ')}`)
      continue
    }
    const r = await run(argv, { allowFailure: true, timeoutMs: 60_000 })
    o.say(r.code === 0 ? `ran       ${argv.join(' ')}` : `could not run ${argv.join(' ')}: ${r.stderr.trim()}`)
  }
  for (const [path, f] of mine) {
    const now = await readFile(path).catch(() => undefined)
    if (now === undefined) {
      o.say(`gone      ${path}`)
    } else if (sha256(now) !== f.sha256) {
      o.say(`kept      ${path}: changed since install; remove it by hand if it should go`)
      continue
    } else if (o.dryRun) {
      o.say(`would remove ${path}`)
      continue
    } else {
      await rm(path)
      // The drop-in's directory was made for it alone.
      if (path.includes('.service.d/')) await rmdir(dirname(path)).catch(() => undefined)
      o.say(`removed   ${path}`)
    }
    if (!o.dryRun) delete manifest.files[path]
  }
  for (const dir of o.purge) {
    if (!existsSync(dir)) continue
    if (o.dryRun) o.say(`would remove ${dir} (--purge)`)
    else {
      await rm(dir, { recursive: true, force: true })
      o.say(`removed   ${dir} (--purge)`)
    }
  }
  if (!o.dryRun) await writeManifest(o.manifest, manifest)
}
