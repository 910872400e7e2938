import { describe } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { kvLayout } from '../../src/mesh/kv-layout.ts'
import { waitFor } from '../../src/lab/daemon.ts'
import { LAB_NETNAME } from '../../src/lab/lab.ts'
import { revokeNode } from '../../src/mesh/revoke.ts'
import { nodeRecord } from '../helpers-keys.ts'
import { dig, labTest, useLab, withLogs } from './helpers.ts'

const layout = kvLayout(LAB_NETNAME)
const NODES = ['node1', 'node2', 'node3', 'node4']
const vpn = (n: string) => `10.99.0.${n.replace('node', '')}`
const FIXTURE = join(import.meta.dirname, '..', 'fixtures', 'dns-fuzz.ts')

describe('lab, ACLs on: every node answers *.mesh on its VPN address from its own view', () => {
  // node1..node3 public, node4 behind NAT.
  const get = useLab({ nodes: 4, nat: 1, consulServers: 1, acl: true, tinc: true, hostFiles: 'seed' })

  labTest('every node answers for every other node over UDP and TCP on its VPN address, and on 127.0.0.1', async () => {
    const lab = get()
    await lab.writeNetwork()
    for (const n of NODES) await lab.startSidecar(n)
    await withLogs(lab, NODES, () => lab.waitForMesh())
    for (const at of NODES) {
      await withLogs(lab, [at], () =>
        waitFor(`${at} to serve DNS with every node`, async () => ((await dig(lab, at, `@${vpn(at)}`, '+short', 'node4.mesh')).trim() === vpn('node4') ? true : undefined), {
          timeoutMs: 30_000,
          intervalMs: 200,
        }),
      )
      for (const other of NODES) {
        assert.equal((await dig(lab, at, `@${vpn(at)}`, '+short', `${other}.mesh`)).trim(), vpn(other), `${at} over UDP for ${other}`)
        assert.equal((await dig(lab, at, `@${vpn(at)}`, '+tcp', '+short', `${other}.mesh`)).trim(), vpn(other), `${at} over TCP for ${other}`)
      }
      assert.equal((await dig(lab, at, '@127.0.0.1', '+short', 'NODE1.MESH')).trim(), vpn('node1'))
    }
    // And across the tunnel: node4 (behind NAT) asks node2's server.
    assert.equal((await dig(lab, 'node4', `@${vpn('node2')}`, '+short', 'node3.mesh')).trim(), vpn('node3'))
  })

  labTest('PTR, TXT, SOA/NS; NXDOMAIN and NODATA carry the SOA; other zones are REFUSED; the resolve command agrees', async () => {
    const lab = get()
    assert.equal((await dig(lab, 'node1', `@${vpn('node1')}`, '+short', '-x', vpn('node4'))).trim(), 'node4.mesh.')
    assert.match(await dig(lab, 'node1', `@${vpn('node1')}`, '+short', 'node4.mesh', 'TXT'), /"behind NAT" "tinc=node4" "key=sha256:[0-9a-f]{64}"/)
    assert.match(await dig(lab, 'node2', `@${vpn('node2')}`, '+short', 'mesh', 'NS'), /^node2\.mesh\.$/m)
    const nx = await dig(lab, 'node3', `@${vpn('node3')}`, 'nobody.mesh')
    assert.match(nx, /status: NXDOMAIN/)
    assert.match(nx, /flags: qr aa rd;/)
    assert.match(nx, /AUTHORITY SECTION:\nmesh\.\s+5\s+IN\s+SOA\s+node3\.mesh\. hostmaster\.mesh\./)
    const nodata = await dig(lab, 'node3', `@${vpn('node3')}`, 'node1.mesh', 'AAAA')
    assert.match(nodata, /status: NOERROR[\s\S]*ANSWER: 0, AUTHORITY: 1/)
    assert.match(nodata, /IN\s+SOA\s+node3\.mesh\./)
    assert.match(await dig(lab, 'node1', `@${vpn('node1')}`, 'example.com'), /status: REFUSED/)
    const r = await lab.cli('node2', ['resolve', 'node3.mesh'])
    assert.equal(r.stdout, `node3.mesh.\t30\tA\t${vpn('node3')}\n`)
  })

  labTest('an alias set in Consul resolves on every node; a name deleted or revoked in KV leaves DNS on every node', async (t) => {
    const lab = get()
    const admin = lab.consul('node1', { token: lab.state.managementToken ?? null })
    await lab.cli('node1', ['alias', 'set', 'gateway', 'node2', '--net', LAB_NETNAME], { env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' } })
    for (const at of NODES)
      await waitFor(`${at} to serve the alias`, async () => (/^node2\.mesh\.\n10\.99\.0\.2$/m.test(await dig(lab, at, `@${vpn(at)}`, '+short', 'gateway.mesh')) ? true : undefined), {
        timeoutMs: 30_000,
        intervalMs: 100,
      })

    // A rename leaves the old name behind in KV: here, a record that comes and goes.
    await admin.kvPut(layout.node('latecomer'), JSON.stringify(nodeRecord('latecomer', 40)))
    for (const at of NODES)
      await waitFor(`${at} to serve latecomer`, async () => ((await dig(lab, at, `@${vpn(at)}`, '+short', 'latecomer.mesh')).trim() === '10.99.0.40' ? true : undefined), {
        timeoutMs: 30_000,
        intervalMs: 100,
      })
    const gone = async (name: string, change: () => Promise<unknown>) => {
      const started = Date.now()
      await change()
      const took: number[] = []
      await Promise.all(
        NODES.filter((n) => n !== name).map(async (at) => {
          await waitFor(`${name} to leave ${at}'s DNS`, async () => (/status: NXDOMAIN/.test(await dig(lab, at, `@${vpn(at)}`, `${name}.mesh`)) ? true : undefined), {
            timeoutMs: 30_000,
            intervalMs: 50,
          })
          took.push(Date.now() - started)
        }),
      )
      // Reported, not asserted (no timed assertions); the figure goes in the issue note.
      t.diagnostic(`${name} left DNS on every node ${Math.max(...took)} ms after the KV change (dig polling every 50 ms)`)
    }
    await gone('latecomer', () => admin.request('DELETE', `/v1/kv/${layout.node('latecomer')}`))
    await gone('node4', () => revokeNode(admin, layout, 'node4'))
    assert.match(await dig(lab, 'node1', `@${vpn('node1')}`, '-x', vpn('node4')), /status: NXDOMAIN/)
  })

  labTest('with Consul stopped, every node keeps answering from its last view', async () => {
    const lab = get()
    lab.stopConsulServer('consul1')
    await waitFor('the sidecars to notice', async () => (NODES.every((n) => readFileSync(join(lab.state.runDir, n, 'sidecar.log'), 'utf8').includes('consul read failed')) ? true : undefined), {
      timeoutMs: 60_000,
      intervalMs: 200,
    })
    for (const at of ['node1', 'node2', 'node3']) {
      assert.equal((await dig(lab, at, `@${vpn(at)}`, '+short', 'node1.mesh')).trim(), vpn('node1'))
      assert.match(await dig(lab, at, `@${vpn(at)}`, '+short', 'gateway.mesh'), /10\.99\.0\.2/)
    }
    await lab.startConsulServer('consul1')
  })

  labTest('thousands of malformed packets over UDP and TCP: the daemon survives and still answers correctly', async () => {
    const lab = get()
    for (const at of ['node1', 'node3']) {
      const r = await lab.exec(at, [process.execPath, '--import', 'tsx', FIXTURE, vpn(at), '53', '4000', 'node2.mesh'], { cwd: join(import.meta.dirname, '..', '..'), timeoutMs: 120_000 })
      const out = JSON.parse(r.stdout) as { sent: number; udpReplies: number; biggestReply: number; tcpSent: number; udp: string[]; tcp: string[] }
      assert.equal(out.sent, 4000)
      assert.ok(out.tcpSent >= 400, `only ${out.tcpSent} TCP connections were made`)
      assert.deepEqual(out.udp, [vpn('node2')])
      assert.deepEqual(out.tcp, [vpn('node2')])
      // No amplification: a garbage query never gets more than a small answer back.
      assert.ok(out.biggestReply <= 200, `a malformed query got a ${out.biggestReply}-byte reply`)
      assert.match(readFileSync(join(lab.state.runDir, at, 'sidecar.log'), 'utf8'), /serving DNS/)
      assert.doesNotMatch(readFileSync(join(lab.state.runDir, at, 'sidecar.log'), 'utf8'), /dns query failed|helper process exited/)
    }
  })
})
