import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { configPath, parseConfig, writeConfig } from '../../src/config-file.ts'
import { waitFor, type Daemon } from '../../src/lab/daemon.ts'
import { LAB_NETNAME, type Lab } from '../../src/lab/lab.ts'
import { cliArgv } from '../../src/lab/sidecar.ts'
import { labConfigDir, sidecarStateDir } from '../../src/lab/tinc-manual.ts'
import { kvLayout } from '../../src/mesh/kv-layout.ts'
import { makeRecord } from '../../src/mesh/publish.ts'
import { nodeRecordSchema, type NodeRecord } from '../../src/mesh/record.ts'
import { keyFingerprint, parseHostFile } from '../../src/tinc/hostfile.ts'
import { run } from '../../src/util/exec.ts'
import { dig, labTest, useLab, withLogs } from './helpers.ts'

/**
 * The trust promises of issue 16 on a network made the way operators make one (init, invite,
 * join through the CLI, ACLs on), with real tincd and Consul. One lab for the four tests:
 * each leaves the mesh as the next one expects.
 */
const layout = kvLayout(LAB_NETNAME)
const KEY = ['--key-size', '2048']
const RUNNING = ['node1', 'node2', 'node3']
const sidecars = new Map<string, Daemon>()

const plan = (lab: Lab, name: string) => {
  const n = lab.state.plan.nodes.find((x) => x.name === name)
  if (!n) throw new Error(`no ${name}`)
  return n
}
const hostsDir = (lab: Lab, name: string) => join(lab.tincFiles(name).dir, 'hosts')
const hosts = (lab: Lab, name: string) => (existsSync(hostsDir(lab, name)) ? readdirSync(hostsDir(lab, name)).sort() : [])
const adminEnv = (lab: Lab) => ({ env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' } })
/** The token `join` wrote into a node's own config file: what a cloned VM or a thief would hold. */
const ownToken = (lab: Lab, name: string) => {
  const path = configPath(labConfigDir(lab.state.runDir, name), LAB_NETNAME)
  const token = parseConfig(readFileSync(path, 'utf8'), path).TINC_CONSUL_TOKEN
  if (!token) throw new Error(`${path} has no token`)
  return token
}

async function record(lab: Lab, name: string): Promise<NodeRecord> {
  const raw = (await lab.consul('node1').kvGet(layout.node(name)))?.value
  return nodeRecordSchema.parse(JSON.parse(raw ?? 'null'))
}

async function start(lab: Lab, name: string): Promise<void> {
  await lab.restartTincd(name)
  sidecars.set(name, await lab.startSidecar(name))
}

async function stopSidecar(lab: Lab, name: string): Promise<void> {
  const d = sidecars.get(name)
  if (d) await lab.kill(d)
  sidecars.delete(name)
}

async function invite(lab: Lab, extra: string[] = []): Promise<string> {
  return (await lab.cli('node1', ['invite', '--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, 'node1'), ...extra])).stdout.trim()
}

async function joinNode(lab: Lab, name: string, inv: string): Promise<void> {
  const n = plan(lab, name)
  const out = await lab.cli(name, ['join', inv, '--name', name, ...(n.behindNat ? [] : ['--address', n.publicIp]), ...KEY, ...lab.setupFlags(name)])
  assert.match(out.stdout, new RegExp(`Joined lab as ${name}`))
}

/** Waits until `check` holds on every listed node (the daemons act on their own schedule). */
async function everywhere(lab: Lab, nodes: string[], what: string, check: (node: string) => boolean | Promise<boolean>, timeoutMs = 30_000) {
  await withLogs(lab, nodes, () => waitFor(what, async () => ((await Promise.all(nodes.map(check))).every(Boolean) ? true : undefined), { timeoutMs, intervalMs: 200 }))
}

describe('lab, ACLs on, a network made by init/invite/join: squatters, revocations, clones and aliases', () => {
  // node1..node3 public, node4 behind NAT. tincd starts from the files init and join write.
  const get = useLab({ nodes: 4, nat: 1, consulServers: 1, acl: true, tinc: false })

  labTest('node1 inits the network, node2 and node3 join from its invites, and every node has every host file', async () => {
    const lab = get()
    await lab.cli('node1', ['init', '--net', LAB_NETNAME, '--name', 'node1', '--cidr', '10.99.0.0/24', '--address', plan(lab, 'node1').publicIp, ...KEY, ...lab.setupFlags('node1')], adminEnv(lab))
    await start(lab, 'node1')
    for (const name of ['node2', 'node3']) {
      await joinNode(lab, name, await invite(lab))
      await start(lab, name)
    }
    await everywhere(lab, RUNNING, 'every node to hold every host file', (n) => JSON.stringify(hosts(lab, n)) === JSON.stringify(RUNNING))
  })

  labTest("a squatting record written with a node's own token never reaches a new joiner's disk", async () => {
    const lab = get()
    const node2 = await record(lab, 'node2')
    const honest = await lab.consul('node1').kvGet(layout.node('node3'))
    assert.ok(honest)
    // node3's daemon would put its own record back: stop it, then squat on node2's address with
    // node3's own token (its policy lets it write its own record as it likes).
    await stopSidecar(lab, 'node3')
    const key = parseHostFile((await record(lab, 'node3')).hostFile).publicKey ?? ''
    const squat = makeRecord({ name: 'node3', vpnAddress: node2.vpnAddress, addresses: [plan(lab, 'node3').publicIp], port: 655, publicKey: key })
    assert.equal(await lab.consul('node3', { token: ownToken(lab, 'node3') }).kvPut(layout.node('node3'), JSON.stringify(squat)), true)

    await joinNode(lab, 'node4', await invite(lab))
    const onDisk = hosts(lab, 'node4')
    assert.ok(onDisk.includes('node1') && onDisk.includes('node2'), `node4's hosts/: ${onDisk.join(' ')}`)
    assert.equal(onDisk.includes('node3'), false, 'the joiner got a host file for the squatting record')
    for (const f of onDisk.filter((f) => f !== 'node2'))
      assert.doesNotMatch(
        readFileSync(join(hostsDir(lab, 'node4'), f), 'utf8'),
        new RegExp(`^Subnet = ${node2.vpnAddress.replaceAll('.', '\\.')}/32$`, 'm'),
        `node4's hosts/${f} claims node2's address`,
      )
    // The running daemons never took it either.
    for (const n of ['node1', 'node2']) assert.doesNotMatch(readFileSync(join(hostsDir(lab, n), 'node3'), 'utf8'), new RegExp(`Subnet = ${node2.vpnAddress.replaceAll('.', '\\.')}/`))

    // node3 puts its real record back; node4 starts and learns it.
    assert.equal(await lab.consul('node3', { token: ownToken(lab, 'node3') }).kvPut(layout.node('node3'), honest.value), true)
    await start(lab, 'node3')
    await start(lab, 'node4')
    await everywhere(lab, [...RUNNING, 'node4'], 'every node to hold all four host files', (n) => hosts(lab, n).length === 4)
  })

  labTest('`alias rm` of the last alias, through the CLI, leaves DNS on every node', async () => {
    const lab = get()
    const all = [...RUNNING, 'node4']
    // The last answer each node gave, for the failure message.
    const answers = new Map<string, string>()
    const ask = async (n: string) => {
      const a = await dig(lab, n, '@127.0.0.1', 'gateway.mesh')
      answers.set(n, a.replace(/^;.*\n|^\n/gm, ''))
      return a
    }
    const explained = (err: unknown) => {
      throw new Error(`${(err as Error).message}; last answers: ${JSON.stringify(Object.fromEntries(answers))}`, { cause: err })
    }
    await lab.cli('node1', ['alias', 'set', 'gateway', 'node2', '--net', LAB_NETNAME], adminEnv(lab))
    await everywhere(lab, all, 'every node to serve gateway.mesh', async (n) => /^gateway\.mesh\.\s.*\sCNAME\s+node2\.mesh\.$/m.test(await ask(n))).catch(explained)
    await lab.cli('node1', ['alias', 'rm', 'gateway', '--net', LAB_NETNAME], adminEnv(lab))
    await everywhere(lab, all, "gateway.mesh to leave every node's DNS", async (n) => /status: NXDOMAIN/.test(await ask(n))).catch(explained)
  })

  labTest("a node down while another is revoked, restarted without its cache, drops the revoked node's file", async () => {
    const lab = get()
    assert.ok(hosts(lab, 'node4').includes('node3'))
    await stopSidecar(lab, 'node4')
    await lab.cli('node1', ['revoke', '--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, 'node1'), 'node3'], adminEnv(lab))
    await stopSidecar(lab, 'node3')
    await everywhere(lab, ['node1', 'node2'], "node3's host file to leave the running nodes", (n) => !hosts(lab, n).includes('node3'))
    rmSync(join(sidecarStateDir(lab.state.runDir, plan(lab, 'node4')), 'cache.json'), { force: true })
    assert.ok(hosts(lab, 'node4').includes('node3'), 'node4 lost the file while down')
    await start(lab, 'node4')
    await everywhere(lab, ['node4'], "node4 to drop node3's file after its first complete read", (n) => !hosts(lab, n).includes('node3'), 60_000)
    assert.deepEqual(hosts(lab, 'node4'), ['node1', 'node2', 'node4'])
  })

  labTest('a clone of node2 (same name, another key and address) is reported in /status and does not loop', async (t) => {
    const lab = get()
    const real = await record(lab, 'node2')
    const clone = await cloneOf(lab, 'node2', 'node3')
    const d = await lab.spawn('node3', 'clone-of-node2', [
      ...cliArgv(),
      'run',
      '--net',
      LAB_NETNAME,
      '--dir',
      clone.root,
      '--state-dir',
      join(clone.base, 'state'),
      '--pidfile',
      join(clone.base, 'tinc.pid'),
      '--consul',
      'http://127.0.0.1:8500',
      '--config-dir',
      clone.configDir,
      '--run-dir',
      join(clone.base, 'run'),
      '--tinc-log',
      join(clone.base, 'tinc.log'),
      '--no-dns',
      '--join-port',
      '0',
    ])
    type Conflict = { ours?: string; theirs?: string; attempts?: number; gaveUp?: boolean }
    const conflictAt = async (node: string): Promise<Conflict | undefined> => {
      const script = "fetch('http://127.0.0.1:9000/status').then(async (r) => process.stdout.write(JSON.stringify((await r.json()).node?.nameConflict ?? null)))"
      const out = (await lab.exec(node, [process.execPath, '-e', script], { allowFailure: true })).stdout
      return (JSON.parse(out || 'null') as Conflict | null) ?? undefined
    }
    // Both daemons find the record rewritten under them; whichever gives up first says so, naming
    // its own key as ours and the other's as theirs.
    const sides = [
      { node: 'node2', ours: real.fingerprint, theirs: clone.fingerprint },
      { node: 'node3', ours: clone.fingerprint, theirs: real.fingerprint },
    ]
    const seen = await withLogs(
      lab,
      ['node2'],
      () =>
        waitFor(
          'a daemon to report the name conflict and give up',
          async () => {
            for (const side of sides) {
              const c = await conflictAt(side.node)
              if (c?.gaveUp) return { ...side, c }
            }
            return undefined
          },
          { timeoutMs: 120_000, intervalMs: 500, daemons: [d] },
        ),
      [d.logFile],
    )
    t.diagnostic(`${seen.node === 'node2' ? 'node2' : 'the clone'} gave up: ${JSON.stringify(seen.c)}`)
    assert.equal(seen.c.ours, seen.ours)
    assert.equal(seen.c.theirs, seen.theirs)
    assert.ok((seen.c.attempts ?? 0) >= 1 && (seen.c.attempts ?? 0) <= 10, `attempts: ${String(seen.c.attempts)}`)
    // Not looped: once one side has given up, the other's record stands and nothing rewrites it.
    // Two 10 s blocking reads in a row come back at the same ModifyIndex (the old loop rewrote
    // it about 40 times a second; the back-off retries within seconds).
    const admin = lab.consul('node1')
    const still = await waitFor(
      "node2's record to stop changing",
      async () => {
        const now = await admin.kvGetOne(layout.node('node2'))
        const after = await admin.kvGetOne(layout.node('node2'), { index: now.item?.modifyIndex ?? 0, waitSeconds: 10 })
        return after.item?.modifyIndex === now.item?.modifyIndex ? after.item?.modifyIndex : undefined
      },
      { timeoutMs: 120_000, daemons: [d] },
    )
    t.diagnostic(`after: node2 ${JSON.stringify(await conflictAt('node2'))}, the clone ${JSON.stringify(await conflictAt('node3'))}`)
    const later = await admin.kvGetOne(layout.node('node2'), { index: still ?? 0, waitSeconds: 10 })
    assert.equal(later.item?.modifyIndex, still, "node2's record kept being rewritten")
    await lab.kill(d)
  })
})

/**
 * A copy of `name` as a restored backup or cloned VM would be, on another machine (`on`): its
 * config file and token, but a new key and that machine's address. No tincd: two tincds with
 * one name would only add noise to what is tested here, the daemons' handling of the record.
 */
async function cloneOf(lab: Lab, name: string, on: string): Promise<{ base: string; root: string; configDir: string; fingerprint: string }> {
  const base = join(lab.state.runDir, on, `clone-of-${name}`)
  const root = join(base, 'etc-tinc')
  const dir = join(root, LAB_NETNAME)
  const configDir = join(base, 'etc-tinc-consul')
  await mkdir(join(dir, 'hosts'), { recursive: true })
  await mkdir(configDir, { recursive: true })
  const own = await record(lab, name)
  await writeFile(join(dir, 'tinc.conf'), `Name = ${name}\nAddressFamily = ipv4\nStrictSubnets = yes\n`)
  await writeFile(join(dir, 'hosts', name), `Address = ${plan(lab, on).publicIp}\nPort = 655\nSubnet = ${own.vpnAddress}/32\n`)
  await run(['tincd', '-c', dir, '-K', '2048'], { timeoutMs: 60_000 })
  const key = parseHostFile(readFileSync(join(dir, 'hosts', name), 'utf8')).publicKey ?? ''
  await writeConfig(configDir, LAB_NETNAME, { TINC_CONSUL_TOKEN: ownToken(lab, name), TINC_CONSUL_JOIN_PORT: '0' })
  return { base, root, configDir, fingerprint: keyFingerprint(key) }
}
