import { spawn } from 'node:child_process'
import { CommandError } from '../errors.ts'

export interface RunOptions {
  /** Run inside this network namespace (via `ip netns exec`). */
  netns?: string
  input?: string
  env?: NodeJS.ProcessEnv
  cwd?: string
  /** Kill the command after this long; a hung `ip` or `tincd -K` must not hang a test run. */
  timeoutMs?: number
  /** Return the result instead of throwing on a non-zero exit. */
  allowFailure?: boolean
}

export interface RunResult {
  code: number | null
  stdout: string
  stderr: string
}

export function netnsArgv(netns: string | undefined, argv: readonly string[]): string[] {
  return netns ? ['ip', 'netns', 'exec', netns, ...argv] : [...argv]
}

/** Runs a command to completion and collects its output. */
export function run(argv: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const full = netnsArgv(opts.netns, argv)
  const [cmd, ...args] = full
  if (!cmd) throw new CommandError('empty command', null, '')
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: opts.env ?? process.env,
      cwd: opts.cwd,
      stdio: ['pipe', 'pipe', 'pipe'],
      timeout: opts.timeoutMs ?? 120_000,
    })
    let stdout = ''
    let stderr = ''
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d))
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    child.on('error', (err) => {
      reject(new CommandError(`cannot run ${cmd}: ${err.message}`, null, '', { cause: err }))
    })
    child.on('close', (code, signal) => {
      if (code === 0 || opts.allowFailure) return resolve({ code, stdout, stderr })
      const why = signal ? `killed by ${signal}` : `exit ${code}`
      const detail = stderr.trim().split('\n').slice(-3).join(' | ')
      reject(new CommandError(`${full.join(' ')} failed (${why})${detail ? `: ${detail}` : ''}`, code, stderr))
    })
    child.stdin.on('error', () => {}) // the command may exit before reading its input
    child.stdin.end(opts.input ?? '')
  })
}

/** True when `name` resolves to an executable on PATH. */
export async function which(name: string, env: NodeJS.ProcessEnv = process.env): Promise<string | undefined> {
  const r = await run(['/bin/sh', '-c', `command -v "$1"`, 'sh', name], { allowFailure: true, env })
  const path = r.stdout.trim()
  return r.code === 0 && path ? path : undefined
}
