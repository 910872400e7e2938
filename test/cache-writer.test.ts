import { test } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { pino } from 'pino'
import { cachePath, loadCache, type CachedView } from '../src/mesh/cache.ts'
import { cacheWriter } from '../src/mesh/daemon/cache-writer.ts'
import { NETWORK } from './helpers-keys.ts'

const view = (revoked: string[]): CachedView => ({ network: NETWORK, records: [], revoked })
const fp = (c: string) => `sha256:${c.repeat(64)}`

test('the view cache waits long for an update, briefly for a change that takes trust away, and is built only when written', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'tc-cache-'))
  t.after(() => rm(dir, { recursive: true, force: true }))
  // Waits of 50 ms (stretched to at most 100) and 60 s: the test sleeps well past the one and far short of the other.
  const writer = cacheWriter(dir, pino({ level: 'silent' }), { soon: 50, later: 60_000 })
  let built = 0
  const lazy = (v: CachedView) => () => (built++, v)

  writer.set(lazy(view([])))
  writer.set(lazy(view([])))
  await sleep(400)
  assert.equal(existsSync(cachePath(dir)), false, 'an update waits the long delay')
  assert.equal(built, 0, 'nothing is built before it is written')

  writer.set(lazy(view([fp('a')])), 'soon')
  await sleep(400)
  assert.deepEqual((await loadCache(dir))?.revoked, [fp('a')], 'a change that takes trust away cuts the wait short, and the newest state is written')
  assert.equal(built, 1, 'three applies, one state built')

  writer.set(lazy(view([fp('a'), fp('b')])))
  await writer.flush()
  assert.deepEqual((await loadCache(dir))?.revoked, [fp('a'), fp('b')], 'stop writes whatever is waiting')
})
