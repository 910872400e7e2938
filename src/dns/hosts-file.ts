import { readFile, writeFile } from 'node:fs/promises'
import { TincConsulError } from '../errors.ts'
import { replaceManagedBlock } from '../tinc/conf-block.ts'
import { writeFileAtomic } from '../util/atomic.ts'
import { uniqueNodes } from './zone.ts'

/**
 * For machines without systemd-resolved or dnsmasq: the mesh's names as a
 * managed block in a hosts file, one block per network. Opt-in only; the rest
 * of the file is never touched.
 */
export function hostsLines(domain: string, nodes: Array<{ name: string; address: string; address6?: string }>): string[] {
  // A node with an IPv6 VPN address (networks with cidr6) gets a second line for it.
  return [...uniqueNodes(nodes).byLabel]
    .sort(([a], [b]) => a.localeCompare(b))
    .flatMap(([label, n]) => [`${n.address}\t${label}.${domain}`, ...(n.address6 ? [`${n.address6}\t${label}.${domain}`] : [])])
}

/**
 * Writes (or with `lines` undefined, removes) the block for `net`. The file is
 * replaced atomically; where it can't be renamed over (a bind-mounted
 * /etc/hosts in a container) it is rewritten in place instead.
 */
export async function writeHostsBlock(file: string, net: string, lines: string[] | undefined): Promise<boolean> {
  let text: string
  try {
    text = await readFile(file, 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || !lines) throw new TincConsulError('HOSTS_FILE', `cannot read ${file}: ${(err as Error).message}`, { cause: err })
    text = ''
  }
  const next = replaceManagedBlock(text, lines, net)
  if (next === text) return false
  try {
    return await writeFileAtomic(file, next, 0o644)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code !== 'EBUSY' && code !== 'EXDEV') throw new TincConsulError('HOSTS_FILE', `cannot write ${file}: ${(err as Error).message}`, { cause: err })
    await writeFile(file, next)
    return true
  }
}
