import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync } from 'node:fs'
import { mkdir, readFile, readdir, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { newGossipKey } from '../src/consul/gossip-key.ts'
import { finishNode, installedConsulRole, type FinishOptions } from '../src/install/finish.ts'
import { encodeInvite } from '../src/mesh/invite.ts'
import { makeTincDir, tempRoot } from './sync-fixture.ts'

const MAIN = join(import.meta.dirname, '..', 'src', 'cli', 'main.ts')
const TOKEN = '0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b'

/**
 * join's (and init's) last step, with systemd simulated: `systemd` is the probe's
 * answer, every path points into a temporary tree, and systemctl is a recorder.
 */
describe('the finish step of join and init: what install does, or the commands to run', () => {
  let root: string
  let base: (sys: string, over?: Partial<FinishOptions>) => { o: FinishOptions; lines: string[]; ran: string[][] }
  before(async () => {
    root = await tempRoot()
    // A node as join leaves it: net "tinc" under the tinc root <root>/laptop, its settings beside it.
    await makeTincDir(root, 'laptop', 4, false)
    await mkdir(join(root, 'settings'), { recursive: true })
    await writeFile(join(root, 'settings', 'tinc.env'), `TINC_CONSUL_TOKEN=${TOKEN}\nTINC_CONSUL_CONSUL_SERVERS=10.99.0.1,10.99.0.2\nTINC_CONSUL_GOSSIP_KEY=${newGossipKey()}\n`, { mode: 0o600 })
    base = (sys, over = {}) => {
      const lines: string[] = []
      const ran: string[][] = []
      const o: FinishOptions = {
        command: 'join',
        net: 'tinc',
        role: 'client',
        install: true,
        dryRun: false,
        systemd: true,
        root: '/',
        tincRoot: join(root, 'laptop'),
        settingsDir: join(root, 'settings'),
        unitDir: join(sys, 'units'),
        consulConfigDir: '/etc/consul.d',
        consulFileDir: join(sys, 'consul.d'),
        consulDataDir: '/var/lib/consul',
        bootstrapExpect: 0,
        bin: '/usr/local/bin/tinc-consul',
        consulBin: '/usr/local/bin/consul',
        manifest: join(sys, 'install.json'),
        say: (l) => lines.push(l),
        run: async (argv) => {
          ran.push(argv)
          return { code: 0, stderr: '' }
        },
        ...over,
      }
      return { o, lines, ran }
    }
  })
  after(() => rm(root, { recursive: true, force: true }))

  test('with systemd: the units and a client agent on the VPN address are written, then tincd, the sidecar and the agent enabled and started', async () => {
    const sys = join(root, 'sys-on')
    const { o, lines, ran } = base(sys)
    assert.equal(await finishNode(o), 'installed')
    assert.ok(existsSync(join(sys, 'units', 'tinc-consul@.service')))
    assert.ok(existsSync(join(sys, 'units', 'tinc@tinc.service.d', 'tinc-consul.conf')))
    const hcl = await readFile(join(sys, 'consul.d', 'tinc-consul.hcl'), 'utf8')
    assert.match(hcl, /^bind_addr += "10\.99\.0\.4"$/m)
    assert.match(hcl, /^server += false$/m)
    assert.match(hcl, /^retry_join += \["10\.99\.0\.1", "10\.99\.0\.2"\]$/m)
    assert.ok(hcl.includes(TOKEN), "the agent runs on the node's token from the settings join wrote")
    const commands = ran.map((a) => a.join(' ')).filter((c) => c.startsWith('systemctl'))
    // tincd first: it makes the address the agent binds to.
    assert.deepEqual(commands, [
      'systemctl daemon-reload',
      'systemctl enable tinc@tinc.service tinc-consul@tinc.service',
      'systemctl restart tinc@tinc.service tinc-consul@tinc.service',
      'systemctl enable consul.service',
      'systemctl restart consul.service',
    ])
    assert.ok(JSON.parse(await readFile(join(sys, 'install.json'), 'utf8')).files[join(sys, 'units', 'tinc-consul@.service')], 'uninstall can undo it')
    assert.match(lines.join('\n'), /tinc is running/)
  })

  test('without systemd: nothing is written or run; the exact commands are printed, install first', async () => {
    const sys = join(root, 'sys-off')
    const { o, lines, ran } = base(sys, { systemd: false })
    assert.equal(await finishNode(o), 'printed')
    assert.equal(existsSync(sys), false, 'nothing written')
    assert.deepEqual(ran, [])
    const next = lines.filter((l) => l.startsWith('  ')).map((l) => l.trim())
    assert.match(next[0] ?? '', new RegExp(`^tinc-consul install --net tinc --consul-client --dir ${join(root, 'laptop')} --config-dir ${join(root, 'settings')} `))
    assert.match(next[1] ?? '', new RegExp(`^tincd -n tinc -c ${join(root, 'laptop', 'tinc')} --logfile `))
    assert.ok(next[2]?.startsWith(`/usr/local/bin/consul agent -config-dir=${join(sys, 'consul.d')} `), next[2])
    assert.match(next[3] ?? '', new RegExp(`^/usr/local/bin/tinc-consul run --net tinc --config-dir ${join(root, 'settings')} `))
    assert.doesNotMatch(lines.join('\n'), /docs\/operations\.md/)
  })

  test('--no-install on systemd: nothing is run; the install command that would do it is printed', async () => {
    const sys = join(root, 'sys-no')
    const { o, lines, ran } = base(sys, { install: false })
    assert.equal(await finishNode(o), 'printed')
    assert.equal(existsSync(sys), false)
    assert.deepEqual(ran, [])
    assert.match(lines.join('\n'), /\(--no-install\)[\s\S]*tinc-consul install --net tinc --consul-client/)
  })

  test('under a --root tree: the files are written there, no systemctl, and the commands the units would run are printed', async () => {
    const sys = join(root, 'sys-tree')
    const { o, lines, ran } = base(sys, { systemd: false, root: sys })
    assert.equal(await finishNode(o), 'files')
    assert.ok(existsSync(join(sys, 'consul.d', 'tinc-consul.hcl')))
    assert.deepEqual(ran, [], 'no systemctl, and no useradd or chgrp either')
    assert.match(lines.join('\n'), /no systemctl was run[\s\S]*tincd -n tinc[\s\S]*consul agent[\s\S]*tinc-consul run --net tinc/)
  })

  test('a failed step says the node is set up and names the install command to run once fixed', async () => {
    const { o } = base(join(root, 'sys-fail'), { run: async (argv) => ({ code: argv.includes('consul.service') && argv[1] === 'restart' ? 1 : 0, stderr: 'bind: cannot assign requested address' }) })
    await assert.rejects(finishNode(o), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'INSTALL_FAILED')
      assert.match(err.message, /join set the node up, but installing it failed: .*cannot assign requested address/)
      assert.match(err.message, /run: tinc-consul install --net tinc --consul-client/)
      return true
    })
  })

  test("init installs only where install set up the Consul agent: the agent's role comes from its config", async () => {
    const dir = join(root, 'consul-role')
    assert.equal(await installedConsulRole(dir), undefined, 'no config: not ours')
    await mkdir(dir, { recursive: true })
    await writeFile(join(dir, 'tinc-consul.hcl'), 'server     = true\n')
    assert.equal(await installedConsulRole(dir), 'server')
    await writeFile(join(dir, 'tinc-consul.hcl'), 'server     = false\n')
    assert.equal(await installedConsulRole(dir), 'client')
  })
})

