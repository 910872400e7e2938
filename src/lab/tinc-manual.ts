import { chmod, mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { run } from '../util/exec.ts'
import { replaceManagedBlock } from '../tinc/conf-block.ts'
import { tincTimerLines } from '../tinc/setup.ts'
import type { LabNodePlan, LabPlan } from './topology.ts'

/**
 * Hand-written tinc configs for the lab's smoke test and demo: the state a
 * person reaches today by copying host files around. Later features replace
 * this with `tinc-consul init`/`join` on the same lab.
 */
/** The lab's one tinc network. */
export const LAB_NETNAME = 'lab'

export interface TincNodeFiles {
  /** Like /etc/tinc: the net's directory is `<root>/lab`. */
  root: string
  dir: string
  pidFile: string
  logFile: string
}

export function tincPaths(runDir: string, node: LabNodePlan): TincNodeFiles {
  const base = join(runDir, node.name)
  return { root: join(base, 'etc-tinc'), dir: join(base, 'etc-tinc', LAB_NETNAME), pidFile: join(base, 'tinc.pid'), logFile: join(base, 'tinc.log') }
}

export function sidecarStateDir(runDir: string, node: LabNodePlan): string {
  return join(runDir, node.name, 'sidecar-state')
}

export async function writeManualTincConfigs(plan: LabPlan, runDir: string, keyBits = 2048): Promise<void> {
  const publics = plan.nodes.filter((n) => !n.behindNat)
  const prefixLen = plan.options.vpnCidr.split('/')[1]
  const hostFiles = new Map<string, string>()
  for (const node of plan.nodes) {
    const { dir } = tincPaths(runDir, node)
    await mkdir(join(dir, 'hosts'), { recursive: true })
    const targets = plan.options.hostFiles === 'seed' ? publics.slice(0, 1) : publics
    const connectTo = targets.filter((p) => p.name !== node.name).map((p) => `ConnectTo = ${p.name}`)
    // StrictSubnets: tinc accepts only the subnets written in local host files. ConnectTo goes in
    // the managed block, where the sidecar takes over once it runs. Timers as init writes them
    // (see TincTimers in setup.ts).
    const conf = [`Name = ${node.name}`, 'AddressFamily = ipv4', 'Interface = tinc0', 'StrictSubnets = yes', ...tincTimerLines(), ''].join('\n')
    await writeFile(join(dir, 'tinc.conf'), replaceManagedBlock(conf, connectTo))
    const header = [...(node.behindNat ? [] : [`Address = ${node.publicIp}`]), 'Port = 655', `Subnet = ${node.vpnIp}/32`, '']
    await writeFile(join(dir, 'hosts', node.name), header.join('\n'))
    // tincd -K appends the public key to hosts/<Name> and never prompts when stdin is not a terminal.
    await run(['tincd', '-c', dir, '-K', String(keyBits)], { timeoutMs: 60_000 })
    hostFiles.set(node.name, await readFile(join(dir, 'hosts', node.name), 'utf8'))
    const up = `#!/bin/sh\nip addr add ${node.vpnIp}/${prefixLen} dev "$INTERFACE"\nip link set "$INTERFACE" up\n`
    const down = `#!/bin/sh\nip link set "$INTERFACE" down\n`
    await writeFile(join(dir, 'tinc-up'), up)
    await writeFile(join(dir, 'tinc-down'), down)
    await chmod(join(dir, 'tinc-up'), 0o755)
    await chmod(join(dir, 'tinc-down'), 0o755)
  }
  // The manual step tinc-consul exists to remove: copying host files around ("seed": just node1's).
  const seed = plan.nodes[0]?.name
  for (const node of plan.nodes) {
    const { dir } = tincPaths(runDir, node)
    for (const [peer, text] of hostFiles) {
      if (peer === node.name || (plan.options.hostFiles === 'seed' && peer !== seed)) continue
      await writeFile(join(dir, 'hosts', peer), text)
    }
  }
}

export function tincdArgv(files: TincNodeFiles, netname: string): string[] {
  // -D keeps tincd in the foreground so the lab owns the process; -n only names the net for scripts.
  return ['tincd', '-n', netname, '-c', files.dir, '-D', `-d${process.env.TINC_CONSUL_LAB_TINC_DEBUG ?? '1'}`, `--pidfile=${files.pidFile}`, `--logfile=${files.logFile}`]
}

/** Per-node stand-ins for /etc/tinc-consul and /run/tinc-consul. */
export const labConfigDir = (runDir: string, node: string): string => join(runDir, node, 'etc-tinc-consul')
export const labEventsDir = (runDir: string, node: string): string => join(runDir, node, 'run-tinc-consul')
