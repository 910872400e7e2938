import { test } from 'node:test'
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { readManagedBlock, replaceManagedBlock } from '../src/tinc/conf-block.ts'
import { generateKey, renderTincConf, writeSetup } from '../src/tinc/setup.ts'
import { renderHostFile } from '../src/tinc/hostfile.ts'
import { confMode } from '../src/tinc/mode.ts'
import { tincBackend } from '../src/tinc/backend.ts'
import { nodeRecord, rsaPublicPem } from './helpers-keys.ts'
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

test("a fresh node setup: full tinc.conf, scripts that never block, idempotent rewrite that keeps the operator's lines", async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tc-setup-'))
  try {
    const publicKey = await generateKey(dir, 'alpha', 1024)
    assert.equal((await stat(join(dir, 'rsa_key.priv'))).mode & 0o777, 0o600)
    const setup = {
      net: 'home',
      name: 'alpha',
      address: '10.99.0.5',
      prefixLength: 24,
      port: 655,
      publicAddresses: ['198.18.0.5'],
      publicKey,
      connectTo: ['hub'],
      peerHostFiles: {},
      interface: 'tinc-home',
      eventsFile: join(dir, 'events', 'tinc-events'),
    }
    await writeSetup(dir, setup)
    const conf = await readFile(join(dir, 'tinc.conf'), 'utf8')
    for (const line of ['Name = alpha', 'Mode = router', 'Interface = tinc-home', 'StrictSubnets = yes', 'KeyExpire = 60', 'PingInterval = 10', 'ConnectTo = hub'])
      assert.ok(conf.includes(line), `tinc.conf lacks "${line}":\n${conf}`)
    assert.match(await readFile(join(dir, 'hosts', 'alpha'), 'utf8'), /Subnet = 10\.99\.0\.5\/32[\s\S]*BEGIN RSA PUBLIC KEY/)
    assert.match(await readFile(join(dir, 'tinc-up'), 'utf8'), /ip addr add 10\.99\.0\.5\/24 dev "\$INTERFACE"/)
    // A hook with no events directory exits 0 at once and writes nothing.
    const env = { ...process.env, NODE: 'hub', SUBNET: '10.99.0.1/32', REMOTEADDRESS: '198.18.0.1' }
    execFileSync(join(dir, 'subnet-up'), { env })
    assert.equal(existsSync(join(dir, 'events')), false)
    // tinc-up (tincd runs it before any hook) makes the directory, so the peers that come up
    // before the daemon starts (at boot, /run is empty) are on file for it. `ip` is a stand-in.
    const bin = join(dir, 'bin')
    await mkdir(bin)
    await writeFile(join(bin, 'ip'), '#!/bin/sh\nexit 0\n', { mode: 0o755 })
    execFileSync(join(dir, 'tinc-up'), { env: { ...env, PATH: `${bin}:${process.env.PATH ?? ''}`, INTERFACE: 'tinc-home' } })
    execFileSync(join(dir, 'subnet-up'), { env })
    assert.match(await readFile(join(dir, 'events', 'tinc-events'), 'utf8'), /^\d+ subnet-up hub 10\.99\.0\.1\/32 198\.18\.0\.1\n$/)
    // The operator adds a line; a re-run changes nothing of theirs.
    await writeFile(join(dir, 'tinc.conf'), `${conf}Compression = 9\n`)
    assert.deepEqual(await writeSetup(dir, setup), [])
    assert.match(await readFile(join(dir, 'tinc.conf'), 'utf8'), /Compression = 9/)
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})

test('a switch-mode setup: tinc.conf says Mode = switch on a tap device without StrictSubnets; addresses are set as before', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tc-setup-switch-'))
  try {
    const peer = nodeRecord('hub', 1, rsaPublicPem())
    const setup = {
      net: 'home',
      name: 'alpha',
      address: '10.99.0.5',
      prefixLength: 24,
      port: 655,
      publicAddresses: [],
      publicKey: rsaPublicPem(),
      connectTo: ['hub'],
      peerHostFiles: { hub: renderHostFile({ addresses: peer.addresses, port: peer.port, subnets: [], options: [], publicKey: rsaPublicPem() }) },
      interface: 'tinc-home',
      eventsFile: join(dir, 'events', 'tinc-events'),
      mode: 'switch' as const,
    }
    await writeSetup(dir, setup)
    const conf = await readFile(join(dir, 'tinc.conf'), 'utf8')
    const head = conf.slice(0, conf.indexOf('# BEGIN tinc-consul'))
    for (const line of ['Name = alpha', 'Mode = switch', 'DeviceType = tap', 'Interface = tinc-home', 'KeyExpire = 60', 'PingInterval = 10'])
      assert.match(head, new RegExp(`^${line}$`, 'm'), `tinc.conf lacks "${line}" outside the block:\n${conf}`)
    assert.doesNotMatch(conf, /Mode = router|StrictSubnets/, 'StrictSubnets would make tincd ignore the MAC addresses peers announce')
    assert.equal(confMode(conf), 'switch')
    assert.deepEqual(readManagedBlock(conf), ['ConnectTo = hub'])
    // Our own host file keeps its /32: the daemon publishes the record (DNS, the address table) from it.
    assert.match(await readFile(join(dir, 'hosts', 'alpha'), 'utf8'), /^Subnet = 10\.99\.0\.5\/32$/m)
    assert.doesNotMatch(await readFile(join(dir, 'hosts', 'hub'), 'utf8'), /Subnet/)
    // ip addr add ... dev $INTERFACE works on a tap device as on a tun one.
    assert.match(await readFile(join(dir, 'tinc-up'), 'utf8'), /ip addr add 10\.99\.0\.5\/24 dev "\$INTERFACE"\nip link set "\$INTERFACE" up/)
    // The default stays router, with StrictSubnets.
    const router = renderTincConf({ name: 'alpha', interface: 'tinc-home', connectTo: [] })
    assert.match(router, /^Mode = router$/m)
    assert.match(router, /^StrictSubnets = yes$/m)
    assert.doesNotMatch(router, /DeviceType/)
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})

test('the tinc 1.0 backend takes a node from nothing to a tincd-readable directory through its interface alone', async () => {
  const tinc = tincBackend()
  assert.equal(tinc.release, '1.0')
  const dir = await mkdtemp(join(tmpdir(), 'tc-backend-'))
  try {
    assert.equal(await tinc.existingNode(dir), undefined, 'an empty directory holds no node')
    const publicKey = await tinc.generateKey(dir, 'beta', 1024)
    const setup = {
      net: 'home',
      name: 'beta',
      address: '10.99.0.6',
      prefixLength: 24,
      port: 655,
      publicAddresses: [],
      publicKey,
      connectTo: [],
      peerHostFiles: {},
      interface: 'tinc-home',
      eventsFile: join(dir, 'events', 'tinc-events'),
      mode: 'switch' as const,
    }
    assert.ok((await tinc.writeSetup(dir, setup)).includes('tinc.conf'))
    assert.deepEqual(await tinc.existingNode(dir), { name: 'beta', publicKey, address: '10.99.0.6' })
    assert.equal(tinc.confMode(await readFile(join(dir, 'tinc.conf'), 'utf8')), 'switch')
    const peer = { record: nodeRecord('gamma', 7, publicKey), publicKey, options: [] }
    assert.match(tinc.peerHostFile(peer, 'router'), /^Subnet = 10\.99\.0\.7\/32$/m)
    assert.doesNotMatch(tinc.peerHostFile(peer, 'switch'), /^Subnet/m, 'switch mode routes by MAC, so a peer file has no Subnet line')
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})
