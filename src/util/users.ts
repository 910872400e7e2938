import { readFileSync } from 'node:fs'

/** A local account's uid and gid from /etc/passwd (names only; a number is taken as it is). */
export function lookupUser(name: string, passwd = '/etc/passwd'): { uid: number; gid: number } | undefined {
  if (/^\d+$/.test(name)) return { uid: Number(name), gid: Number(name) }
  let text: string
  try {
    text = readFileSync(passwd, 'utf8')
  } catch {
    return undefined
  }
  for (const line of text.split('\n')) {
    const [user, , uid, gid] = line.split(':')
    if (user === name && uid && gid && /^\d+$/.test(uid) && /^\d+$/.test(gid)) return { uid: Number(uid), gid: Number(gid) }
  }
  return undefined
}
