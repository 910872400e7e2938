import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { waitFor, type Daemon } from '../../src/lab/daemon.ts'
import { LAB_NETNAME, type Lab } from '../../src/lab/lab.ts'
import { dig as digIn, labTest, useLab, withLogs } from './helpers.ts'

const NODES = ['node1', 'node2', 'node3']
const vpn = (n: string) => `10.99.0.${n.replace('node', '')}`
const LISTENER = join(import.meta.dirname, '..', 'fixtures', 'listener.ts')

// Re-registration after an agent restart happens on the next resync; 2 s keeps the test short.
process.env.TINC_CONSUL_SERVICES_RESYNC = '2'

const dig = (lab: Lab, from: string, ...args: string[]) => digIn(lab, from, `@${vpn(from)}`, ...args)

/** Waits until every node's DNS answers `name` (with dig's +short output) as `want`; returns the slowest node's ms. */
async function everyNode(lab: Lab, what: string, args: string[], want: (out: string) => boolean, timeoutMs = 30_000): Promise<number> {
  const started = Date.now()
  const took = await Promise.all(
    NODES.map(async (at) => {
      await waitFor(`${at}: ${what}`, async () => (want(await dig(lab, at, ...args)) ? true : undefined), { timeoutMs, intervalMs: 100 })
      return Date.now() - started
    }),
  )
  return Math.max(...took)
}

const tokenEnv = (lab: Lab, node: string) => ({ ...process.env, TINC_CONSUL_TOKEN: lab.state.nodeTokens[node] ?? '' })
const listAll = async (lab: Lab, at: string) =>
  JSON.parse((await lab.cli(at, ['service', 'ls', '--all', '--json', '--net', LAB_NETNAME, '--config-dir', join(lab.servicesDir(at), '..')], { env: tokenEnv(lab, at) })).stdout) as Array<{
    name: string
    node: string
    address: string
    port: number
  }>

