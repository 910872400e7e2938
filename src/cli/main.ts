import { defineCommand, runCommand, showUsage, type CommandDef } from 'citty'
import { TincConsulError } from '../errors.ts'
import { VERSION } from '../version.ts'
import { preloadConfig } from '../config-file.ts'

// Flag defaults read the environment when the command modules load, so the network's
// config file must be in the environment first: hence the commands are imported on use, below.
try {
  preloadConfig(process.argv.slice(2))
} catch (err) {
  console.error(`tinc-consul: ${(err as Error).message}`)
  process.exit(2)
}
export const main = defineCommand({
  meta: { name: 'tinc-consul', version: VERSION, description: 'Keeps a tinc mesh VPN in sync through Consul: host files, addresses, names and services' },
  args: {
    debug: { type: 'boolean', description: 'Show stack traces and error causes', default: false },
  },
  // Loaded on use: the daemon doesn't carry the lab, install or join code in its memory.
  subCommands: {
    init: () => import('./init.ts').then((m) => m.initCommand),
    invite: () => import('./invite.ts').then((m) => m.inviteCommand),
    join: () => import('./join.ts').then((m) => m.joinCommand),
    adopt: () => import('./adopt.ts').then((m) => m.adoptCommand),
    run: () => import('./run.ts').then((m) => m.runCommand),
    revoke: () => import('./admin.ts').then((m) => m.revokeCommand),
    pin: () => import('./admin.ts').then((m) => m.pinCommand),
    resolve: () => import('./dns.ts').then((m) => m.resolveCommand),
    alias: () => import('./dns.ts').then((m) => m.aliasCommand),
    subnet: () => import('./subnet.ts').then((m) => m.subnetCommand),
    group: () => import('./group.ts').then((m) => m.groupCommand),
    hosts: () => import('./dns.ts').then((m) => m.hostsCommand),
    service: () => import('./service.ts').then((m) => m.serviceCommand),
    status: () => import('./status.ts').then((m) => m.statusCommand),
    graph: () => import('./status.ts').then((m) => m.graphCommand),
    install: () => import('./install.ts').then((m) => m.installCommand),
    uninstall: () => import('./install.ts').then((m) => m.uninstallCommand),
    lab: () => import('./lab.ts').then((m) => m.labCommand),
  },
})

/** Follows argv through subcommands so `tinc-consul lab up --help` shows the help for `lab up`. */
async function resolveCommand(cmd: CommandDef, argv: string[]): Promise<{ cmd: CommandDef; parent?: CommandDef }> {
  let current: CommandDef = cmd
  let parent: CommandDef | undefined
  for (const arg of argv) {
    if (arg === '--') break
    const subs = (typeof current.subCommands === 'function' ? await current.subCommands() : await current.subCommands) as Record<string, CommandDef | (() => Promise<CommandDef>)> | undefined
    const next = subs?.[arg]
    if (!next) continue
    parent = current
    current = typeof next === 'function' ? await next() : next
  }
  return { cmd: current, parent }
}

/** citty reports bad argv as CLIError with codes like EARG or E_UNKNOWN_COMMAND. */
function isCittyUsageError(err: unknown): boolean {
  return err instanceof Error && err.name === 'CLIError'
}

function describeError(err: unknown, debug: boolean): string {
  if (debug) {
    const parts: string[] = []
    for (let e: unknown = err; e; e = (e as { cause?: unknown }).cause) parts.push(e instanceof Error ? (e.stack ?? e.message) : String(e))
    return parts.join('\ncaused by: ')
  }
  if (err instanceof TincConsulError) return err.message
  if (isCittyUsageError(err)) return `${(err as Error).message} (see --help)`
  return `unexpected error: ${err instanceof Error ? err.message : String(err)} (run with --debug for details)`
}

export async function cli(argv: string[]): Promise<void> {
  const before = argv.includes('--') ? argv.slice(0, argv.indexOf('--')) : argv
  const debug = before.includes('--debug')
  if (debug) process.env.TINC_CONSUL_LOG_LEVEL ??= 'debug'
  try {
    if (before.includes('--help') || before.includes('-h')) {
      const { cmd, parent } = await resolveCommand(main as CommandDef, before)
      await showUsage(cmd, parent)
      return
    }
    if (before.length === 1 && (before[0] === '--version' || before[0] === '-v')) {
      console.log(VERSION)
      return
    }
    if (before.filter((a) => !a.startsWith('-')).length === 0) {
      await showUsage(main)
      process.exitCode = 2
      return
    }
    await runCommand(main, { rawArgs: argv })
  } catch (err) {
    if (err instanceof Error && (err as { code?: unknown }).code === 'E_NO_COMMAND') {
      // `tinc-consul lab` alone: show what `lab` can do rather than a bare error.
      const { cmd, parent } = await resolveCommand(main as CommandDef, before)
      await showUsage(cmd, parent)
      process.exitCode = 2
      return
    }
    console.error(`tinc-consul: ${describeError(err, debug)}`)
    process.exitCode = isCittyUsageError(err) || (err instanceof TincConsulError && err.name === 'UsageError') ? 2 : 1
  }
}

await cli(process.argv.slice(2))
