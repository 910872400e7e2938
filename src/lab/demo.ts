/* eslint-disable no-console -- the demo's job is to print the story */
import { LabError } from '../errors.ts'
import { waitFor } from './daemon.ts'
import { groupsDemo } from './demo-groups.ts'
import { LAB_NETNAME, type Lab } from './lab.ts'
import { labConfigDir } from './tinc-manual.ts'

export interface DemoOptions {
  keyBits: number
  step(msg: string): void
}

interface Joined {
  name: string
  address: string
  behindNat: boolean
  via: string
  /** From the end of key generation to the first successful ping of every peer. */
  joinToPingMs?: number
}

/** Seconds since the CLI started, as its progress lines print them: "[  1.2s] …". */
const stamp = (line: string | undefined) => Number(/^\[\s*([\d.]+)s\]/.exec(line ?? '')?.[1] ?? NaN)

type Show = (node: string, argv: string[]) => void
type Indent = (text: string) => void

const show: Show = (node, argv) => console.log(`\n${node}# tinc-consul ${argv.map((a) => (a.length > 60 ? `${a.slice(0, 40)}…` : a)).join(' ')}`)
const indent: Indent = (text) => console.log(text.trimEnd().replace(/^/gm, '    '))

/**
 * The story of issue 4 on a running lab (started without tinc configs): `init`
 * on the first node, then an invite and a `join` for each of the others, and
 * how long each new node takes to reach every peer. Then services (issue 6),
 * and groups with the reachability matrix before and after an association
 * (issue 20, src/lab/demo-groups.ts).
 */
