/* eslint-disable no-console -- the demo's job is to print the story */
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { LabError } from '../errors.ts'
import { BLOCK_BEGIN, BLOCK_END } from '../tinc/conf-block.ts'
import { waitFor, type Daemon } from './daemon.ts'
import { LAB_NETNAME, type Lab } from './lab.ts'
import { labConfigDir } from './tinc-manual.ts'

/**
 * The lab writes its hand-made ConnectTo lines inside our block, as a preview of what the sidecar
 * renders; a network made by hand has them as plain lines. This turns a node's tinc.conf into that.
 */
export function makeHandMade(lab: Lab, node: string): void {
  const path = join(lab.tincFiles(node).dir, 'tinc.conf')
  const plain = readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l !== BLOCK_BEGIN && l !== BLOCK_END && !l.startsWith('# Managed by tinc-consul'))
  writeFileSync(path, plain.join('\n'))
}

export interface PingRun {
  answered: number
  lost: number
  /** The longest run of unanswered pings between the first and the last answer. */
  longest: number
}

/** What `ping -D` printed: answers, losses and the longest interruption, counted by icmp_seq. */
export function pingInterruption(log: string): PingRun {
  const got = new Set([...log.matchAll(/icmp_seq=(\d+) ttl=/g)].map((m) => Number(m[1])))
  if (got.size === 0) return { answered: 0, lost: 0, longest: 0 }
  const seqs = [...got]
  let longest = 0
  let run = 0
  let lost = 0
  for (let s = Math.min(...seqs); s <= Math.max(...seqs); s++) {
    if (got.has(s)) run = 0
    else {
      run++
      lost++
      longest = Math.max(longest, run)
    }
  }
  return { answered: got.size, lost, longest }
}

/** Every unordered pair of the names, in order. */
const pairs = (names: string[]): Array<[string, string]> => names.flatMap((a, i) => names.slice(i + 1).map((b): [string, string] => [a, b]))

const PING_INTERVAL_S = 0.2

/**
 * Issue 18's story on a lab started with hand-written tinc configs: the network people already
 * run adopts node by node while pings run between every pair, then a LAN behind a public node and
 * one behind a node behind NAT are announced, approved and reached from every node.
 */
