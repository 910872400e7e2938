import { watch, type FSWatcher } from 'node:fs'
import { mkdir, open } from 'node:fs/promises'
import { basename, dirname } from 'node:path'
import type { Logger } from '../log.ts'
import { isTincName } from './names.ts'

/**
 * What tincd's hook scripts report (see renderScripts in setup.ts): one line
 * per event, "<unix seconds> <event> <node> <subnet|-> <remote address|->".
 * The file is written by a shell script that tincd runs, so every line is
 * checked like any other input before it is believed.
 */
export const EVENT_KINDS = ['host-up', 'host-down', 'subnet-up', 'subnet-down'] as const
export type TincEventKind = (typeof EVENT_KINDS)[number]

export interface TincEvent {
  at: Date
  kind: TincEventKind
  node: string
  subnet?: string
  remote?: string
}

const LINE_RE = /^(\d{1,12}) (host-up|host-down|subnet-up|subnet-down) (\S{1,64}) (\S{1,64}) (\S{1,64})$/

export function parseEventLine(line: string): TincEvent | undefined {
  const m = LINE_RE.exec(line.trim())
  if (!m || !isTincName(m[3])) return undefined
  const opt = (v: string | undefined) => (v && v !== '-' && /^[0-9A-Fa-f.:/#]+$/.test(v) ? v : undefined)
  return { at: new Date(Number(m[1]) * 1000), kind: m[2] as TincEventKind, node: m[3], subnet: opt(m[4]), remote: opt(m[5]) }
}

export interface EventWatcher {
  stop(): void
}

/**
 * Follows the events file from its start. Creates its directory, since
 * the hooks write nothing while it is missing. When the file grows past
 * `maxBytes` after a read it is truncated, so it can't fill the disk while
 * the daemon runs; the hooks themselves stop at 1 MiB while it doesn't.
 */
export async function watchEvents(file: string, onEvent: (e: TincEvent) => void, log: Logger, maxBytes = 64 * 1024): Promise<EventWatcher> {
  await mkdir(dirname(file), { recursive: true, mode: 0o755 })
  // Replays what the file already holds (it is kept small): a daemon started after tincd
  // still learns who came up before it, and when.
  let offset = 0
  let reading: Promise<void> | undefined
  let again = false
  const read = async (): Promise<void> => {
    const fh = await open(file, 'r+').catch(() => undefined)
    if (!fh) return
    try {
      const { size } = await fh.stat()
      if (size < offset) offset = 0
      if (size === offset) return
      const buf = Buffer.alloc(Math.min(size - offset, 1024 * 1024))
      const { bytesRead } = await fh.read(buf, 0, buf.length, offset)
      const text = buf.subarray(0, bytesRead).toString('utf8')
      // Only whole lines: a hook may be half-way through writing the last one.
      const end = text.lastIndexOf('\n') + 1
      offset += Buffer.byteLength(text.slice(0, end))
      for (const line of text.slice(0, end).split('\n')) {
        if (!line) continue
        const e = parseEventLine(line)
        if (e) onEvent(e)
        else log.warn({ file, line: line.slice(0, 120) }, 'ignored a malformed tinc event line')
      }
      if (offset >= maxBytes && offset === size) {
        await fh.truncate(0)
        offset = 0
      }
    } finally {
      await fh.close()
    }
  }
  const kick = () => {
    if (reading) {
      again = true
      return
    }
    reading = read()
      .catch((err: unknown) => log.warn({ err, file }, 'could not read tinc events'))
      .finally(() => {
        reading = undefined
        if (again) {
          again = false
          kick()
        }
      })
  }
  // Watch the directory: the file may not exist yet, and a watch on a missing file fails.
  const watcher: FSWatcher = watch(dirname(file), (_event, name) => {
    if (name === basename(file)) kick()
  })
  // An emitted error (the directory removed under us) must not end the daemon: status just
  // stops learning about links until the next start.
  watcher.on('error', (err) => log.error({ err, file }, 'watching tinc events failed; peer up/down changes are no longer followed'))
  kick()
  return { stop: () => watcher.close() }
}

export interface PeerLink {
  up: boolean
  since: Date
  remote?: string
}

/** Folds host-up/host-down into who tincd currently reaches (for status); subnet events pass through. */
export function applyEvent(links: Map<string, PeerLink>, e: TincEvent): boolean {
  if (e.kind !== 'host-up' && e.kind !== 'host-down') return false
  const up = e.kind === 'host-up'
  if (links.get(e.node)?.up === up) return false
  links.set(e.node, { up, since: e.at, remote: e.remote })
  return true
}
