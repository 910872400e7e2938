import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { existsSync, readFileSync, statSync } from 'node:fs'
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { parseConfig } from '../src/config-file.ts'
import { requireConsul } from '../src/lab/provision.ts'
import { newGossipKey } from '../src/consul/gossip-key.ts'
import { planInstall, type InstallInput } from '../src/install/plan.ts'
import { makeTincDir, tempRoot } from './sync-fixture.ts'

const MAIN = join(import.meta.dirname, '..', 'src', 'cli', 'main.ts')
const BIN = join(import.meta.dirname, '..', 'bin', 'tinc-consul.js')
const TOKEN = '0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b'

function cli(args: string[]) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', MAIN, ...args], { encoding: 'utf8', env: { ...process.env, TINC_CONSUL_NET: '' } })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

/** systemd-analyze's verdict on unit files: its exit code and everything it complained about. */
function verify(paths: string[]) {
  const r = spawnSync('systemd-analyze', ['verify', ...paths], { encoding: 'utf8' })
  return { code: r.status, complaints: `${r.stdout}${r.stderr}`.trim() }
}

describe('systemd units and Consul configs as install writes them', () => {
  let root: string
  let consulBin: string
  before(async () => {
    root = await tempRoot()
    consulBin = await requireConsul()
  })
  after(() => rm(root, { recursive: true, force: true }))

  const input = (unitDir: string, configDir: string, role: 'server' | 'client' | 'bootstrap'): InstallInput => ({
    net: 'home',
    node: { name: 'hub1', vpnAddress: role === 'bootstrap' ? undefined : '10.20.0.1' },
    consul: {
      role,
      servers: ['10.20.0.2', '10.20.0.3'],
      bootstrapExpect: 0,
      gossipKey: newGossipKey(),
      agentToken: TOKEN,
      datacenter: 'home',
      dataDir: '/var/lib/consul',
      configDir,
      fileDir: configDir,
      managementToken: role === 'bootstrap' ? TOKEN : undefined,
    },
    unitDir,
    tincRoot: '/etc/tinc',
    settingsDir: '/etc/tinc-consul',
    bin: BIN,
    consulBin,
    systemctl: false,
  })

  async function writeSteps(i: InstallInput): Promise<void> {
    for (const s of await planInstall(i)) {
      if (s.kind !== 'file') continue
      await mkdir(join(s.path, '..'), { recursive: true })
      await writeFile(s.path, s.content)
    }
  }

  test('the units pass systemd-analyze verify without a single complaint', { skip: spawnSync('systemd-analyze', ['--version']).status !== 0 ? 'systemd-analyze is missing' : false }, async () => {
    const units = join(root, 'units')
    await writeSteps(input(units, join(root, 'consul.d'), 'server'))
    const v = verify([join(units, 'tinc-consul@home.service'), join(units, 'consul.service')])
    assert.equal(v.code, 0, v.complaints)
    assert.equal(v.complaints, '', 'no warnings either')
    // The check itself can fail: the same unit with a misspelt setting is caught.
    const bad = join(root, 'bad')
    await mkdir(bad, { recursive: true })
    await writeFile(join(bad, 'tinc-consul@.service'), (await readFile(join(units, 'tinc-consul@.service'), 'utf8')).replace('NoNewPrivileges=yes', 'NoNewPrivilege=yes'))
    assert.match(verify([join(bad, 'tinc-consul@home.service')]).complaints, /Unknown key 'NoNewPrivilege'/)
    // The drop-in replaces ExecStart (an empty one first, or systemd refuses a second).
    const dropIn = await readFile(join(units, 'tinc@home.service.d', 'tinc-consul.conf'), 'utf8')
    assert.match(dropIn, /^ExecStart=\nExecStart=\/usr\/sbin\/tincd -n %i -D --logfile \$EXTRA$/m)
  })

  test('the server, client and bootstrap configs pass `consul validate` and bind only the VPN address and loopback', async () => {
    for (const role of ['server', 'client', 'bootstrap'] as const) {
      const dir = join(root, `consul-${role}`)
      await writeSteps(input(join(root, `units-${role}`), dir, role))
      const v = spawnSync(consulBin, ['validate', dir], { encoding: 'utf8' })
      assert.equal(v.status, 0, `${role}: ${v.stdout}${v.stderr}`)
      const hcl = await readFile(join(dir, 'tinc-consul.hcl'), 'utf8')
      const bind = role === 'bootstrap' ? '127.0.0.1' : '10.20.0.1'
      assert.match(hcl, new RegExp(`^bind_addr += "${bind.replace(/\./g, '\\.')}"$`, 'm'), role)
      assert.match(hcl, /^client_addr = "127\.0\.0\.1"$/m, role)
      assert.match(hcl, /^encrypt = "[A-Za-z0-9+/]{43}="$/m, role)
      assert.match(hcl, /default_policy += "deny"/, role)
      assert.match(hcl, new RegExp(`^server += ${role === 'client' ? 'false' : 'true'}$`, 'm'), role)
      // The first server bootstraps alone; the others join it and never ask to form a cluster (server.hcl.tmpl says why).
      assert.match(hcl, new RegExp(`^bootstrap_expect = ${role === 'bootstrap' ? 1 : 0}$|^server += false$`, 'm'), role)
      assert.match(hcl, /^retry_join += \["10\.20\.0\.2", "10\.20\.0\.3"\]$/m, role)
      assert.match(hcl, /^retry_interval = "5s"$/m, role)
    }
  })

  test('a value that would break out of a config line is refused before anything is written', async () => {
    const i = input(join(root, 'u'), join(root, 'c'), 'server')
    await assert.rejects(planInstall({ ...i, consul: { ...i.consul!, gossipKey: 'x"\nacl { enabled = false }' } }), /gossip key must be 32 bytes/)
    await assert.rejects(planInstall({ ...i, consul: { ...i.consul!, servers: ['10.0.0.1"]\nserver = false #'] } }), /not a Consul server address/)
    await assert.rejects(planInstall({ ...i, bin: '/usr/bin/tinc-consul --dir /tmp' }), /must be absolute, without spaces/)
    await assert.rejects(planInstall({ ...i, net: '../../etc/x' }), /network name must be/)
    assert.equal(existsSync(join(root, 'u')), false)
  })
})

