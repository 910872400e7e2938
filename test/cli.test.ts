import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { readFileSync } from 'node:fs'

const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }

function cli(...args: string[]) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { encoding: 'utf8', env: { ...process.env, NO_COLOR: '1' } })
  return { code: r.status, out: r.stdout, err: r.stderr }
}

test('--version prints the package version', () => {
  const r = cli('--version')
  assert.equal(r.code, 0)
  assert.equal(r.out.trim(), pkg.version)
})

test('--help lists the commands, and works on subcommands', () => {
  const root = cli('--help')
  assert.equal(root.code, 0)
  assert.match(root.out, /lab/)
  const up = cli('lab', 'up', '--help')
  assert.equal(up.code, 0)
  assert.match(up.out, /--nodes/)
  assert.match(up.out, /TINC_CONSUL_LAB_NODES/)
})

test('a bad flag gives a one-line error and exit 2, never a stack trace', () => {
  const r = cli('lab', 'up', '--nodes', 'lots')
  assert.equal(r.code, 2)
  assert.match(r.err, /^tinc-consul: --nodes must be a whole number from 1 to 20, got "lots"\n$/)
  assert.doesNotMatch(r.err, /\n\s+at /)
})

test('--debug shows the stack trace for the same error', () => {
  const r = cli('--debug', 'lab', 'up', '--nodes', 'lots')
  assert.equal(r.code, 2)
  assert.match(r.err, /UsageError: --nodes must be/)
  assert.match(r.err, /\n\s+at /)
})

test('an unknown command is an error, not silence', () => {
  const r = cli('lab', 'frobnicate')
  assert.equal(r.code, 2)
  assert.match(r.err, /Unknown command/)
})
