#!/usr/bin/env node
// Runs before anything that needs node_modules, so that the README's two commands
// work on a fresh clone: it installs the locked dependencies when they are missing
// or older than the lockfile. Plain JavaScript on purpose: nothing is installed yet.
import { spawnSync } from 'node:child_process'
import { existsSync, statSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { dirname, join } from 'node:path'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const lock = join(root, 'package-lock.json')
const installed = join(root, 'node_modules', '.package-lock.json')

const stale = !existsSync(installed) || statSync(installed).mtimeMs < statSync(lock).mtimeMs
if (stale) {
  console.error('[setup] installing locked npm dependencies (npm ci)…')
  const r = spawnSync('npm', ['ci', '--no-audit', '--no-fund'], { cwd: root, stdio: 'inherit' })
  if (r.status !== 0) {
    console.error('[setup] npm ci failed; fix the error above and run the command again')
    process.exit(r.status ?? 1)
  }
}
