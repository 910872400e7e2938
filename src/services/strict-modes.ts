import type { Stats } from 'node:fs'
import { lstat, readlink } from 'node:fs/promises'
import { dirname, isAbsolute } from 'node:path'

/**
 * sshd's StrictModes, for script checks: a command the daemon runs (as root, usually) must
 * come from a definition file and an executable that nobody but root could have written.
 * That means every file and directory on the way, from `/` down, is owned by root or by
 * the daemon's own user, and is not group- or world-writable. Group write is refused
 * whatever the group, since we don't reason about group membership; POSIX ACLs show up in
 * the group bits as their mask, so a named-user ACL with write is refused too.
 *
 * Two departures from sshd, both without loosening it:
 * - A sticky directory (`/tmp`, mode 1777) may be writable by others if it is owned by root
 *   or us: others can't rename, replace or delete the entries in it that they don't own, and
 *   the next component is itself checked to be owned by root or us.
 * - sshd checks the canonical path, which leaves out the directories that hold the symbolic
 *   links it went through. Here the path is resolved one component at a time, so every
 *   directory that takes part in the resolution is checked, and every link followed must be
 *   owned by root or us (in a sticky directory, its owner could swap it).
 */

const trustedUids = (): ReadonlySet<number> => new Set([0, process.getuid?.() ?? 0])

const octal = (st: Stats): string => (st.mode & 0o7777).toString(8).padStart(4, '0')

function ownerProblem(path: string, st: Stats, what = ''): string | undefined {
  const uids = trustedUids()
  if (uids.has(st.uid)) return undefined
  const allowed = uids.size > 1 ? `root or the daemon's uid ${process.getuid?.()}` : 'root'
  return `${path}${what} is owned by uid ${st.uid}, not ${allowed}`
}

/** Why this directory or file can't be trusted, or undefined. */
export function modeProblem(path: string, st: Stats): string | undefined {
  const owner = ownerProblem(path, st)
  if (owner) return owner
  const sticky = st.isDirectory() && (st.mode & 0o1000) !== 0
  if (sticky) return undefined
  if (st.mode & 0o002) return `${path} is world-writable (mode ${octal(st)})`
  if (st.mode & 0o020) return `${path} is group-writable (mode ${octal(st)})`
  return undefined
}

/** Linux's own limit on links followed in one lookup. */
const MAX_LINKS = 40

/**
 * Walks `path` from `/`, checking each directory and the final file with `modeProblem`, and
 * returns the first reason to distrust it. `final: 'refuse-link'` refuses a symbolic link as
 * the last component (a definition file must sit in the directory we checked); `'follow'`
 * follows it (`/usr/bin/python3` is usually a link). Nothing is trusted that we could not stat.
 */
export async function pathProblem(path: string, final: 'refuse-link' | 'follow'): Promise<string | undefined> {
  // Not path.resolve: a lexical ".." would skip over a link that the kernel follows.
  const abs = isAbsolute(path) ? path : `${process.cwd()}/${path}`
  const stat = (p: string) => lstat(p).catch((err: NodeJS.ErrnoException) => `cannot check ${p}: ${err.code ?? err.message}`)
  const root = await stat('/')
  if (typeof root === 'string') return root
  const rootProblem = modeProblem('/', root)
  if (rootProblem) return rootProblem
  let todo = abs.split('/').filter(Boolean)
  let at = '/'
  let links = 0
  let sawFile = false
  while (todo.length) {
    const part = todo.shift() as string
    const last = todo.length === 0
    if (part === '.' || part === '..') {
      if (part === '..') at = dirname(at)
      continue
    }
    const next = at === '/' ? `/${part}` : `${at}/${part}`
    const st = await stat(next)
    if (typeof st === 'string') return st
    if (st.isSymbolicLink()) {
      if (last && final === 'refuse-link') return `${next} is a symbolic link`
      const owner = ownerProblem(next, st, ' (a symbolic link)')
      if (owner) return owner
      if (++links > MAX_LINKS) return `too many symbolic links in ${path}`
      const target = await readlink(next).catch((err: NodeJS.ErrnoException) => ({ err: `cannot check ${next}: ${err.code ?? err.message}` }))
      if (typeof target !== 'string') return target.err
      if (target.startsWith('/')) at = '/'
      todo = [...target.split('/').filter(Boolean), ...todo]
      continue
    }
    if (!last && !st.isDirectory()) return `${next} is not a directory`
    if (last && !st.isFile()) return `${next} is not a regular file`
    const problem = modeProblem(next, st)
    if (problem) return problem
    at = next
    sawFile = last
  }
  return sawFile ? undefined : `${path} is not a regular file`
}

/**
 * Why the script check defined in `definitionPath` must not run, or undefined. Run when the
 * file is read and again before every run, so a file or program swapped or loosened later
 * is caught; between this check and exec only someone who can write a checked directory
 * (root or us) could swap the program.
 */
export async function scriptCheckProblem(definitionPath: string, command: readonly string[]): Promise<string | undefined> {
  const program = command[0] ?? ''
  // The schema already requires this: a bare name would be looked up in a PATH we don't check.
  if (!program.startsWith('/')) return `the program ${JSON.stringify(program)} is not an absolute path`
  return (await pathProblem(definitionPath, 'refuse-link')) ?? (await pathProblem(program, 'follow'))
}

export const scriptRefusal = (definitionPath: string, problem: string): string => `refusing script check in ${definitionPath}: ${problem}`
