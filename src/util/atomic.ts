import { randomBytes } from 'node:crypto'
import { chmod, open, readFile, rename, rm, stat } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'

/**
 * Writes a file so readers see either the old bytes or the new ones, never a
 * mix: temp file in the same directory, fsync, rename. Skips the write when the
 * bytes (and mode) are already right, so tincd sees no new mtime for nothing.
 * Returns whether anything changed.
 */
export interface AtomicWriteOptions {
  /**
   * fsync before the rename (default). Files we can always rebuild (host files, the view
   * cache) skip it: on ext4 a rename over an existing file is ordered after its data anyway,
   * and a file left short by a crash is rewritten on the next render because its bytes differ.
   */
  durable?: boolean
}

export async function writeFileAtomic(path: string, data: string | Uint8Array, mode = 0o644, opts: AtomicWriteOptions = {}): Promise<boolean> {
  const bytes = typeof data === 'string' ? Buffer.from(data, 'utf8') : Buffer.from(data)
  const current = await readFile(path).catch(() => undefined)
  if (current && current.equals(bytes)) {
    const st = await stat(path)
    if ((st.mode & 0o7777) === mode) return false
    await chmod(path, mode)
    return true
  }
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`)
  try {
    const fh = await open(tmp, 'wx', mode)
    try {
      await fh.writeFile(bytes)
      await fh.chmod(mode) // the umask may have narrowed the mode open() asked for
      if (opts.durable !== false) await fh.sync()
    } finally {
      await fh.close()
    }
    await rename(tmp, path)
  } catch (err) {
    await rm(tmp, { force: true })
    throw err
  }
  return true
}
