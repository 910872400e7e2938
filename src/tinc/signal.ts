import { readFile } from 'node:fs/promises'
import type { Logger } from '../log.ts'

/**
 * Sends a signal to the tincd named by a pidfile, after checking that the pid
 * really is tincd: a stale pidfile must never make us signal some other process.
 * Returns false (and logs why) when there is no tincd to signal.
 */
export async function signalTincd(pidFile: string, signal: NodeJS.Signals, log: Logger): Promise<boolean> {
  let text: string
  try {
    text = await readFile(pidFile, 'utf8')
  } catch {
    log.debug({ pidFile }, 'no tincd pidfile; nothing to signal')
    return false
  }
  // tinc 1.0 writes "<pid>\n"; 1.1 appends a cookie and address, so take the first field.
  const pid = Number(text.trim().split(/\s+/)[0])
  if (!Number.isInteger(pid) || pid <= 1) {
    log.warn({ pidFile }, 'tincd pidfile does not hold a pid')
    return false
  }
  const comm = await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '')
  if (comm.trim() !== 'tincd') {
    log.warn({ pidFile, pid, comm: comm.trim() }, 'pidfile names a process that is not tincd; not signalling it')
    return false
  }
  try {
    process.kill(pid, signal)
    log.info({ pid, signal }, 'signalled tincd')
    return true
  } catch (err) {
    log.warn({ err, pid, signal }, 'could not signal tincd')
    return false
  }
}
