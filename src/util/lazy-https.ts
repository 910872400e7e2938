import { createRequire } from 'node:module'
import type https from 'node:https'

/**
 * node:https, loaded with the first https URL: a daemon that talks plain HTTP to its local agent
 * and checks plain-HTTP services never holds TLS's code (about 0.7 MB resident).
 */
const load = createRequire(import.meta.url)
let mod: typeof https | undefined
export const httpsModule = (): typeof https => (mod ??= load('node:https') as typeof https)
