import { readFileSync } from 'node:fs'

// Read at run time so the version has one source, package.json, in both the
// tsx (src/) and compiled (dist/) layouts, which sit at the same depth.
const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }

export const VERSION: string = pkg.version
