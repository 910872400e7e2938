/** tinc 1.0 node names: letters, digits and underscore only. The length cap is ours. */
export const TINC_NAME_RE = /^[A-Za-z0-9_]{1,64}$/

export function isTincName(name: unknown): name is string {
  return typeof name === 'string' && TINC_NAME_RE.test(name)
}

/** A hostname as a tinc name: anything outside [A-Za-z0-9_] becomes "_" ("my-laptop.lan" → "my_laptop"). */
export function sanitizeTincName(hostname: string): string {
  const base = hostname.split('.')[0] ?? ''
  const name = base.replace(/[^A-Za-z0-9_]/g, '_').slice(0, 64)
  return isTincName(name) ? name : 'node'
}

/** Parses `HOST[:PORT]` / `[v6]:PORT` as given to --address. */
export function parseHostPort(s: string): { host: string; port?: number } | undefined {
  const m = /^\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?$/.exec(s) ?? /^([A-Za-z0-9.-]{1,253})(?::(\d{1,5}))?$/.exec(s)
  if (!m?.[1]) return undefined
  const port = m[2] === undefined ? undefined : Number(m[2])
  if (port !== undefined && !(port >= 1 && port <= 65535)) return undefined
  return { host: m[1], port }
}
