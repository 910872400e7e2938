import { readFileSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import type { Logger } from '../log.ts'

/**
 * tinc 1.0 writes its USR1/USR2 dumps from inside the signal handlers, and its
 * HUP and ALRM handlers log a line there too. The handlers call its logger
 * (localtime, stdio, malloc) and are installed with an empty sa_mask, so a
 * second signal landing while a handler writes re-enters that non-reentrant
 * code; tincd then blocks on a futex forever, silent, forwarding nothing.
 * Sending USR2 and USR1 back to back hung a lone tincd within 20 000 pairs
 * here. So every signal this process sends to one tincd goes through one lane:
 * the next is sent only after tincd has finished answering the previous one.
 */
const lanes = new Map<string, Promise<void>>()

/**
 * Runs `fn` after everything queued earlier for the tincd of `pidFile` has
 * finished, and holds the lane `holdMs` longer (for a handler whose end can't
 * be observed). The caller gets `fn`'s result without waiting for the hold.
 */
export function inTincdLane<T>(pidFile: string, fn: () => Promise<T>, holdMs = 0): Promise<T> {
  const prev = lanes.get(pidFile) ?? Promise.resolve()
  const result = prev.then(fn)
  const hold = () => new Promise<void>((r) => setTimeout(r, holdMs))
  const done = result.then(hold, hold)
  lanes.set(pidFile, done)
  void done.then(() => {
    if (lanes.get(pidFile) === done) lanes.delete(pidFile)
  })
  return result
}

export type TincdLookup = { pid: number } | { pid?: undefined; missing: boolean; reason: string }

function procComm(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim()
  } catch {
    return undefined
  }
}

/**
 * The pid of the tincd named by a pidfile, checked against /proc: a stale
 * pidfile whose pid was reused must never get some other process signalled.
 */
export async function findTincd(pidFile: string, comm: (pid: number) => string | undefined = procComm): Promise<TincdLookup> {
  let text: string
  try {
    text = await readFile(pidFile, 'utf8')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    return code === 'ENOENT' ? { missing: true, reason: `not running (no pidfile at ${pidFile})` } : { missing: false, reason: `cannot read pidfile ${pidFile}: ${code ?? String(err)}` }
  }
  // tinc 1.0 writes "<pid>\n"; 1.1 appends a cookie and address, so take the first field.
  const pid = Number(text.trim().split(/\s+/)[0])
  if (!Number.isInteger(pid) || pid <= 1) return { missing: false, reason: `pidfile ${pidFile} does not hold a pid` }
  const name = comm(pid)
  if (name !== 'tincd') return { missing: name === undefined, reason: `pid ${pid} is ${name === undefined ? 'not running' : `"${name}", not tincd`}` }
  return { pid }
}

/**
 * tincd logs one line from inside its HUP/ALRM handler; nothing tells us when
 * that write is over, so the lane stays closed this long after the signal.
 */
const HANDLER_HOLD_MS = 200

/**
 * Sends SIGHUP or SIGALRM to the tincd named by a pidfile, in its lane.
 * Returns false (and logs why) when there is no tincd to signal.
 */
export function signalTincd(pidFile: string, signal: 'SIGHUP' | 'SIGALRM', log: Logger): Promise<boolean> {
  return inTincdLane(
    pidFile,
    async () => {
      const found = await findTincd(pidFile)
      if (found.pid === undefined) {
        if (found.missing) log.debug({ pidFile, reason: found.reason }, 'no tincd to signal')
        else log.warn({ pidFile, reason: found.reason }, 'not signalling: the pidfile does not name a running tincd')
        return false
      }
      try {
        process.kill(found.pid, signal)
        log.info({ pid: found.pid, signal }, 'signalled tincd')
        return true
      } catch (err) {
        log.warn({ err, pid: found.pid, signal }, 'could not signal tincd')
        return false
      }
    },
    HANDLER_HOLD_MS,
  )
}