describe('tinc-consul install and uninstall, under --root', () => {
  let root: string
  let sys: string
  let tincRoot: string
  let settings: string
  let args: string[]
  before(async () => {
    root = await tempRoot()
    sys = join(root, 'sys')
    // A node as init leaves it: <root>/hub1/tinc is the net "tinc" of tinc root <root>/hub1.
    await makeTincDir(root, 'hub1', 1, true)
    tincRoot = join(root, 'hub1')
    settings = join(root, 'etc-tinc-consul')
    await mkdir(settings, { recursive: true })
    await writeFile(join(settings, 'tinc.env'), `TINC_CONSUL_TOKEN=${TOKEN}\n`, { mode: 0o600 })
    args = ['--net', 'tinc', '--dir', tincRoot, '--config-dir', settings, '--root', sys, '--bin', BIN, '--consul-bin', '/usr/local/bin/consul']
  })
  after(() => rm(root, { recursive: true, force: true }))

  test('--dry-run prints every file and command and writes nothing', () => {
    const r = cli(['install', ...args, '--consul-server', '--dry-run'])
    assert.equal(r.code, 0, r.stderr)
    assert.match(r.stdout, /nothing was changed/)
    for (const f of ['etc/systemd/system/tinc-consul@.service', 'etc/systemd/system/tinc@tinc.service.d/tinc-consul.conf', 'etc/systemd/system/consul.service', 'etc/consul.d/tinc-consul.hcl'])
      assert.match(r.stdout, new RegExp(`write ${join(sys, f).replace(/[.@]/g, '\\$&')} \\((0644|0640)\\)`))
    assert.match(r.stdout, /bind_addr += "10\.99\.0\.1"/)
    assert.equal(existsSync(sys), false, 'nothing under --root')
    assert.doesNotMatch(readFileSync(join(settings, 'tinc.env'), 'utf8'), /GOSSIP/, 'the settings file is untouched')
  })

  test('install writes the units and a server config bound to the VPN address, keeps the gossip key on a re-run, and hands it to the join endpoint', async () => {
    const r = cli(['install', ...args, '--consul-server'])
    assert.equal(r.code, 0, r.stderr)
    assert.match(r.stdout, /no systemctl was run/)
    const unit = await readFile(join(sys, 'etc/systemd/system/tinc-consul@.service'), 'utf8')
    assert.match(unit, new RegExp(`^ExecStart=${BIN} run --net %i --dir ${tincRoot} --config-dir ${settings}$`, 'm'))
    assert.match(unit, new RegExp(`^EnvironmentFile=${settings}/%i\\.env$`, 'm'))
    const hcl = join(sys, 'etc/consul.d/tinc-consul.hcl')
    assert.equal(statSync(hcl).mode & 0o777, 0o640)
    const key = /^encrypt = "(.+)"$/m.exec(await readFile(hcl, 'utf8'))?.[1]
    assert.ok(key)
    assert.match(await readFile(hcl, 'utf8'), /^node_name {2}= "hub1"$/m)
    const env = parseConfig(await readFile(join(settings, 'tinc.env'), 'utf8'), 'tinc.env')
    assert.equal(env.TINC_CONSUL_GOSSIP_KEY, key)
    assert.equal(env.TINC_CONSUL_TOKEN, TOKEN, 'the token stays')
    assert.equal(statSync(join(settings, 'tinc.env')).mode & 0o777, 0o600)
    const again = cli(['install', ...args, '--consul-server'])
    assert.equal(again.code, 0, again.stderr)
    assert.doesNotMatch(again.stdout, /^wrote/m, 'a second run changes nothing')
    assert.equal(/^encrypt = "(.+)"$/m.exec(await readFile(hcl, 'utf8'))?.[1], key)
  })

  test('--bootstrap, before init: a one-server Consul on loopback with a management token, kept across re-runs', async () => {
    const boot = join(root, 'boot')
    const r = cli(['install', '--net', 'home', '--consul-server', '--bootstrap', '--name', 'hub1', '--root', boot, '--config-dir', join(root, 'none'), '--dir', join(root, 'none')])
    assert.equal(r.code, 0, r.stderr)
    const hcl = await readFile(join(boot, 'etc/consul.d/tinc-consul.hcl'), 'utf8')
    assert.match(hcl, /^bind_addr += "127\.0\.0\.1"$/m)
    assert.match(hcl, /^bootstrap_expect = 1$/m)
    assert.match(hcl, /^node_name {2}= "hub1"$/m)
    const token = /initial_management = "([0-9a-f-]{36})"/.exec(await readFile(join(boot, 'etc/consul.d/tinc-consul-bootstrap.hcl'), 'utf8'))?.[1]
    assert.ok(token)
    assert.match(r.stdout, new RegExp(`export CONSUL_HTTP_TOKEN=${token}`))
    assert.equal(existsSync(join(boot, 'etc/systemd/system/tinc-consul@.service')), false, 'no sidecar before init')
    const again = cli(['install', '--net', 'home', '--consul-server', '--bootstrap', '--name', 'hub1', '--root', boot, '--config-dir', join(root, 'none'), '--dir', join(root, 'none')])
    assert.match(again.stdout, new RegExp(`export CONSUL_HTTP_TOKEN=${token}`), 'the same token on a re-run')
    assert.doesNotMatch(again.stdout, /^wrote/m)
  })

  test('install refuses a node that was never set up, and a client without a gossip key', async () => {
    const r = cli(['install', '--net', 'other', '--dir', tincRoot, '--config-dir', settings, '--root', sys])
    assert.equal(r.code, 2)
    assert.match(r.stderr, /tinc\.conf is missing: run `tinc-consul init` or `join` first/)
    // A node whose join reply carried no gossip key (its settings have only the token).
    const bare = join(root, 'bare-settings')
    await mkdir(bare, { recursive: true })
    await writeFile(join(bare, 'tinc.env'), `TINC_CONSUL_TOKEN=${TOKEN}\n`, { mode: 0o600 })
    const c = cli(['install', '--net', 'tinc', '--dir', tincRoot, '--config-dir', bare, '--root', join(root, 'sys2'), '--consul-client'])
    assert.equal(c.code, 2)
    assert.match(c.stderr, /no Consul gossip key/)
  })

  test('run refuses a malformed gossip key at start, before its join endpoint could hand it to a joiner', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', MAIN, 'run', '--net', 'tinc', '--dir', tincRoot, '--config-dir', settings, '--gossip-key', 'not-a-key'], { encoding: 'utf8' })
    assert.equal(r.status, 2, r.stderr)
    assert.match(r.stderr, /--gossip-key \(TINC_CONSUL_GOSSIP_KEY\) must be 32 bytes in base64/)
  })

  test('uninstall removes what install wrote, keeps a file edited since, and keeps the keys; --purge removes them', async () => {
    const dropIn = join(sys, 'etc/systemd/system/tinc@tinc.service.d/tinc-consul.conf')
    await writeFile(dropIn, `${await readFile(dropIn, 'utf8')}# my own line\n`)
    const dry = cli(['uninstall', '--net', 'tinc', '--dir', tincRoot, '--config-dir', settings, '--root', sys, '--consul', '--dry-run'])
    assert.equal(dry.code, 0, dry.stderr)
    assert.match(dry.stdout, /would remove .*tinc-consul@\.service/)
    assert.ok(existsSync(join(sys, 'etc/systemd/system/tinc-consul@.service')), 'dry run removed nothing')
    const r = cli(['uninstall', '--net', 'tinc', '--dir', tincRoot, '--config-dir', settings, '--root', sys, '--consul'])
    assert.equal(r.code, 0, r.stderr)
    for (const f of ['etc/systemd/system/tinc-consul@.service', 'etc/systemd/system/consul.service', 'etc/consul.d/tinc-consul.hcl']) assert.equal(existsSync(join(sys, f)), false, `${f} removed`)
    assert.match(r.stdout, /kept .*tinc-consul\.conf: changed since install/)
    assert.ok(existsSync(dropIn))
    assert.ok(existsSync(join(tincRoot, 'tinc', 'hosts', 'hub1')), 'keys kept')
    assert.ok(existsSync(join(settings, 'tinc.env')), 'tokens kept')
    const purge = cli(['uninstall', '--net', 'tinc', '--dir', tincRoot, '--config-dir', settings, '--root', sys, '--state-dir', join(root, 'state'), '--purge'])
    assert.equal(purge.code, 0, purge.stderr)
    assert.equal(existsSync(join(tincRoot, 'tinc')), false, 'keys gone with --purge')
    assert.equal(existsSync(join(settings, 'tinc.env')), false, 'tokens gone with --purge')
  })
})
