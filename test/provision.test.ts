import { test } from 'node:test'
import assert from 'node:assert/strict'
import { chmod, mkdir, mkdtemp, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { cachedConsulPath, excludeBlock, findConsul, parseConsulVersion, parseTincVersion, proxyOnly } from '../src/lab/provision.ts'
import { CONSUL_VERSION } from '../src/lab/pins.ts'

test('parses the versions that consul and tincd print', () => {
  assert.equal(parseConsulVersion('Consul v1.22.7\nRevision \nBuild Date 2026-04-22\n'), '1.22.7')
  assert.equal(parseConsulVersion('Consul v1.23.0-rc1\n'), '1.23.0-rc1')
  assert.equal(parseConsulVersion('something else'), undefined)
  assert.equal(parseTincVersion('tinc version 1.0.36 (built Apr 13 2023 16:03:05, protocol 17)\nCopyright'), '1.0.36')
  assert.equal(parseTincVersion('tinc version 1.1pre18'), undefined)
})

test("copies Consul's exclude lines (block and single form) into the throwaway module", () => {
  const mod = 'module x\n\nexclude (\n\tgithub.com/a/b v1.1.5 // broken\n\tgithub.com/a/b v1.1.6\n)\nexclude github.com/c/d v0.1.0\nrequire (\n\tfoo v1\n)\n'
  assert.equal(excludeBlock(mod), 'exclude (\n\tgithub.com/a/b v1.1.5\n\tgithub.com/a/b v1.1.6\n\tgithub.com/c/d v0.1.0\n)\n')
  assert.equal(excludeBlock('module x\n'), '')
})

test('the Consul cache is per version and follows TINC_CONSUL_CACHE_DIR, then XDG_CACHE_HOME', () => {
  assert.equal(cachedConsulPath({ TINC_CONSUL_CACHE_DIR: '/c' }), `/c/consul/v${CONSUL_VERSION}/consul`)
  assert.equal(cachedConsulPath({ XDG_CACHE_HOME: '/x' }), `/x/tinc-consul/consul/v${CONSUL_VERSION}/consul`)
})

async function fakeConsul(dir: string, version: string): Promise<string> {
  const path = join(dir, `consul-${version}`)
  await writeFile(path, `#!/bin/sh\necho "Consul v${version}"\necho "Revision abc"\n`)
  await chmod(path, 0o755)
  return path
}

test('CONSUL_BIN is used only when it is the pinned version; otherwise the cache is next', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tc-prov-'))
  const wrong = await fakeConsul(dir, '1.0.0')
  const right = await fakeConsul(dir, CONSUL_VERSION)
  const emptyPath = { PATH: '/nonexistent' }
  assert.deepEqual(await findConsul({ ...emptyPath, CONSUL_BIN: right, TINC_CONSUL_CACHE_DIR: dir }), { path: right, source: 'CONSUL_BIN' })
  assert.equal(await findConsul({ ...emptyPath, CONSUL_BIN: wrong, TINC_CONSUL_CACHE_DIR: dir }), undefined)
  const cached = cachedConsulPath({ TINC_CONSUL_CACHE_DIR: dir })
  await mkdir(join(cached, '..'), { recursive: true })
  await writeFile(cached, `#!/bin/sh\necho "Consul v${CONSUL_VERSION}"\n`)
  await chmod(cached, 0o755)
  assert.deepEqual(await findConsul({ ...emptyPath, CONSUL_BIN: wrong, TINC_CONSUL_CACHE_DIR: dir }), { path: cached, source: 'cache' })
})

test('the throwaway build module requires Consul and its nested-module pins, and repeats its excludes', async () => {
  const { buildGoMod } = await import('../src/lab/provision.ts')
  const { CONSUL_NESTED_MODULES } = await import('../src/lab/pins.ts')
  const mod = buildGoMod('1.25.9', 'module github.com/hashicorp/consul\nexclude (\n\tgithub.com/hashicorp/go-msgpack v1.1.5\n)\n')
  assert.match(mod, /^go 1\.25\.9$/m)
  assert.match(mod, new RegExp(`^\\tgithub\\.com/hashicorp/consul v${CONSUL_VERSION.replace(/\./g, '\\.')}$`, 'm'))
  for (const [m, v] of Object.entries(CONSUL_NESTED_MODULES)) assert.ok(mod.includes(`\t${m} ${v}\n`), `${m} ${v} missing`)
  assert.match(mod, /exclude \(\n\tgithub\.com\/hashicorp\/go-msgpack v1\.1\.5\n\)/)
  assert.doesNotMatch(mod, /replace/)
})

test('the Consul build uses the module proxy only, never the direct VCS fallback', () => {
  assert.equal(proxyOnly('https://proxy.example,direct'), 'https://proxy.example')
  assert.equal(proxyOnly('https://a.example|https://b.example,direct'), 'https://a.example,https://b.example')
  assert.equal(proxyOnly('direct'), '')
  assert.equal(proxyOnly('off'), '')
})
