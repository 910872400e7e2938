import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { chmodSync, chownSync, existsSync, lchownSync, mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { pino } from 'pino'
import { agentChecks, agentServices } from '../src/consul/agent.ts'
import { createConsulClient } from '../src/consul/client.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { waitFor } from '../src/lab/daemon.ts'
import { DefinitionError, readDefinition, type ServiceDefinition } from '../src/services/definition.ts'
import { runLocalCheck } from '../src/services/local-check.ts'
import { checkId, serviceId } from '../src/services/registration.ts'
import { startServices } from '../src/services/registrar.ts'

/**
 * sshd-style StrictModes for script checks (src/services/strict-modes.ts). Each test builds
 * its own tree under a fresh root-owned directory in the temp dir; the temp dir's sticky,
 * root-owned ancestors (`/tmp`, 1777) are accepted by design, which the good cases rely on.
 * chown to another uid needs root, as the suite runs.
 */
const NOBODY = 65534
const SCRIPTS = { allowScripts: true }
const asRoot = process.getuid?.() === 0 ? {} : { skip: 'needs root to chown files to another uid' }

let base: string
let n = 0

/** root/{services/x.json, bin/check}: all root-owned, 0755 and 0644, i.e. the good case. */
function tree(opts: { program?: (t: { root: string; bin: string }) => string } = {}) {
  const root = join(base, `t${++n}`)
  const services = join(root, 'services')
  const bin = join(root, 'bin')
  mkdirSync(services, { recursive: true, mode: 0o755 })
  mkdirSync(bin, { mode: 0o755 })
  chmodSync(root, 0o755)
  const marker = join(root, 'ran')
  const script = join(bin, 'check')
  writeFileSync(script, `#!/bin/sh\necho ran >> ${marker}\necho fine\n`, { mode: 0o755 })
  const program = opts.program?.({ root, bin }) ?? script
  const file = join(services, 'x.json')
  writeFileSync(file, JSON.stringify({ port: 1, check: { type: 'script', command: [program], interval: '1s' } }), { mode: 0o644 })
  return { root, services, bin, script, file, marker }
}

async function refusal(file: string): Promise<DefinitionError> {
  try {
    await readDefinition(file, SCRIPTS)
  } catch (err) {
    assert.ok(err instanceof DefinitionError, `expected a DefinitionError, got ${String(err)}`)
    assert.equal(err.code, 'INSECURE_SCRIPT_CHECK', err.message)
    return err
  }
  assert.fail(`${file} was accepted`)
}

const refusedFor = async (file: string, reason: string) => assert.equal((await refusal(file)).message, `x.json: refusing script check in ${file}: ${reason}`)

before(() => {
  base = mkdtempSync(join(tmpdir(), 'tinc-consul-strict-'))
})
after(() => rmSync(base, { recursive: true, force: true }))

describe('script checks: the definition file and its directories', asRoot, () => {
  test('the good case is accepted: everything root-owned, nothing group- or world-writable', async () => {
    const t = tree()
    const def = await readDefinition(t.file, SCRIPTS)
    assert.deepEqual(def.check.type === 'script' && def.check.command, [t.script])
    assert.equal(def.path, t.file)
  })

  test('a group- or world-writable services directory or ancestor is refused, naming it and its mode', async () => {
    let t = tree()
    chmodSync(t.services, 0o775)
    await refusedFor(t.file, `${t.services} is group-writable (mode 0775)`)
    t = tree()
    chmodSync(t.services, 0o777)
    await refusedFor(t.file, `${t.services} is world-writable (mode 0777)`)
    t = tree()
    chmodSync(t.root, 0o777)
    await refusedFor(t.file, `${t.root} is world-writable (mode 0777)`)
  })

  test('a directory owned by another uid is refused even at 0755', async () => {
    const t = tree()
    chownSync(t.services, NOBODY, NOBODY)
    await refusedFor(t.file, `${t.services} is owned by uid ${NOBODY}, not root`)
  })

  test('a sticky directory may be world-writable if root owns it; not if someone else does', async () => {
    let t = tree()
    chmodSync(t.root, 0o1777)
    assert.equal((await readDefinition(t.file, SCRIPTS)).check.type, 'script')
    t = tree()
    chmodSync(t.root, 0o1777)
    chownSync(t.root, NOBODY, NOBODY)
    await refusedFor(t.file, `${t.root} is owned by uid ${NOBODY}, not root`)
  })

  test('a definition file owned by another uid, or writable by others, is refused', async () => {
    let t = tree()
    chownSync(t.file, NOBODY, 0)
    await refusedFor(t.file, `${t.file} is owned by uid ${NOBODY}, not root`)
    t = tree()
    chmodSync(t.file, 0o664)
    await refusedFor(t.file, `${t.file} is group-writable (mode 0664)`)
    t = tree()
    chmodSync(t.file, 0o666)
    await refusedFor(t.file, `${t.file} is world-writable (mode 0666)`)
  })

  test('a symlinked definition file is refused, even one pointing at a good file', async () => {
    const t = tree()
    const real = join(t.root, 'real.json')
    renameSync(t.file, real)
    symlinkSync(real, t.file)
    await refusedFor(t.file, `${t.file} is a symbolic link`)
  })

  test('a services directory reached through links is checked along the whole resolution', async () => {
    const t = tree()
    // A root-owned link in a good directory is followed and the target checked.
    const via = join(t.root, 'via')
    symlinkSync('services', via)
    assert.equal((await readDefinition(join(via, 'x.json'), SCRIPTS)).check.type, 'script')
    // The same link inside a world-writable directory: anyone could have pointed it elsewhere.
    const open = join(t.root, 'open')
    mkdirSync(open, { mode: 0o777 })
    chmodSync(open, 0o777)
    symlinkSync('../services', join(open, 'svc'))
    const file = join(open, 'svc', 'x.json')
    await refusedFor(file, `${open} is world-writable (mode 0777)`)
    // A link owned by someone else, in a sticky directory where its owner may replace it.
    const sticky = join(t.root, 'sticky')
    mkdirSync(sticky)
    chmodSync(sticky, 0o1777)
    symlinkSync('../services', join(sticky, 'svc'))
    lchownSync(join(sticky, 'svc'), NOBODY, NOBODY)
    await refusedFor(join(sticky, 'svc', 'x.json'), `${join(sticky, 'svc')} (a symbolic link) is owned by uid ${NOBODY}, not root`)
  })

  test('the rules are for script checks only: other definitions still read from anywhere', async () => {
    const t = tree()
    chmodSync(t.services, 0o777)
    const tcp = join(t.services, 'web.json')
    writeFileSync(tcp, '{"port": 80}')
    chownSync(tcp, NOBODY, NOBODY)
    assert.equal((await readDefinition(tcp, SCRIPTS)).check.type, 'tcp')
  })
})

describe('script checks: the program', asRoot, () => {
  test('a program owned by another uid, writable by others, or in a loose directory is refused', async () => {
    let t = tree()
    chownSync(t.script, NOBODY, NOBODY)
    await refusedFor(t.file, `${t.script} is owned by uid ${NOBODY}, not root`)
    t = tree()
    chmodSync(t.script, 0o777)
    await refusedFor(t.file, `${t.script} is world-writable (mode 0777)`)
    t = tree()
    chmodSync(t.bin, 0o775)
    await refusedFor(t.file, `${t.bin} is group-writable (mode 0775)`)
  })

  test('a program reached through a link is accepted if every step is trusted, refused if not', async () => {
    let t = tree({
      program: ({ root }) => {
        symlinkSync('bin/check', join(root, 'tool'))
        return join(root, 'tool')
      },
    })
    assert.equal((await readDefinition(t.file, SCRIPTS)).check.type, 'script')
    t = tree({
      program: ({ root }) => {
        const loose = join(root, 'loose')
        mkdirSync(loose)
        chmodSync(loose, 0o777)
        writeFileSync(join(loose, 'check'), '#!/bin/sh\n', { mode: 0o755 })
        symlinkSync('loose/check', join(root, 'tool'))
        return join(root, 'tool')
      },
    })
    await refusedFor(t.file, `${join(t.root, 'loose')} is world-writable (mode 0777)`)
  })

  test('a missing program is refused: nothing is trusted that could not be checked', async () => {
    const t = tree({ program: ({ bin }) => join(bin, 'nope') })
    await refusedFor(t.file, `cannot check ${join(t.bin, 'nope')}: ENOENT`)
  })
})

describe('script checks are checked again before every run', asRoot, () => {
  const run = (def: ServiceDefinition) => runLocalCheck(def, '127.0.0.1')

  test('a directory loosened after the file was read stops the runs until it is fixed', async () => {
    const t = tree()
    const def = await readDefinition(t.file, SCRIPTS)
    assert.equal((await run(def)).status, 'passing')
    assert.ok(existsSync(t.marker), 'the good script ran')
    rmSync(t.marker)
    chmodSync(t.services, 0o775)
    const r = await run(def)
    assert.equal(r.status, 'critical')
    assert.equal(r.output, `refusing script check in ${t.file}: ${t.services} is group-writable (mode 0775)`)
    assert.equal(r.refused, r.output)
    assert.equal(existsSync(t.marker), false, 'the script did not run')
    chmodSync(t.services, 0o755)
    assert.equal((await run(def)).status, 'passing')
  })

  test('a program or definition file swapped after the read is not run', async () => {
    let t = tree()
    let def = await readDefinition(t.file, SCRIPTS)
    const evil = join(t.root, 'evil')
    writeFileSync(evil, `#!/bin/sh\necho ran >> ${t.marker}\n`, { mode: 0o755 })
    chownSync(evil, NOBODY, NOBODY)
    renameSync(evil, t.script)
    let r = await run(def)
    assert.equal(r.output, `refusing script check in ${t.file}: ${t.script} is owned by uid ${NOBODY}, not root`)
    assert.equal(existsSync(t.marker), false, 'the swapped-in program did not run')
    t = tree()
    def = await readDefinition(t.file, SCRIPTS)
    rmSync(t.file)
    symlinkSync(join(t.root, 'elsewhere.json'), t.file)
    r = await run(def)
    assert.equal(r.output, `refusing script check in ${t.file}: ${t.file} is a symbolic link`)
  })
})

describe('the registrar refuses one definition and keeps the others', asRoot, () => {
  let consul: DevConsul
  before(async () => {
    consul = await startDevConsul()
  })
  after(async () => {
    await consul.stop()
  })

  test('a refused script check is not registered and logged with its path and reason; others are registered; a later refusal turns the check critical', async () => {
    const lines: Array<{ msg: string; file?: string; err?: { message: string; code?: string } }> = []
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        lines.push(JSON.parse(chunk.toString()) as (typeof lines)[number])
        done()
      },
    })
    const t = tree()
    const bad = join(t.services, 'bad.json')
    writeFileSync(bad, JSON.stringify({ port: 2, check: { type: 'script', command: [t.script] } }))
    chownSync(bad, NOBODY, NOBODY)
    writeFileSync(join(t.services, 'web.json'), '{"port": 3, "check": {"type": "ttl"}}')
    const who = { net: 'strict', node: 'n1', address: '127.0.0.1' }
    const reg = await startServices({ dir: t.services, who, consulUrl: consul.url, allowScripts: true, deregisterOnExit: true, resyncMs: 200, log: pino({ level: 'info' }, sink) })
    const client = createConsulClient({ url: consul.url })
    try {
      const why = `bad.json: refusing script check in ${bad}: ${bad} is owned by uid ${NOBODY}, not root`
      assert.deepEqual(reg.problems(), [{ file: 'bad.json', message: why }])
      assert.ok(
        lines.some((l) => l.file === 'bad.json' && l.err?.message === why && l.err.code === 'INSECURE_SCRIPT_CHECK'),
        JSON.stringify(lines),
      )
      assert.deepEqual(Object.keys(await agentServices(client, 'Meta["mesh-net"] == "strict"')).sort(), [serviceId('strict', 'web'), serviceId('strict', 'x')])

      const check = async () => (await agentChecks(client))[checkId(serviceId('strict', 'x'))]
      await waitFor('x to pass', async () => ((await check())?.Status === 'passing' ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })
      chmodSync(t.bin, 0o777)
      const refused = `refusing script check in ${t.file}: ${t.bin} is world-writable (mode 0777)`
      await waitFor('x to be refused', async () => ((await check())?.Output === refused ? true : undefined), { timeoutMs: 10_000, intervalMs: 50 })
      assert.equal((await check())?.Status, 'critical')
      assert.ok(
        lines.some((l) => l.file === 'x.json' && l.msg === refused),
        JSON.stringify(lines),
      )
    } finally {
      await reg.stop()
    }
  })
})
