import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, readFileSync } from 'node:fs'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { parseConfig } from '../../src/config-file.ts'
import { waitFor } from '../../src/lab/daemon.ts'
import { LAB_NETNAME, type Lab } from '../../src/lab/lab.ts'
import { requireConsul } from '../../src/lab/provision.ts'
import { labConfigDir } from '../../src/lab/tinc-manual.ts'
import { labTest, useLab, withLogs } from './helpers.ts'

const KEY = ['--key-size', '2048']
// The lab's own Consul agents already hold 127.0.0.1:8500 and :8600 in each namespace; the
// agents started from install's configs answer HTTP on 18500 instead (a file beside ours,
// as an operator's local override would be).
const HTTP = 18500

const settings = (lab: Lab, name: string) => parseConfig(readFileSync(join(labConfigDir(lab.state.runDir, name), `${LAB_NETNAME}.env`), 'utf8'), 'env')
const sys = (lab: Lab, name: string) => join(lab.state.runDir, name, 'sys')

/** GET on the install-configured agent's HTTP API, from inside the node's namespace. */
async function agentGet(lab: Lab, name: string, path: string): Promise<unknown> {
  const script = `fetch('http://127.0.0.1:${HTTP}${path}').then(async (r) => process.stdout.write(r.ok ? await r.text() : 'null')).catch(() => process.stdout.write('null'))`
  return JSON.parse((await lab.exec(name, [process.execPath, '-e', script], { allowFailure: true })).stdout || 'null') as unknown
}

describe('lab, ACLs on: install on nodes set up by init and join; Consul from its configs runs over tinc', () => {
  const get = useLab({ nodes: 3, nat: 1, consulServers: 1, acl: true, tinc: false })

  labTest(
    'install --consul-server on node1 hands the gossip key to joiners (after SIGHUP); a client on a NAT node reaches the server over the VPN only; uninstall undoes it',
    async (t) => {
      const lab = get()
      const consulBin = await requireConsul()
      const setup = (name: string) => [...lab.setupFlags(name), ...KEY]
      const node1 = lab.state.plan.nodes.find((n) => n.name === 'node1')
      assert.ok(node1)
      await lab.cli('node1', ['init', '--net', LAB_NETNAME, '--name', 'node1', '--cidr', '10.99.0.0/24', '--address', node1.publicIp, ...setup('node1')], {
        env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' },
      })
      await lab.restartTincd('node1')
      const sidecar = await lab.startSidecar('node1')

      const place = (name: string) => ['--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, name), '--dir', lab.tincFiles(name).root, '--root', sys(lab, name)]
      const flags = (name: string) => [...place(name), '--consul-data-dir', join(lab.state.runDir, name, 'consul-vpn-data'), '--consul-bin', consulBin]
      const dry = await lab.cli('node1', ['install', ...flags('node1'), '--consul-server', '--bootstrap-expect', '1', '--dry-run'])
      assert.match(dry.stdout, /bind_addr += "10\.99\.0\.1"/)
      assert.equal(existsSync(sys(lab, 'node1')), false, '--dry-run wrote nothing')
      const server = await lab.cli('node1', ['install', ...flags('node1'), '--consul-server', '--bootstrap-expect', '1'])
      assert.match(server.stdout, /wrote +.*tinc-consul\.hcl: Consul server agent, bound to 10\.99\.0\.1/)
      const gossipKey = settings(lab, 'node1').TINC_CONSUL_GOSSIP_KEY
      assert.ok(gossipKey, "install put the gossip key in node1's settings")

      // The running join endpoint learns the key from its settings file on SIGHUP.
      process.kill(sidecar.pid, 'SIGHUP')
      await withLogs(lab, ['node1'], () =>
        waitFor("node1's daemon to restart with the new settings", async () => (/SIGHUP: running with the new settings/.test(readFileSync(sidecar.logFile, 'utf8')) ? true : undefined), {
          timeoutMs: 30_000,
          daemons: [sidecar],
        }),
      )
      const inv = (await lab.cli('node1', ['invite', '--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, 'node1')])).stdout.trim()
      await lab.cli('node3', ['join', inv, '--name', 'node3', ...setup('node3')])
      assert.equal(settings(lab, 'node3').TINC_CONSUL_GOSSIP_KEY, gossipKey, 'the join reply carried the gossip key')
      await lab.restartTincd('node3')
      await lab.startSidecar('node3')
      // The lab's Consul servers sit on the control network; this cluster's server is node1 on the VPN.
      const client = await lab.cli('node3', ['install', ...flags('node3'), '--consul-client', '--consul-servers', '10.99.0.1'])
      const node3Vpn = /Consul client agent, bound to (10\.99\.0\.\d+)/.exec(client.stdout)?.[1]
      assert.ok(node3Vpn && node3Vpn !== '10.99.0.1', `bound to node3's VPN address: ${client.stdout}`)
      const vpn: Record<string, string> = { node1: '10.99.0.1', node3: node3Vpn }

      const pids: Record<string, number> = {}
      for (const name of ['node1', 'node3']) {
        await writeFile(join(sys(lab, name), 'etc/consul.d/zz-lab-ports.hcl'), `ports {\n  http = ${HTTP}\n  dns = -1\n}\n`)
        pids[name] = (await lab.spawn(name, 'consul-vpn', [consulBin, 'agent', `-config-dir=${join(sys(lab, name), 'etc/consul.d')}`])).pid
      }
      const leader = await withLogs(lab, ['node1', 'node3'], () =>
        waitFor(
          "node3's agent to find the leader through tinc",
          async () => {
            const l = await agentGet(lab, 'node3', '/v1/status/leader')
            return typeof l === 'string' && l ? l : undefined
          },
          { timeoutMs: 90_000, intervalMs: 500 },
        ),
      )
      assert.equal(leader, '10.99.0.1:8300', 'the server is known by its VPN address')
      // Nothing of this Consul listens outside the VPN address and loopback (the lab's own agents,
      // on the control network, are other processes).
      for (const name of ['node1', 'node3']) {
        const ss = (await lab.exec(name, ['ss', '-Hltnup'])).stdout.split('\n').filter((l) => l.includes(`pid=${pids[name] ?? 0},`))
        const addrs = ss.map((l) => l.split(/\s+/)[4] ?? '').filter((a) => /:(830[0-2]|18500)$/.test(a))
        t.diagnostic(`${name}: ${addrs.join(' ')}`)
        for (const a of addrs) assert.ok(a.startsWith(`${vpn[name] ?? '?'}:`) || a.startsWith('127.0.0.1:'), `${name} listens on ${a}`)
        assert.ok(
          addrs.some((a) => a.startsWith(`${vpn[name] ?? '?'}:`)),
          `${name} listens on its VPN address`,
        )
      }

      const un = await lab.cli('node3', ['uninstall', ...place('node3'), '--consul'])
      assert.match(un.stdout, /removed .*tinc-consul\.hcl/)
      assert.equal(existsSync(join(sys(lab, 'node3'), 'etc/consul.d/tinc-consul.hcl')), false)
      assert.ok(existsSync(join(lab.tincFiles('node3').dir, 'hosts', 'node3')), 'node3 keeps its key')
      assert.ok(settings(lab, 'node3').TINC_CONSUL_TOKEN, 'node3 keeps its token')
    },
    300_000,
  )
})
