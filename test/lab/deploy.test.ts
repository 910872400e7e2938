import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { waitFor, type Daemon } from '../../src/lab/daemon.ts'
import { LAB_NETNAME } from '../../src/lab/lab.ts'
import { requireConsul } from '../../src/lab/provision.ts'
import { labConfigDir, sidecarStateDir } from '../../src/lab/tinc-manual.ts'
import { dig, labTest, useLab, withLogs } from './helpers.ts'

/**
 * docs/deploy.md, followed command by command on a lab with no Consul of its
 * own: node1..node3 are the hubs (public), node4 the laptop behind NAT. Consul
 * runs only from the configs install writes, on the VPN addresses, with
 * gossip encryption and ACLs; systemd is absent, so each agent and daemon is
 * started by hand the way its unit would start it.
 */
describe("lab: docs/deploy.md from zero, command by command, Consul only from install's configs", () => {
  const get = useLab({ nodes: 4, nat: 1, consulServers: 0, tinc: false })

  labTest(
    'bootstrap, init, move onto the VPN, two more servers, a laptop, a hub down, key rotation through another hub, upgrade, backup',
    async (t) => {
      const lab = get()
      const consulBin = await requireConsul()
      const runDir = lab.state.runDir
      const hubs = ['node1', 'node2', 'node3']
      const vpn = (name: string) => `10.99.0.${name.slice(4)}`
      const publicIp = (name: string) => lab.state.plan.nodes.find((n) => n.name === name)?.publicIp ?? '?'
      const sys = (name: string) => join(runDir, name, 'sys')
      const setup = (name: string) => [...lab.setupFlags(name), '--key-size', '2048']
      // Where install's files go: init and join take the same flags for the install they finish with.
      const installPlace = (name: string) => ['--root', sys(name), '--consul-data-dir', join(runDir, name, 'consul-data'), '--consul-bin', consulBin]
      const place = (name: string) => ['--net', LAB_NETNAME, '--config-dir', labConfigDir(runDir, name), '--dir', lab.tincFiles(name).root, ...installPlace(name)]
      // lab.cli installs nothing by default; here init and join install under --root (no systemctl there).
      const installing = { ...process.env, TINC_CONSUL_NO_INSTALL: '0' }
      /** The one command printed what to start; the test starts it the way the units would. */
      const printsStartCommands = (name: string, out: string) => {
        assert.match(out, /no systemctl was run/)
        assert.match(out, new RegExp(`^  tincd -n ${LAB_NETNAME} -c ${lab.tincFiles(name).dir} --logfile`, 'm'))
        assert.ok(out.includes(`agent -config-dir=${join(sys(name), 'etc/consul.d')} `), out)
        assert.match(out, new RegExp(`run --net ${LAB_NETNAME} --config-dir ${labConfigDir(runDir, name)} `))
      }
      const settings = (name: string) => join(labConfigDir(runDir, name), `${LAB_NETNAME}.env`)

      // What `systemctl restart consul` / `tinc-consul@lab` would do.
      const agents = new Map<string, Daemon>()
      const restartConsul = async (name: string, onVpn = true) => {
        const old = agents.get(name)
        if (old) await lab.kill(old)
        // consul.service binds the VPN address tinc-up makes, retrying (Restart=) until it exists.
        const vpnUp = async () => ((await lab.exec(name, ['ip', '-o', '-4', 'addr', 'show'])).stdout.includes(' inet 10.99.0.') ? true : undefined)
        if (onVpn) await waitFor(`${name}'s VPN address`, vpnUp, { timeoutMs: 30_000, intervalMs: 100 })
        agents.set(name, await lab.spawn(name, 'consul', [consulBin, 'agent', `-config-dir=${join(sys(name), 'etc/consul.d')}`]))
      }
      const sidecars = new Map<string, Daemon>()
      const restartSidecar = async (name: string) => {
        const old = sidecars.get(name)
        if (old) await lab.kill(old)
        sidecars.set(name, await lab.startSidecar(name))
      }
      const logs = <T>(names: string[], fn: () => Promise<T>) => withLogs(lab, names, fn)

      // 2. The first server: Consul alone on loopback, init, then Consul onto the VPN address.
      const boot = await lab.cli('node1', ['install', ...place('node1'), '--consul-server', '--bootstrap', '--name', 'node1'])
      const managementToken = /export CONSUL_HTTP_TOKEN=(\S+)/.exec(boot.stdout)?.[1]
      assert.ok(managementToken, `install --bootstrap prints the management token:\n${boot.stdout}`)
      const operator = { ...process.env, CONSUL_HTTP_TOKEN: managementToken }
      const consul = (name: string, args: string[], allowFailure = false) => lab.exec(name, [consulBin, ...args], { env: operator, allowFailure })
      const raftPeers = async (name: string) => {
        const r = await consul(name, ['operator', 'raft', 'list-peers'], true)
        return r.code === 0 ? r.stdout : undefined
      }
      await restartConsul('node1', false)
      await logs(['node1'], () =>
        waitFor('the bootstrap server to elect itself', async () => ((await raftPeers('node1'))?.includes('leader') ? true : undefined), {
          timeoutMs: 60_000,
          daemons: [agents.get('node1') as Daemon],
        }),
      )

      // init finishes as `install --consul-server` would: install set up this Consul agent.
      const moved = await lab.cli('node1', ['init', '--net', LAB_NETNAME, '--name', 'node1', '--cidr', '10.99.0.0/24', '--address', publicIp('node1'), ...setup('node1'), ...installPlace('node1')], {
        env: { ...operator, TINC_CONSUL_NO_INSTALL: '0' },
      })
      assert.match(moved.stdout, /Consul server agent, bound to 10\.99\.0\.1/)
      printsStartCommands('node1', moved.stdout)
      const agentConfig = readFileSync(join(sys('node1'), 'etc/consul.d/tinc-consul.hcl'), 'utf8')
      assert.ok(!agentConfig.includes(managementToken), "the agent runs on the node's token, not the operator's still exported from init")
      await lab.restartTincd('node1')
      await restartConsul('node1')
      await restartSidecar('node1')
      await logs(['node1'], () =>
        waitFor("node1's server to lead again from its VPN address, with its data", async () => ((await raftPeers('node1'))?.match(/10\.99\.0\.1:8300\s+leader/) ? true : undefined), {
          timeoutMs: 60_000,
          daemons: [agents.get('node1') as Daemon],
        }),
      )

      // What `systemctl status tinc-consul@lab` would tell an operator: the join endpoint is up.
      const joinsOpen = (name: string) =>
        logs([name], () =>
          waitFor(`${name}'s join endpoint`, async () => ((await lab.exec(name, ['ss', '-Hltn', 'sport = :8655'])).stdout.trim() ? true : undefined), {
            timeoutMs: 60_000,
            intervalMs: 500,
            daemons: [sidecars.get(name) as Daemon],
          }),
        )
      await joinsOpen('node1')

      // 3. Invites; 4. the second and third servers.
      const invite = async (on: string, args: string[]) => (await lab.cli(on, ['invite', '--net', LAB_NETNAME, '--config-dir', labConfigDir(runDir, on), ...args], { env: operator })).stdout.trim()
      const invites: Record<string, string> = {}
      for (const hub of ['node2', 'node3']) invites[hub] = await invite('node1', ['--name', hub, '--serve-joins'])
      const open = (await lab.cli('node1', ['invite', 'list', '--net', LAB_NETNAME, '--config-dir', labConfigDir(runDir, 'node1')], { env: operator })).stdout
      assert.match(open, /node2/)
      assert.match(open, /node3/)
      for (const hub of ['node2', 'node3']) {
        const joined = await lab.cli(hub, ['join', invites[hub] ?? '', '--address', publicIp(hub), ...setup(hub), ...installPlace(hub), '--consul-server'], { env: installing })
        assert.match(readFileSync(settings(hub), 'utf8'), /^TINC_CONSUL_GOSSIP_KEY=/m, `${hub} got the gossip key from the join`)
        assert.match(joined.stdout, new RegExp(`Consul server agent, bound to ${vpn(hub).replace(/\./g, '\\.')}`))
        printsStartCommands(hub, joined.stdout)
        await lab.restartTincd(hub)
        await restartConsul(hub)
        await restartSidecar(hub)
        await joinsOpen(hub)
      }
      const three = await logs(hubs, () =>
        waitFor(
          'three voting servers on their VPN addresses',
          async () => {
            const peers = await raftPeers('node1')
            const voters = (peers ?? '').split('\n').filter((l) => /\s10\.99\.0\.[123]:8300\s+(leader|follower)\s+true\s/.test(l))
            return voters.length === 3 ? peers : undefined
          },
          { timeoutMs: 120_000, intervalMs: 1000 },
        ),
      )
      t.diagnostic(`raft peers:\n${String(three)}`)

      // 5. The laptop behind NAT.
      // One command: the join, then the client agent's config and the units (docs/joining.md).
      const laptopInvite = await invite('node1', ['--name', 'node4'])
      const client = await lab.cli('node4', ['join', laptopInvite, ...setup('node4'), ...installPlace('node4')], { env: installing })
      assert.match(client.stdout, /Consul client agent, bound to 10\.99\.0\.4/)
      printsStartCommands('node4', client.stdout)
      await lab.restartTincd('node4')
      await restartConsul('node4')
      await restartSidecar('node4')
      await logs(['node1', 'node4'], () =>
        waitFor('node1.mesh to resolve on the laptop', async () => ((await dig(lab, 'node4', '@127.0.0.1', '+short', 'node1.mesh', 'A')).trim() === '10.99.0.1' ? true : undefined), {
          timeoutMs: 60_000,
          intervalMs: 1000,
        }),
      )
      const status = await lab.cli('node4', ['status', '--net', LAB_NETNAME, '--config-dir', labConfigDir(runDir, 'node4'), '--json'])
      const self = (JSON.parse(status.stdout) as { node?: { name?: string; address?: string } }).node
      assert.deepEqual([self?.name, self?.address], ['node4', '10.99.0.4'], `the laptop serves its status:\n${status.stdout}`)
      const oldToken = /^TINC_CONSUL_TOKEN=(.+)$/m.exec(readFileSync(settings('node4'), 'utf8'))?.[1]
      assert.ok(oldToken)

      const node3 = lab.state.plan.nodes.find((n) => n.name === 'node3')
      assert.ok(node3)

      // No single node needed: hub1 goes away entirely; the laptop's key is rotated through hub2.
      lab.stopNode('node1')
      agents.delete('node1')
      sidecars.delete('node1')
      await logs(['node2', 'node3'], () =>
        waitFor('a leader among the two hubs left', async () => ((await raftPeers('node2'))?.match(/10\.99\.0\.[23]:8300\s+leader/) ? true : undefined), { timeoutMs: 60_000, intervalMs: 1000 }),
      )
      const revoked = await lab.cli('node2', ['revoke', '--net', LAB_NETNAME, '--config-dir', labConfigDir(runDir, 'node2'), 'node4'], { env: operator })
      assert.match(revoked.stdout, /revoked node4/)
      assert.match(revoked.stdout, /deleted node4's Consul token/)
      const dead = await lab.exec('node2', [consulBin, 'acl', 'token', 'read', '-self'], { env: { ...process.env, CONSUL_HTTP_TOKEN: oldToken }, allowFailure: true })
      assert.notEqual(dead.code, 0, "the revoked laptop's old token no longer works")
      const rotate = await invite('node2', ['--name', 'node4'])
      await lab.kill(sidecars.get('node4') as Daemon)
      const rejoin = await lab.cli('node4', ['join', rotate, '--force', ...setup('node4'), ...installPlace('node4')], { env: installing })
      assert.match(rejoin.stdout, /198\.18\.0\.[23]:8655/, `the join went through a hub still up:\n${rejoin.stdout}`)
      // The new join brought a new token, and the laptop's Consul agent runs on it too.
      assert.match(rejoin.stdout, /^wrote +.*tinc-consul\.hcl/m)
      await lab.restartTincd('node4')
      await restartConsul('node4')
      await restartSidecar('node4')
      await logs(['node2', 'node4'], () =>
        waitFor('the laptop to ping hub2 with its new key', async () => ((await lab.exec('node4', ['ping', '-c1', '-W1', vpn('node2')], { allowFailure: true })).code === 0 ? true : undefined), {
          timeoutMs: 60_000,
          intervalMs: 500,
        }),
      )

      // Upgrade hub3: install again changes nothing; the restarted daemon comes back from its cache.
      const again = await lab.cli('node3', ['install', ...place('node3'), '--consul-server'])
      assert.doesNotMatch(again.stdout, /^\s*wrote /m, `a second install rewrote something:\n${again.stdout}`)
      assert.match(again.stdout, /^unchanged .*tinc-consul\.hcl/m)
      assert.ok(existsSync(join(sidecarStateDir(runDir, node3), 'cache.json')), 'the view cache a restart starts from')
      await restartSidecar('node3')
      await logs(['node3'], () =>
        waitFor('the restarted hub3 daemon to answer DNS', async () => ((await dig(lab, 'node3', '@127.0.0.1', '+short', 'node4.mesh', 'A')).trim() === '10.99.0.4' ? true : undefined), {
          timeoutMs: 30_000,
          intervalMs: 500,
        }),
      )

      // Back up and monitor.
      const snap = join(runDir, 'node2', 'consul.snap')
      await consul('node2', ['snapshot', 'save', snap])
      assert.ok(statSync(snap).size > 0)
      assert.match((await consul('node2', ['snapshot', 'inspect', snap])).stdout, /Index/)
      const metrics = (await lab.exec('node4', [process.execPath, '-e', "fetch('http://127.0.0.1:9000/metrics').then(async (r) => process.stdout.write(await r.text()))"])).stdout
      assert.match(metrics, /^tinc_consul_tincd_up 1$/m)
      assert.match(metrics, /^tinc_consul_node_reachable\{node="node2"\} 1$/m)
    },
    420_000,
  )
})
