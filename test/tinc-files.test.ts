import { test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, readFile, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { readManagedBlock, replaceManagedBlock } from '../src/tinc/conf-block.ts'
import { writeFileAtomic } from '../src/util/atomic.ts'

test('the managed block is appended once and replaced in place, leaving other lines alone', () => {
  const mine = 'Name = a\n# my own comment\nConnectTo = handpicked\n'
  const once = replaceManagedBlock(mine, ['ConnectTo = b'])
  assert.ok(once.startsWith(mine))
  assert.deepEqual(readManagedBlock(once), ['ConnectTo = b'])
  const withTail = `${once}Device = /dev/net/tun\n`
  const twice = replaceManagedBlock(withTail, ['ConnectTo = c', 'ConnectTo = d'])
  assert.ok(twice.startsWith(mine))
  assert.ok(twice.endsWith('Device = /dev/net/tun\n'))
  assert.deepEqual(readManagedBlock(twice), ['ConnectTo = c', 'ConnectTo = d'])
  assert.equal(replaceManagedBlock(twice, ['ConnectTo = c', 'ConnectTo = d']), twice)
})

test('broken markers are refused rather than guessed at', () => {
  assert.throws(() => replaceManagedBlock('# BEGIN tinc-consul\nConnectTo = x\n', []), /markers are broken/)
  assert.throws(() => replaceManagedBlock('# END tinc-consul\n# BEGIN tinc-consul\n', []), /markers are broken/)
})

test('atomic writes report whether the bytes changed and never leave temp files', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tc-atomic-'))
  const f = join(dir, 'hosts_a')
  assert.equal(await writeFileAtomic(f, 'one\n'), true)
  const before = (await stat(f)).mtimeMs
  assert.equal(await writeFileAtomic(f, 'one\n'), false)
  assert.equal((await stat(f)).mtimeMs, before)
  assert.equal(await writeFileAtomic(f, 'two\n', 0o600), true)
  assert.equal(await readFile(f, 'utf8'), 'two\n')
  assert.equal((await stat(f)).mode & 0o777, 0o600)
  await writeFile(join(dir, 'other'), 'x')
  const { readdir } = await import('node:fs/promises')
  assert.deepEqual((await readdir(dir)).sort(), ['hosts_a', 'other'])
})