export async function runNetworksDemo(lab: Lab): Promise<{ failures: number }> {
  const names = lab.state.plan.nodes.map((n) => n.name)
  const vpn = (name: string) => lab.state.plan.nodes.find((n) => n.name === name)?.vpnIp ?? '?'
  await lab.waitForMesh()
  for (const n of names) makeHandMade(lab, n)
  console.log(`\na hand-made tinc network: ${names.join(', ')}, every host file copied by hand, no Consul records`)
  const pings: Array<{ pair: string; d: Daemon }> = []
  for (const [a, b] of pairs(names)) pings.push({ pair: `${a} → ${b}`, d: await lab.spawn(a, `ping-${a}-${b}`, ['stdbuf', '-oL', 'ping', '-D', '-i', String(PING_INTERVAL_S), vpn(b)]) })
  const operator = { env: { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' } }
  for (const [i, n] of names.entries()) {
    console.log(`\n${n}# tinc-consul adopt --net ${LAB_NETNAME}`)
    const out = await lab.cli(n, ['adopt', '--net', LAB_NETNAME, ...lab.setupFlags(n)], operator)
    console.log((i === 0 ? out.stdout : out.stdout.split('\n').slice(0, 3).join('\n')).trimEnd().replace(/^/gm, '    '))
    // The sidecar runs with the token adopt made and stored, not the lab's own for the node.
    delete lab.state.nodeTokens[n]
    await lab.startSidecar(n)
  }
  const managed = (at: string, peer: string) => readFileSync(join(lab.tincFiles(at).dir, 'hosts', peer), 'utf8').startsWith('# Written by tinc-consul from')
  await waitFor('every host file to be managed', async () => (names.every((a) => names.every((b) => a === b || managed(a, b))) ? true : undefined), { timeoutMs: 60_000 })
  // A little past the end state, where a reload would show.
  await new Promise((r) => setTimeout(r, 5000))
  for (const p of pings) await lab.kill(p.d)
  console.log(`\npings every ${PING_INTERVAL_S} s on every pair, from before the first adopt until every host file was managed:`)
  let worst = 0
  for (const p of pings) {
    const r = pingInterruption(readFileSync(p.d.logFile, 'utf8'))
    worst = Math.max(worst, r.longest)
    console.log(`  ${p.pair.padEnd(18)} ${String(r.answered).padStart(4)} answered, ${r.lost} lost, longest interruption ${r.longest} ping(s) (${(r.longest * PING_INTERVAL_S).toFixed(1)} s)`)
  }
  console.log(`adopt: longest interruption on any pair ${worst} ping(s) (target: none beyond one lost ping: ${worst <= 1 ? 'met' : 'MISSED'})`)
  const failures = (await subnetsDemo(lab, names, operator)) + (worst > 1 ? 1 : 0)
  const viewer = names.at(-1) ?? 'node1'
  console.log(`\n${viewer}# tinc-consul status`)
  const st = await lab.cli(viewer, ['status', '--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, viewer)], { allowFailure: true })
  console.log((st.code === 0 ? st.stdout : `FAILED: ${st.stderr}`).trimEnd().replace(/^/gm, '    '))
  return { failures: failures + (st.code === 0 ? 0 : 1) }
}

/** A LAN behind the first node (its host routes back) and one behind the last (masqueraded), announced, approved, pinged. */
async function subnetsDemo(lab: Lab, names: string[], operator: { env: NodeJS.ProcessEnv }): Promise<number> {
  const first = names[0]
  const last = names.at(-1)
  if (!first || !last || first === last) throw new LabError('LAB_EMPTY', 'the networks demo needs at least two nodes')
  const lans = [
    { node: first, lan: await lab.addLan(first, '192.168.51.0/24', { routeBack: true }), flags: [] as string[] },
    { node: last, lan: await lab.addLan(last, '192.168.52.0/24', { routeBack: false }), flags: ['--masquerade'] },
  ]
  const onNode = (n: string) => ['--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, n)]
  for (const { node, lan, flags } of lans) {
    await lab.exec(node, ['sysctl', '-q', '-w', 'net.ipv4.ip_forward=1'])
    console.log(`\n${node}# tinc-consul subnet add ${[lan.cidr, ...flags].join(' ')}`)
    const add = await lab.cli(node, ['subnet', 'add', lan.cidr, ...flags, ...onNode(node), '--dir', lab.tincFiles(node).root])
    console.log(add.stdout.trimEnd().replace(/^/gm, '    '))
    console.log(`operator# tinc-consul subnet approve ${node} ${lan.cidr}`)
    await lab.cli(first, ['subnet', 'approve', node, lan.cidr, '--net', LAB_NETNAME], operator)
  }
  console.log(`\n${first}# tinc-consul subnet ls`)
  console.log((await lab.cli(first, ['subnet', 'ls', ...onNode(first)])).stdout.trimEnd().replace(/^/gm, '    '))
  console.log(`\nLAN hosts over the VPN (rows ping columns):\n  ${''.padEnd(8)}${lans.map((l) => `${l.lan.hostIp} (behind ${l.node})`.padEnd(30)).join('')}`)
  let failures = 0
  for (const from of names) {
    const cells = await Promise.all(
      lans.map(({ lan }) =>
        waitFor(`${from} to ping ${lan.hostIp}`, async () => ((await lab.exec(from, ['ping', '-c1', '-W1', lan.hostIp], { allowFailure: true })).code === 0 ? 'ok' : undefined), {
          timeoutMs: 45_000,
          intervalMs: 250,
        }).catch(() => 'FAIL'),
      ),
    )
    failures += cells.filter((c) => c === 'FAIL').length
    console.log(`  ${from.padEnd(8)}${cells.map((c) => c.padEnd(30)).join('')}`)
  }
  return failures
}
