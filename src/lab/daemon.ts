import { spawn } from 'node:child_process'
import { openSync, closeSync, readFileSync } from 'node:fs'
import { LabError } from '../errors.ts'

export interface Daemon {
  name: string
  pid: number
  logFile: string
  /** Set once the process has exited; a daemon that dies during start-up fails the wait that needs it. */
  exit: { code: number | null; signal: NodeJS.Signals | null } | undefined
}

/**
 * Starts a long-running process inside a namespace, detached into its own
 * process group with output going to a log file, so `lab up` can return and
 * leave the lab running. Teardown finds it again through `ip netns pids`.
 */
export function startDaemon(name: string, ns: string, argv: string[], logFile: string, env: NodeJS.ProcessEnv = process.env): Daemon {
  const fd = openSync(logFile, 'a')
  try {
    const child = spawn('ip', ['netns', 'exec', ns, ...argv], { detached: true, stdio: ['ignore', fd, fd], env })
    if (child.pid === undefined) throw new LabError('LAB_SPAWN', `cannot start ${name}: ${argv[0]} did not start`)
    const daemon: Daemon = { name, pid: child.pid, logFile, exit: undefined }
    child.on('exit', (code, signal) => (daemon.exit = { code, signal }))
    child.on('error', () => (daemon.exit = { code: null, signal: null }))
    child.unref()
    return daemon
  } finally {
    closeSync(fd)
  }
}

export function logTail(file: string, lines = 8): string {
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n')
  } catch {
    return '(no log)'
  }
}

export function assertRunning(d: Daemon): void {
  if (d.exit) {
    throw new LabError('LAB_DAEMON_EXITED', `${d.name} exited (${d.exit.signal ?? `code ${d.exit.code}`}) during start-up; last log lines:\n${logTail(d.logFile)}`)
  }
}

/**
 * Retries `probe` until it returns a value, a daemon it depends on dies, or the
 * deadline passes. The lab is a harness waiting on real daemons it does not
 * control, so bounded polling is the honest tool here.
 */
export async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, opts: { timeoutMs: number; intervalMs?: number; daemons?: Daemon[] }): Promise<T> {
  const deadline = Date.now() + opts.timeoutMs
  let last: unknown
  for (;;) {
    for (const d of opts.daemons ?? []) assertRunning(d)
    try {
      const v = await probe()
      if (v !== undefined) return v
    } catch (err) {
      last = err
    }
    if (Date.now() > deadline) {
      const why = last instanceof Error ? `: ${last.message}` : ''
      throw new LabError('LAB_TIMEOUT', `timed out after ${Math.round(opts.timeoutMs / 1000)}s waiting for ${what}${why}`, { cause: last })
    }
    await new Promise((r) => setTimeout(r, opts.intervalMs ?? 250))
  }
}
