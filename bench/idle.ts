/* eslint-disable no-console -- a benchmark prints its figures */
// npm run bench:idle -- [--seconds 60] [--settle 60] [--nodes 3] [--connect-to 3|all]
//
// What a sidecar costs on a quiet mesh: a lab with hand-written tinc configs and ACLs, a sidecar on
// every node, then nothing happens for --seconds. For each node it prints the sidecar's wake-ups
// (context switches of all its threads) per second, CPU share and resident memory, next to the
// same node's tincd as the reference measured in the same run. The sidecars run the build (dist/,
// TINC_CONSUL_LAB_BUILD=1, as `npm run bench:idle` sets), not the source through tsx, whose loader
// thread and compiler would be measured too. Start-up's garbage is collected in the first minute
// (V8's memory reducer), so the measurement starts after --settle seconds.
import { readdirSync, readFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { labUp } from '../src/lab/lab.ts'
import { pidsIn } from '../src/lab/netns.ts'

const { values } = parseArgs({
  options: { seconds: { type: 'string', default: '60' }, nodes: { type: 'string', default: '3' }, 'connect-to': { type: 'string', default: '3' }, settle: { type: 'string', default: '60' } },
})
const SECONDS = Number(values.seconds)
const NODES = Number(values.nodes)
if (!(SECONDS >= 5 && SECONDS <= 3600) || !(NODES >= 2 && NODES <= 10)) throw new Error('usage: --seconds 5..3600 --nodes 2..10')
/** USER_HZ on Linux: /proc counts CPU time in these. */
const TICKS_PER_S = 100

interface Sample {
  switches: number
  ticks: number
  rssKb: number
}

/** All threads: libuv's and V8's wake up on the main thread's behalf. */
function sample(pid: number): Sample {
  const rssKb = Number(/^VmRSS:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN)
  let switches = 0
  let ticks = 0
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    const status = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8')
    for (const f of ['voluntary_ctxt_switches', 'nonvoluntary_ctxt_switches']) switches += Number(new RegExp(`^${f}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0)
    // The command may hold spaces: fields are counted after its closing parenthesis (utime, stime are 14 and 15).
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8')
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    ticks += Number(rest[11]) + Number(rest[12])
  }
  return { switches, ticks, rssKb }
}

const comm = (pid: number) => readFileSync(`/proc/${pid}/comm`, 'utf8').trim()
const cmdline = (pid: number) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ')

const lab = await labUp({ nodes: NODES, nat: 1, consulServers: 1, acl: true, tinc: true })
try {
  await lab.writeNetwork()
  const names = lab.state.plan.nodes.map((n) => n.name)
  for (const n of names) await lab.startSidecar(n, { env: { TINC_CONSUL_CONNECT_TO: values['connect-to'] } })
  await lab.waitForMesh()
  const procs = names.map((n) => {
    const pids = pidsIn(lab.nsOf(n))
    const sidecar = pids.find((p) => comm(p) === 'node' && / run --net /.test(cmdline(p)))
    const tincd = pids.find((p) => comm(p) === 'tincd')
    if (!sidecar || !tincd) throw new Error(`${n}: no sidecar or tincd found`)
    return { node: n, sidecar, tincd }
  })
  // Let start-up settle: the first renders, DNS and status binding, the agents' anti-entropy, the GC after them.
  await new Promise((r) => setTimeout(r, Number(values.settle) * 1000))
  const before = procs.map((p) => ({ s: sample(p.sidecar), t: sample(p.tincd) }))
  await new Promise((r) => setTimeout(r, SECONDS * 1000))
  const after = procs.map((p) => ({ s: sample(p.sidecar), t: sample(p.tincd) }))
  console.log(`${SECONDS} s of a quiet ${names.length}-node mesh (ACLs on, --connect-to ${values['connect-to']}), per node:`)
  console.log('node      sidecar wake-ups/s  CPU %   RSS MB   tincd wake-ups/s  CPU %   ratio (wake-ups)')
  procs.forEach((p, i) => {
    const b = before[i]
    const a = after[i]
    if (!a || !b) return
    const rate = (x: Sample, y: Sample) => (y.switches - x.switches) / SECONDS
    const cpu = (x: Sample, y: Sample) => ((y.ticks - x.ticks) / TICKS_PER_S / SECONDS) * 100
    const sw = rate(b.s, a.s)
    const tw = rate(b.t, a.t)
    console.log(
      `${p.node.padEnd(9)} ${sw.toFixed(2).padStart(18)} ${cpu(b.s, a.s).toFixed(2).padStart(6)} ${(a.s.rssKb / 1024).toFixed(0).padStart(8)}   ${tw.toFixed(2).padStart(16)} ${cpu(b.t, a.t).toFixed(2).padStart(6)}   ${tw > 0 ? (sw / tw).toFixed(1) : '-'}`,
    )
  })
} finally {
  lab.down()
}
