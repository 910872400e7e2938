import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { once } from 'node:events'
import { LabError } from '../../src/errors.ts'
import { labUp, readLabStates } from '../../src/lab/lab.ts'
import { labTest, namespacesWithPrefix, pidAlive } from './helpers.ts'
import { listNamespaces } from '../../src/lab/netns.ts'

labTest('Ctrl-C on a process that owns a lab tears the whole lab down', async () => {
  const child = spawn(process.execPath, ['--import', 'tsx', 'test/fixtures/lab-hold.ts'], { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d))
  const ready = new Promise<{ prefix: string; pids: number[]; runDir: string }>((resolve, reject) => {
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d
      const m = /READY (.*)\n/.exec(out)
      if (m?.[1]) resolve(JSON.parse(m[1]) as { prefix: string; pids: number[]; runDir: string })
    })
    child.on('exit', (code) => reject(new Error(`fixture exited early (${code}): ${err}`)))
  })
  const info = await ready
  assert.ok(namespacesWithPrefix(info.prefix).length > 0)
  child.kill('SIGINT')
  const [code] = (await once(child, 'exit')) as [number | null]
  assert.equal(code, 130)
  assert.deepEqual(namespacesWithPrefix(info.prefix), [])
  assert.deepEqual(info.pids.filter(pidAlive), [])
  assert.equal(existsSync(info.runDir), false)
})

labTest('a lab that fails during start-up removes what it had built and says why', async () => {
  const before = listNamespaces()
  await assert.rejects(labUp({ nodes: 2, nat: 1, consulServers: 1, tinc: false, consulBin: '/bin/false' }), (err: unknown) => {
    assert.ok(err instanceof LabError)
    assert.equal(err.code, 'LAB_DAEMON_EXITED')
    assert.match(err.message, /consul agent consul1 exited/)
    return true
  })
  assert.deepEqual(listNamespaces(), before)
  assert.deepEqual(readLabStates(), [])
})
