import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { DEFAULT_CONFIG_DIR } from '../config-file.ts'
import { TincConsulError } from '../errors.ts'
import { tincDirFor } from '../tinc/setup.ts'
import { applyInstall, printPlan, type Say, type StepRunner } from './apply.ts'
import { hclValue, planNodeInstall, type NodeInstallOptions } from './node.ts'
import { CONSUL_CONFIG_FILE } from './plan.ts'

/** Whether systemd is the init here: the check systemd's own sd_booted() makes. */
export const systemdRunning = (): boolean => existsSync('/run/systemd/system')

/**
 * The last step of `join` (and of `init` where install set up the local Consul
 * agent): what `install` would do for this node, through the same planner.
 *
 * - `install: false` (--no-install): nothing; the next steps are printed, `install` first.
 * - systemd runs here: the units and the Consul config are written, then enabled and started.
 * - a packaging or test tree (`root` other than /): the files are written there and the
 *   commands that start what the units would are printed; no systemctl.
 * - no systemd: nothing is written; the exact commands are printed, `install` first.
 */
export interface FinishOptions extends Omit<NodeInstallOptions, 'systemctl'> {
  /** The command finishing ("join", "init"), for messages. */
  command: string
  install: boolean
  dryRun: boolean
  /** Whether to run systemctl: systemd runs here and files go to the live system. */
  systemd: boolean
  /** '/' on a real machine; a packaging or test tree otherwise. */
  root: string
  /** install's manifest, for uninstall. */
  manifest: string
  say: Say
  run?: StepRunner
  /** Why nothing is installed, when it isn't --no-install or a missing systemd (init: a Consul agent install didn't set up). */
  notInstalledBecause?: string
  /** Replaces stand-ins in what a dry run prints (join's, before the reply exists). */
  describe?: (line: string) => string
}

export type FinishOutcome = 'installed' | 'files' | 'printed'

export async function finishNode(o: FinishOptions): Promise<FinishOutcome> {
  const say = o.describe ? (l: string) => o.say(o.describe?.(l) ?? l) : o.say
  if (!o.install || (!o.systemd && o.root === '/')) {
    say(`\n${o.dryRun ? 'Then nothing would be installed' : 'Nothing was installed'} (${o.notInstalledBecause ?? (!o.install ? '--no-install' : 'systemd is not running here')}). Next:`)
    for (const c of nextCommands(o)) say(`  ${c}`)
    return 'printed'
  }
  const plan = await planNodeInstall({ ...o, systemctl: o.systemd }).catch((err: unknown) => {
    throw failed(o, err)
  })
  if (o.dryRun) {
    say(`\nThen, as \`${installCommand(o)}\` would:`)
    printPlan(plan.steps, say)
  } else {
    say(`\nInstalling ${o.systemd ? 'and starting the units' : `under ${o.root}`}:`)
    await applyInstall(plan.steps, { manifest: o.manifest, say, run: o.run }).catch((err: unknown) => {
      throw failed(o, err)
    })
  }
  if (o.systemd) {
    if (!o.dryRun) say(`\n${o.net} is running: \`systemctl status tinc@${o.net} tinc-consul@${o.net}\`, \`tinc-consul status --net ${o.net}\`.`)
    return 'installed'
  }
  say(`\nFiles are under ${o.root}: no systemctl was run. What the units would start:`)
  for (const c of startCommands(o)) say(`  ${c}`)
  return 'files'
}

/** After a real join or init the node exists and the invite is spent: the error says so, and how to finish by hand. */
function failed(o: FinishOptions, err: unknown): unknown {
  if (o.dryRun) return err
  const why = err instanceof Error ? err.message : String(err)
  return new TincConsulError('INSTALL_FAILED', `${o.command} set the node up, but installing it failed: ${why}\nFix that, then run: ${installCommand(o)}`, { cause: err })
}

/** The `tinc-consul install` that does what this finish step does, with the paths that differ from the defaults. */
export function installCommand(o: FinishOptions): string {
  const role = o.role === 'server' ? ' --consul-server' : o.role === 'client' ? ' --consul-client' : ''
  const flags = [
    ...(o.tincRoot !== '/etc/tinc' ? [`--dir ${o.tincRoot}`] : []),
    ...(o.settingsDir !== DEFAULT_CONFIG_DIR ? [`--config-dir ${o.settingsDir}`] : []),
    ...(o.root !== '/' ? [`--root ${o.root}`] : []),
  ]
  return `tinc-consul install --net ${o.net}${role}${flags.map((f) => ` ${f}`).join('')}`
}

/** What the units run (with the files where they were written), in the order that works by hand: tincd makes the VPN address the agent binds to. */
function startCommands(o: FinishOptions): string[] {
  const run = `${o.bin} run --net ${o.net}${o.settingsDir !== DEFAULT_CONFIG_DIR ? ` --config-dir ${o.settingsDir}` : ''}`
  return [
    `tincd -n ${o.net} -c ${tincDirFor(o.tincRoot, o.net)} --logfile        # tinc@${o.net}`,
    ...(o.role ? [`${o.consulBin} agent -config-dir=${o.consulFileDir} &        # consul`] : []),
    `${run}        # tinc-consul@${o.net}`,
  ]
}

/** Without an install: `install` first (on systemd it also starts everything), then what to start by hand without systemd. */
function nextCommands(o: FinishOptions): string[] {
  const install = `${installCommand(o)}        # ${o.role ? `the Consul ${o.role} agent's config on the VPN address, ` : ''}the units${o.systemd ? ', enabled and started' : ''}`
  return o.systemd ? [install] : [install, ...startCommands(o)]
}

/**
 * The role of the Consul agent install set up here (its config names it), or
 * undefined when install wrote none: `init` finishes with an install only then.
 */
export async function installedConsulRole(consulFileDir: string): Promise<'server' | 'client' | undefined> {
  const server = await hclValue(join(consulFileDir, CONSUL_CONFIG_FILE), 'server')
  return server === 'true' ? 'server' : server === 'false' ? 'client' : undefined
}

/** Valid values (TEST-NET addresses, an all-zero token and key) standing in for the join reply's. */
const STAND_IN = { address: '192.0.2.1', server: '192.0.2.2', token: '00000000-0000-0000-0000-000000000000', gossipKey: `${'A'.repeat(43)}=` }
const STAND_IN_LABEL: Record<string, string> = {
  [STAND_IN.address]: '<VPN address from the reply>',
  [STAND_IN.server]: '<Consul servers from the reply>',
  [STAND_IN.token]: '<node token from the reply>',
  [STAND_IN.gossipKey]: '<gossip key from the reply>',
}

/**
 * What `join --dry-run` plans the install with: the reply doesn't exist yet, so stand-ins
 * take the place of its address, token, servers and gossip key, and are named when printed.
 */
export function fromInviteAlone(name: string): Pick<FinishOptions, 'known' | 'describe'> {
  return {
    known: {
      node: { name, vpnAddress: STAND_IN.address },
      settings: { TINC_CONSUL_TOKEN: STAND_IN.token, TINC_CONSUL_CONSUL_SERVERS: STAND_IN.server, TINC_CONSUL_GOSSIP_KEY: STAND_IN.gossipKey },
    },
    describe: (line) => Object.entries(STAND_IN_LABEL).reduce((l, [value, label]) => l.replaceAll(value, label), line),
  }
}