describe('tinc-consul join --dry-run', () => {
  let root: string
  before(async () => {
    root = await tempRoot()
  })
  after(() => rm(root, { recursive: true, force: true }))

  test('prints the join and the install plan from the invite alone, spends nothing and writes nothing', async () => {
    // The endpoint is a port nobody listens on: a join that tried it would fail, not print a plan.
    const invite = encodeInvite({ net: 'home', endpoints: ['127.0.0.1:1'], token: randomBytes(32), name: 'laptop', expiresAt: new Date(Date.now() + 3_600_000) })
    const place = ['--dir', join(root, 'tinc'), '--config-dir', join(root, 'settings'), '--root', join(root, 'sys'), '--consul-bin', '/usr/local/bin/consul', '--retry', '0']
    const r = spawnSync(process.execPath, ['--import', 'tsx', MAIN, 'join', invite, ...place, '--dry-run'], { encoding: 'utf8', env: { ...process.env, TINC_CONSUL_NET: '' } })
    assert.equal(r.status, 0, r.stderr)
    assert.match(r.stdout, /nothing was changed and the invite is not spent/)
    assert.match(r.stdout, /redeem the invite \(this spends it\) at the first of 127\.0\.0\.1:1 that answers, as laptop/)
    assert.match(r.stdout, new RegExp(`write ${join(root, 'sys', 'etc/consul.d/tinc-consul.hcl')} \\(0640\\): Consul client agent, bound to <VPN address from the reply>`))
    assert.match(r.stdout, /^bind_addr += "<VPN address from the reply>"$/m)
    assert.match(r.stdout, /^encrypt = "<gossip key from the reply>"$/m)
    assert.match(r.stdout, /tinc-consul@\.service/)
    assert.deepEqual(await readdir(root), [], 'no key, no config, no settings, no units')
  })
})