export async function runJoinDemo(lab: Lab, opts: DemoOptions): Promise<{ joined: Joined[]; failures: number }> {
  const joined = await initAndJoin(lab, opts)
  console.log('\nnodes:')
  for (const j of joined)
    console.log(
      `  ${j.name.padEnd(8)} ${j.address.padEnd(12)} ${(j.behindNat ? 'behind NAT' : 'public').padEnd(11)} ${j.via.padEnd(20)} ${j.joinToPingMs === undefined ? '' : `join → ping all: ${(j.joinToPingMs / 1000).toFixed(2)} s`}`,
    )
  let failures = await reachTables(lab, joined)
  const asker = joined.at(-1)
  const target = joined[0]
  if (asker && target) {
    for (const q of [`${target.name}.mesh`, target.address]) {
      show(asker.name, ['resolve', q])
      indent((await lab.cli(asker.name, ['resolve', q], { allowFailure: true })).stdout)
    }
  }
  failures += await servicesDemo(lab, joined, show, indent)
  const viewer = joined.at(-1)
  if (viewer) {
    // What an operator looks at first: this node's picture of the mesh.
    console.log(`\nstatus: the mesh as ${viewer.name} sees it (tincd's own dump, the hooks, Consul)`)
    show(viewer.name, ['status'])
    const st = await lab.cli(viewer.name, ['status', '--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, viewer.name)], { allowFailure: true })
    indent(st.code === 0 ? st.stdout : `FAILED: ${st.stderr.trim()}`)
    if (st.code !== 0) failures++
  }
  const times = joined.flatMap((j) => (j.joinToPingMs === undefined ? [] : [j.joinToPingMs]))
  const worst = Math.max(...times)
  console.log(
    `\njoin → ping every peer, after key generation: worst ${(worst / 1000).toFixed(2)} s, mean ${(times.reduce((a, b) => a + b, 0) / times.length / 1000).toFixed(2)} s over ${times.length} joins (target <= 3 s: ${worst <= 3000 ? 'met' : 'MISSED'})`,
  )
  failures += await groupsDemo(lab, joined, { show, indent })
  return { joined, failures }
}

/** `init` on the first node, then an invite and a join for every other, each timed from key generation to pinging every peer. */
async function initAndJoin(lab: Lab, opts: DemoOptions): Promise<Joined[]> {
  const { plan } = lab.state
  const [first, second, ...rest] = plan.nodes
  if (!first || !second) throw new LabError('LAB_EMPTY', 'the demo needs at least two nodes')
  const key = ['--key-size', String(opts.keyBits)]
  const operator = { ...process.env, TINC_CONSUL_TOKEN: lab.state.managementToken ?? '' }
  const startNode = async (name: string) => {
    await lab.restartTincd(name)
    await lab.startSidecar(name)
  }
  const initArgs = ['init', '--net', LAB_NETNAME, '--name', first.name, '--cidr', plan.options.vpnCidr, '--address', first.publicIp, ...key]
  show(first.name, initArgs)
  const init = await lab.cli(first.name, [...initArgs, ...lab.setupFlags(first.name)], { env: operator })
  indent(init.stdout)
  await startNode(first.name)
  const joined: Joined[] = [{ name: first.name, address: /This node has address (\S+)\.$/m.exec(init.stdout)?.[1] ?? '?', behindNat: false, via: 'init' }]

  for (const n of [second, ...rest]) {
    // The second public node may serve joins itself, so losing the first doesn't stop anyone joining.
    const inviter = n === second || joined.length % 2 === 1 ? first.name : second.name
    const inviteArgs = ['invite', '--net', LAB_NETNAME, ...(n.behindNat ? [] : ['--name', n.name, '--serve-joins'])]
    show(inviter, inviteArgs)
    const inv = (await lab.cli(inviter, [...inviteArgs, '--config-dir', labConfigDir(lab.state.runDir, inviter)])).stdout.trim()
    console.log(`    ${inv.slice(0, 72)}…`)
    const joinArgs = ['join', inv, '--name', n.name, ...(n.behindNat ? [] : ['--address', n.publicIp]), ...key]
    show(n.name, joinArgs)
    const res = await lab.cli(n.name, [...joinArgs, ...lab.setupFlags(n.name)])
    const exited = performance.now()
    indent(res.stdout)
    const lines = res.stdout.split('\n')
    // The CLI's own clock: from the first step after key generation to its last line.
    const afterKeygen = stamp(lines.find((l) => /redeeming the invite/.test(l)))
    const lastStep = stamp(lines.filter((l) => /^\[/.test(l)).at(-1))
    const keygenDone = exited - (lastStep - afterKeygen) * 1000
    const address = /^Joined \S+ as \S+ with address (\S+)\.$/m.exec(res.stdout)?.[1] ?? '?'
    await startNode(n.name)
    const peers = joined.map((j) => j.address)
    await Promise.all(peers.map((ip) => waitForPing(lab, n.name, ip)))
    const ms = performance.now() - keygenDone
    opts.step(`${n.name} reaches all ${peers.length} peers ${(ms / 1000).toFixed(2)} s after its key was generated`)
    joined.push({ name: n.name, address, behindNat: n.behindNat, via: `invite from ${inviter}`, joinToPingMs: ms })
  }
  return joined
}

const waitForPing = (lab: Lab, from: string, ip: string) =>
  waitFor(`${from} to ping ${ip}`, async () => ((await lab.exec(from, ['ping', '-c1', '-W1', ip], { allowFailure: true })).code === 0 ? true : undefined), {
    timeoutMs: 60_000,
    intervalMs: 50,
  })

/** Every node pings every other over the VPN and asks its own DNS server for every name; returns the failures. */
async function reachTables(lab: Lab, joined: Array<Pick<Joined, 'name' | 'address'>>): Promise<number> {
  console.log('\nping over the VPN (rows ping columns):')
  console.log(`  ${''.padEnd(8)}${joined.map((j) => j.name.padEnd(9)).join('')}`)
  let failures = 0
  for (const a of joined) {
    const cells = await Promise.all(joined.map(async (b) => (a === b ? '-' : (await lab.exec(a.name, ['ping', '-c1', '-W2', b.address], { allowFailure: true })).code === 0 ? 'ok' : 'FAIL')))
    failures += cells.filter((c) => c === 'FAIL').length
    console.log(`  ${a.name.padEnd(8)}${cells.map((c) => c.padEnd(9)).join('')}`)
  }
  console.log("\nnames over the VPN: each row asks its own DNS server (dig @its VPN address) for each column's NODE.mesh")
  console.log(`  ${''.padEnd(8)}${joined.map((j) => j.name.padEnd(9)).join('')}`)
  for (const a of joined) {
    // The newest node's daemon may still be binding its VPN address (it appears when tinc-up runs): wait a little, like the pings do.
    const answers = async (b: Pick<Joined, 'name' | 'address'>) =>
      (await lab.exec(a.name, ['dig', '+short', '+time=1', `@${a.address}`, `${b.name.replace(/_/g, '-')}.mesh`], { allowFailure: true })).stdout.trim() === b.address
    const cells = await Promise.all(
      joined.map((b) => waitFor(`${a.name} to resolve ${b.name}`, async () => ((await answers(b)) ? 'ok' : undefined), { timeoutMs: 15_000, intervalMs: 100 }).catch(() => 'FAIL')),
    )
    failures += cells.filter((c) => c === 'FAIL').length
    console.log(`  ${a.name.padEnd(8)}${cells.map((c) => c.padEnd(9)).join('')}`)
  }
  return failures
}

/**
 * Issue 6's story: one node declares a web service with an HTTP check, a real server
 * starts on its VPN address, and another node finds it by name.
 */
async function servicesDemo(lab: Lab, joined: Joined[], show: (node: string, argv: string[]) => void, indent: (text: string) => void): Promise<number> {
  const host = joined[1]
  const asker = joined.at(-1)
  if (!host || !asker) return 0
  const flags = ['--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, host.name)]
  console.log(`\nservices: ${host.name} declares a web service; Consul checks it; every node's DNS serves it while it is healthy`)
  const addArgs = ['service', 'add', 'web', '--port', '8080', '--check', 'http:/', '--tag', 'demo']
  show(host.name, addArgs)
  indent((await lab.cli(host.name, [...addArgs, ...flags])).stdout)
  const server = `require('node:http').createServer((q, r) => r.end('hello from ${host.name}\\n')).listen(8080, '${host.address}')`
  console.log(`\n${host.name}# (a web server on ${host.address}:8080)`)
  await lab.spawn(host.name, 'demo-web', [process.execPath, '-e', server])
  const askerFlags = ['--net', LAB_NETNAME, '--config-dir', labConfigDir(lab.state.runDir, asker.name)]
  const seen = await waitFor(
    `${asker.name} to resolve web.service.mesh`,
    async () => ((await lab.cli(asker.name, ['resolve', 'web.service.mesh', '--type', 'SRV', ...askerFlags], { allowFailure: true })).code === 0 ? true : undefined),
    { timeoutMs: 30_000, intervalMs: 250 },
  ).catch(() => false)
  for (const argv of [
    ['resolve', 'web.service.mesh', '--type', 'SRV', '--verbose'],
    ['service', 'ls', '--all'],
  ]) {
    show(asker.name, argv)
    indent((await lab.cli(asker.name, [...argv, ...askerFlags], { allowFailure: true })).stdout)
  }
  show(host.name, ['service', 'ls'])
  indent((await lab.cli(host.name, ['service', 'ls', ...flags], { allowFailure: true })).stdout)
  return seen ? 0 : 1
}
