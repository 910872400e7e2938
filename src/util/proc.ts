import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'

/**
 * True while a process is running. A zombie counts as gone: it has exited and
 * only waits to be reaped, which for our detached daemons happens whenever the
 * parent's event loop (or init) gets to it, not when teardown needs to know.
 */
export function processAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    // The state letter follows the parenthesised command name, which may itself contain spaces.
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3)
    return state !== 'Z' && state !== 'X'
  } catch {
    return false
  }
}

/**
 * The path of a module beside the calling one, to fork it as a helper process: `.ts` when
 * running from source (tsx), `.js` when compiled.
 */
export function siblingModule(metaUrl: string, name: string): string {
  return fileURLToPath(new URL(`./${name}${metaUrl.endsWith('.ts') ? '.ts' : '.js'}`, metaUrl))
}
