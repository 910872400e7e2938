/** tinc 1.0 node names: letters, digits and underscore only. The length cap is ours. */
export const TINC_NAME_RE = /^[A-Za-z0-9_]{1,64}$/

export function isTincName(name: unknown): name is string {
  return typeof name === 'string' && TINC_NAME_RE.test(name)
}

/** Turns a hostname into a valid tinc name: other characters become `_`, and the result is capped. */
export function sanitizeTincName(hostname: string): string {
  const name = hostname.split('.')[0]?.replace(/[^A-Za-z0-9_]/g, '_').slice(0, 64) ?? ''
  return name || 'node'
}