describe("lab, ACLs on: services on the mesh, health-checked by Consul, served by every node's DNS", () => {
  // node1 and node2 public, node3 behind NAT.
  const get = useLab({ nodes: 3, nat: 1, consulServers: 1, acl: true, tinc: true, hostFiles: 'seed' })
  const listeners = new Map<string, Daemon>()
  const listen = async (lab: Lab, node: string, kind: 'tcp' | 'http', port: number) => {
    const d = await lab.spawn(node, `listener-${kind}-${port}`, [process.execPath, '--import', 'tsx', LISTENER, kind, vpn(node), String(port)])
    listeners.set(`${node}:${port}`, d)
    await waitFor(`${kind} listener on ${node}:${port}`, async () => (readFileSync(d.logFile, 'utf8').includes('listening') ? true : undefined), { timeoutMs: 15_000, intervalMs: 50, daemons: [d] })
  }
  // Written beside the directory and renamed in, as an editor or config tool would: the
  // registrar must never see a half-written file (it did, once, and kept the old port).
  const write = (lab: Lab, node: string, file: string, text: string) => {
    mkdirSync(lab.servicesDir(node), { recursive: true })
    const tmp = join(lab.servicesDir(node), '..', `.${file}.tmp`)
    writeFileSync(tmp, text)
    renameSync(tmp, join(lab.servicesDir(node), file))
  }

  labTest('a TCP service on node1 and an HTTP service on node2 resolve on every node, and show in `service ls --all`', async () => {
    const lab = get()
    await lab.writeNetwork()
    write(lab, 'node1', 'files.toml', 'name = "files"\nport = 7001\ntags = ["share"]\n[check]\ntype = "tcp"\ninterval = "1s"\ntimeout = "1s"\n')
    write(lab, 'node2', 'web.yaml', 'name: web\nport: 8080\ncheck:\n  type: http\n  path: /health\n  interval: 1s\n  timeout: 1s\n')
    for (const n of NODES) await lab.startSidecar(n)
    await withLogs(lab, NODES, () => lab.waitForMesh())
    await listen(lab, 'node1', 'tcp', 7001)
    await listen(lab, 'node2', 'http', 8080)
    await withLogs(lab, NODES, async () => {
      await everyNode(lab, 'files.service.mesh', ['+short', 'files.service.mesh'], (o) => o.trim() === vpn('node1'))
      await everyNode(lab, 'web.service.mesh', ['+short', 'web.service.mesh'], (o) => o.trim() === vpn('node2'))
    })
    await withLogs(lab, NODES, async () => {
      for (const at of NODES) {
        assert.equal((await dig(lab, at, '+short', '_files._tcp.service.mesh', 'SRV')).trim(), '1 1 7001 node1.mesh.')
        assert.equal((await dig(lab, at, '+short', 'web.service.mesh', 'SRV')).trim(), '1 1 8080 node2.mesh.')
        assert.equal((await dig(lab, at, '+short', 'share.files.service.mesh')).trim(), vpn('node1'), 'by tag')
        // The SRV target's address comes along in the additional section.
        assert.match(await dig(lab, at, 'web.service.mesh', 'SRV'), /ADDITIONAL SECTION:\nnode2\.mesh\.\s+30\s+IN\s+A\s+10\.99\.0\.2/)
        assert.deepEqual(
          (await listAll(lab, at)).map((e) => `${e.name} ${e.node} ${e.address}:${e.port}`),
          ['files node1 10.99.0.1:7001', 'web node2 10.99.0.2:8080'],
          `${at}: service ls --all`,
        )
      }
    })
    const mine = await lab.cli('node2', ['service', 'ls', '--net', LAB_NETNAME, '--config-dir', join(lab.servicesDir('node2'), '..')], { env: tokenEnv(lab, 'node2') })
    assert.match(mine.stdout, /^web\s+8080\s+tcp\s+http\s+passing\s+web\.yaml$/m)
    // In Consul they carry the network's and their node's prefix (the lab's network asks for scoped
    // names), which is all each node's token may write; DNS and the listings above use the mesh names.
    const inConsul = Object.keys(await lab.consul('consul1').request<Record<string, string[]>>('GET', '/v1/catalog/services'))
    assert.deepEqual(inConsul.filter((n) => n.endsWith('files') || n.endsWith('web')).sort(), [`tinc-${LAB_NETNAME}--node1--files`, `tinc-${LAB_NETNAME}--node2--web`])
  })

  labTest('a listener that dies leaves DNS and the listing on every node, and comes back when restarted', async (t) => {
    const lab = get()
    const d = listeners.get('node1:7001')
    assert.ok(d)
    const started = Date.now()
    await lab.kill(d)
    const gone = await withLogs(lab, NODES, () => everyNode(lab, 'files to leave DNS', ['files.service.mesh'], (o) => /status: NXDOMAIN/.test(o)))
    // Reported, not asserted: no timed assertions. The check runs every 1 s.
    t.diagnostic(`files left DNS on every node ${gone} ms after its listener died (check interval 1 s, dig polling every 100 ms)`)
    for (const at of NODES)
      assert.deepEqual(
        (await listAll(lab, at)).map((e) => e.name),
        ['web'],
        `${at}: service ls --all without files`,
      )
    await listen(lab, 'node1', 'tcp', 7001)
    const returned = await everyNode(lab, 'files to come back', ['+short', 'files.service.mesh'], (o) => o.trim() === vpn('node1'))
    t.diagnostic(`files was back on every node ${returned} ms after its listener restarted (${Date.now() - started} ms for the round trip)`)
  })

  labTest('a changed port in a definition file shows in SRV on every node', async () => {
    const lab = get()
    await listen(lab, 'node2', 'http', 8081)
    write(lab, 'node2', 'web.yaml', 'name: web\nport: 8081\ncheck:\n  type: http\n  path: /health\n  interval: 1s\n  timeout: 1s\n')
    await withLogs(lab, NODES, () => everyNode(lab, 'web on 8081', ['+short', 'web.service.mesh', 'SRV'], (o) => o.trim() === '1 1 8081 node2.mesh.'))
  })

  labTest('a malformed definition file is reported; the other services keep working and new ones still register', async () => {
    const lab = get()
    write(lab, 'node1', 'broken.toml', 'name = "broken"\nport = "seven"\n')
    const log = join(lab.state.runDir, 'node1', 'sidecar.log')
    await waitFor('the sidecar to report broken.toml', async () => (/"file":"broken\.toml".*invalid service file/.test(readFileSync(log, 'utf8')) ? true : undefined), {
      timeoutMs: 15_000,
      intervalMs: 100,
    })
    const ls = await lab.cli('node1', ['service', 'ls', '--net', LAB_NETNAME, '--config-dir', join(lab.servicesDir('node1'), '..')], { env: tokenEnv(lab, 'node1') })
    assert.match(ls.stdout, /^broken\s+-\s+-\s+-\s+invalid\s+broken\.toml$/m)
    assert.match(ls.stdout, /^broken\.toml: port: /m)
    assert.match(ls.stdout, /^files\s+7001\s+tcp\s+tcp\s+passing\s+files\.toml$/m)
    write(lab, 'node1', 'extra.toml', 'port = 7001\n[check]\ninterval = "1s"\n')
    await withLogs(lab, NODES, () => everyNode(lab, 'extra.service.mesh', ['+short', 'extra.service.mesh'], (o) => o.trim() === vpn('node1')))
    for (const at of NODES) assert.equal((await dig(lab, at, '+short', 'files.service.mesh')).trim(), vpn('node1'), `${at} still serves files`)
  })

  labTest("an agent that restarts knowing nothing gets the node's services back", async (t) => {
    const lab = get()
    const started = Date.now()
    await lab.restartConsulAgent('node2', { forgetServices: true })
    const back = await withLogs(lab, NODES, () => everyNode(lab, 'web back after the agent restart', ['+short', 'web.service.mesh', 'SRV'], (o) => o.trim() === '1 1 8081 node2.mesh.', 60_000))
    t.diagnostic(`web was served again on every node ${back} ms after node2's agent restart began (${Date.now() - started} ms in all; resync every 2 s)`)
    assert.match(readFileSync(join(lab.state.runDir, 'node2', 'sidecar.log'), 'utf8'), /"why":"missing from the agent \(restarted\?\)".*service registered/)
  })
})
