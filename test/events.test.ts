import { test } from 'node:test'
import assert from 'node:assert/strict'
import { appendFile, mkdir, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pino } from 'pino'
import { applyEvent, parseEventLine, watchEvents, type PeerLink, type TincEvent } from '../src/tinc/events.ts'

test('event lines from the hooks are parsed strictly', () => {
  assert.deepEqual(parseEventLine('1795300000 host-up node2 - 198.18.0.2'), { at: new Date(1795300000_000), kind: 'host-up', node: 'node2', subnet: undefined, remote: '198.18.0.2' })
  assert.equal(parseEventLine('1795300000 subnet-up hub 10.99.0.1/32#10 -')?.subnet, '10.99.0.1/32#10')
  for (const bad of ['', 'x host-up a - -', '1 host-up ../x - -', '1 exec node2 - -', '1 host-up node2 - $(reboot)']) {
    const e = parseEventLine(bad)
    assert.ok(e === undefined || e.remote === undefined, `accepted ${JSON.stringify(bad)}`)
  }
})

test('the daemon replays the events file, then follows it, whole lines only, and tracks who is up', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tc-events-'))
  const file = join(dir, 'lab', 'tinc-events')
  const seen: TincEvent[] = []
  // Written before the daemon started: tincd brought node2 up first.
  await mkdir(join(dir, 'lab'))
  await appendFile(file, '1795300000 host-up node2 - 198.18.0.2\n')
  const w = await watchEvents(file, (e) => void seen.push(e), pino({ level: 'silent' }), 200)
  try {
    await appendFile(file, '1795300001 host-up node3 - 198.18.0.101\n1795300002 host-down node2 - 198.18.0.2\n1795300003 host-up no')
    const until = async (n: number) => {
      for (let i = 0; i < 100 && seen.length < n; i++) await new Promise((r) => setTimeout(r, 20))
    }
    await until(3)
    assert.deepEqual(
      seen.map((e) => `${e.kind} ${e.node}`),
      ['host-up node2', 'host-up node3', 'host-down node2'],
    )
    await appendFile(file, 'de4 - 198.18.0.102\n')
    await until(4)
    assert.equal(seen[3]?.node, 'node4', 'a line split across two writes was lost')
    const links = new Map<string, PeerLink>()
    for (const e of seen) applyEvent(links, e)
    assert.deepEqual(
      [...links].filter(([, l]) => l.up).map(([n]) => n),
      ['node3', 'node4'],
    )
  } finally {
    w.stop()
    await rm(dir, { recursive: true, force: true })
  }
})
