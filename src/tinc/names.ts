/** tinc 1.0 node names: letters, digits and underscore only. The length cap is ours. */
export const TINC_NAME_RE = /^[A-Za-z0-9_]{1,64}$/

export function isTincName(name: unknown): name is string {
  return typeof name === 'string' && TINC_NAME_RE.test(name)
}
