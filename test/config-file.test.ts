import { test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { preloadConfig } from '../src/config-file.ts'

test("the settings file fills what the environment leaves unset, and Consul's own variables count as set", async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tc-conf-'))
  try {
    await writeFile(join(dir, 'home.env'), 'TINC_CONSUL_TOKEN=node-token\nTINC_CONSUL_CONSUL=http://127.0.0.1:8500\nTINC_CONSUL_DNS_PORT=5353\n', { mode: 0o600 })
    const argv = ['revoke', '--net', 'home', '--config-dir', dir, 'laptop']
    const plain: NodeJS.ProcessEnv = {}
    preloadConfig(argv, plain)
    assert.equal(plain.TINC_CONSUL_TOKEN, 'node-token')
    assert.equal(plain.TINC_CONSUL_DNS_PORT, '5353')
    // An operator who exported a management token to revoke a node keeps it.
    const operator: NodeJS.ProcessEnv = { CONSUL_HTTP_TOKEN: 'management', CONSUL_HTTP_ADDR: '127.0.0.1:18500' }
    preloadConfig(argv, operator)
    assert.equal(operator.TINC_CONSUL_TOKEN, undefined)
    assert.equal(operator.TINC_CONSUL_CONSUL, undefined)
    assert.equal(operator.TINC_CONSUL_DNS_PORT, '5353')
    const explicit: NodeJS.ProcessEnv = { TINC_CONSUL_TOKEN: 'given' }
    preloadConfig(argv, explicit)
    assert.equal(explicit.TINC_CONSUL_TOKEN, 'given')
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})
