import { existsSync, readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

/**
 * Read at run time so the version has one source, package.json: the nearest one above this
 * module that is ours, found the same from src/ (tsx) and from the bundle in dist/cli/.
 */
function packageVersion(): string {
  for (let dir = dirname(fileURLToPath(import.meta.url)); ; dir = dirname(dir)) {
    const file = join(dir, 'package.json')
    if (existsSync(file)) {
      const pkg = JSON.parse(readFileSync(file, 'utf8')) as { name?: string; version?: string }
      if (pkg.name === 'tinc-consul' && pkg.version) return pkg.version
    }
    if (dirname(dir) === dir) return '0.0.0-unknown'
  }
}

export const VERSION: string = packageVersion()
